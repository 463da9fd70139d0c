"""What every subcommand module shares: the registration decorator and the argument helpers.

A subcommand module registers ``name -> (help, add_arguments, run, example)`` with :func:`subcommand`; ``run`` parses
nothing itself and calls library functions only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn

from ..registry import parse_param_items, parse_param_value

SUBCOMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str | None]
] = {}

parse_value = parse_param_value  # the one ``--param`` value rule (JSON when it parses, else the string)


class UsageError(ValueError):
    """The command cannot run as given: a bad option value, path or input file. Exit status 2 (as argparse's).

    Library functions raise ``ValueError`` / ``FileNotFoundError`` for bad input; both count as usage errors too."""


class RuntimeFailure(RuntimeError):
    """The command was valid but failed while running (a write that failed, a model that cannot run). Exit status 1."""


_USAGE_TYPES = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)


def exit_code(err: BaseException) -> int:
    """2 for a usage error (``UsageError``, ``ValueError``, a missing or wrong path), 1 for any other failure."""
    if isinstance(err, RuntimeFailure):
        return 1
    return 2 if isinstance(err, _USAGE_TYPES) else 1


def one_line(err: BaseException) -> str:
    """The error as one line: whitespace (newlines of a multi-line message) collapsed; an exception type the library
    does not raise on purpose (a bug, or an error from deep inside a dependency) keeps its type name."""
    text = " ".join(str(err).split())
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = repr(err.args[0])
    if isinstance(err, (UsageError, RuntimeFailure)) or (exit_code(err) == 2 and text):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class CliParser(argparse.ArgumentParser):
    """argparse with a one-line error: ``PROG: error: MESSAGE (see PROG --help)`` on stderr, exit status 2 (no usage
    block: ``--help`` shows it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
               example: str | None = None):
    """Register ``run`` as ``hf-rope-ext NAME``; ``example`` is printed at the end of its ``--help``."""

    def decorator(run: Callable[[argparse.Namespace], int]):
        SUBCOMMANDS[name] = (help, add_arguments, run, example)
        return run

    return decorator

def add_verbose(p: argparse.ArgumentParser) -> None:
    """``-v`` on the subcommand too (``hf-rope-ext eval ppl ... -v``); SUPPRESS keeps the top-level value otherwise."""
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress information")

def sub_parser(sub: Any, name: str, help: str, example: str | None = None) -> argparse.ArgumentParser:
    """A nested subcommand parser with ``-v`` and an example at the end of its help."""
    p = sub.add_parser(name, help=help, description=help, epilog=example,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbose(p)
    return p

def parse_params(items: list[str] | None) -> dict[str, Any]:
    return parse_param_items(items, "--param")

def add_patch_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--method / --factor / --target-length / --param ..., shared by every subcommand that patches."""
    p.add_argument("--method", required=required, help="extension method (see `hf-rope-ext methods`)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--factor", type=float, help="new length / original length")
    group.add_argument("--target-length", type=positive_int, help="new context length instead of --factor")
    p.add_argument("--original-length", type=positive_int,
                   help="length the model was trained at (default: from its config)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="method parameter, repeatable; the value is JSON when it parses (16, true, [1,2]), else text")
    p.add_argument("--layer-types", help="per-layer-type rope (Gemma-3): comma-separated layer types to patch")
    p.add_argument(
        "--attn-implementation",
        choices=["sdpa", "eager"],
        help="attention-level methods and --param logn=true: the attention they run on (default: the model's)",
    )
    p.add_argument("--repatch", action="store_true",
                   help="the model is already extended: undo that extension first and apply this one instead")

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
    if getattr(args, "repatch", False):
        kwargs["repatch"] = True
    return kwargs

def _int_at_least(minimum: int, meaning: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, refused with ``meaning`` in the message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {meaning}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"  # argparse names the type in some messages
    return parse


positive_int = _int_at_least(1, "a positive integer")
"""argparse type: an integer >= 1 (a chunk size, a count, a stride)."""
non_negative_int = _int_at_least(0, "0 or more")
"""argparse type: an integer >= 0 (an offset)."""


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

def model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local folder, .gguf file, Hub id (online or cached), or the offline alias smollm2")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: where the model loads)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

def text_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default=None,
                   help="text source: a text/JSONL file, a saved datasets folder, dataset:NAME[:CONFIG], "
                        "builtin:pydoc (default, offline) or builtin:stdlib")
    p.add_argument("--text-field", default="text", help="JSONL / dataset field holding the text (default: text)")
    p.add_argument("--text-split", default="test", help="dataset split (default: test)")
    p.add_argument("--offset", type=non_negative_int, default=0, help="first token of the text to use (default 0)")

def ppl_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=parse_lengths, required=True, help="window lengths, e.g. 2048,4096,8k")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="sliding-window stride S (default: the window, i.e. non-overlapping; the papers use 256)")
    p.add_argument("--windows", type=positive_int, default=1, help="windows per length (default 1)")
    p.add_argument("--bucket-size", type=positive_int, default=None,
                   help="position-bucket width (default: window / 8)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--loss-chunk", type=positive_int, default=1024,
                   help="positions per LM-head chunk (memory; default 1024)")

_PATCH_OPTIONS = {"factor": "--factor", "target_length": "--target-length", "original_length": "--original-length",
                  "param": "--param", "layer_types": "--layer-types", "attn_implementation": "--attn-implementation",
                  "repatch": "--repatch"}


def check_patch_options(args: argparse.Namespace) -> None:
    """Patch options without ``--method`` are refused: evaluating the model unpatched instead would be a silently
    wrong result. Also the method name itself, before a model is loaded."""
    if getattr(args, "method", None):
        from ..registry import get_method

        get_method(args.method)
        return
    given = [flag for key, flag in _PATCH_OPTIONS.items() if getattr(args, key, None) not in (None, False, [])]
    if given:
        raise UsageError(
            f"{', '.join(given)} given without --method: name the method to patch with (see `hf-rope-ext methods`), "
            "or leave these out to use the model as saved"
        )


def load(args: argparse.Namespace, patch: bool = True) -> tuple[Any, Any]:
    from .. import patch_model
    from ..loading import load_model

    check_patch_options(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if patch and getattr(args, "method", None):
        patch_model(model, args.method, tokenizer=tokenizer, **patch_kwargs(args))
    return model, tokenizer

def text_source(args: argparse.Namespace) -> Any:
    from ..eval.text import load_text

    return load_text(args.text, field=args.text_field, split=args.text_split)

def write_json(report: Any, path: str | None) -> None:
    if path:
        report.save(path)
        print(f"wrote {path}")

