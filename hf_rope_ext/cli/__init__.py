"""``hf-rope-ext`` command line: one module per subcommand group, each calling library functions only.

    methods.py   hf-rope-ext methods
    patch.py     hf-rope-ext patch | unpatch
    eval.py      hf-rope-ext eval ppl|passkey|needle | compare
    plot.py      hf-rope-ext plot ppl|positions|heatmap|wavelengths|similarity
    demo.py      hf-rope-ext demo
    card.py      hf-rope-ext card
    push.py      hf-rope-ext push
    finetune.py  hf-rope-ext finetune | recipes list|cp
    export.py    hf-rope-ext export (GGUF for llama.cpp)
    search.py    hf-rope-ext search (LongRoPE factor search)
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from . import card, demo, eval, export, finetune, methods, patch, plot, push, search  # noqa: F401  (each registers its subcommands)
from ._common import (
    SUBCOMMANDS,
    CliParser,
    RuntimeFailure,
    UsageError,
    add_patch_arguments,
    add_verbose,
    exit_code,
    one_line,
    parse_params,
    parse_value,
    patch_kwargs,
    subcommand,
)

__all__ = ["main", "build_parser", "subcommand", "add_patch_arguments", "patch_kwargs", "parse_params", "parse_value",
           "UsageError", "RuntimeFailure", "EXIT_USAGE", "EXIT_FAILURE"]

EXIT_USAGE = 2
"""Exit status of a usage error: a bad option, value, path or input file (argparse's own status for bad options)."""
EXIT_FAILURE = 1
"""Exit status of a valid command that failed while running (out of memory, a write that failed, a bug)."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hf_rope_ext")
    except PackageNotFoundError:  # a source tree that was never installed
        from .. import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="hf-rope-ext",
        description="Extend the context window of HF transformer models.",
        epilog="run `hf-rope-ext COMMAND --help` for a command's options and examples\n\n"
        "example:\n  hf-rope-ext patch smollm2 --method yarn --factor 2 --out out/smollm2-yarn-16k",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress information")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run, example) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=example,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_verbose(p)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def _recipe_passthrough(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """``[-v] finetune ARGS...`` -> (top-level args, ARGS): the recipe parses its own arguments (and ``--help``)."""
    for i, token in enumerate(argv):
        if not token.startswith("-"):
            return (argv[:i], argv[i + 1 :]) if token == "finetune" else None
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status: 0 done, 2 a usage error (bad option, value, path or input file;
    also what argparse exits with), 1 a failure while running, 130 interrupted. Every error is ONE line on stderr,
    ``error: ...``; the traceback only with ``-v``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)
    parser = build_parser()
    passthrough = _recipe_passthrough(argv)
    try:
        if passthrough is not None:
            args = parser.parse_args([*passthrough[0], "finetune"])
            args.recipe_args = passthrough[1]
        else:
            args = parser.parse_args(argv)
    except SystemExit as done:  # --help / --version exit as argparse does; a usage error returns its status
        if done.code in (0, None):
            raise
        return int(done.code) if isinstance(done.code, int) else EXIT_USAGE
    verbose = verbose or bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (every failure ends as one line; -v shows where)
        code = exit_code(err)
        if verbose:
            traceback.print_exc()
        hint = "" if verbose or code == EXIT_USAGE else " (run again with -v for the traceback)"
        print(f"error: {one_line(err)}{hint}", file=sys.stderr)
        return code
