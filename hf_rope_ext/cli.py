"""``hf-rope-ext`` command line: argparse subcommands that call the library's functions and nothing else.

Each feature module adds its subcommands through ``SUBCOMMANDS`` (name -> (add_arguments, run)).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def decorator(run: Callable[[argparse.Namespace], int]):
        SUBCOMMANDS[name] = (help, add_arguments, run)
        return run

    return decorator


def parse_value(text: str) -> Any:
    """``--param key=value`` values: JSON when it parses (numbers, lists, true/null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_params(items: list[str] | None) -> dict[str, Any]:
    params = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--param expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        params[key.strip()] = parse_value(value)
    return params


def _methods_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kind",
        choices=["rope", "absolute", "attention"],
        help="only methods of this kind (rope: rotary frequencies; absolute: position tables; attention: "
        "attention-level methods for rotary models)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@subcommand("methods", "list the extension methods", _methods_args)
def _methods(args: argparse.Namespace) -> int:
    from . import list_methods

    rows = list_methods(args.kind)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        params = ", ".join(f"{k}={v['default']}" for k, v in r["parameters"].items())
        print(f"{r['name']:<{width}}  {r['kind']:<8}  {r['description']}" + (f"  [{params}]" if params else ""))
    return 0


def add_patch_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--method / --factor / --target-length / --param, shared by every subcommand that patches."""
    p.add_argument("--method", required=required, help="extension method (see `hf-rope-ext methods`)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--factor", type=float, help="new length / original length")
    group.add_argument("--target-length", type=int, help="new context length instead of --factor")
    p.add_argument("--original-length", type=int, help="length the model was trained at (default: from its config)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="method parameter, repeatable")
    p.add_argument("--layer-types", help="per-layer-type rope (Gemma-3): comma-separated layer types to patch")
    p.add_argument(
        "--attn-implementation",
        choices=["sdpa", "eager"],
        help="attention-level methods and --param logn=true: the attention they run on (default: the model's)",
    )


def patch_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = dict(
        factor=args.factor,
        max_position_embeddings=args.target_length,
        original_max_position_embeddings=args.original_length,
        **parse_params(args.param),
    )
    if getattr(args, "layer_types", None):
        kwargs["layer_types"] = args.layer_types.split(",")
    if getattr(args, "attn_implementation", None):
        kwargs["attn_implementation"] = args.attn_implementation
    return kwargs


def _patch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local folder, .gguf file, Hub id, or the offline aliases smollm2 / minilm")
    add_patch_arguments(p)
    p.add_argument("--out", required=True, help="folder to save the extended model and tokenizer")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")


@subcommand("patch", "patch a model and save it extended", _patch_args)
def _patch(args: argparse.Namespace) -> int:
    from . import patch_info, patch_model
    from .loading import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    patch_model(model, args.method, tokenizer=tokenizer, **patch_kwargs(args))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    info = patch_info(model)
    print(
        json.dumps(
            {
                k: info[k]
                for k in (
                    "method",
                    "factor",
                    "original_max_position_embeddings",
                    "max_position_embeddings",
                    "parameters",
                    "requires_plugin",
                )
                if k in info
            },
            indent=2,
            default=str,
        )
    )
    print(f"saved to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # feature modules register their subcommands on import
    for module in ("hf_rope_ext.eval.cli", "hf_rope_ext.cards", "hf_rope_ext.hub"):
        try:
            __import__(module)
        except ModuleNotFoundError as err:
            if err.name is None or not module.startswith(err.name):
                raise
    parser = argparse.ArgumentParser(
        prog="hf-rope-ext", description="Extend the context window of HF transformer models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress information")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # under `python -m`, feature modules register on the importable `hf_rope_ext.cli`, not on this `__main__` copy
    from hf_rope_ext.cli import main as _main

    sys.exit(_main())
