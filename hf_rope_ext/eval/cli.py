"""Command-line subcommands for evaluation and pictures: ``eval ppl|passkey|needle``, ``compare``, ``plot ...``,
``demo``. Each parses arguments, calls the library functions and prints; nothing else."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..cli import add_patch_arguments, parse_value, patch_kwargs, subcommand

# --------------------------------------------------------------------------------------------------------------------
# argument helpers


def parse_lengths(text: str) -> list[int]:
    """``"2048,4k,16k"`` -> [2048, 4096, 16384] (a ``k`` suffix multiplies by 1024)."""
    out = []
    for item in str(text).split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            value = int(float(item[:-1]) * 1024) if item.endswith("k") else int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a length: {item!r} (use e.g. 2048,4k,16k)") from None
        if value < 2:
            raise argparse.ArgumentTypeError(f"lengths must be >= 2, got {value}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("give at least one length")
    return out


def parse_depths(text: str) -> list[float]:
    try:
        depths = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"depths are numbers in [0, 1], got {text!r}") from None
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise argparse.ArgumentTypeError(f"depths are numbers in [0, 1], got {text!r}")
    return depths


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local folder, .gguf file, Hub id (online or cached), or the offline alias smollm2")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: where the model loads)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _text_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default=None,
                   help="text source: a text/JSONL file, a saved datasets folder, dataset:NAME[:CONFIG], "
                        "builtin:pydoc (default, offline) or builtin:stdlib")
    p.add_argument("--text-field", default="text", help="JSONL / dataset field holding the text (default: text)")
    p.add_argument("--text-split", default="test", help="dataset split (default: test)")
    p.add_argument("--offset", type=int, default=0, help="first token of the text to use (default 0)")


def _ppl_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=parse_lengths, required=True, help="window lengths, e.g. 2048,4096,8k")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding-window stride S (default: the window, i.e. non-overlapping; the papers use 256)")
    p.add_argument("--windows", type=int, default=1, help="windows per length (default 1)")
    p.add_argument("--bucket-size", type=int, default=None, help="position-bucket width (default: window / 8)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--loss-chunk", type=int, default=1024, help="positions per LM-head chunk (memory; default 1024)")


def _load(args: argparse.Namespace, patch: bool = True) -> tuple[Any, Any]:
    from .. import patch_model
    from ..loading import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if patch and getattr(args, "method", None):
        patch_model(model, args.method, tokenizer=tokenizer, **patch_kwargs(args))
    return model, tokenizer


def _text(args: argparse.Namespace) -> Any:
    from .text import load_text

    return load_text(args.text, field=args.text_field, split=args.text_split)


def _write_json(report: Any, path: str | None) -> None:
    if path:
        report.save(path)
        print(f"wrote {path}")


# --------------------------------------------------------------------------------------------------------------------
# eval ppl | passkey | needle


def _eval_ppl_args(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    add_patch_arguments(p, required=False)
    _text_arguments(p)
    _ppl_arguments(p)
    p.add_argument("--share-forward", action="store_true",
                   help="one forward at the longest length; shorter lengths read off its first tokens (exact for "
                        "static position encodings; needs --windows 1 and no --stride)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", help="also write a PNG of perplexity vs length (and loss by position next to it)")


def _eval_ppl(args: argparse.Namespace) -> int:
    from ..plots import plot_perplexity_vs_length, plot_position_loss
    from .perplexity import perplexity_at_lengths

    model, tokenizer = _load(args)
    report = perplexity_at_lengths(
        model, tokenizer, args.lengths, _text(args), stride=args.stride, windows=args.windows, offset=args.offset,
        bucket_size=args.bucket_size, batch_size=args.batch_size, loss_chunk=args.loss_chunk,
        share_forward=args.share_forward, model_name=args.model, progress=not args.no_progress,
    )
    print(f"model {args.model}" + (f", {args.method} x{report.patch['factor']:g}" if report.patch else ", unpatched"))
    print(f"text: {report.text_description}, from token {args.offset}")
    print(report.table())
    longest = report.results[-1]
    print(f"\nloss by position at {longest.window}: " + ", ".join(
        f"{b.start}-{b.end}: {b.perplexity:.2f}" for b in longest.buckets if b.tokens))
    _write_json(report, args.out)
    if args.plot:
        plot_perplexity_vs_length(report, args.plot)
        positions = Path(args.plot).with_name(Path(args.plot).stem + "_positions.png")
        plot_position_loss(report, positions)
        print(f"wrote {args.plot} and {positions}")
    return 0


def _retrieval_args(p: argparse.ArgumentParser, default_depths: str) -> None:
    _model_arguments(p)
    add_patch_arguments(p, required=False)
    p.add_argument("--lengths", type=parse_lengths, required=True, help="prompt lengths in tokens, e.g. 4k,8k,16k")
    p.add_argument("--depths", type=parse_depths, default=parse_depths(default_depths),
                   help=f"needle depths in [0, 1] (default {default_depths})")
    p.add_argument("--trials", type=int, default=1, help="samples per (length, depth) (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate per prompt")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per generate call (default 1)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", help="also write the accuracy heatmap PNG here")


def _eval_passkey_args(p: argparse.ArgumentParser) -> None:
    _retrieval_args(p, "0,0.25,0.5,0.75,1")


def _eval_needle_args(p: argparse.ArgumentParser) -> None:
    _retrieval_args(p, "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1")
    _text_arguments(p)


def _finish_retrieval(report: Any, args: argparse.Namespace) -> int:
    from ..plots import plot_retrieval_heatmap

    print(f"{report.task}: model {args.model}" + (f", {args.method}" if report.patch else ", unpatched"))
    print(report.table())
    print(f"overall accuracy {report.overall_accuracy:.2f} ({len(report.trials)} prompts, {report.seconds:.0f} s)")
    _write_json(report, args.out)
    if args.plot:
        plot_retrieval_heatmap(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _eval_passkey(args: argparse.Namespace) -> int:
    from .passkey import passkey_accuracy

    model, tokenizer = _load(args)
    report = passkey_accuracy(model, tokenizer, args.lengths, args.depths, trials=args.trials, seed=args.seed,
                              max_new_tokens=args.max_new_tokens or 12, batch_size=args.batch_size,
                              model_name=args.model, progress=not args.no_progress)
    return _finish_retrieval(report, args)


def _eval_needle(args: argparse.Namespace) -> int:
    from .needle import needle_grid

    model, tokenizer = _load(args)
    report = needle_grid(model, tokenizer, args.lengths, args.depths, _text(args), trials=args.trials, seed=args.seed,
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
        q = sub.add_parser(name, help=help_text, description=help_text)
        add(q)
        q.set_defaults(_eval_run=run)


@subcommand("eval", "evaluate a model (patched on the fly with --method/--factor): ppl, passkey, needle", _eval_args)
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
    _model_arguments(p)
    p.add_argument("--methods", required=True,
                   help="comma-separated methods (see `hf-rope-ext methods`); 'none' = the unpatched model")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--factor", type=float, help="new length / original length, for every method")
    group.add_argument("--target-length", type=int, help="new context length instead of --factor")
    p.add_argument("--original-length", type=int, help="length the model was trained at (default: from its config)")
    p.add_argument("--param", action="append", metavar="[METHOD.]KEY=VALUE",
                   help="method parameter, repeatable; METHOD. limits it to one method (yarn.beta_fast=16)")
    _text_arguments(p)
    _ppl_arguments(p)
    p.set_defaults(bucket_size=None)
    p.add_argument("--passkey-lengths", type=parse_lengths, default=None,
                   help="also run passkey retrieval at these lengths (5 depths each)")
    p.add_argument("--passkey-trials", type=int, default=1, help="passkey keys per (length, depth) (default 1)")
    p.add_argument("--copy", choices=["deepcopy", "inplace"], default="deepcopy",
                   help="patch a deep copy per method (default) or patch/unpatch in place (half the memory)")
    p.add_argument("--out-dir", default="compare_out", help="folder for compare.json, compare.md and PNGs")


@subcommand("compare", "patch a fresh copy per method, measure each the same way, print a table, plot", _compare_args)
def _compare(args: argparse.Namespace) -> int:
    from ..loading import load_model
    from .compare import compare_methods

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    scoped, shared = _method_params(args.param, methods)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    extra = {"original_max_position_embeddings": args.original_length} if args.original_length else {}
    report = compare_methods(
        model, tokenizer, methods, args.lengths, factor=args.factor, max_position_embeddings=args.target_length,
        method_params=scoped, text=_text(args), stride=args.stride, windows=args.windows, offset=args.offset,
        bucket_size=args.bucket_size, batch_size=args.batch_size, passkey_lengths=args.passkey_lengths,
        passkey_trials=args.passkey_trials, copy_mode=args.copy, model_name=args.model,
        progress=not args.no_progress, **extra, **shared,
    )
    _write_compare_outputs(report, Path(args.out_dir))
    return 0


def _write_compare_outputs(report: Any, out_dir: Path, wavelengths: dict[str, Any] | None = None) -> list[Path]:
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


# --------------------------------------------------------------------------------------------------------------------
# plot


def _plot_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="plot_command", required=True, metavar="{ppl,positions,heatmap,wavelengths,similarity}")
    q = sub.add_parser("ppl", help="perplexity vs length from eval ppl / compare JSON files")
    q.add_argument("results", nargs="+", help="JSON files written by `eval ppl --out` or `compare`")
    q.add_argument("--out", required=True, help="PNG to write")
    q.add_argument("--original-length", type=int, help="mark this length (default: from the results)")
    q.set_defaults(_plot_run=_plot_ppl)
    q = sub.add_parser("positions", help="loss by position bucket from eval ppl / compare JSON files")
    q.add_argument("results", nargs="+", help="JSON files written by `eval ppl --out` or `compare`")
    q.add_argument("--out", required=True, help="PNG to write")
    q.add_argument("--length", type=int, help="which window length (default: the longest)")
    q.set_defaults(_plot_run=_plot_positions)
    q = sub.add_parser("heatmap", help="accuracy heatmap from eval passkey / needle JSON")
    q.add_argument("results", help="JSON file written by `eval passkey --out` or `eval needle --out`")
    q.add_argument("--out", required=True, help="PNG to write")
    q.set_defaults(_plot_run=_plot_heatmap)
    q = sub.add_parser("wavelengths", help="RoPE per-dimension wavelengths and scales for each method")
    q.add_argument("model", nargs="?", help="read head dim, base and trained length from this model (or give them)")
    q.add_argument("--methods", default="extrapolate,linear,ntk,yarn", help="comma-separated rotary methods")
    q.add_argument("--factor", type=float, required=True, help="extension factor s")
    q.add_argument("--head-dim", type=int, help="rotary dimensions per head")
    q.add_argument("--base", type=float, help="rope_theta")
    q.add_argument("--original-length", type=int, help="trained context length L")
    q.add_argument("--out", required=True, help="PNG to write")
    q.add_argument("--json", dest="json_out", help="also write the numbers as JSON here")
    q.set_defaults(_plot_run=_plot_wavelengths)
    q = sub.add_parser("similarity", help="cosine similarity of learned position vectors, before / after extension")
    q.add_argument("model", help="a model with a learned position table (GPT-2, BERT, OPT, ...)")
    add_patch_arguments(q)
    q.add_argument("--max-points", type=int, default=512, help="subsample long tables to this many rows")
    q.add_argument("--out", required=True, help="PNG to write")
    q.set_defaults(_plot_run=_plot_similarity, dtype=None, device=None)


@subcommand("plot", "pictures: ppl, positions, heatmap (from result JSON), wavelengths, similarity", _plot_args)
def _plot(args: argparse.Namespace) -> int:
    path = args._plot_run(args)
    print(f"wrote {path}")
    return 0


def _plot_ppl(args: argparse.Namespace) -> Path:
    from ..plots import plot_perplexity_vs_length

    return plot_perplexity_vs_length(args.results, args.out, original_length=args.original_length)


def _plot_positions(args: argparse.Namespace) -> Path:
    from ..plots import plot_position_loss

    return plot_position_loss(args.results, args.out, length=args.length)


def _plot_heatmap(args: argparse.Namespace) -> Path:
    from ..plots import plot_retrieval_heatmap

    return plot_retrieval_heatmap(args.results, args.out)


def _plot_wavelengths(args: argparse.Namespace) -> Path:
    from dataclasses import asdict

    from ..plots import plot_rope_wavelengths, rope_geometry, rope_wavelengths

    geometry: dict[str, Any] = {}
    if args.model:
        from ..loading import load_model

        geometry = rope_geometry(load_model(args.model)[0])
    for key in ("head_dim", "base", "original_length"):
        if getattr(args, key) is not None:
            geometry[key] = getattr(args, key)
    missing = [f"--{k.replace('_', '-')}" for k in ("head_dim", "base", "original_length") if k not in geometry]
    if missing:
        raise ValueError(f"give a model or {', '.join(missing)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.json_out:
        rows = rope_wavelengths(methods, args.factor, **geometry)
        Path(args.json_out).write_text(json.dumps({"kind": "rope_wavelengths", **geometry,
                                                   "methods": [asdict(r) for r in rows]}, indent=2) + "\n")
    return plot_rope_wavelengths(methods, args.factor, args.out, **geometry)


def _plot_similarity(args: argparse.Namespace) -> Path:
    import copy

    from .. import patch_model
    from ..loading import load_model
    from ..plots import plot_position_similarity, position_table

    model, _ = load_model(args.model)
    before = position_table(model)
    extended = patch_model(copy.deepcopy(model), args.method, **patch_kwargs(args))
    return plot_position_similarity(before, position_table(extended), args.out, original_length=before.shape[0],
                                    max_points=args.max_points,
                                    title=f"{args.model}: {args.method}")


# --------------------------------------------------------------------------------------------------------------------
# demo


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="model to extend (default: the offline SmolLM2-135M, trained at 8192 tokens)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, ...")
    p.add_argument("--methods", default=None, help="comma-separated methods (default depends on the device)")
    p.add_argument("--factor", type=float, default=None, help="extension factor (default: 2 on CPU, 4 on GPU)")
    p.add_argument("--lengths", type=parse_lengths, default=None, help="window lengths (default depends on device)")
    p.add_argument("--passkey-lengths", type=parse_lengths, default=None,
                   help="passkey lengths (default: none on CPU, 4k,8k,16k,32k on GPU); 0 disables")
    p.add_argument("--out-dir", default="hf_rope_ext_demo", help="folder for the table, JSON and PNGs")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def demo_plan(device: str, args: argparse.Namespace | None = None) -> dict[str, Any]:
    """What the demo measures on ``device``: on CPU a budget of a few minutes on 2 cores, on a GPU further."""
    on_gpu = not device.startswith("cpu")
    plan: dict[str, Any] = (
        {"methods": ["extrapolate", "ntk", "yarn"], "factor": 4.0,
         "lengths": [2048, 4096, 8192, 16384, 32768], "passkey_lengths": [4096, 8192, 16384, 32768],
         "passkey_trials": 2, "buckets_per_original": 4}
        if on_gpu else
        {"methods": ["extrapolate", "yarn"], "factor": 2.0, "lengths": [2048, 4096, 8192, 12288],
         "passkey_lengths": None, "passkey_trials": 1, "buckets_per_original": 8}
    )
    if args is not None:
        if args.methods:
            plan["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
        if args.factor:
            plan["factor"] = args.factor
        if args.lengths:
            plan["lengths"] = args.lengths
        if args.passkey_lengths is not None:
            plan["passkey_lengths"] = [n for n in args.passkey_lengths if n > 0] or None
    return plan


@subcommand("demo", "the main job: extend the real SmolLM2-135M past its 8192 tokens, table + plots", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    import torch

    from ..loading import load_model
    from ..plots import rope_geometry
    from .compare import compare_methods
    from .text import load_text

    t0 = time.perf_counter()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = demo_plan(device, args)
    offset = 20000  # the stretch of the offline text used in the project's reference measurements
    print(f"hf-rope-ext demo on {device} ({torch.get_num_threads()} CPU threads); loading {args.model} ...",
          flush=True)
    model, tokenizer = load_model(args.model, dtype="float32", device=device)
    load_seconds = time.perf_counter() - t0
    text = load_text(None)
    original = model.config.max_position_embeddings
    longest = max(plan["lengths"])
    print(f"loaded in {load_seconds:.0f} s: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, trained context {original} tokens")
    print(f"measuring: methods {', '.join(plan['methods'])} (each patched for x{plan['factor']:g} = "
          f"{int(original * plan['factor'])} tokens) at lengths {', '.join(map(str, plan['lengths']))}"
          + (f"; passkey at {', '.join(map(str, plan['passkey_lengths']))}" if plan["passkey_lengths"] else ""),
          flush=True)
    report = compare_methods(
        model, tokenizer, plan["methods"], plan["lengths"], factor=plan["factor"], text=text, offset=offset,
        bucket_size=max(1, original // plan["buckets_per_original"]), passkey_lengths=plan["passkey_lengths"],
        passkey_trials=plan["passkey_trials"], model_name=args.model, progress=not args.no_progress,
    )
    shared = [r.method for r in report.runs if r.perplexity and r.perplexity.results
              and any(x.derived_from_window for x in r.perplexity.results)]
    report.notes = [
        (f"model: {args.model} ({type(model).__name__}, fp32, {device}), trained at {original} tokens, zero-shot "
         "(no fine-tuning)"),
        f"text: {text.description}, tokens {offset}–{offset + longest} (no BOS); the same tokens for every method",
        ("PPL @ N: perplexity of the first N tokens of that stretch read as one N-token window (every token after "
         "the first scored once)"),
    ]
    if shared:
        report.notes.append(
            f"{', '.join(shared)}: one forward at {longest} tokens gives every shorter length (token t's loss does "
            "not depend on later tokens for a causal model with static RoPE)")
    if longest > original:
        report.notes.append(f"last column: tokens at positions {original}–{longest}, i.e. past the trained length")
    if not plan["passkey_lengths"]:
        report.notes.append(f"passkey not run: on a CPU each {longest}-token prompt costs about one more forward "
                            "per method and depth; add --passkey-lengths, or run with a GPU")
    from ..registry import get_method

    # wavelengths describe rotary frequencies; attention-level methods keep the trained ones
    wavelength_methods = [m for m in plan["methods"] if m != "none" and get_method(m).kind == "rope"]
    geometry = rope_geometry(model)
    report.notes.append(f"measurements took {report.seconds:.0f} s after a {load_seconds:.0f} s model load")
    print()
    _write_compare_outputs(report, Path(args.out_dir), wavelengths={"methods": wavelength_methods,
                                                                    "factor": plan["factor"], **geometry}
                           if wavelength_methods else None)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s wall time")
    return 0
