"""``hf-rope-ext plot ppl|positions|heatmap|wavelengths|similarity``: pictures (calls :mod:`hf_rope_ext.plots`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ._common import add_patch_arguments, patch_kwargs, sub_parser, subcommand

EXAMPLES = {
    "ppl": "hf-rope-ext plot ppl ppl_yarn.json ppl_ntk.json --out ppl.png",
    "positions": "hf-rope-ext plot positions ppl_yarn.json --length 16384 --out positions.png",
    "heatmap": "hf-rope-ext plot heatmap passkey.json --out passkey.png",
    "wavelengths": "hf-rope-ext plot wavelengths out/smollm2-yarn-16k --methods linear,ntk,yarn --factor 2 "
                   "--out wavelengths.png",
    "similarity": "hf-rope-ext plot similarity gpt2 --method interpolate --factor 2 --out similarity.png",
}
EXAMPLE = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES.values())


def _example(name: str) -> str:
    return f"example:\n  {EXAMPLES[name]}"

def _plot_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="plot_command", required=True, metavar="{" + ",".join(EXAMPLES) + "}")
    q = sub_parser(sub, "ppl", "perplexity vs length from eval ppl / compare JSON files", _example("ppl"))
    q.add_argument("results", nargs="+", help="JSON files written by `eval ppl --out` or `compare`")
    q.add_argument("--out", required=True, help="PNG to write")
    q.add_argument("--original-length", type=int, help="mark this length (default: from the results)")
    q.set_defaults(_plot_run=_plot_ppl)
    q = sub_parser(sub, "positions", "loss by position bucket from eval ppl / compare JSON files",
                   _example("positions"))
    q.add_argument("results", nargs="+", help="JSON files written by `eval ppl --out` or `compare`")
    q.add_argument("--out", required=True, help="PNG to write")
    q.add_argument("--length", type=int, help="which window length (default: the longest)")
    q.set_defaults(_plot_run=_plot_positions)
    q = sub_parser(sub, "heatmap", "accuracy heatmap from eval passkey / needle JSON", _example("heatmap"))
    q.add_argument("results", help="JSON file written by `eval passkey --out` or `eval needle --out`")
    q.add_argument("--out", required=True, help="PNG to write")
    q.set_defaults(_plot_run=_plot_heatmap)
    q = sub_parser(sub, "wavelengths", "RoPE per-dimension wavelengths and scales for each method",
                   _example("wavelengths"))
    q.add_argument("model", nargs="?", help="read head dim, base and trained length from this model (or give them)")
    q.add_argument("--methods", default="extrapolate,linear,ntk,yarn", help="comma-separated rotary methods")
    q.add_argument("--factor", type=float, required=True, help="extension factor s")
    q.add_argument("--head-dim", type=int, help="rotary dimensions per head")
    q.add_argument("--base", type=float, help="rope_theta")
    q.add_argument("--original-length", type=int, help="trained context length L")
    q.add_argument("--out", required=True, help="PNG to write")
    q.add_argument("--json", dest="json_out", help="also write the numbers as JSON here")
    q.set_defaults(_plot_run=_plot_wavelengths)
    q = sub_parser(sub, "similarity", "cosine similarity of learned position vectors, before / after extension",
                   _example("similarity"))
    q.add_argument("model", help="a model with a learned position table (GPT-2, BERT, OPT, ...)")
    add_patch_arguments(q)
    q.add_argument("--max-points", type=int, default=512, help="subsample long tables to this many rows")
    q.add_argument("--out", required=True, help="PNG to write")
    q.set_defaults(_plot_run=_plot_similarity, dtype=None, device=None)


@subcommand("plot", "pictures: ppl, positions, heatmap (from result JSON), wavelengths, similarity", _plot_args,
            EXAMPLE)
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

    from ..plots import config_rope_geometry, plot_rope_wavelengths, rope_wavelengths

    geometry: dict[str, Any] = {}
    if args.model:
        from ..loading import load_config

        geometry = config_rope_geometry(load_config(args.model))  # the config only: no weights are read
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


