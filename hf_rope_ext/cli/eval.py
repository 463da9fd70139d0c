"""``hf-rope-ext eval ppl|passkey|needle`` and ``hf-rope-ext compare``: measure a model (calls
:mod:`hf_rope_ext.eval`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import (
    add_patch_arguments,
    load,
    model_arguments,
    parse_depths,
    parse_lengths,
    parse_value,
    positive_int,
    ppl_arguments,
    sub_parser,
    subcommand,
    text_arguments,
    text_source,
    write_json,
)

EVAL_EXAMPLE = """examples:
  hf-rope-ext eval ppl smollm2 --method yarn --factor 2 --lengths 4k,8k,16k --out ppl.json --plot ppl.png
  hf-rope-ext eval passkey out/smollm2-yarn-16k --lengths 8k,16k --trials 2 --out passkey.json
  hf-rope-ext eval needle smollm2 --method dca --factor 2 --lengths 16k --depths 0.1,0.5,0.9"""

COMPARE_EXAMPLE = """example:
  hf-rope-ext compare smollm2 --methods none,linear,ntk,yarn --factor 2 --lengths 4k,8k,16k --out-dir compare_out"""

def describe_patch(patch: dict[str, Any] | None, args: argparse.Namespace) -> str:
    """``"yarn x2 (patched here)"``, ``"yarn x2 (found in the saved model)"`` or ``"none (not extended)"``."""
    from ..eval.compare import UNPATCHED

    if not patch:
        return f"{UNPATCHED} (not extended)"
    where = "patched here" if getattr(args, "method", None) else "found in the saved model"
    return f"{patch['method']} x{patch['factor']:g} ({where})"


# --------------------------------------------------------------------------------------------------------------------
# eval ppl | passkey | needle


def _eval_ppl_args(p: argparse.ArgumentParser) -> None:
    model_arguments(p)
    add_patch_arguments(p, required=False)
    text_arguments(p)
    ppl_arguments(p)
    p.add_argument("--share-forward", action="store_true",
                   help="one forward at the longest length; shorter lengths read off its first tokens (exact for "
                        "static position encodings; needs --windows 1 and no --stride)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", help="also write a PNG of perplexity vs length (and loss by position next to it)")


def _eval_ppl(args: argparse.Namespace) -> int:
    from ..eval.perplexity import perplexity_at_lengths
    from ..plots import plot_perplexity_vs_length, plot_position_loss

    model, tokenizer = load(args)
    report = perplexity_at_lengths(
        model, tokenizer, args.lengths, text_source(args), stride=args.stride, windows=args.windows,
        offset=args.offset,
        bucket_size=args.bucket_size, batch_size=args.batch_size, loss_chunk=args.loss_chunk,
        share_forward=args.share_forward, model_name=args.model, progress=not args.no_progress,
    )
    print(f"model {args.model}, {describe_patch(report.patch, args)}")
    print(f"text: {report.text_description}, from token {args.offset}")
    print(report.table())
    longest = report.results[-1]
    print(f"\nloss by position at {longest.window}: " + ", ".join(
        f"{b.start}-{b.end}: {b.perplexity:.2f}" for b in longest.buckets if b.tokens))
    write_json(report, args.out)
    if args.plot:
        plot_perplexity_vs_length(report, args.plot)
        positions = Path(args.plot).with_name(Path(args.plot).stem + "_positions.png")
        plot_position_loss(report, positions)
        print(f"wrote {args.plot} and {positions}")
    return 0


def _retrieval_args(p: argparse.ArgumentParser, default_depths: str) -> None:
    model_arguments(p)
    add_patch_arguments(p, required=False)
    p.add_argument("--lengths", type=parse_lengths, required=True, help="prompt lengths in tokens, e.g. 4k,8k,16k")
    p.add_argument("--depths", type=parse_depths, default=parse_depths(default_depths),
                   help=f"needle depths in [0, 1] (default {default_depths})")
    p.add_argument("--trials", type=positive_int, default=1, help="samples per (length, depth) (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys (default 0)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="tokens to generate per prompt")
    p.add_argument("--batch-size", type=positive_int, default=1, help="prompts per generate call (default 1)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", help="also write the accuracy heatmap PNG here")


def _eval_passkey_args(p: argparse.ArgumentParser) -> None:
    _retrieval_args(p, "0,0.25,0.5,0.75,1")


def _eval_needle_args(p: argparse.ArgumentParser) -> None:
    _retrieval_args(p, "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1")
    text_arguments(p)


def _finish_retrieval(report: Any, args: argparse.Namespace) -> int:
    from ..plots import plot_retrieval_heatmap

    print(f"{report.task}: model {args.model}, {describe_patch(report.patch, args)}")
    print(report.table())
    print(f"overall accuracy {report.overall_accuracy:.2f} ({len(report.trials)} prompts, {report.seconds:.0f} s)")
    write_json(report, args.out)
    if args.plot:
        plot_retrieval_heatmap(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _eval_passkey(args: argparse.Namespace) -> int:
    from ..eval.passkey import passkey_accuracy

    model, tokenizer = load(args)
    report = passkey_accuracy(model, tokenizer, args.lengths, args.depths, trials=args.trials, seed=args.seed,
                              max_new_tokens=args.max_new_tokens or 12, batch_size=args.batch_size,
                              model_name=args.model, progress=not args.no_progress)
    return _finish_retrieval(report, args)


def _eval_needle(args: argparse.Namespace) -> int:
    from ..eval.needle import needle_grid

    model, tokenizer = load(args)
    report = needle_grid(model, tokenizer, args.lengths, args.depths, text_source(args), trials=args.trials,
                         seed=args.seed,
                         offset=args.offset, max_new_tokens=args.max_new_tokens or 16, batch_size=args.batch_size,
                         model_name=args.model, progress=not args.no_progress)
    return _finish_retrieval(report, args)


_EVAL = {
    "ppl": ("sliding-window perplexity at several lengths, with loss by position", _eval_ppl_args, _eval_ppl),
    "passkey": ("passkey retrieval accuracy over lengths x depths", _eval_passkey_args, _eval_passkey),
    "needle": ("needle-in-a-haystack accuracy grid over lengths x depths", _eval_needle_args, _eval_needle),
}


def _eval_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="{" + ",".join(_EVAL) + "}")
    for name, (help_text, add, run) in _EVAL.items():
        q = sub_parser(sub, name, help_text, EVAL_EXAMPLE)
        add(q)
        q.set_defaults(_eval_run=run)


@subcommand("eval", "evaluate a model (patched on the fly with --method/--factor): ppl, passkey, needle", _eval_args,
            EVAL_EXAMPLE)
def _eval(args: argparse.Namespace) -> int:
    return args._eval_run(args)


# --------------------------------------------------------------------------------------------------------------------
# compare


def _method_params(items: list[str] | None, methods: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``--param yarn.beta_fast=16`` -> per-method; ``--param key=value`` -> every method."""
    scoped: dict[str, dict[str, Any]] = {}
    shared: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--param expects [METHOD.]KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if "." in key:
            method, key = key.split(".", 1)
            if method not in methods:
                raise SystemExit(f"--param {item!r}: method {method!r} is not among --methods {','.join(methods)}")
            scoped.setdefault(method, {})[key.strip()] = parse_value(value)
        else:
            shared[key.strip()] = parse_value(value)
    return scoped, shared


def _compare_args(p: argparse.ArgumentParser) -> None:
    model_arguments(p)
    p.add_argument("--methods", required=True,
                   help="comma-separated methods (see `hf-rope-ext methods`); 'none' = the unpatched model")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--factor", type=float, help="new length / original length, for every method")
    group.add_argument("--target-length", type=positive_int, help="new context length instead of --factor")
    p.add_argument("--original-length", type=positive_int,
                   help="length the model was trained at (default: from its config)")
    p.add_argument("--param", action="append", metavar="[METHOD.]KEY=VALUE",
                   help="method parameter, repeatable; METHOD. limits it to one method (yarn.beta_fast=16)")
    text_arguments(p)
    ppl_arguments(p)
    p.set_defaults(bucket_size=None)
    p.add_argument("--passkey-lengths", type=parse_lengths, default=None,
                   help="also run passkey retrieval at these lengths (5 depths each)")
    p.add_argument("--passkey-trials", type=positive_int, default=1,
                   help="passkey keys per (length, depth) (default 1)")
    p.add_argument("--copy", choices=["deepcopy", "inplace"], default="deepcopy",
                   help="patch a deep copy per method (default) or patch/unpatch in place (half the memory)")
    p.add_argument("--out-dir", default="compare_out", help="folder for compare.json, compare.md and PNGs")


@subcommand("compare", "patch a fresh copy per method, measure each the same way, print a table, plot", _compare_args,
            COMPARE_EXAMPLE)
def _compare(args: argparse.Namespace) -> int:
    from ..eval.compare import compare_methods
    from ..loading import load_model

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    scoped, shared = _method_params(args.param, methods)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    extra = {"original_max_position_embeddings": args.original_length} if args.original_length else {}
    report = compare_methods(
        model, tokenizer, methods, args.lengths, factor=args.factor, max_position_embeddings=args.target_length,
        method_params=scoped, text=text_source(args), stride=args.stride, windows=args.windows, offset=args.offset,
        bucket_size=args.bucket_size, batch_size=args.batch_size, passkey_lengths=args.passkey_lengths,
        passkey_trials=args.passkey_trials, copy_mode=args.copy, model_name=args.model,
        progress=not args.no_progress, **extra, **shared,
    )
    write_compare_outputs(report, Path(args.out_dir))
    return 0


def write_compare_outputs(report: Any, out_dir: Path, wavelengths: dict[str, Any] | None = None) -> list[Path]:
    from ..plots import plot_perplexity_vs_length, plot_position_loss, plot_retrieval_heatmap, plot_rope_wavelengths

    out_dir.mkdir(parents=True, exist_ok=True)
    table = report.table()
    if any(run.perplexity for run in report.runs):
        table += (f"\n\nPerplexity by position in the {max(report.lengths)}-token window:\n\n"
                  + report.bucket_table())
    for run in report.runs:
        if run.passkey is not None:
            table += f"\n\nPasskey accuracy, {run.method} (rows: depth, columns: length):\n\n" + run.passkey.table()
    text = table + "\n\n" + "\n".join(f"- {n}" for n in report.notes) + "\n"
    print(text)
    files = [report.save(out_dir / "compare.json")]
    (out_dir / "compare.md").write_text(text)
    files.append(out_dir / "compare.md")
    if any(run.perplexity for run in report.runs):
        files.append(plot_perplexity_vs_length(report, out_dir / "ppl_vs_length.png"))
        files.append(plot_position_loss(report, out_dir / "loss_by_position.png"))
    for run in report.runs:
        if run.passkey is not None:
            files.append(plot_retrieval_heatmap(run.passkey, out_dir / f"passkey_{run.method}.png"))
    if wavelengths:
        files.append(plot_rope_wavelengths(path=out_dir / "rope_wavelengths.png", **wavelengths))
    print("wrote " + ", ".join(str(f) for f in files))
    return files


