"""Benchmark: LongRoPE factor search on the real SmolLM2-135M (trained at 8192 tokens) at 16k tokens (factor 2).

Usage::

    # the full CPU measurement (issue 11; ~60 minutes of search + ~25 minutes of validation on 2 cores), resumable:
    nohup nice -n 10 python benchmarks/bench_search.py --budget 40 --minutes 60 --proxy-length 16384 \\
        > /tmp/bench_search.log 2>&1 &
    # a smoke run (two evaluations at a 9216-token proxy, no validation: ~3-6 minutes):
    python benchmarks/bench_search.py --budget 2 --proxy-length 9216 --no-validation --no-control \\
        --out /tmp/search_smoke.json
    python benchmarks/bench_search.py --report-only        # the markdown table from the JSON already written
    # issue 11's second run: every dimension and the attention factor searched, from a wider YaRN ramp too:
    python benchmarks/bench_search.py --budget 60 --minutes 60 --all-dims --attention-factor search \
        --start yarn:beta_fast=128 --controls-from benchmarks/results/search_16k_cpu.json \
        --out benchmarks/results/search_16k_cpu_attention.json
    # GPU plan (scripts/gpu_plan.sh search): the same at 32k and 64k (--length; factor = length / 8192)

Stages, each resumable (``--out`` is rewritten after each; the search's own log, ``<out>_log.jsonl``, lets a killed
search continue without redoing evaluations):

1. Search (``hf_rope_ext.search_rope_factors``): objective ``--objective`` (default ``beyond``: NLL of the tokens past
   8192) on one window of ``--search-text`` (default ``builtin:pydoc`` from token 60000, a stretch the validation
   does not use), evaluated at ``--proxy-length`` tokens, ``--budget`` evaluations and/or ``--minutes``. Every
   candidate uses YaRN's attention factor 0.1 ln s + 1 (``--attention-factor``), so the YaRN seed (with the critical
   dimensions searched, PI's projection is the same vector) is stock ``yarn`` and the search starts from it.
2. Validation at 16384 tokens on texts the search did not see: the window of benchmarks/RESULTS.md §1
   (``builtin:pydoc`` from token 20000) and ``builtin:stdlib`` from token 0: whole-window perplexity and perplexity of
   positions 8k-16k, for the searched factors and for stock ``yarn`` (the same factor).
3. The control: the *unpatched* model reading positions 8k-16k of each validation window with its own 8k window
   sliding by 2k (each 2k bucket scored as the last 2048 tokens of the 8192-token window ending with it), as in
   benchmarks/bench_attention.py.

Writes ``benchmarks/results/search_16k_cpu.json`` (with the search's every candidate) and prints a markdown table.
``--length`` other than 16384 scales everything: the search and validation windows, and the control's buckets up to
the end of the window (``--device cuda`` for 32k / 64k; the texts must hold the windows, which is checked).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
ORIGINAL = 8192
LENGTH = 16384
VALIDATION = (("builtin:pydoc", 20000), ("builtin:stdlib", 0))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=40, help="evaluations (default 40)")
    p.add_argument("--minutes", type=float, default=None, help="search time limit in minutes")
    p.add_argument("--length", type=int, default=LENGTH,
                   help="target length (default 16384; factor = length / 8192); validation windows have this length")
    p.add_argument("--proxy-length", type=int, default=None, help="search window (default: --length)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--objective", choices=["beyond", "window", "needle"], default="beyond")
    p.add_argument("--search-text", default="builtin:pydoc")
    p.add_argument("--search-offset", type=int, default=60000)
    p.add_argument("--attention-factor", default="yarn",
                   help="yarn (0.1 ln s + 1, default: the yarn seed is then stock yarn exactly, so any gain over it "
                        "comes from the factors), longrope (sqrt(1 + ln s / ln L)), a number, or search (searched "
                        "with the factors from both formulas' values; the yarn seed with YaRN's value is stock yarn)")
    p.add_argument("--controls-from", type=Path, default=None, metavar="JSON",
                   help="copy stage 3 (the unpatched 8k-window control) from another results JSON of this script "
                        "instead of measuring it again (the same validation windows)")
    p.add_argument("--all-dims", action="store_true", help="search every dimension, not only the critical ones")
    p.add_argument("--start", default=None, metavar="METHOD[:KEY=VALUE...]",
                   help="one more initial candidate: the divisors of a rotary method, e.g. yarn:beta_fast=128")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-validation", action="store_true", help="skip stage 2")
    p.add_argument("--no-control", action="store_true", help="skip stage 3")
    p.add_argument("--passkey-only", action="store_true",
                   help="only stage 4, for the search already in --out (no search, validation or control)")
    p.add_argument("--passkey", action="store_true",
                   help="stage 4: passkey at the target length with the best factors (the prompts of "
                        "bench_attention.py / bench_finetune_smollm2.py: depths 0.1-0.9, 2 keys each; resumable)")
    p.add_argument("--dtype", default=None, help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--out", type=Path, default=RESULTS / "search_16k_cpu.json")
    p.add_argument("--report-only", action="store_true", help="no measurement: print the table from the JSON")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.2f}"


def _k(tokens: int) -> str:
    return f"{tokens // 1024}k"


def _control_ppl(c: dict) -> float:
    """The control's perplexity past 8k (key ``ppl_8k_16k`` in JSONs written at 16k before ``--length`` existed)."""
    return c["ppl_beyond"] if "ppl_beyond" in c else c["ppl_8k_16k"]


def _at(candidate: dict) -> str:
    return f" (attention {candidate['attention']:.4f})" if "attention" in candidate else ""


def report(state: dict) -> str:
    search = state.get("search") or {}
    lines = []
    if search:
        fresh = [c for c in search["candidates"] if not c.get("resumed")]
        evaluating = sum(c["seconds"] for c in fresh)  # the candidates' own times; the rest is validation
        best = min(search["candidates"], key=lambda c: c["score"])
        found = [c for c in search["candidates"] if not c["origin"].startswith("seed")]
        lines += [
            f"Search: objective `{search['objective']}` at {search['eval_length']} tokens on "
            f"{', '.join(search['texts'])}; {search['evaluations']} evaluations in {evaluating / 60:.1f} min "
            f"({evaluating / max(1, len(fresh)):.0f} s each incl. patching; stopped by {search['stopped']}; "
            f"validation {max(0.0, search['seconds'] - evaluating) / 60:.1f} min more); dimensions "
            f"{search['searched_dims'][0]}–"
            f"{search['searched_dims'][-1]}"
            + (" and the attention factor" if "attention" in best else "") + " searched; best NLL "
            f"{search['score']:.4f} (seeds: " + ", ".join(
                f"{c['origin'].split(':')[1]}{_at(c)} {c['score']:.4f}" for c in search["candidates"]
                if c["origin"].startswith("seed")) + "). "
            f"Best candidate: #{best['index']} ({best['origin']}, generation {best['generation']})"
            + (f"; best candidate the search itself made: {min(c['score'] for c in found):.4f}." if found else "."),
            "",
            "Best factors: " + ", ".join(f"{x:.3g}" for x in search["factors"])
            + f"; attention factor {search['attention_factor']:.4f}"
            + (" (searched)." if "attention" in best else " (fixed)."),
            "",
        ]
    rows = state.get("validation") or []
    control = state.get("control") or {}
    if rows or control:
        n = (state.get("meta") or {}).get("length", LENGTH)
        whole, past = f"0–{_k(n)}", f"{_k(ORIGINAL)}–{_k(n)}"
        lines += [f"| text ({n} tokens) | method | PPL {whole} | PPL {past} | vs yarn ({whole}) | vs yarn ({past}) "
                  f"| vs control ({past}) |", "|---|---|---:|---:|---:|---:|---:|"]
        yarn = {r["text"]: r for r in rows if r["method"] == "yarn"}

        def vs(a, b, same=False) -> str:
            return "–" if a is None or b is None or same else f"{100 * (a / b - 1):+.1f} %"

        for r in rows:
            base = yarn.get(r["text"])
            c = _control_ppl(control[r["text"]]) if r["text"] in control else None
            lines.append(f"| {r['text']} | {r['method']} | {fmt(r['ppl_window'])} | {fmt(r['ppl_beyond'])} | "
                         f"{vs(r['ppl_window'], base and base['ppl_window'], r is base)} | "
                         f"{vs(r['ppl_beyond'], base and base['ppl_beyond'], r is base)} | {vs(r['ppl_beyond'], c)} |")
        for text, c in control.items():
            lines.append(f"| {text} | none, 8k sliding window (control) | – | {fmt(_control_ppl(c))} | – | – | – |")
    passkey = state.get("passkey") or {}
    if passkey:
        lines += ["", "| passkey, searched factors: depth | keys correct | answers (expected->generated) |",
                  "|---|---|---|"]
        for key, cell in passkey.items():
            lines.append(f"| {key.split('|')[1]} | {cell['correct']}/{cell['total']} | {', '.join(cell['outputs'])} |")
        n = (state.get("meta") or {}).get("length", LENGTH)
        lines += ["", f"Passkey at {n // 1024}k, searched factors: {sum(c['correct'] for c in passkey.values())}/"
                      f"{sum(c['total'] for c in passkey.values())} keys over all depths"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    state = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.report_only:
        if not state:
            print(f"no results at {args.out}", file=sys.stderr)
            return 1
        print(report(state))
        return 0

    import torch

    from hf_rope_ext import search_rope_factors
    from hf_rope_ext.eval.perplexity import token_nll
    from hf_rope_ext.eval.text import load_text, tokenize
    from hf_rope_ext.loading import load_model
    from hf_rope_ext.methods._rope_base import yarn_attention_factor

    def save() -> None:
        if args.passkey_only:  # the search's meta stays; this stage records its own command
            state["passkey_command"] = "python " + " ".join([sys.argv[0]] + sys.argv[1:]) if argv is None else argv
            args.out.write_text(json.dumps(state, indent=1))
            return
        state["meta"] = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)", "length": args.length,
                         "factor": factor, "device": args.device, "dtype": args.dtype,
                         "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]) if argv is None else argv,
                         "updated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(state, indent=1))

    if args.length <= ORIGINAL:
        raise SystemExit(f"--length must exceed the original {ORIGINAL} tokens, got {args.length}")
    factor = args.length / ORIGINAL
    if args.passkey_only:
        if "search" not in state:
            raise SystemExit(f"--passkey-only: no search in {args.out}; run the search first")
        args.passkey, args.no_control, args.no_validation = True, True, True
    proxy = args.proxy_length or args.length
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else None)
    attention = {"longrope": None, "search": None, "yarn": yarn_attention_factor(factor)}.get(args.attention_factor)
    if attention is None and args.attention_factor not in ("longrope", "search"):
        attention = float(args.attention_factor)
    model, tok = load_model("smollm2", dtype=args.dtype, device=args.device)
    model.eval()
    # ~4 characters per token in both texts; 8 per token leaves room (pydoc is shorter than that: all of it)
    search_ids = tokenize(tok, load_text(args.search_text).text[: 8 * (args.search_offset + proxy)])
    validation = []
    for source, offset in ([] if args.no_validation else VALIDATION):
        text = load_text(source).text
        ids = tokenize(tok, text[: max(400_000, 8 * (offset + args.length))])  # stdlib: only its start is needed
        if ids.numel() < offset + args.length:
            raise SystemExit(f"{source} has {ids.numel()} tokens: no {args.length}-token window from {offset}")
        validation.append((f"{source}@{offset}", ids[offset : offset + args.length]))

    if not args.passkey_only:  # stages 1 and 2
        log = args.out.with_name(args.out.stem + "_log.jsonl")
        t0 = time.perf_counter()
        result = search_rope_factors(
            model, tok, factor, [search_ids[args.search_offset : args.search_offset + proxy]],
            budget=args.budget, max_minutes=args.minutes, objective=args.objective, seed=args.seed,
            proxy_length=proxy, critical_only=not args.all_dims, attention_factor=attention,
            search_attention=args.attention_factor == "search", start_factors=args.start,
            validation_texts=[ids for _, ids in validation], validation_baselines=["yarn"] if validation else [],
            log_path=log, resume=log.exists(), progress=not args.no_progress,
        )
        names = {f"validation_texts[{i}]": name for i, (name, _) in enumerate(validation)}
        for r in result.validation:
            r["text"] = names.get(r["text"], r["text"])
        data = result.to_dict()
        data["texts"] = [f"{args.search_text}@{args.search_offset}"]
        state["search"] = data
        state["validation"] = result.validation
        print(f"search + validation: {time.perf_counter() - t0:.0f} s; best NLL {result.score:.4f}", flush=True)
        save()

    if args.controls_from is not None and not args.no_control:
        other = json.loads(args.controls_from.read_text())
        names = {n for n, _ in validation}
        if other.get("meta", {}).get("length") != args.length or not set(other.get("control", {})) >= names:
            raise SystemExit(f"--controls-from {args.controls_from}: no control for the same validation windows")
        state["control"] = {n: other["control"][n] for n, _ in validation}
        state["control_copied_from"] = str(args.controls_from)
        save()
    if not args.no_control:
        control = state.setdefault("control", {})
        for name, window in validation:
            if name in control:
                continue
            buckets = []
            for start in range(ORIGINAL, args.length, 2048):
                piece = window[start + 2048 - ORIGINAL : start + 2048][None]  # the 8192 tokens ending with the bucket
                with torch.inference_mode():
                    nll = token_nll(model, piece, first_scored=ORIGINAL - 2048)[0, ORIGINAL - 2048 :]
                buckets.append({"start": start, "tokens": int(nll.numel()), "nll": float(nll.double().mean())})
            tokens = sum(b["tokens"] for b in buckets)
            control[name] = {"ppl_beyond": math.exp(sum(b["nll"] * b["tokens"] for b in buckets) / tokens),
                             "buckets": [{**b, "perplexity": math.exp(b["nll"])} for b in buckets]}
            print(f"[control] {name}: {control[name]['ppl_beyond']:.2f}", flush=True)
            save()
    if args.passkey:
        from hf_rope_ext import apply_search_result
        from hf_rope_ext.eval import passkey_accuracy
        from hf_rope_ext.patching import unpatch_model
        from hf_rope_ext.search import SearchResult

        apply_search_result(model, SearchResult.from_dict(state["search"]))
        cells = state.setdefault("passkey", {})
        for depth in (0.1, 0.3, 0.5, 0.7, 0.9):
            key = f"longrope (searched)|{depth}"
            if key in cells:
                continue
            with torch.inference_mode():  # the same prompts as bench_attention.py's --passkey (one call per depth)
                rep = passkey_accuracy(model, tok, [args.length], [depth], trials=2, max_new_tokens=8,
                                       model_name="smollm2", progress=False)
            trials = rep.to_dict()["trials"]
            cells[key] = {"correct": sum(t["correct"] for t in trials), "total": len(trials),
                          "outputs": [f"{t['answer']}->{t['output'].strip()!r}" for t in trials],
                          "seconds": rep.seconds}
            save()
            print(f"[passkey] {key}: {cells[key]['correct']}/{len(trials)} {cells[key]['outputs']}", flush=True)
        unpatch_model(model)
    print(report(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
