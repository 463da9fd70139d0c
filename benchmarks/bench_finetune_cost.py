"""Benchmark 4: what the fine-tune recipe costs against a plain transformers training loop.

Usage::

    python benchmarks/bench_finetune_cost.py                       # SmolLM2-135M, 1024 tokens, batch 1, 4 steps, CPU
    python benchmarks/bench_finetune_cost.py --device cuda --seq-len 4096 --steps 20
    python benchmarks/bench_finetune_cost.py --model /path/to/testbed --seq-len 1024 --steps 10
    python benchmarks/bench_finetune_cost.py --report-only

Four configurations on the same model, method (``--method`` x ``--factor``), sequence length, batch and number of
optimizer steps, full fine-tuning with AdamW (same lr, clipping at 1.0), each in its own subprocess so that peak
memory is that configuration's own:

* ``recipe`` — ``hf_rope_ext.recipes.finetune.run()`` (accelerate, data packing, checkpoint-free run, final save);
* ``plain`` — ``load_model`` + ``patch_model``, then a bare ``for`` loop: forward with labels, backward, clip, step;
* ``recipe+gc`` / ``plain+gc`` — the same with gradient checkpointing (``gradient_checkpointing_enable``,
  non-reentrant).

tokens/s counts the training loop only (the recipe's ``training_summary.json`` ``tokens_per_s``; the plain loop timed
the same way, first step included). Peak memory: CUDA ``max_memory_allocated`` on GPU; on CPU the process's peak
resident set (``ru_maxrss``, what the recipe reports), which includes loading the model — identical in both since
both load through ``load_model``. The configurations run in the order given by ``--order`` (default
recipe, plain, plain+gc, recipe+gc, so neither side always runs first).

Writes ``benchmarks/results/finetune_cost_<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--method", default="yarn")
    p.add_argument("--factor", type=float, default=2.0)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--order", default="recipe,plain,plain+gc,recipe+gc")
    p.add_argument("--out", default=None)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tag = "cuda" if args.device.startswith("cuda") else args.device
    args.out = Path(args.out or RESULTS / f"finetune_cost_{tag}.json")
    return args


def peak_memory(device: str) -> tuple[int, str]:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"


def worker_recipe(args, gc: bool, workdir: Path) -> dict:
    from hf_rope_ext.recipes import finetune as recipe

    values = {
        "model": args.model, "method": args.method, "factor": args.factor, "train_mode": "full",
        "seq_len": args.seq_len, "data": ["builtin:pydoc"], "eval_chunks": 0, "eval_before_after": False,
        "max_steps": args.steps, "batch_size": args.batch, "grad_accum": 1, "lr": args.lr,
        "lr_scheduler": "constant", "warmup_steps": 0, "save_every": 0, "log_every": 1000,
        "gradient_checkpointing": gc, "output_dir": str(workdir / "run"), "cache_dir": str(workdir / "tokens"),
        "model_card": False, "overwrite": True, "mixed_precision": "no",
    }
    if args.device.startswith("cuda"):
        values["mixed_precision"] = "no"
    res = recipe.run(recipe.options_from_dict(values))
    s = res.summary  # a TrainingSummary
    return {"tokens_per_s": s.tokens_per_s, "wall_time_s": s.wall_time_s, "steps": s.steps, "tokens": s.tokens,
            "peak_memory_bytes": s.peak_memory_bytes, "peak_memory_kind": s.peak_memory_kind,
            "loss_last": s.final_loss}


def worker_plain(args, gc: bool) -> dict:
    import torch

    from hf_rope_ext import patch_model
    from hf_rope_ext.eval.text import load_text, tokenize
    from hf_rope_ext.loading import load_model

    model, tok = load_model(args.model, device=args.device)
    patch_model(model, args.method, factor=args.factor)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    ids = tokenize(tok, load_text("builtin:pydoc"))
    n = args.seq_len * args.batch
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    losses = []
    for step in range(args.steps):
        chunk = ids[step * n:(step + 1) * n].view(args.batch, args.seq_len).to(args.device)
        loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    wall = time.perf_counter() - t0
    mem, kind = peak_memory(args.device)
    return {"tokens_per_s": args.steps * n / wall, "wall_time_s": wall, "steps": args.steps, "tokens": args.steps * n,
            "peak_memory_bytes": mem, "peak_memory_kind": kind, "loss_last": losses[-1]}


def fmt_table(state: dict) -> str:
    m = state["meta"]
    lines = [f"{m['model']}, {m['method']} x{m['factor']:g}, full fine-tune, {m['seq_len']} tokens x batch "
             f"{m['batch']}, {m['steps']} steps, {m['device_name']}", "",
             "| configuration | tokens/s | loop wall (s) | peak memory (MiB) | memory kind | vs plain (tokens/s) |",
             "|---|---:|---:|---:|---|---:|"]
    rows = state["rows"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | – | – | – | {r['error'][:80]} | – |")
            continue
        base = rows.get("plain+gc" if name.endswith("+gc") else "plain", {})
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base.get("tokens_per_s") else float("nan")
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['wall_time_s']:.1f} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} | {r['peak_memory_kind']} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        gc = args.worker.endswith("+gc")
        with tempfile.TemporaryDirectory(prefix="bench_ft_") as tmp:
            r = worker_recipe(args, gc, Path(tmp)) if args.worker.startswith("recipe") else worker_plain(args, gc)
        print("RESULT " + json.dumps(r), flush=True)
        return 0
    if args.report_only:
        print(fmt_table(json.loads(args.out.read_text())))
        return 0
    import torch

    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads")
    state = {"meta": {"model": args.model, "method": args.method, "factor": args.factor, "seq_len": args.seq_len,
                      "batch": args.batch, "steps": args.steps, "lr": args.lr, "device": args.device,
                      "device_name": device_name, "torch": torch.__version__,
                      "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
                      "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}, "rows": {}}
    base_cmd = [sys.executable, str(Path(__file__).resolve())] + [a for a in (argv or sys.argv[1:])]
    for name in args.order.split(","):
        t0 = time.perf_counter()
        proc = subprocess.run(base_cmd + ["--worker", name], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            state["rows"][name] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            state["rows"][name] = json.loads(line[len("RESULT "):])
        state["rows"][name]["process_s"] = time.perf_counter() - t0
        print(f"[{name}] {state['rows'][name]}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(state, indent=1) + "\n")
    print(fmt_table(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
