"""``hf-rope-ext push``: upload a saved extended model to the Hub (calls :mod:`hf_rope_ext.hub`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import UsageError, subcommand

EXAMPLE = """examples:
  hf-rope-ext push out/smollm2-yarn-16k me/smollm2-yarn-16k --dry-run     # list what would be sent
  hf-rope-ext push out/smollm2-yarn-16k me/smollm2-yarn-16k --private"""


def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder",
                   help="saved extended model: weights, config.json with 'hf_rope_ext', tokenizer, README.md")
    p.add_argument("repo_id", help="Hub model repo, owner/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to push to (created if missing; default main)")
    p.add_argument("--commit-message", help="commit title (default names method, factor and lengths)")
    p.add_argument("--dry-run", action="store_true", help="list exactly what would be sent; contact nothing")
    p.add_argument("--include-checkpoints", action="store_true",
                   help="also send training checkpoints and optimizer / scheduler / RNG states")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="leave out files matching this pattern (relative path or file name); repeatable")


@subcommand("push", "upload a saved extended model (with its card) to the Hugging Face Hub", _push_args, EXAMPLE)
def _push(args: argparse.Namespace) -> int:
    from ..hub import plan_push, push_folder

    if args.dry_run:
        plan = plan_push(args.folder, include_checkpoints=args.include_checkpoints, exclude=args.exclude,
                         repo_id=args.repo_id)
        print(plan.describe(args.repo_id, args.revision, args.private), flush=True)
        if not plan.ok:
            raise UsageError(f"dry run: this push would be refused: {'; '.join(plan.problems)}")
        print("dry run: nothing was sent")
        return 0
    result = push_folder(
        args.folder, args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message,
        include_checkpoints=args.include_checkpoints, exclude=args.exclude,
    )
    if result.card_retargeted_from is not None:
        print(f"note: {Path(args.folder, 'README.md')} named {result.card_retargeted_from!r} in its loading code; "
              f"updated it in place to name {result.repo_id!r} (the uploaded card names the repo)")
    print(f"pushed {len(result.files)} files to {result.url}")
    print(f"commit: {result.commit_url}")
    return 0
