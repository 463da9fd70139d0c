"""Fine-tune an extended model at its new length: patch, train briefly, merge, save a reloadable model.

    hf-rope-ext finetune --config smollm2_pose_yarn_smoke --output_dir runs/smoke
    accelerate launch -m hf_rope_ext.recipes.finetune --config my.yaml [--key value ...]
    python recipes/finetune.py --config recipes/configs/llama2_7b_yarn_lora.yaml --max_steps 50   # from a clone
    hf-rope-ext finetune --help                                                   # every option with its help

Zero-shot extension loses some quality; the papers recover it with a short fine-tune at the new length:
Position Interpolation ~200-1000 steps (https://arxiv.org/abs/2306.15595), YaRN ~400 steps
(https://arxiv.org/abs/2309.00071), LongLoRA = LoRA + trainable embeddings and norms, optionally with shifted sparse
attention (https://arxiv.org/abs/2309.12307), PoSE = short windows whose position ids skip to cover the target length
(https://arxiv.org/abs/2309.10400).

Read it top to bottom, as a torchtune recipe:

    1. Options      one dataclass, a field per option with its help; YAML (--config) then --key value overrides
    2. Plan         what the options mean for the loaded model (lengths, objective, LoRA targets)
    3. Helpers      learning rate, batches, signals, checkpoints, evaluation, the loss plot
    4. The run      setup(o) -> Setup   checks, load + patch ONCE, data, trainable parameters, optimizer, resume
                    train(s)            the loop, checkpoints, early stop on a signal or stop_after
                    save(s)             merge, save atomically with TrainingSummary, loss plot, model card

Output folder layout:
    OUTPUT_DIR/run_config.yaml              the resolved options of the last start (usable as --config)
    OUTPUT_DIR/checkpoints/step-XXXXXXXX/   accelerate state + trainer_state.json (resume with --resume true)
    OUTPUT_DIR/model/                       the merged model, tokenizer, training_summary.json, loss.png, README.md
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import logging
import math
import os
import resource
import shutil
import signal
import sys
import time
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

import hf_rope_ext
from hf_rope_ext import patch_info, patch_model, registry
from hf_rope_ext.loading import load_model
from hf_rope_ext.training import adapters, data, io, pose, s2attn
from hf_rope_ext.training.heldout import heldout_perplexity
from hf_rope_ext.training.summary import TrainingSummary

logger = logging.getLogger("finetune")

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
    return Options(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def load_yaml(name_or_path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """A shipped config name or a YAML file -> (its path, its mapping)."""
    from hf_rope_ext.recipes import config_path

    path = config_path(name_or_path)  # unknown -> FileNotFoundError listing the shipped configs
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
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
        description=__doc__.split("\n\n")[0],
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
    for name in ("save_every", "keep_checkpoints", "warmup_steps", "eval_chunks"):
        if getattr(o, name) < 0:
            raise ValueError(f"option {name} must be >= 0, got {getattr(o, name)}")
    if not o.lr > 0:
        raise ValueError(f"option lr must be > 0, got {o.lr}")
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
    if check_data:
        data.resolve_sources(o.data)  # missing files, unknown built-ins, `datasets` not installed
        if o.eval_data:
            data.resolve_sources(o.eval_data)


# ====================================================================================================================
# 2. Model-dependent plan: everything checked after loading + patching, before any data or training.


@dataclass
class Plan:
    """What the options mean for this model."""

    original_length: int
    """Length the model was trained at."""
    target_length: int
    """Length after patching."""
    seq_len: int
    """Tokens per training sequence."""
    objective: str
    """"causal" or "masked"."""
    lora_targets: list[str] | str | None
    """peft target_modules (None for full fine-tuning)."""
    modules_to_save: list[str]
    """Modules trained fully next to LoRA."""
    tie_embeddings: bool
    """Input embeddings tied to the output head and trained (peft must keep them tied)."""


def _objective(model: Any, requested: str) -> str:
    name = type(model).__name__
    head = "masked" if "MaskedLM" in name else "causal" if ("CausalLM" in name or "LMHead" in name) else None
    if head is None:
        raise ValueError(f"{name} has no language-modelling head; load a *ForCausalLM or *ForMaskedLM model")
    if requested != "auto" and requested != head:
        raise ValueError(f"objective {requested!r} does not fit {name} (a {head} LM)")
    return head


def make_plan(model: Any, tokenizer: Any, o: Options) -> Plan:
    info = patch_info(model)
    original, target = int(info["original_max_position_embeddings"]), int(info["max_position_embeddings"])
    objective = _objective(model, o.objective)
    if objective == "masked" and tokenizer.mask_token_id is None:
        raise ValueError("the masked objective needs a tokenizer with a mask token")
    if objective == "causal" and tokenizer.eos_token_id is None and tokenizer.sep_token_id is None:
        logger.warning("tokenizer has no end-of-sequence token: documents are joined without a separator")
    seq_len = o.seq_len or (original if o.pose else target)
    if seq_len > target:
        raise ValueError(f"seq_len {seq_len} exceeds the target length {target}")
    if o.pose and seq_len >= target:
        raise ValueError(f"pose trains short windows: seq_len ({seq_len}) must be below the target length {target}")
    if not o.pose and seq_len < target:
        logger.warning(
            "training at %d tokens, below the target %d: positions beyond it are never trained "
            "(set pose: true to cover them with short windows)",
            seq_len,
            target,
        )
    if o.s2attn:
        s2attn.check_s2attn_supported(model)
        s2attn.s2attn_group_size(seq_len, o.s2attn_group_ratio)

    lora_targets: list[str] | str | None = None
    modules_to_save = list(o.modules_to_save)
    if o.train_mode != "full":
        linear = adapters.linear_module_names(model)
        if o.lora_targets == "attention":
            lora_targets = adapters.attention_lora_targets(model)
            if not lora_targets:
                raise ValueError(
                    f"found no linear layers inside attention blocks of {type(model).__name__}; "
                    f"set lora_targets to module names, e.g. {adapters.short_names(linear)[:8]}"
                )
        elif o.lora_targets == "all-linear":
            lora_targets = "all-linear"
        else:
            names = [o.lora_targets] if isinstance(o.lora_targets, str) else list(o.lora_targets)
            missing = adapters.unmatched_targets(model, names, candidates=linear)
            if missing:
                raise ValueError(
                    f"lora_targets {missing} match no linear layer of {type(model).__name__}; linear layers "
                    f"are named: {', '.join(adapters.short_names(linear))} (or use 'attention', 'all-linear')"
                )
            lora_targets = names
        missing = adapters.unmatched_targets(model, modules_to_save)
        if missing:
            raise ValueError(f"modules_to_save {missing} match no module of {type(model).__name__}")
        if o.train_mode == "longlora":
            modules_to_save += adapters.longlora_modules_to_save(model)
        train_tables = o.train_position_embeddings
        if train_tables is None:
            train_tables = info.get("kind") == "absolute"
        if train_tables:
            tables = adapters.position_table_modules(model)
            if not tables and o.train_position_embeddings:
                raise ValueError("train_position_embeddings: this model has no learned position table")
            modules_to_save += tables
        modules_to_save = list(dict.fromkeys(modules_to_save))
    elif o.lora_targets != "attention" or o.modules_to_save:
        logger.warning("train_mode full trains every weight: lora_targets / modules_to_save are ignored")
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    token_embedding = [n for n, m in model.named_modules() if n and m is embed]
    trains_embed = any(adapters.matches(n, m) for n in token_embedding for m in modules_to_save)
    return Plan(original, target, seq_len, objective, lora_targets, modules_to_save, tied and trains_embed)


def make_trainable(model: Any, o: Options, plan: Plan) -> Any:
    """Wrap with peft LoRA (lora/longlora) or unfreeze everything (full). Returns the model to train."""
    if o.train_mode == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=o.lora_r,
        lora_alpha=o.lora_alpha,
        lora_dropout=o.lora_dropout,
        target_modules=plan.lora_targets,
        modules_to_save=plan.modules_to_save or None,
        ensure_weight_tying=plan.tie_embeddings,
        task_type=None,
    )
    return get_peft_model(model, config)


def count_parameters(model: Any) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters live on the meta device (no memory); buffers are copied (small).
    Sharded engines train a model that cannot be unwrapped whole: this copy, taken after patching, becomes the final
    model once it is given the gathered weights (:func:`rebuild_on_cpu`), so the model is loaded and patched once."""
    memo = {
        id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }  # shared (tied) parameters stay shared: deepcopy maps each object once
    return copy.deepcopy(model, memo)


def rebuild_on_cpu(skeleton: torch.nn.Module, o: Options, plan: Plan, full_state: dict[str, torch.Tensor]) -> Any:
    """FSDP / DeepSpeed: the trained model on the main process's CPU, from the :func:`meta_copy` taken before training
    and the gathered state dict; LoRA merged."""
    new: dict[int, torch.nn.Parameter] = {}
    for module in skeleton.modules():  # allocate the parameters (tied ones once); full_state fills them below
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in new:
                    new[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
                module._parameters[name] = new[id(p)]
    model = make_trainable(skeleton, o, plan)  # the same module names as the trained model
    missing, unexpected = model.load_state_dict(full_state, strict=False)
    storage = {name: t.data_ptr() for name, t in model.state_dict(keep_vars=True).items()}
    loaded = {storage[name] for name in full_state if name in storage}
    missing = [k for k in missing if storage.get(k) not in loaded]  # tied weights arrive once, under one name
    if missing or unexpected:
        raise RuntimeError(
            f"gathered weights do not fit the rebuilt model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model if o.train_mode == "full" else model.merge_and_unload()


# ====================================================================================================================
# 3. Helpers: learning rate, batches, signals, checkpoints, evaluation, the loss plot.


def lr_at(step: int, o: Options) -> float:
    """Linear warmup over warmup_steps, then constant / linear / cosine decay to 0 at max_steps."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.lr_scheduler == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps)
    if o.lr_scheduler == "linear":
        return o.lr * max(0.0, 1 - progress)
    return o.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_seed(o: Options, step: int, rank: int, world: int) -> int:
    """Seed for everything random in one optimizer step on one process (dropout, PoSE skips, masking)."""
    return (o.seed * 1_000_003 + step * world + rank) % (2**63)


def make_batch(
    chunks: torch.Tensor, indices: list[int], o: Options, plan: Plan, tokenizer: Any, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Model inputs for one micro-batch: input_ids [b, seq_len], labels, and for PoSE position_ids + attention_mask."""
    ids = chunks[indices]  # [b, seq_len]
    batch: dict[str, torch.Tensor] = {}
    if plan.objective == "masked":
        ids, labels = data.mask_for_mlm(
            ids,
            mask_token_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            special_ids=list(tokenizer.all_special_ids),
            probability=o.mlm_probability,
            generator=gen,
        )
        batch["attention_mask"] = torch.ones_like(ids)
    else:
        labels = ids  # the model shifts labels by one for next-token prediction
    if o.pose:  # positions span the target length; the explicit mask keeps the jumps from splitting the sequence
        position_ids, mask = pose.pose_batch(
            len(indices), plan.seq_len, plan.target_length, num_chunks=o.pose_chunks, generator=gen
        )
        batch.update(position_ids=position_ids, attention_mask=mask)
    batch.update(input_ids=ids, labels=labels)
    return batch


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop checkpoints at the end of the current step and exits cleanly.

    A third signal restores the default handlers and interrupts at once."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.count = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        self.reason = signal.Signals(signum).name
        logger.warning("%s received: saving a checkpoint at the end of this step, then exiting", self.reason)
        if self.count >= 3:
            self.__exit__()
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclass
class TrainState:
    """Progress carried across resumptions: ``trainer_state.json`` in each checkpoint."""

    step: int = 0
    """Optimizer steps done."""
    tokens: int = 0
    """Training tokens seen (all processes)."""
    loss_curve: list[list[float]] = field(default_factory=list)
    """[step, mean loss] per step."""
    elapsed_s: float = 0.0
    """Seconds spent in the training loop, summed over resumptions."""
    eval_before: dict[str, Any] | None = None
    """Held-out perplexity of the patched model before training."""
    options: dict[str, Any] = field(default_factory=dict)
    """The options in RESUME_KEYS, as the run started."""
    num_processes: int = 1
    """Processes of the run that wrote the checkpoint."""


def resume_mismatch(saved: dict[str, Any], o: Options) -> list[str]:
    """``"key old -> new"`` for each option in RESUME_KEYS that differs between a checkpoint and ``o``."""
    return [
        f"{k} {saved.get(k)!r} -> {getattr(o, k)!r}" for k in RESUME_KEYS if saved.get(k) != getattr(o, k)
    ]


def save_checkpoint(accelerator: Any, root: Path, state: TrainState, keep: int) -> Path:
    """accelerate state (model, optimizer, RNG) + trainer_state.json, written to a temporary folder then renamed."""
    final = root / io.checkpoint_name(state.step)
    tmp = final.with_name(f".{final.name}.partial")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / io.COMPLETE_MARKER).write_text(json.dumps(asdict(state), indent=1))
        io.replace_directory(tmp, final)
        io.prune_checkpoints(root, keep)
        logger.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


def resume_checkpoint(o: Options, root: Path) -> Path | None:
    """The checkpoint to resume from, or None. Refuses to silently mix a new run into old checkpoints."""
    if isinstance(o.resume, str):
        return Path(o.resume)
    latest = io.latest_checkpoint(root)
    if o.resume:
        if latest is None:
            logger.warning("resume: no checkpoint in %s yet, starting from scratch", root)
        return latest
    if latest is not None and not o.overwrite:
        raise ValueError(
            f"{root} already holds checkpoints (latest {latest.name}); pass --resume true to continue "
            "or --overwrite true to start again"
        )
    return None


def evaluate(accelerator: Any, model: Any, chunks: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Held-out perplexity with every process scoring its share of the chunks (sharded engines need every process in
    every forward pass, so shares are padded to equal length and the padding is not scored)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = math.ceil(chunks.shape[0] / world)
    mine = chunks[rank::world]
    scored = mine.shape[0]
    if scored < per_rank:
        mine = torch.cat([mine, chunks[:1].expand(per_rank - scored, -1)])
    inner = accelerator.unwrap_model(model)  # DDP's wrapper is not needed without gradients; sharded keep hooks
    part = heldout_perplexity(
        inner, mine, scored=scored, device=accelerator.device, **{**kwargs, "seed": kwargs["seed"] + rank}
    )
    totals = torch.tensor([part.nll * part.tokens, float(part.tokens)], dtype=torch.float64, device=accelerator.device)
    nll_sum, tokens = accelerator.reduce(totals, reduction="sum").tolist()
    mean = nll_sum / max(tokens, 1.0)
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "tokens": int(tokens),
        "chunks": int(chunks.shape[0]),
        "length": int(chunks.shape[1]),
        "objective": part.objective,
    }


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak accelerator memory (CUDA max allocated) where there is one, else the process's peak resident memory."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    if device.type == "cuda":
        return {
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
            "peak_memory_kind": "cuda_max_allocated",
            "peak_rss_bytes": rss,
        }
    return {"peak_memory_bytes": rss, "peak_memory_kind": "cpu_peak_rss", "peak_rss_bytes": rss}


def plot_loss(curve: list[list[float]], path: Path, title: str) -> None:
    """Training loss per optimizer step as a PNG (matplotlib's Agg canvas; the global backend is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([c[0] for c in curve], [c[1] for c in curve], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


# ====================================================================================================================
# 4. The run: setup -> train -> save.


@dataclass
class Setup:
    """Everything the training loop needs, built once by :func:`setup`."""

    o: Options
    accelerator: Any
    model: Any
    """The patched model, made trainable and prepared by accelerate."""
    tokenizer: Any
    plan: Plan
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    """The trainable parameters (clipped together)."""
    train_chunks: torch.Tensor
    """[n_chunks, seq_len] training sequences."""
    eval_chunks: torch.Tensor | None
    """[eval_chunks, target_length] held-out sequences, or None without evaluation."""
    eval_kwargs: dict[str, Any]
    state: TrainState
    resumed_from: Path | None
    out: Path
    skeleton: Any = None
    """Sharded engines, main process: :func:`meta_copy` of the patched model, the frame of the final model."""


@dataclass
class RunResult:
    """What ``run`` returns (on the main process; other processes get ``model=None``)."""

    stopped: bool
    """True when the run stopped early (signal or stop_after) after writing a checkpoint."""
    step: int
    """Optimizer steps done so far."""
    summary: TrainingSummary | None = None
    """The training summary (also OUTPUT_DIR/model/training_summary.json); None when stopped."""
    model: Any = None
    """The final, merged model in memory (main process, finished runs)."""
    checkpoint: Path | None = None
    """The checkpoint written when stopped."""


def load_and_patch(o: Options) -> tuple[Any, Any]:
    """The model and tokenizer, patched to the target length (the one load of the run)."""
    task = {"auto": "auto", "causal": "causal-lm", "masked": "masked-lm"}[o.objective]
    try:
        model, tokenizer = load_model(o.model, dtype=o.dtype, task=task)
    except ValueError as err:
        kind = {"auto": "language", "causal": "causal", "masked": "masked"}[o.objective]
        raise ValueError(f"could not load {o.model!r} as a {kind} model: {err}") from err
    if o.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(o.tokenizer)
    # fails here on target <= original, bad method parameters, an unsupported model
    patch_model(
        model,
        o.method,
        factor=o.factor,
        max_position_embeddings=o.target_length,
        original_max_position_embeddings=o.original_length,
        tokenizer=tokenizer,
        **o.method_params,
    )
    return model, tokenizer


def load_data(o: Options, plan: Plan, tokenizer: Any, accelerator: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training chunks [n, seq_len] and held-out chunks [eval_chunks, target_length] (None without evaluation).
    Tokenised once (main process first, the others read its cache); without eval_data the tail is held out."""
    with accelerator.main_process_first():
        kwargs = {
            "cache_dir": o.cache_dir,
            "text_field": o.text_field,
            "dataset_config": o.dataset_config,
            "dataset_split": o.dataset_split,
        }
        stream = data.load_token_stream(o.data, tokenizer, max_tokens=o.max_tokens, **kwargs)
        eval_stream = data.load_token_stream(o.eval_data, tokenizer, **kwargs) if o.eval_data else None
    wrap = None
    if plan.objective == "masked" and tokenizer.cls_token_id is not None:
        wrap = (tokenizer.cls_token_id, tokenizer.sep_token_id)
    n_eval = o.eval_chunks if o.eval_before_after else 0
    if n_eval and eval_stream is None:  # hold out the tail of the training stream
        held = n_eval * plan.target_length
        if stream.numel() - held < plan.seq_len * 2:
            raise ValueError(
                f"data has {stream.numel()} tokens: too few to hold out {n_eval} x {plan.target_length} "
                f"for evaluation and train; add data, set eval_data, or lower eval_chunks"
            )
        stream, eval_stream = stream[:-held], stream[-held:]
    train_chunks = data.pack(stream, plan.seq_len, wrap=wrap)
    eval_chunks = data.pack(eval_stream, plan.target_length, wrap=wrap)[:n_eval] if n_eval else None
    if train_chunks.shape[0] == 0:
        raise ValueError(f"data gives {stream.numel()} tokens, fewer than one training sequence of {plan.seq_len}")
    if n_eval and eval_chunks.shape[0] == 0:
        raise ValueError(f"eval_data is shorter than one chunk of the target length {plan.target_length}")
    logger.info(
        "data: %d training chunks of %d tokens; %d held-out chunks of %d",
        train_chunks.shape[0],
        plan.seq_len,
        0 if eval_chunks is None else eval_chunks.shape[0],
        plan.target_length,
    )
    return train_chunks, eval_chunks


def setup(o: Options) -> Setup:
    """Check everything, load + patch the model once, read the data, make it trainable, build the optimizer, resume.
    Nothing is written to output_dir until every check has passed."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    check_options(o)
    accelerator = Accelerator(mixed_precision=o.mixed_precision, gradient_accumulation_steps=o.grad_accum)
    world = accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:  # e.g. torchrun / --multi_gpu on a machine without GPUs: N independent runs would collide
        raise ValueError(
            f"{launched} processes were launched but accelerate sees {world}; on CPU-only machines set "
            "ACCELERATE_USE_CPU=1 (accelerate launch --multi_gpu --num_processes N uses gloo then)"
        )
    out = Path(o.output_dir)
    resumed_from = resume_checkpoint(o, out / "checkpoints")
    logger.info(
        "hf_rope_ext %s | %d process(es) on %s | output %s", hf_rope_ext.__version__, world, accelerator.device, out
    )

    model, tokenizer = load_and_patch(o)
    plan = make_plan(model, tokenizer, o)
    logger.info(
        "extended %s: %d -> %d positions with %s; training %s at %d tokens%s%s",
        type(model).__name__,
        plan.original_length,
        plan.target_length,
        o.method,
        o.train_mode,
        plan.seq_len,
        " + PoSE" if o.pose else "",
        " + S²-Attn" if o.s2attn else "",
    )
    train_chunks, eval_chunks = load_data(o, plan, tokenizer, accelerator)

    state = TrainState(options={k: getattr(o, k) for k in RESUME_KEYS}, num_processes=world)
    if resumed_from is not None:
        saved = json.loads((resumed_from / io.COMPLETE_MARKER).read_text())
        changed = resume_mismatch(saved["options"], o)
        if changed:
            raise ValueError(
                f"cannot resume from {resumed_from}: options changed since it was written: {', '.join(changed)}"
            )
        if saved.get("num_processes") != world:
            logger.warning(
                "resuming with %d processes (checkpoint had %s): the data order will differ",
                world,
                saved.get("num_processes"),
            )
        for key in ("step", "tokens", "loss_curve", "elapsed_s", "eval_before"):
            setattr(state, key, saved[key])

    # ---- every check passed: the run starts writing
    if accelerator.is_main_process:
        if o.overwrite and (out / "checkpoints").exists():
            shutil.rmtree(out / "checkpoints")
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.yaml").write_text(yaml.safe_dump(asdict(o), sort_keys=False))

    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    skeleton = meta_copy(model) if sharded and accelerator.is_main_process else None
    # ---- trainable parameters, memory savers, S²-Attn, optimizer
    if o.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if o.s2attn:
        s2attn.enable_s2attn(model, o.s2attn_group_ratio)
    set_seed(o.seed)  # LoRA's initial A matrices
    model = make_trainable(model, o, plan)
    model.train()
    n_train, n_all = count_parameters(model)
    logger.info("trainable parameters: %d of %d (%.2f%%)", n_train, n_all, 100 * n_train / n_all)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # no dataloader goes through prepare()
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = o.batch_size
    model, optimizer = accelerator.prepare(model, optimizer)
    if resumed_from is not None:
        accelerator.load_state(str(resumed_from))
        logger.info("resumed from %s at step %d", resumed_from, state.step)
    eval_kwargs = {
        "objective": plan.objective,
        "batch_size": o.eval_batch_size,
        "mask_token_id": tokenizer.mask_token_id,
        "special_ids": list(tokenizer.all_special_ids),
        "vocab_size": len(tokenizer),
        "seed": o.seed,
    }
    return Setup(
        o, accelerator, model, tokenizer, plan, optimizer, params, train_chunks, eval_chunks, eval_kwargs, state,
        resumed_from, out, skeleton,
    )


def train(s: Setup) -> RunResult | None:
    """The training loop from ``s.state.step`` to max_steps; a checkpoint every save_every steps. Returns a stopped
    RunResult (with its checkpoint) on a signal or at stop_after, else None (training finished)."""
    from tqdm.auto import tqdm

    o, plan, accelerator, state = s.o, s.plan, s.accelerator, s.state
    world, rank = accelerator.num_processes, accelerator.process_index
    if s.resumed_from is None and s.eval_chunks is not None:  # the patched model before training (LoRA is a no-op)
        state.eval_before = evaluate(accelerator, s.model, s.eval_chunks, s.eval_kwargs)
        logger.info(
            "held-out perplexity at %d before training: %.3f", plan.target_length, state.eval_before["perplexity"]
        )
    tokens_per_step = o.batch_size * plan.seq_len * o.grad_accum * world
    start_step, started, elapsed_before = state.step, time.perf_counter(), state.elapsed_s
    stop_at = o.max_steps if o.stop_after is None else min(o.max_steps, start_step + o.stop_after)
    checkpoints = s.out / "checkpoints"
    bar = tqdm(
        total=o.max_steps, initial=start_step, desc="fine-tune", disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    with StopRequest() as stop:
        step = start_step
        while step < stop_at:
            torch.manual_seed(step_seed(o, step, rank, world))  # dropout: identical whether or not the run resumed
            gen = torch.Generator().manual_seed(step_seed(o, step, rank, world))
            lr = lr_at(step, o)
            for group in s.optimizer.param_groups:
                group["lr"] = lr
            losses = []
            for micro in range(o.grad_accum):
                indices = data.micro_batch_indices(
                    s.train_chunks.shape[0], step=step, micro=micro, grad_accum=o.grad_accum,
                    batch_size=o.batch_size, world=world, rank=rank, seed=o.seed,
                )
                batch = make_batch(s.train_chunks, indices, o, plan, s.tokenizer, gen)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.accumulate(s.model):
                    loss = s.model(**batch, use_cache=False).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and o.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(s.params, o.max_grad_norm)
                    s.optimizer.step()
                    s.optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach().float())
            step += 1
            mean_loss = float(accelerator.reduce(torch.stack(losses).mean(), reduction="mean"))
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training loss is {mean_loss} at step {step}; lower lr or check the data")
            state.loss_curve.append([step, mean_loss])
            state.tokens += tokens_per_step
            state.step = step
            state.elapsed_s = elapsed_before + time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if step % o.log_every == 0 or step == 1:
                logger.info("step %d/%d loss %.4f lr %.2e", step, o.max_steps, mean_loss, lr)
            requested = stop.reason is not None
            if world > 1:  # every process must agree to stop at the same step
                flag = torch.tensor(float(requested), device=accelerator.device)
                requested = float(accelerator.reduce(flag, reduction="sum")) > 0
            if requested or (step == stop_at and step < o.max_steps):
                path = save_checkpoint(accelerator, checkpoints, state, o.keep_checkpoints)
                why = stop.reason or f"stop_after={o.stop_after}"
                logger.warning("stopped at step %d (%s); continue with --resume true", step, why)
                bar.close()
                return RunResult(stopped=True, step=step, checkpoint=path)
            if o.save_every and step % o.save_every == 0 and step < o.max_steps:
                save_checkpoint(accelerator, checkpoints, state, o.keep_checkpoints)
    bar.close()
    return None


def summarize(s: Setup, model: Any, eval_after: dict[str, Any] | None) -> TrainingSummary:
    """The TrainingSummary of a finished run (what the model card reads)."""
    o, plan, state, accelerator = s.o, s.plan, s.state, s.accelerator
    world = accelerator.num_processes
    curve = state.loss_curve
    k = max(1, min(10, len(curve) // 5))  # loss_first / final_loss: means over a few steps
    device = accelerator.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    mixed = str(accelerator.mixed_precision)
    lora = None
    if o.train_mode != "full":
        lora = {
            "r": o.lora_r,
            "lora_alpha": o.lora_alpha,
            "lora_dropout": o.lora_dropout,
            "target_modules": adapters.short_names(plan.lora_targets)
            if isinstance(plan.lora_targets, list)
            else plan.lora_targets,
            "modules_to_save": adapters.short_names(plan.modules_to_save) or None,
        }
    extras = ", ".join(["PoSE"] * o.pose + ["S2-Attn"] * o.s2attn)
    return TrainingSummary(
        method=o.method,
        factor=plan.target_length / plan.original_length,
        original_length=plan.original_length,
        target_length=plan.target_length,
        recipe=f"hf-rope-ext finetune ({o.train_mode}{', ' + extras if extras else ''})",
        train_mode=o.train_mode,
        data=list(o.data),
        eval_data=(list(o.eval_data) or "tail of the training data") if s.eval_chunks is not None else None,
        steps=state.step,
        tokens=state.tokens,
        seq_len=plan.seq_len,
        batch_size=o.batch_size * o.grad_accum * world,
        gradient_accumulation_steps=o.grad_accum,
        learning_rate=o.lr,
        warmup_steps=o.warmup_steps,
        optimizer="AdamW",
        scheduler=o.lr_scheduler,
        precision=o.dtype if mixed == "no" else f"{mixed} mixed precision",
        lora=lora,
        seed=o.seed,
        hardware=f"{world} x {device_name}",
        num_processes=world,
        distributed_type=str(accelerator.distributed_type.value),
        wall_time_s=state.elapsed_s,
        tokens_per_s=state.tokens / state.elapsed_s if state.elapsed_s else None,
        **peak_memory(device),
        loss_first=sum(c[1] for c in curve[:k]) / k if curve else None,
        final_loss=sum(c[1] for c in curve[-k:]) / k if curve else None,
        loss_curve=curve,
        eval_before=state.eval_before,
        eval_after=eval_after,
        extension=patch_info(model),
        options=asdict(o),
    )


def write_model_card(folder: Path, summary: TrainingSummary, base_model: str | None, repo_id: str | None) -> None:
    """README.md through ``hf_rope_ext.cards``; a failure is a warning (the model is saved either way).
    ``repo_id`` is a Hub id (owner/name) when known; a local run has none (``hf-rope-ext push`` rewrites the card)."""
    try:
        from hf_rope_ext import cards

        cards.write_card(folder, training=summary, base_model=base_model, repo_id=repo_id)
    except Exception as err:
        logger.warning("model card not written: %s", err)


def save(s: Setup) -> RunResult:
    """Held-out perplexity after training, then on the main process: merge LoRA, restore inference settings, save
    model + tokenizer + TrainingSummary + loss plot into a temporary folder, moved into place at the end; then the
    model card."""
    from accelerate.utils import DistributedType

    o, plan, accelerator, state = s.o, s.plan, s.accelerator, s.state
    eval_after = None
    if s.eval_chunks is not None:  # on the trained, not yet merged model: same numbers, every process helps
        eval_after = evaluate(accelerator, s.model, s.eval_chunks, s.eval_kwargs)
        before = state.eval_before["perplexity"] if state.eval_before else float("nan")
        logger.info(
            "held-out perplexity at %d after training: %.3f (before: %.3f)",
            plan.target_length,
            eval_after["perplexity"],
            before,
        )
    accelerator.wait_for_everyone()
    main = accelerator.is_main_process
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        full_state = accelerator.get_state_dict(s.model)  # a collective: every process gathers
        model = rebuild_on_cpu(s.skeleton, o, plan, full_state) if main else None
    else:
        model = accelerator.unwrap_model(s.model) if main else None
        if model is not None and o.train_mode != "full":
            model = model.merge_and_unload()
    summary = None
    if main:
        s2attn.disable_s2attn(model)
        if o.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.config.use_cache = True
        model.eval()
        if o.save_dtype != "auto":
            model.to(getattr(torch, o.save_dtype))
        summary = summarize(s, model, eval_after)
        meta = dict(model.config.hf_rope_ext)
        meta["finetune"] = {
            "train_mode": o.train_mode,
            "steps": state.step,
            "tokens": state.tokens,
            "seq_len": plan.seq_len,
            "pose": o.pose,
            "s2attn": o.s2attn,
            "data": o.data,
            "lr": o.lr,
        }
        model.config.hf_rope_ext = meta
        final = s.out / "model"
        with io.atomic_directory(final) as tmp:
            model.save_pretrained(tmp)
            s.tokenizer.save_pretrained(tmp)
            if state.loss_curve:
                title = f"{o.method} x{plan.target_length / plan.original_length:g}, {o.train_mode}"
                plot_loss(state.loss_curve, tmp / "loss.png", title)
                summary.plots = [{"path": "loss.png", "title": "Training loss"}]  # relative to the model folder
            summary.save(tmp)
        if o.model_card:  # in the final folder: the card names the model by its folder (a failure is only a warning)
            local = Path(o.model).expanduser().exists() or o.model in ("smollm2", "minilm")
            write_model_card(final, summary, base_model=None if local else o.model, repo_id=None)
        logger.info("saved %s (%d steps, %.0f tokens/s)", final, state.step, summary.tokens_per_s or 0)
    accelerator.wait_for_everyone()
    return RunResult(stopped=False, step=state.step, summary=summary, model=model)


def run(o: Options) -> RunResult:
    """Train as ``o`` says: to the end (saved model) or to an early stop (checkpoint)."""
    s = setup(o)
    stopped = train(s)
    return stopped if stopped is not None else save(s)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Command line: parse, run; a bad option or config is one error line and exit status 2."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        o = parse_options(argv, prog=prog)
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
    try:
        run(o)
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
