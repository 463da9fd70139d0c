"""``hf-rope-ext search``: LongRoPE's evolutionary search of per-dimension rotary factors, saved natively as
``longrope`` (calls :func:`hf_rope_ext.search_rope_factors` and :func:`hf_rope_ext.apply_search_result`).

Output folder: the patched model and tokenizer (config.json with ``rope_type: longrope``, reloads in stock
transformers), ``search.json`` (every candidate and its score, the best factors, validation figures, time),
``search_log.jsonl`` (the log ``--resume`` reads), ``search.png`` (best factors vs PI / NTK / YaRN per dimension and
the best score per generation) and ``README.md`` (the model card, recording the search).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

from ._common import subcommand

EXAMPLE = """examples:
  hf-rope-ext search smollm2 --factor 2 --text corpus.txt --validation-text builtin:pydoc --budget 40 \\
      --proxy-length 9216 --out out/smollm2-longrope-16k
  hf-rope-ext search smollm2 --factor 2 --text corpus.txt --budget 80 --out out/smollm2-longrope-16k --resume
  (a killed search continues with --resume: logged candidates are not evaluated again)"""

LOG_FILE = "search_log.jsonl"
RESULT_FILE = "search.json"
PLOT_FILE = "search.png"


def _args(p: argparse.ArgumentParser) -> None:
    from ..search import OBJECTIVES

    p.add_argument("model", help="local folder, .gguf file, Hub id, or the offline alias smollm2")
    p.add_argument("--factor", type=float, required=True, help="target length / original length (> 1)")
    p.add_argument("--text", action="append", required=True, metavar="SOURCE",
                   help="search text (repeatable): a text/JSONL file, builtin:pydoc or builtin:stdlib")
    p.add_argument("--validation-text", action="append", default=[], metavar="SOURCE",
                   help="text scored at the target length with the best factors, not used by the search (repeatable)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--offset", type=int, default=0, help="first token of each search text (default 0)")
    p.add_argument("--validation-offset", type=int, default=None,
                   help="first token of each validation text (default: --offset)")
    p.add_argument("--budget", type=int, default=40, help="evaluations in all, resumed ones included (default 40)")
    p.add_argument("--minutes", type=float, default=None, help="stop starting evaluations after this many minutes")
    p.add_argument("--objective", choices=OBJECTIVES, default="beyond",
                   help="beyond: NLL past the original length (default); window: whole window; needle: a needle's "
                        "answer")
    p.add_argument("--proxy-length", type=int, default=None,
                   help="evaluate candidates on windows of this many tokens (default: the target length); "
                        "validation runs at the target")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); the search is deterministic for it")
    p.add_argument("--all-dims", action="store_true",
                   help="search every dimension (default: only those whose wavelength exceeds the original length, "
                        "LongRoPE2's critical dimensions; the others keep YaRN's divisors)")
    p.add_argument("--attention-factor", type=float, default=None,
                   help="cos/sin multiplier (default: LongRoPE's sqrt(1 + ln s / ln L)); with --search-attention one "
                        "more starting value")
    p.add_argument("--search-attention", action="store_true",
                   help="search the attention factor too (saved as longrope's attention_factor); it starts from "
                        "YaRN's 0.1 ln s + 1 and LongRoPE's sqrt(1 + ln s / ln L)")
    p.add_argument("--attention-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="bounds of a searched attention factor (default: 1 and 1 + 0.2 ln s)")
    p.add_argument("--start", default=None, metavar="METHOD[:KEY=VALUE...]",
                   help="one more initial candidate: a rotary method's divisors, e.g. yarn:beta_fast=128")
    p.add_argument("--population-size", type=int, default=8, help="initial population (default 8)")
    p.add_argument("--parents", type=int, default=4, help="top-k parents kept each generation (default 4)")
    p.add_argument("--baseline", action="append", default=[], metavar="METHOD",
                   help="rotary method also scored on the validation texts, e.g. yarn (repeatable)")
    p.add_argument("--out", required=True, help="new (or empty) folder for the model, search.json, plot and card")
    p.add_argument("--resume", action="store_true", help=f"continue the search logged in --out ({LOG_FILE})")
    p.add_argument("--overwrite", action="store_true", help="replace --out even when it holds files")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: where the model loads)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _check(args: argparse.Namespace) -> Path:
    """Everything that can be refused before the model loads; returns the output folder."""
    if not math.isfinite(args.factor) or args.factor <= 1:
        raise ValueError(f"--factor must be a number > 1 (target length / original length), got {args.factor:g}")
    if args.budget < 1:
        raise ValueError(f"--budget must be at least 1 evaluation, got {args.budget}")
    if args.minutes is not None and not args.minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes:g}")
    if args.attention_range is not None and not args.search_attention:
        raise ValueError("--attention-range bounds a searched attention factor: add --search-attention (or give a "
                         "fixed --attention-factor instead)")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the search in --out, --overwrite replaces it: give one of them")
    out = Path(args.out).expanduser()
    source = Path(args.model).expanduser()
    if source.exists() and out.resolve() == source.resolve():
        raise ValueError(f"--out {args.out} is the model folder being read; give another folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder")
    if args.resume:
        if not (out / LOG_FILE).is_file():
            raise ValueError(f"--resume: {out / LOG_FILE} not found; nothing to resume (run without --resume)")
    elif out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {args.out} exists and is not empty; give a new or empty folder, --overwrite to "
                         "replace it, or --resume to continue the search logged there")
    return out


def _rows(result) -> dict:
    """The validation figures as a card results item (``{"kind": "rows"}``)."""
    rows = []
    for r in result.validation:
        method = "longrope" if r["method"].startswith("longrope") else r["method"]
        rows.append({"task": "perplexity", "length": r["length"], "value": r["ppl_window"], "method": method,
                     "dataset": r["text"]})
    return {"kind": "rows", "rows": rows}


@subcommand("search", "search LongRoPE per-dimension rotary factors and save the model with them", _args, EXAMPLE)
def _search(args: argparse.Namespace) -> int:
    from .. import apply_search_result, search_rope_factors
    from ..cards import write_card
    from ..eval.text import load_text
    from ..loading import load_model
    from ..plots import plot_search
    from ..training.io import atomic_directory

    out = _check(args)
    texts = [load_text(t, field=args.text_field) for t in args.text]
    validation = [load_text(t, field=args.text_field) for t in args.validation_text]
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, task="declared")

    def clear_out() -> None:  # every input check passed: only now is an --overwrite folder emptied
        if args.overwrite and out.is_dir():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)

    result = search_rope_factors(
        model, tokenizer, args.factor, texts, budget=args.budget, max_minutes=args.minutes, objective=args.objective,
        seed=args.seed, validation_texts=validation, validation_baselines=args.baseline,
        proxy_length=args.proxy_length, offset=args.offset, validation_offset=args.validation_offset,
        critical_only=not args.all_dims, attention_factor=args.attention_factor,
        search_attention=args.search_attention, start_factors=args.start,
        attention_range=tuple(args.attention_range) if args.attention_range is not None else None,
        population_size=args.population_size, parents=args.parents, log_path=out / LOG_FILE, resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress, on_start=clear_out,
    )
    apply_search_result(model, result, tokenizer)
    with atomic_directory(out.resolve()) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copy2(out / LOG_FILE, tmp / LOG_FILE)
        result.save(tmp / RESULT_FILE)
        plot_search(result, tmp / PLOT_FILE)
    write_card(out, results=[_rows(result)] if result.validation else [], plots=[out / PLOT_FILE])
    shown = {
        "factors": [round(x, 4) for x in result.factors], "attention_factor": round(result.attention_factor, 5),
        "score_nll": round(result.score, 5),
        "objective": result.objective, "evaluations": result.evaluations, "resumed": result.resumed_evaluations,
        "stopped": result.stopped, "seconds": round(result.seconds, 1),
        "validation": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                       for r in result.validation],
    }
    print(json.dumps(shown, indent=2))
    print(f"saved to {args.out}")
    return 0
