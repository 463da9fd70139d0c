"""Benchmark 1: the real SmolLM2-135M (trained at 8192 tokens) zero-shot past its context, every rotary method.

Usage::

    python benchmarks/bench_zero_shot.py                      # CPU plan: 12k and 16k (factor 2), ~45 min on 2 cores
    python benchmarks/bench_zero_shot.py --device cuda        # GPU plan: 12k, 16k, 24k, 32k (factor 4), + passkey
    python benchmarks/bench_zero_shot.py --report-only        # tables from the JSON already written (--plots: PNG)
    python benchmarks/bench_zero_shot.py --report-only --block passkey   # one block of benchmarks/RESULTS.md
    python benchmarks/bench_zero_shot.py --methods yarn,ntk --lengths 12k,16k --passkey-top 0

Stages, each resumable (results go to ``--out`` after every method / passkey cell; what is already there is
skipped, so an interrupted run continues where it stopped):

1. Perplexity of one window per length on the offline text (``builtin:pydoc``, tokens from ``--offset`` 20000 — the
   stretch of the reference measurements), by 2048-token position bucket. Static methods: ONE forward at the longest
   length gives every shorter length exactly (``perplexity_at_lengths(share_forward=True)``: causal attention, so a
   prefix's losses do not depend on later tokens). Dynamic methods (frequencies depend on the total length) get one
   forward per length.
2. Passkey (``passkey_accuracy``) for the ``--passkey-top`` methods with the lowest perplexity past the trained
   length at the longest length, at ``--passkey-lengths`` x ``--passkey-depths``, ``--passkey-trials`` keys per cell.

``longrope`` needs searched per-dimension factors that SmolLM2 does not ship. With ``--longrope-from yarn`` (the
GPU default) it is run with yarn's per-dimension divisors as long factors (short factors 1), which makes it
NTK-by-parts with LongRoPE's attention factor sqrt(1 + ln s / ln L), evaluated per length (length-dependent); the
CPU plan leaves it out (``--longrope-from none``) because it would cost two more long forwards for a near-duplicate.

Writes ``benchmarks/results/zero_shot_<device>.json``, ``..._positions.png`` (perplexity by position at the longest
length) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
ORIGINAL = 8192
BLOCKS = ("perplexity", "buckets", "passkey")


def parse_length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cpu", help="cpu (default plan: 12k,16k) or cuda (plan: 12k..32k)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--methods", default=None, help="comma list; default every rotary method in the registry")
    p.add_argument("--lengths", default=None, help="default cpu 12k,16k; cuda 12k,16k,24k,32k")
    p.add_argument("--factor", type=float, default=None, help="default longest length / 8192")
    p.add_argument("--bucket-size", type=int, default=2048)
    p.add_argument("--offset", type=int, default=20000)
    p.add_argument("--text", default="builtin:pydoc")
    p.add_argument("--dtype", default=None, help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--longrope-from", choices=["none", "yarn"], default=None,
                   help="factor set for longrope (default: none on cpu = skipped, yarn on cuda)")
    p.add_argument("--passkey-top", type=int, default=None, help="methods given passkey (default cpu 2, cuda all)")
    p.add_argument("--passkey-lengths", default=None, help="default: the perplexity lengths")
    p.add_argument("--passkey-depths", default=None, help="default cpu 0.25,0.75; cuda 0,0.25,0.5,0.75,1")
    p.add_argument("--passkey-trials", type=int, default=None, help="keys per cell (default cpu 1, cuda 3)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--deadline-minutes", type=float, default=None,
                   help="start no new measurement after this many minutes (what finished is saved)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/zero_shot_<device>.json)")
    p.add_argument("--report-only", action="store_true", help="no measurement: print the tables from the JSON")
    p.add_argument("--block", choices=BLOCKS, default=None,
                   help="with --report-only: print only this block (as committed in benchmarks/RESULTS.md)")
    p.add_argument("--plots", action="store_true", help="with --report-only: also redraw the PNG from the JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.lengths = [parse_length(x) for x in (args.lengths or ("12k,16k,24k,32k" if gpu else "12k,16k")).split(",")]
    args.factor = args.factor or max(args.lengths) / ORIGINAL
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.longrope_from = args.longrope_from or ("yarn" if gpu else "none")
    args.passkey_top = (99 if gpu else 2) if args.passkey_top is None else args.passkey_top
    args.passkey_lengths = ([parse_length(x) for x in args.passkey_lengths.split(",")] if args.passkey_lengths
                            else list(args.lengths))
    args.passkey_depths = [float(x) for x in (args.passkey_depths or ("0,0.25,0.5,0.75,1" if gpu else "0.25,0.75"))
                           .split(",")]
    args.passkey_trials = args.passkey_trials or (3 if gpu else 1)
    device_tag = "cuda" if gpu else args.device
    args.out = Path(args.out or RESULTS / f"zero_shot_{device_tag}.json")
    return args


def default_methods(longrope_from: str) -> list[str]:
    from hf_rope_ext.registry import METHODS

    names = [n for n, s in METHODS.items() if s.kind == "rope"]
    order = ["extrapolate", "linear", "ntk", "ntk_by_parts", "yarn", "llama3", "longrope", "dynamic_ntk",
             "dynamic_yarn"]
    names = sorted(names, key=lambda n: order.index(n) if n in order else len(order))
    return [n for n in names if n != "longrope" or longrope_from != "none"]


def longrope_params(model, factor: float) -> dict:
    """yarn's per-dimension divisors theta_i / theta'_i as LongRoPE long factors (short factors 1)."""
    from hf_rope_ext.methods._rope_base import default_inv_freq
    from hf_rope_ext.plots import rope_geometry
    from hf_rope_ext.registry import get_method

    geo = rope_geometry(model)
    dim, base = int(geo["head_dim"]), float(geo["base"])
    spec = get_method("yarn")
    inv, _ = spec.compute(spec.make_params(factor=factor, original_max_position_embeddings=ORIGINAL), dim, base)
    divisors = (default_inv_freq(dim, base) / inv).tolist()
    return {"long_factor": divisors, "short_factor": [1.0] * len(divisors)}


def tail_ppl(result: dict, start: int = ORIGINAL) -> float:
    buckets = [b for b in result["buckets"] if b["start"] >= start and b["tokens"]]
    if not buckets:
        return float("nan")
    return math.exp(sum(b["nll"] * b["tokens"] for b in buckets) / sum(b["tokens"] for b in buckets))


def load_state(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"perplexity": {}, "passkey": {}}


def save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(path)


def fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else (f"{x:.2f}" if x < 1000 else f"{x:.3g}")


def report_blocks(state: dict) -> dict[str, str]:
    """The markdown blocks of benchmarks/RESULTS.md section 1, by name (``BLOCKS``), from the JSON alone."""
    meta = state.get("meta", {})
    blocks = {}
    ppl = state["perplexity"]
    if ppl:
        lengths = sorted({r["window"] for m in ppl.values() for r in m["report"]["results"]})
        longest = max(lengths)
        head = ["method", "dynamic"] + [f"PPL @ {n}" for n in lengths] + [f"PPL of positions {ORIGINAL}–{longest}",
                                                                         f"s per {longest // 1024}k forward"]
        lines = [f"Model {meta.get('model')}, factor {meta.get('factor')}, text {meta.get('text')} from token "
                 f"{meta.get('offset')}, dtype {meta.get('dtype')}, device {meta.get('device_name')}", "",
                 "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
        for name, m in ppl.items():
            by = {r["window"]: r for r in m["report"]["results"]}
            cells = [name, "yes" if m["dynamic"] else "no"] + [fmt(by[n]["perplexity"]) if n in by else "–"
                                                                for n in lengths]
            cells += [fmt(tail_ppl(by[longest])) if longest in by else "–",
                      f"{by[longest]['seconds']:.0f}" if longest in by else "–"]
            lines.append("| " + " | ".join(cells) + " |")
        blocks["perplexity"] = "\n".join(lines)
        lines = []
        for length in lengths:
            first = next((m for m in ppl.values() if any(r["window"] == length for r in m["report"]["results"])), None)
            if first is None:
                continue
            lines += ["" if lines else None, f"Perplexity by {meta.get('bucket_size')}-token position bucket, "
                      f"window {length}:", ""]
            res0 = next(r for r in first["report"]["results"] if r["window"] == length)
            bks = [b for b in res0["buckets"] if b["tokens"]]
            lines += ["| method | " + " | ".join(f"{b['start'] // 1024}k–{b['end'] // 1024}k" for b in bks) + " |",
                      "|---|" + "---:|" * len(bks)]
            for name, m in ppl.items():
                r = next((r for r in m["report"]["results"] if r["window"] == length), None)
                if r is None:
                    continue
                by_start = {b["start"]: b for b in r["buckets"]}
                lines.append(f"| {name} | " + " | ".join(fmt(by_start[b["start"]]["perplexity"]) for b in bks) + " |")
        blocks["buckets"] = "\n".join(x for x in lines if x is not None)
    pk = state["passkey"]
    if pk:
        methods = list(dict.fromkeys(k.split("|")[0] for k in pk))
        cells = sorted({(int(k.split("|")[1]), float(k.split("|")[2])) for k in pk})
        starts = {}  # (length, depth) -> the token positions where the key sentence starts (the same for every method)
        for k, r in pk.items():
            cell = (int(k.split("|")[1]), float(k.split("|")[2]))
            starts.setdefault(cell, set()).update(t["needle_start"] for t in r["trials"] if "needle_start" in t)
        lines = ["Passkey (correct / keys; greedy):", "",
                 "| method | " + " | ".join(f"{n} @ depth {d:g}" for n, d in cells) + " | total |",
                 "|---|" + "---:|" * (len(cells) + 1),
                 "| *key starts at token* | " + " | ".join("/".join(str(x) for x in sorted(starts.get(c, ()))) or "–"
                                                          for c in cells) + " | |"]
        for name in methods:
            row, hit, tot = [], 0, 0
            for n, d in cells:
                r = pk.get(f"{name}|{n}|{d}")
                if r is None:
                    row.append("–")
                    continue
                c = sum(t["correct"] for t in r["trials"])
                hit, tot = hit + c, tot + len(r["trials"])
                outs = "; ".join(f"{t['answer']}→{t['prediction'] or repr(t['output'])[:20]}" for t in r["trials"])
                row.append(f"{c}/{len(r['trials'])} ({outs})")
            lines.append(f"| {name} | " + " | ".join(row) + f" | {hit}/{tot} |")
        blocks["passkey"] = "\n".join(lines)
    return blocks


def report(state: dict, block: str | None = None) -> str:
    """Every block (or only ``block``), as printed by --report-only."""
    blocks = report_blocks(state)
    if block is not None:
        if block not in blocks:
            raise SystemExit(f"--block {block}: the JSON has no data for it (has: {', '.join(blocks) or 'nothing'})")
        return blocks[block]
    return "\n\n".join(blocks.values())


def draw(state: dict, out: Path) -> None:
    from hf_rope_ext.eval.compare import CompareReport, MethodRun
    from hf_rope_ext.eval.perplexity import PerplexityReport
    from hf_rope_ext.plots import plot_position_loss

    meta = state["meta"]
    runs = [MethodRun(method=n, perplexity=PerplexityReport.from_dict(dict(m["report"])))
            for n, m in state["perplexity"].items()]
    lengths = sorted({r.window for run in runs for r in run.perplexity.results})
    longest = max(lengths)
    runs = [r for r in runs if any(x.window == longest for x in r.perplexity.results)]
    cmp = CompareReport(model=meta["model"], original_length=ORIGINAL, patch_arguments={"factor": meta["factor"]},
                        lengths=lengths, text=meta["text"], text_description="", offset=meta["offset"], runs=runs)
    plot_position_loss(cmp, out.with_name(out.stem + "_positions.png"), length=longest,
                       title=f"SmolLM2-135M zero-shot, factor {meta['factor']:g}, window {longest}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    state = load_state(args.out)
    if args.report_only:
        print(report(state, args.block))
        if args.plots and state["perplexity"]:
            draw(state, args.out)
        return 0

    import torch

    from hf_rope_ext import patch_info, patch_model, unpatch_model
    from hf_rope_ext.eval import passkey_accuracy, perplexity_at_lengths
    from hf_rope_ext.eval.text import load_text, tokenize
    from hf_rope_ext.loading import load_model
    from hf_rope_ext.registry import get_method

    t_start = time.perf_counter()

    def out_of_time() -> bool:
        return args.deadline_minutes is not None and time.perf_counter() - t_start > 60 * args.deadline_minutes

    methods = args.methods.split(",") if args.methods else default_methods(args.longrope_from)
    for name in methods:
        get_method(name)
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    state.setdefault("meta", {})
    state["meta"].update({
        "model": args.model, "factor": args.factor, "text": args.text, "offset": args.offset, "dtype": args.dtype,
        "bucket_size": args.bucket_size, "device": args.device, "device_name": device_name,
        "torch": torch.__version__, "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
        "updated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    })
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    model.eval()
    print(f"loaded {args.model} in {time.perf_counter() - t0:.0f} s", flush=True)
    ids = tokenize(tok, load_text(args.text))
    progress = not args.no_progress

    # stage 1: perplexity
    for name in methods:
        done = state["perplexity"].get(name)
        if done and {r["window"] for r in done["report"]["results"]} >= set(args.lengths):
            print(f"[skip] {name}: already measured", flush=True)
            continue
        if out_of_time():
            print(f"[deadline] stopping before {name}", flush=True)
            break
        spec = get_method(name)
        params = longrope_params(model, args.factor) if name == "longrope" else {}
        t0 = time.perf_counter()
        patch_model(model, name, factor=args.factor, **params)
        patch_s = time.perf_counter() - t0
        try:
            with torch.inference_mode():
                rep = perplexity_at_lengths(model, tok, args.lengths, ids, offset=args.offset,
                                            bucket_size=args.bucket_size, share_forward=not spec.dynamic
                                            and name != "longrope", model_name=args.model, progress=progress)
        finally:
            info = patch_info(model)
            unpatch_model(model)
        state["perplexity"][name] = {"dynamic": bool(spec.dynamic or name == "longrope"), "patch": info,
                                     "patch_seconds": patch_s, "report": rep.to_dict(),
                                     "longrope_from": args.longrope_from if name == "longrope" else None}
        save_state(args.out, state)
        by = {r.window: r for r in rep.results}
        print(f"[ppl] {name}: " + ", ".join(f"{n}: {by[n].perplexity:.2f}" for n in args.lengths)
              + f"  ({rep.seconds:.0f} s)", flush=True)

    # stage 2: passkey for the best methods past the trained length
    longest = max(args.lengths)
    ranked = sorted(((tail_ppl(next(r for r in m["report"]["results"] if r["window"] == longest)), n)
                     for n, m in state["perplexity"].items()
                     if n in methods and any(r["window"] == longest for r in m["report"]["results"])))
    chosen = [n for _, n in ranked[: args.passkey_top]]
    if chosen:
        print(f"passkey for {', '.join(chosen)} (lowest perplexity past {ORIGINAL} at {longest})", flush=True)
    for name in chosen:
        for length in args.passkey_lengths:
            for depth in args.passkey_depths:
                key = f"{name}|{length}|{depth}"
                if key in state["passkey"] and len(state["passkey"][key]["trials"]) >= args.passkey_trials:
                    continue
                if out_of_time():
                    print(f"[deadline] stopping before passkey {key}", flush=True)
                    break
                patch_model(model, name, factor=args.factor,
                            **(longrope_params(model, args.factor) if name == "longrope" else {}))
                try:
                    with torch.inference_mode():
                        rep = passkey_accuracy(model, tok, [length], [depth], trials=args.passkey_trials,
                                               max_new_tokens=args.max_new_tokens, model_name=args.model,
                                               progress=progress)
                finally:
                    unpatch_model(model)
                state["passkey"][key] = rep.to_dict()
                save_state(args.out, state)
                print(f"[passkey] {key}: " + ", ".join(f"{t.answer} -> {t.output!r} ({'ok' if t.correct else 'wrong'})"
                                                      for t in rep.trials) + f"  ({rep.seconds:.0f} s)", flush=True)
    state["meta"]["seconds_this_run"] = time.perf_counter() - t_start
    save_state(args.out, state)
    print(report(state))
    if state["perplexity"]:
        try:
            draw(state, args.out)
        except Exception as err:  # a picture must not lose the numbers
            print(f"(plot failed: {err})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
