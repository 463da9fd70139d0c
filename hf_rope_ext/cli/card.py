"""``hf-rope-ext card``: write a model card for a saved extended model (calls :mod:`hf_rope_ext.cards`)."""

from __future__ import annotations

import argparse

from ._common import subcommand

EXAMPLE = """example:
  hf-rope-ext card out/smollm2-yarn-16k --results ppl.json passkey.json \\
      --base-model HuggingFaceTB/SmolLM2-135M-Instruct --repo-id me/smollm2-yarn-16k
  (results: reports from `hf-rope-ext eval ... --out`, or {"kind": "rows", "rows": [...]}; see docs/cards.md)"""


def _card_args(p: argparse.ArgumentParser) -> None:
    from ..cards import TEMPLATE_NAMES

    p.add_argument("folder", help="folder saved from a patched model (config.json carries 'hf_rope_ext')")
    p.add_argument("--results", nargs="+", action="extend", default=[], metavar="FILE",
                   help="JSON reports of kind perplexity, retrieval, compare, training_summary or rows "
                        "(docs/cards.md); repeatable")
    p.add_argument("--training", metavar="PATH",
                   help="training_summary.json or the folder holding it (default: FOLDER/training_summary.json if "
                        "present)")
    p.add_argument("--plots", nargs="+", action="extend", default=[], metavar="IMAGE",
                   help="extra plot images to copy into the folder and show in the card")
    p.add_argument("--base-model", help="Hub id (or local folder) of the model that was extended (default: the one "
                                        "recorded when the model was patched)")
    p.add_argument("--base-card", help="the base model's README.md, to carry its license and language over")
    p.add_argument("--license", help="Hub license id (default: the base model card's)")
    p.add_argument("--language", nargs="+", help="language code(s) (default: the base model card's)")
    p.add_argument("--repo-id", help="Hub id the model will be pushed to (used in the loading code)")
    p.add_argument("--template", help=f"{' or '.join(TEMPLATE_NAMES)} or a path (default: from the architecture)")
    p.add_argument("--stdout", action="store_true", help="print the card instead of writing README.md")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a README.md hf-rope-ext did not write (kept as README.md.bak)")


@subcommand("card", "write a model card (README.md) for a saved extended model", _card_args, EXAMPLE)
def _card(args: argparse.Namespace) -> int:
    from ..cards import render_card, write_card

    kwargs = dict(
        results=args.results, training=args.training, plots=args.plots, base_model=args.base_model,
        base_card=args.base_card, license=args.license, language=args.language, repo_id=args.repo_id,
        template=args.template,
    )
    if args.stdout:
        print(render_card(args.folder, copy_plots=False, **kwargs), end="")
        return 0
    path = write_card(args.folder, overwrite=args.overwrite, **kwargs)
    print(f"wrote {path}")
    return 0
