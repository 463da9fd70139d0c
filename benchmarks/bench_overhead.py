"""What patching costs at run time: forward time patched vs unpatched (interleaved in one process, median of
repeats), patch_model wall time, and generation tokens/s with a KV cache for static and dynamic methods.

Usage:
    python benchmarks/bench_overhead.py [--model smollm2] [--tokens 1024] [--repeats 5] [--new-tokens 32]
        [--methods yarn,dynamic_ntk,dynamic_yarn] [--out benchmarks/results/overhead.json]
    python benchmarks/bench_overhead.py --report-only     # the table of benchmarks/RESULTS.md from the JSON, no model

Ratios > 1 mean the patched model is slower. Both models are the same object: each repeat runs unpatched, then
patched (patch_model / unpatch_model in between), so machine load affects both sides alike.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def table(rows: list[dict]) -> str:
    """The markdown table of benchmarks/RESULTS.md section 3."""
    lines = ["| method | patch_model first / median (ms) | forward unpatched (s) | forward patched (s) | ratio "
             "| gen tok/s unpatched | gen tok/s patched | speed ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['patch_model_ms']} / {r['patch_model_ms_median']} | "
                     f"{r['forward_s_unpatched']} | {r['forward_s_patched']} | {r['forward_ratio']} | "
                     f"{r['gen_tok_s_unpatched']} | {r['gen_tok_s_patched']} | {r['gen_ratio']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="folder, .gguf, hub id or the offline alias smollm2")
    p.add_argument("--tokens", type=int, default=1024, help="forward length (also the generation prompt length)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--factor", type=float, default=4.0)
    p.add_argument("--methods", default="yarn,dynamic_ntk,dynamic_yarn")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "overhead.json"))
    p.add_argument("--report-only", action="store_true", help="print the table from --out; no model, no measurement")
    args = p.parse_args(argv)
    if args.report_only:
        print(table(json.loads(Path(args.out).read_text())["rows"]))
        return 0

    import pydoc_data.topics

    import torch

    from hf_rope_ext import patch_model, unpatch_model
    from hf_rope_ext.loading import load_model

    load_before = os.getloadavg()
    model, tok = load_model(args.model, device=args.device)
    text = "\n\n".join(pydoc_data.topics.topics.values())
    ids = tok(text, return_tensors="pt").input_ids[:, 20000 : 20000 + args.tokens].to(args.device)
    torch.set_grad_enabled(False)
    model(ids[:, :64])  # warm-up

    rows = []
    for method in args.methods.split(","):
        patch = functools.partial(patch_model, model, method, args.factor)
        generate = functools.partial(model.generate, ids, max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        forward = functools.partial(model, ids)
        t_patch = timed(patch)
        unpatch_model(model)
        base_f, patched_f, base_g, patched_g, patch_times = [], [], [], [], []
        for _ in range(args.repeats):
            base_f.append(timed(forward))
            base_g.append(timed(generate))
            patch_times.append(timed(patch))
            patched_f.append(timed(forward))
            patched_g.append(timed(generate))
            unpatch_model(model)
        row = {
            "method": method,
            "patch_model_ms": round(t_patch * 1000, 2),
            "patch_model_ms_median": round(statistics.median(patch_times) * 1000, 2),
            "forward_s_unpatched": round(statistics.median(base_f), 4),
            "forward_s_patched": round(statistics.median(patched_f), 4),
            "forward_ratio": round(statistics.median(patched_f) / statistics.median(base_f), 3),
            "gen_tok_s_unpatched": round(args.new_tokens / statistics.median(base_g), 2),
            "gen_tok_s_patched": round(args.new_tokens / statistics.median(patched_g), 2),
            "gen_ratio": round(statistics.median(base_g) / statistics.median(patched_g), 3),
        }
        rows.append(row)
        print(json.dumps(row))

    load_after = os.getloadavg()
    print(f"\nload average (1/5/15 min) before {load_before}, after {load_after}")
    print(f"\nmodel {args.model}, {args.tokens} tokens, {args.repeats} repeats, {args.new_tokens} new tokens, "
          f"device {args.device}, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "report_only"}
    out.write_text(json.dumps({"args": settings, "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M"),
                               "load_average_before": load_before, "load_average_after": load_after,
                               "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                               "torch": torch.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
