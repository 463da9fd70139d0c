"""``hf-rope-ext finetune`` (the fine-tune recipe, :mod:`hf_rope_ext.recipes.finetune`) and
``hf-rope-ext recipes list|cp`` (the shipped configurations, :mod:`hf_rope_ext.recipes`)."""

from __future__ import annotations

import argparse

from ._common import sub_parser, subcommand

FINETUNE_EXAMPLE = """Every argument after `finetune` goes to the recipe; `hf-rope-ext finetune --help` lists its
options.

examples:
  hf-rope-ext finetune --config smollm2_pose_yarn_smoke --output_dir runs/smoke
  hf-rope-ext recipes cp smollm2_pose_yarn_smoke my.yaml && hf-rope-ext finetune --config my.yaml --max_steps 50
  accelerate launch --config_file ddp.yaml -m hf_rope_ext.recipes.finetune --config my.yaml   # several processes"""

RECIPES_EXAMPLE = """examples:
  hf-rope-ext recipes list
  hf-rope-ext recipes cp smollm2_pose_yarn_smoke my.yaml
  hf-rope-ext recipes cp accelerate/fsdp ."""


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe_args", nargs=argparse.REMAINDER, help="the recipe's own arguments (--config FILE ...)")


@subcommand("finetune", "fine-tune an extended model briefly at the new length (the shipped recipe)", _finetune_args,
            FINETUNE_EXAMPLE)
def _finetune(args: argparse.Namespace) -> int:
    from ..recipes.finetune import main as recipe_main

    return int(recipe_main(list(args.recipe_args), prog="hf-rope-ext finetune") or 0)


def _recipes_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="recipes_command", required=True, metavar="{list,cp}")
    q = sub_parser(sub, "list", "the shipped recipe and accelerate configurations", RECIPES_EXAMPLE)
    q.set_defaults(_recipes_run=_list)
    q = sub_parser(sub, "cp", "copy a shipped configuration out to edit it", RECIPES_EXAMPLE)
    q.add_argument("name", help="a name from `hf-rope-ext recipes list`")
    q.add_argument("dest", nargs="?", default=".", help="folder or file name (default: the current folder)")
    q.add_argument("--overwrite", action="store_true", help="replace the destination file if it exists")
    q.set_defaults(_recipes_run=_cp)


@subcommand("recipes", "the shipped fine-tune configurations: list them, copy one out", _recipes_args,
            RECIPES_EXAMPLE)
def _recipes(args: argparse.Namespace) -> int:
    return args._recipes_run(args)


def _list(args: argparse.Namespace) -> int:
    import yaml

    from ..recipes import list_configs

    for name, path in list_configs().items():
        summary = ""
        if not name.startswith("accelerate/"):
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            summary = ", ".join(f"{k}={values[k]}" for k in ("model", "method", "factor", "train_mode") if k in values)
        print(f"{name:<32} {summary}")
    return 0


def _cp(args: argparse.Namespace) -> int:
    from ..recipes import copy_config

    try:
        path = copy_config(args.name, args.dest, overwrite=args.overwrite)
    except FileExistsError as err:
        raise ValueError(str(err).replace("overwrite=True (--overwrite)", "--overwrite")) from None
    print(f"wrote {path}")
    return 0
