"""The fine-tune recipe's options: one dataclass, a field per option with its help, read from YAML (``--config``,
a shipped name or a file) and then ``--key value`` overrides on the command line, checked before anything loads.

``metadata["help"]`` of each field is its ``--help`` text; ``metadata["resume"]`` marks the options a resumed run must
keep (they change the model or the data order), from which ``RESUME_KEYS`` is derived. The command line is stdlib
``argparse`` built from the dataclass rather than ``transformers.HfArgumentParser``: that parser hands every metadata
key to ``add_argument``, turns ``bool | str`` and ``str | list`` fields into one type, exits instead of raising, and
cannot layer YAML defaults under command-line values (docs/finetuning.md).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hf_rope_ext import registry
from hf_rope_ext.training import data, io

EXAMPLES = """examples:
  hf-rope-ext finetune --config smollm2_pose_yarn_smoke --output_dir runs/smoke
  hf-rope-ext finetune --config my.yaml --max_steps 50 --lr 1e-4 --param beta_fast=16
  hf-rope-ext finetune --model ./my-model --factor 4 --method yarn --data notes.txt --output_dir runs/x
  accelerate launch --config_file ddp.yaml -m hf_rope_ext.recipes.finetune --config my.yaml

--config takes a shipped config name (`hf-rope-ext recipes list`) or a YAML file; options on the command line
override it. A value is read as it would be written in the YAML file (--data "[a.txt, b.txt]", --resume true,
--factor null); list options also take several values (--data a.txt b.txt)."""


# ====================================================================================================================
# 1. Options: one flat dataclass. metadata["help"] is the --help text; metadata["resume"] marks the options that must
#    not change between a run and its resumption (they change the model or the data order).


def opt(default: Any, help: str, *, resume: bool = False) -> Any:
    """A dataclass field with its help text (shown by ``--help``) and whether a resumed run must keep it."""
    metadata = {"help": help, "resume": resume}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Options:
    """Everything the recipe reads. Each field's help is in its metadata (``--help`` prints it)."""

    # --- model and extension
    model: str | None = opt(
        None,
        "Model to extend: a local folder, a .gguf file, a Hub id, or an offline alias (smollm2, minilm). Required.",
        resume=True,
    )
    tokenizer: str | None = opt(None, "Tokenizer folder or id when it differs from the model's.")
    dtype: Literal["float32", "bfloat16", "float16"] = opt(
        "float32", "dtype the weights are loaded and trained in; mixed_precision adds autocast on top.", resume=True
    )
    method: str = opt(
        "yarn",
        "Extension method from the registry (`hf-rope-ext methods`): yarn, linear, ntk, ... or copy/hierarchical "
        "for learned tables.",
        resume=True,
    )
    factor: float | None = opt(None, "New length / original length. Give this or target_length.", resume=True)
    target_length: int | None = opt(None, "New context length in tokens, instead of factor.", resume=True)
    original_length: int | None = opt(
        None, "Length the model was trained at; default: from its config.", resume=True
    )
    method_params: dict[str, Any] = opt(
        {},
        "The method's own parameters, e.g. {beta_fast: 32} for yarn.",
        resume=True,
    )

    # --- what is trained
    train_mode: Literal["lora", "longlora", "full"] = opt(
        "lora",
        "lora: LoRA adapters only; longlora: LoRA + trainable embeddings and norms (LongLoRA); full: every weight.",
        resume=True,
    )
    lora_r: int = opt(8, "LoRA rank.", resume=True)
    lora_alpha: int = opt(16, "LoRA scaling numerator (scale = alpha / r).", resume=True)
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.")
    lora_targets: str | list[str] = opt(
        "attention",
        "Modules that get LoRA adapters: 'attention' (every linear layer inside attention blocks), 'all-linear', "
        "or a list of module names (peft matching: exact or dotted suffix).",
        resume=True,
    )
    modules_to_save: list[str] = opt(
        [], "Extra modules trained fully next to LoRA (names, peft matching).", resume=True
    )
    train_position_embeddings: bool | None = opt(
        None,
        "Train learned position tables fully in lora mode; default: yes when a learned table was extended.",
        resume=True,
    )
    objective: Literal["auto", "causal", "masked"] = opt(
        "auto",
        "Training loss: next-token (causal) or BERT-style masked LM; auto follows the model's head.",
        resume=True,
    )
    mlm_probability: float = opt(0.15, "Fraction of tokens masked for the masked objective.")

    # --- PoSE / S²-Attn
    pose: bool = opt(
        False,
        "PoSE: train on short windows (seq_len) whose position ids skip to cover the target length.",
        resume=True,
    )
    pose_chunks: int = opt(2, "PoSE: number of chunks each window is cut into.", resume=True)
    s2attn: bool = opt(
        False,
        "LongLoRA's shifted sparse attention while training (Llama-family models); full attention at inference.",
        resume=True,
    )
    s2attn_group_ratio: float = opt(0.25, "S²-Attn group size as a fraction of seq_len.", resume=True)
    context_parallel: int = opt(
        1,
        "Context parallelism: shard each sequence over this many GPUs (accelerate ParallelismConfig cp_size, FSDP2; "
        "recipes/accelerate/fsdp_context_parallel.yaml). Position ids stay the global ones on every shard.",
        resume=True,
    )

    # --- data
    data: list[str] = opt(
        ["builtin:pydoc"],
        "Training text: files (.txt .md .jsonl .json .parquet), folders, a `datasets` name, or builtin:pydoc / "
        "builtin:stdlib (offline; see hf_rope_ext.text).",
        resume=True,
    )
    text_field: str = opt(
        "text", "Field / column holding the text in JSONL, JSON, parquet and datasets sources.", resume=True
    )
    dataset_config: str | None = opt(None, "Configuration name for a `datasets` source.")
    dataset_split: str = opt("train", "Split of a `datasets` source.")
    eval_data: list[str] = opt(
        [], "Held-out text for the before/after perplexity; default: the tail of data, kept out of training."
    )
    eval_chunks: int = opt(4, "Number of held-out chunks of target length to evaluate (0: no evaluation).")
    seq_len: int | None = opt(
        None, "Tokens per training sequence; default: the target length (with pose: the original length).", resume=True
    )
    max_tokens: int | None = opt(None, "Read at most this many tokens of training data.", resume=True)
    cache_dir: str | None = opt(
        None, "Where tokenised data is cached; default $HF_ROPE_EXT_CACHE or ~/.cache/hf_rope_ext/tokens."
    )

    # --- optimisation
    max_steps: int = opt(400, "Optimizer steps.")
    batch_size: int = opt(1, "Sequences per process per micro-batch.", resume=True)
    grad_accum: int = opt(8, "Micro-batches per optimizer step.", resume=True)
    lr: float = opt(2e-4, "Peak learning rate (LoRA ~1e-4..2e-4; full fine-tuning ~2e-5).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = opt("cosine", "Decay after warmup.")
    warmup_steps: int = opt(20, "Linear warmup steps.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0: off).")
    seed: int = opt(0, "Seed for data order, PoSE sampling, masking and dropout.", resume=True)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = opt(
        None, "accelerate mixed precision (autocast); default: what `accelerate launch` / its config says, else no."
    )
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    loss_chunk: int = opt(
        2048,
        "Next-token loss: positions per chunk of logits (built one chunk at a time, recomputed in backward, so "
        "[tokens, vocab] logits never exist); 0: the model's own loss over full logits.",
    )

    # --- run
    output_dir: str | None = opt(None, "Run folder: checkpoints/, model/, run_config.yaml. Required.")
    save_every: int = opt(100, "Checkpoint every N optimizer steps (0: only on interruption).")
    keep_checkpoints: int = opt(2, "How many recent checkpoints to keep (0: all).")
    resume: bool | str = opt(
        False, "Continue from the latest checkpoint in output_dir (true) or from a given checkpoint folder."
    )
    overwrite: bool = opt(False, "Start from scratch even if output_dir already holds checkpoints (they are deleted).")
    stop_after: int | None = opt(
        None, "Stop with a checkpoint after this many steps in this invocation (time-limited jobs; resume later)."
    )
    log_every: int = opt(10, "Log the loss every N steps.")
    eval_before_after: bool = opt(True, "Held-out perplexity at the target length before and after training.")
    eval_batch_size: int = opt(1, "Batch size for the held-out evaluation.")
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "dtype of the saved model; auto keeps the training dtype."
    )
    model_card: bool = opt(True, "Write README.md with hf_rope_ext.cards.")


METHOD_PARAMS_HELP = next(f.metadata["help"] for f in dataclasses.fields(Options) if f.name == "method_params")
RESUME_KEYS = tuple(f.name for f in dataclasses.fields(Options) if f.metadata["resume"])
"""Options a resumed run must keep (derived from the fields' ``resume`` metadata)."""

# --help shows the options in these groups, each starting at the named field
_GROUPS = {
    "model": "model and extension",
    "train_mode": "what is trained",
    "pose": "PoSE / shifted sparse attention",
    "data": "data",
    "max_steps": "optimisation",
    "output_dir": "run",
}


def _describe(annotation: Any, *, short: bool = False) -> str:
    """The type as --help and error messages show it: ``'lora' | 'full'``; ``short``: ``{lora,full}|null``."""
    if typing.get_origin(annotation) is Literal:
        if short:
            return "{" + ",".join(map(str, typing.get_args(annotation))) + "}"
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return ("|" if short else " | ").join(_describe(a, short=short) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation)) if not typing.get_args(annotation) else str(annotation)


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """``value`` (from YAML, or a command-line value read as YAML) as ``annotation``, or ValueError naming the option.
    Numbers written like 2e-4 (a string to YAML 1.1) become floats; a single value becomes a one-item list."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if isinstance(annotation, types.UnionType) or origin is typing.Union:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(name, value, arg)
                except ValueError:
                    pass
    elif origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            return "no"
        if value in args:
            return value
        raise ValueError(f"option {name}: {value!r} is not one of {', '.join(map(repr, args))}")
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if annotation is float else int(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if annotation is float:
                return float(value)
            if float(value).is_integer():
                return int(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list):
            return [_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(items)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ValueError(f"option {name}: expected {_describe(annotation)}, got {value!r}")


def _unknown(keys: list[str], known: list[str], where: str) -> ValueError:
    named = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=1)
        named.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ValueError(f"unknown option(s) in {where}: {', '.join(named)}; valid options: {', '.join(known)}")


def options_from_dict(values: dict[str, Any], where: str = "config") -> Options:
    """Build Options from a mapping; unknown keys and wrong types raise ValueError naming them."""
    hints = typing.get_type_hints(Options)
    unknown = [k for k in values if k not in hints]
    if unknown:
        raise _unknown(unknown, list(hints), where)
    for key in ("data", "eval_data"):
        entries = values.get(key)
        for entry in entries if isinstance(entries, list) else [entries]:
            if isinstance(entry, dict):
                raise ValueError(
                    f"option {key}: entry {entry!r} is a mapping (YAML reads `name: value` inside [...] as one); "
                    f"entries are strings: a file, a folder, builtin:pydoc, or a `datasets` name alone, e.g. "
                    f"{key}: [{next(iter(entry.values()), 'NAME')}]"
                )
    return Options(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def load_yaml(name_or_path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """A shipped config name or a YAML file -> (its path, its mapping)."""
    from hf_rope_ext.recipes import config_path

    path = config_path(name_or_path)  # unknown -> FileNotFoundError listing the shipped configs
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:  # name the file and the line, not a parser traceback
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = getattr(err, "problem", None) or str(err)
        start = getattr(err, "context_mark", None)
        if getattr(err, "context", None) and start is not None:
            what += f" ({err.context} opened at line {start.line + 1})"
        raise ValueError(f"{where}: not valid YAML: {what}; expected lines of option: value") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(values).__name__}")
    return path, values


def _yaml_value(text: str) -> Any:
    """A command-line value read as it would be written in the YAML file (a plain string when it is not YAML)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with errors raised as ValueError (main() reports them in one line) instead of exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise ValueError(f"{message} (see --help)")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """``--config``, ``--param`` and one ``--NAME`` per Options field, with its help, type and default."""
    parser = _Parser(
        prog=prog,
        usage="%(prog)s [--config NAME_OR_FILE] [--OPTION VALUE ...] [--param KEY=VALUE ...]",
        description="Fine-tune an extended model at its new length: patch, train briefly, merge, save it reloadable.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME_OR_FILE",
        help="A shipped config name (`hf-rope-ext recipes list`) or a YAML file of option: value (repeatable: later "
        "files win). The command line overrides it.",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"method_params (the YAML key): {METHOD_PARAMS_HELP} On the command line --param sets one, merged over "
        "the YAML's (repeatable; the value is JSON when it parses, else a string, as for `hf-rope-ext --param`).",
    )
    hints = typing.get_type_hints(Options)
    group: Any = parser
    for f in dataclasses.fields(Options):
        if f.name in _GROUPS:
            group = parser.add_argument_group(_GROUPS[f.name])
        if f.name == "method_params":  # a mapping: YAML, or --param KEY=VALUE
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        hint = hints[f.name]
        listed, flag = "list" in str(hint), hint is bool
        metavar = "VALUE" if listed else _describe(hint, short=True)
        group.add_argument(
            f"--{f.name}",
            type=_yaml_value,
            nargs="+" if listed else "?" if flag else None,
            const=True if flag else None,  # --pose alone is --pose true
            default=argparse.SUPPRESS,
            metavar=metavar,
            help=f"{f.metadata['help']} Default: {default!r}.",
        )
    return parser


def parse_options(argv: list[str] | None = None, prog: str | None = None) -> Options:
    """``--config NAME_OR_FILE`` plus ``--key value`` / ``--key=value`` overrides and ``--param KEY=VALUE``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args, extra = parser.parse_known_args(argv)
    if extra:
        flags = [a.split("=")[0][2:] for a in extra if a.startswith("--")]
        if flags:
            known = ["config", "param", *(f.name for f in dataclasses.fields(Options) if f.name != "method_params")]
            raise _unknown(flags, known, "the command line")
        raise ValueError(f"unexpected argument(s) {extra}; options are --key value (see --help)")
    values: dict[str, Any] = {}
    for name in args.config:
        path, from_file = load_yaml(name)
        unknown = [k for k in from_file if k not in {f.name for f in dataclasses.fields(Options)}]
        if unknown:
            raise _unknown(unknown, [f.name for f in dataclasses.fields(Options)], str(path))
        values.update(from_file)
    for key, value in vars(args).items():
        if key in ("config", "param"):
            continue
        if isinstance(value, list) and len(value) == 1:  # one value: itself (a scalar or a YAML list)
            value = value[0]
        values[key] = value
    if args.param:
        params = registry.parse_param_items(args.param, option="--param")
        values["method_params"] = {**(values.get("method_params") or {}), **params}
    return options_from_dict(values, where="config / command line")


def check_context_parallel(o: Options, spec: Any) -> None:
    """What context parallelism (``context_parallel > 1``) cannot train, refused before anything loads. The engine
    (FSDP2, CUDA) is checked when the run starts (``distributed.check_context_parallel_engine``)."""
    cp = o.context_parallel
    if cp < 1:
        raise ValueError(f"option context_parallel must be >= 1 (1: off), got {cp}")
    if cp == 1:
        return
    why = None
    if o.s2attn:
        why = "s2attn: shifted sparse attention regroups the tokens of the whole sequence, which no process holds"
    elif spec.kind == "attention":
        why = (f"attention-level method '{spec.name}': it rewrites attention, which context parallelism replaces "
               "by ring attention")
    elif spec.kind != "rope":
        why = f"method '{spec.name}': it extends a learned position table; context parallelism is for rotary models"
    elif spec.dynamic:
        why = (f"dynamic method '{spec.name}' scales its frequencies by the largest position it sees, which differs "
               "from shard to shard")
    elif o.objective == "masked":
        why = "the masked objective: context parallelism computes causal attention only"
    if why:
        raise ValueError(f"context_parallel {cp} cannot be combined with {why}; set context_parallel: 1")


def check_options(o: Options, *, check_data: bool = True) -> None:
    """Checks that need no model: run before anything is loaded. ``check_data=False`` skips looking at the data
    sources (to validate a config written for another machine)."""
    if not o.model:
        raise ValueError("option model is required (a model folder, .gguf file, Hub id or alias)")
    if not o.output_dir:
        raise ValueError("option output_dir is required")
    if (o.factor is None) == (o.target_length is None):
        raise ValueError("give exactly one of factor (new length / original length) or target_length")
    if o.factor is not None and o.factor <= 1:
        raise ValueError(f"factor must be > 1, got {o.factor}: the target length must exceed the original length")
    spec = registry.get_method(o.method)  # unknown method -> lists the known ones
    fixed = ("factor", "original_max_position_embeddings")  # set by the recipe's own options
    valid = [f.name for f in dataclasses.fields(spec.params_cls) if f.name not in fixed]
    unknown = sorted(set(o.method_params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown method_params {unknown} for method '{spec.name}'; valid: {', '.join(valid) or 'none'}"
        )
    registry.check_param_types(spec.name, spec.params_cls, o.method_params)  # types and finiteness, before loading
    if spec.kind == "attention" and (o.pose or o.s2attn):
        raise ValueError(
            f"attention-level method '{spec.name}' cannot be combined with "
            f"{'pose (its position ids have gaps; the method needs contiguous ones)' if o.pose else 's2attn'}; "
            "train it on full-length windows, or fine-tune with a rotary method (yarn, ntk_by_parts, ...)"
        )
    at_least_one = (
        "lora_r", "lora_alpha", "max_steps", "batch_size", "grad_accum", "log_every", "eval_batch_size", "pose_chunks"
    )
    for name in at_least_one:
        if getattr(o, name) < 1:
            raise ValueError(f"option {name} must be >= 1, got {getattr(o, name)}")
    for name in ("save_every", "keep_checkpoints", "warmup_steps", "eval_chunks", "loss_chunk"):
        if getattr(o, name) < 0:
            raise ValueError(f"option {name} must be >= 0, got {getattr(o, name)}")
    if not o.lr > 0 or not math.isfinite(o.lr):
        raise ValueError(f"option lr must be a finite number > 0, got {o.lr}")
    if o.lr > 1:  # no optimizer in this recipe has a use for it: AdamW moves every weight by ~lr per step
        raise ValueError(
            f"option lr {o.lr:g} is above 1: AdamW would move every trained weight by about {o.lr:g} per step and the "
            "run diverges at once. Typical: 1e-4..2e-4 for LoRA, ~2e-5 for full fine-tuning (written 2e-4, not 2)"
        )
    if not 0 <= o.lora_dropout < 1 or not 0 < o.mlm_probability < 1:
        raise ValueError("lora_dropout must be in [0, 1) and mlm_probability in (0, 1)")
    if o.seq_len is not None and o.seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {o.seq_len}")
    if o.stop_after is not None and o.stop_after < 1:
        raise ValueError(f"stop_after must be >= 1, got {o.stop_after}")
    if o.resume and o.overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if isinstance(o.resume, str) and not (Path(o.resume) / io.COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"resume: {o.resume} is not a complete checkpoint folder (no {io.COMPLETE_MARKER})")
    if o.s2attn and o.objective == "masked":
        raise ValueError("s2attn is causal attention; it cannot train a masked-LM objective")
    if isinstance(o.lora_targets, list) and not o.lora_targets:
        raise ValueError("lora_targets is an empty list; use 'attention', 'all-linear' or module names")
    check_context_parallel(o, spec)
    if check_data:
        data.resolve_sources(o.data)  # missing files, unknown built-ins, `datasets` not installed
        if o.eval_data:
            data.resolve_sources(o.eval_data)
