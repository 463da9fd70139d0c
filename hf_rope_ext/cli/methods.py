"""``hf-rope-ext methods``: list the extension methods (calls :func:`hf_rope_ext.list_methods`)."""

from __future__ import annotations

import argparse
import json

from ._common import subcommand

EXAMPLE = """examples:
  hf-rope-ext methods
  hf-rope-ext methods --kind attention --json"""


def _methods_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kind",
        choices=["rope", "absolute", "attention"],
        help="only methods of this kind (rope: rotary frequencies; absolute: position tables; attention: "
        "attention-level methods for rotary models)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@subcommand("methods", "list the extension methods", _methods_args, EXAMPLE)
def _methods(args: argparse.Namespace) -> int:
    from .. import list_methods

    rows = list_methods(args.kind)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        params = ", ".join(f"{k}={v['default']}" for k, v in r["parameters"].items())
        print(f"{r['name']:<{width}}  {r['kind']:<9}  {r['description']}" + (f"  [{params}]" if params else ""))
    return 0
