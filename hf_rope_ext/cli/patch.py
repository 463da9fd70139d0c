"""``hf-rope-ext patch`` and ``hf-rope-ext unpatch``: extend a saved model, or undo an extension, and save it
(calls :func:`hf_rope_ext.patch_model` / :func:`hf_rope_ext.unpatch_model`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import add_patch_arguments, patch_kwargs, subcommand

PATCH_EXAMPLE = """examples:
  hf-rope-ext patch smollm2 --method yarn --factor 2 --out out/smollm2-yarn-16k
  hf-rope-ext patch smollm2 --method dca --factor 2 --param chunk_size=6144 --out out/smollm2-dca-16k
  hf-rope-ext patch out/smollm2-yarn-16k --method ntk --factor 4 --repatch --out out/smollm2-ntk-32k
  hf-rope-ext patch model.gguf --method yarn --factor 2 --out model-yarn-16k.gguf   (GGUF: rope metadata only)"""

UNPATCH_EXAMPLE = """example:
  hf-rope-ext unpatch out/smollm2-yarn-16k --out out/smollm2-original"""

_SHOWN = ("method", "factor", "original_max_position_embeddings", "max_position_embeddings", "parameters",
          "requires_plugin")


def _check_out(args: argparse.Namespace) -> None:
    """Refuse, before loading anything, to write into the folder being read or over a non-empty folder unless
    ``--overwrite`` (no user file overwritten unasked)."""
    target, source = Path(args.out).expanduser(), Path(args.model).expanduser()
    if source.exists() and target.resolve() == source.resolve():
        raise ValueError(f"--out {args.out} is the model folder being read; give another folder")
    if target.exists() and not target.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder")
    if target.is_dir() and any(target.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {args.out} exists and is not empty; give a new or empty folder, or --overwrite")


def _save(model, tokenizer, out: str) -> None:
    """Save into a temporary sibling of ``out``, then swap it in: an ``--overwrite`` leaves none of the old folder's
    files (a stale shard index, another model's README.md), and a failure while writing leaves the old folder as it
    was."""
    from ..training.io import atomic_directory

    with atomic_directory(Path(out).expanduser().resolve()) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local folder, .gguf file, Hub id, or the offline aliases smollm2 / minilm")


def _save_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="new (or empty) folder to save the model and tokenizer in")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even when it holds files (the whole folder is replaced, atomically)")


def _patch_args(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    add_patch_arguments(p)
    _save_args(p)


@subcommand("patch", "patch a model and save it extended", _patch_args, PATCH_EXAMPLE)
def _patch(args: argparse.Namespace) -> int:
    from .. import patch_info, patch_model
    from ..loading import load_model
    from ..registry import get_method

    get_method(args.method)  # an unknown method is named before anything else is looked at
    if str(args.out).endswith(".gguf"):
        return _patch_gguf(args)  # GGUF in, GGUF out: see the section at the end of this file
    _check_out(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype, task="declared")
    patch_model(model, args.method, tokenizer=tokenizer, **patch_kwargs(args))
    _save(model, tokenizer, args.out)
    info = patch_info(model)
    print(json.dumps({k: info[k] for k in _SHOWN if k in info}, indent=2, default=str))
    print(f"saved to {args.out}")
    return 0


def _unpatch_args(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    _save_args(p)


@subcommand("unpatch", "undo the extension of a saved model and save the original", _unpatch_args, UNPATCH_EXAMPLE)
def _unpatch(args: argparse.Namespace) -> int:
    from .. import patch_info, unpatch_model
    from ..loading import load_model

    _check_out(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype, task="declared")
    info = patch_info(model)
    if not info:
        raise ValueError(f"{args.model} is not extended by hf-rope-ext (its config has no 'hf_rope_ext' entry)")
    unpatch_model(model, tokenizer=tokenizer)
    _save(model, tokenizer, args.out)
    print(f"removed {info['method']} x{info['factor']:g}: context back to {info['original_max_position_embeddings']} "
          f"tokens; saved to {args.out}")
    return 0


# ------------------------------------------------------------------------------------------- GGUF in, GGUF out
# (issue 13) an --out ending in .gguf: the input GGUF's rope metadata is rewritten for llama.cpp, tensors untouched
# (hf_rope_ext.gguf.patch_gguf); a GGUF input with a folder --out still loads and saves a transformers model above.


def _patch_gguf(args: argparse.Namespace) -> int:
    from ..gguf import patch_gguf
    from ..loading import smollm2_gguf_path

    source = str(smollm2_gguf_path()) if args.model == "smollm2" else str(args.model)
    if not source.endswith(".gguf"):
        raise ValueError(f"--out {args.out} is a GGUF file, so the model must be a .gguf file too, got {args.model}; "
                         "to turn a model folder into a GGUF use `hf-rope-ext export DIR --format gguf --out FILE`")
    unused = [o for o, v in (("--dtype", args.dtype), ("--layer-types", args.layer_types),
                             ("--attn-implementation", args.attn_implementation), ("--repatch", args.repatch)) if v]
    if unused:
        raise ValueError(f"{', '.join(unused)} do not apply to a GGUF rewrite (only the rope metadata changes)")
    kwargs = patch_kwargs(args)
    result = patch_gguf(source, args.out, args.method, kwargs.pop("factor"),
                        max_position_embeddings=kwargs.pop("max_position_embeddings"),
                        original_context_length=kwargs.pop("original_max_position_embeddings"),
                        overwrite=args.overwrite, **kwargs)
    print(json.dumps({"rope": result["keys"], "how": result["how"]}, indent=2))
    print(f"wrote {args.out}")
    return 0
