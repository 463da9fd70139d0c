"""Fine-tune an extended model at its new length: patch, train briefly, merge, save a reloadable model.

    accelerate launch recipes/finetune.py --config recipes/configs/llama_yarn_lora.yaml [--key value ...]
    python recipes/finetune.py --config recipes/configs/llama_yarn_lora.yaml --max_steps 50
    python recipes/finetune.py --help                      # every option with its help

Zero-shot extension loses some quality; the papers recover it with a short fine-tune at the new length:
Position Interpolation ~200-1000 steps (https://arxiv.org/abs/2306.15595), YaRN ~400 steps
(https://arxiv.org/abs/2309.00071), LongLoRA = LoRA + trainable embeddings and norms, optionally with shifted sparse
attention (https://arxiv.org/abs/2309.12307), PoSE = short windows whose position ids skip to cover the target length
(https://arxiv.org/abs/2309.10400).

The script reads top to bottom: options -> checks -> model + patch -> data -> trainable parameters -> training loop
with checkpoints -> merge, save (written to a temporary folder, then moved into place), summary, plot, evaluation.

Output folder layout:
    OUTPUT_DIR/run_config.yaml              the resolved options of the last start
    OUTPUT_DIR/checkpoints/step-XXXXXXXX/   accelerate state + trainer_state.json (resume with --resume true)
    OUTPUT_DIR/model/                       the merged model, tokenizer, training_summary.json, loss.png, README.md
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import math
import os
import resource
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

logger = logging.getLogger("finetune")


# ====================================================================================================================
# 1. Options: one flat dataclass; YAML + ``--key value`` overrides; unknown keys are refused.


def opt(default: Any, help: str) -> Any:
    """A dataclass field with its help text (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class Options:
    """Everything the recipe reads. Each field's help is in its metadata (``--help`` prints it)."""

    # --- model and extension
    model: str | None = opt(
        None,
        "Model to extend: a local folder, a .gguf file, a Hub id, or an offline alias (smollm2, minilm). Required.",
    )
    tokenizer: str | None = opt(None, "Tokenizer folder or id when it differs from the model's.")
    dtype: Literal["float32", "bfloat16", "float16"] = opt(
        "float32",
        "dtype the weights are loaded and trained in; mixed_precision adds autocast on top.",
    )
    method: str = opt(
        "yarn",
        "Extension method from the registry (`hf-rope-ext methods`): yarn, linear, ntk, ... or copy/hierarchical "
        "for learned tables.",
    )
    factor: float | None = opt(None, "New length / original length. Give this or target_length.")
    target_length: int | None = opt(None, "New context length in tokens, instead of factor.")
    original_length: int | None = opt(None, "Length the model was trained at; default: from its config.")
    method_params: dict[str, Any] = opt({}, "The method's own parameters, e.g. {beta_fast: 32} for yarn.")

    # --- what is trained
    train_mode: Literal["lora", "longlora", "full"] = opt(
        "lora",
        "lora: LoRA adapters only; longlora: LoRA + trainable embeddings and norms (LongLoRA); full: every weight.",
    )
    lora_r: int = opt(8, "LoRA rank.")
    lora_alpha: int = opt(16, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.")
    lora_targets: str | list[str] = opt(
        "attention",
        "Modules that get LoRA adapters: 'attention' (every linear layer inside attention blocks), 'all-linear', "
        "or a list of module names (peft matching: exact or dotted suffix).",
    )
    modules_to_save: list[str] = opt([], "Extra modules trained fully next to LoRA (names, peft matching).")
    train_position_embeddings: bool | None = opt(
        None,
        "Train learned position tables fully in lora mode; default: yes when a learned table was extended.",
    )
    objective: Literal["auto", "causal", "masked"] = opt(
        "auto",
        "Training loss: next-token (causal) or BERT-style masked LM; auto follows the model's head.",
    )
    mlm_probability: float = opt(0.15, "Fraction of tokens masked for the masked objective.")

    # --- PoSE / S²-Attn
    pose: bool = opt(
        False,
        "PoSE: train on short windows (seq_len) whose position ids skip to cover the target length.",
    )
    pose_chunks: int = opt(2, "PoSE: number of chunks each window is cut into.")
    s2attn: bool = opt(
        False,
        "LongLoRA's shifted sparse attention while training (Llama-family models); full attention at inference.",
    )
    s2attn_group_ratio: float = opt(0.25, "S²-Attn group size as a fraction of seq_len.")

    # --- data
    data: list[str] = opt(
        ["builtin:pydoc"],
        "Training text: files (.txt .md .jsonl .json .parquet), folders, a `datasets` name, or builtin:pydoc / "
        "builtin:stdlib (offline).",
    )
    text_field: str = opt("text", "Field / column holding the text in JSONL, JSON, parquet and datasets sources.")
    dataset_config: str | None = opt(None, "Configuration name for a `datasets` source.")
    dataset_split: str = opt("train", "Split of a `datasets` source.")
    eval_data: list[str] = opt(
        [],
        "Held-out text for the before/after perplexity; default: the tail of data, kept out of training.",
    )
    eval_chunks: int = opt(4, "Number of held-out chunks of target length to evaluate (0: no evaluation).")
    seq_len: int | None = opt(
        None,
        "Tokens per training sequence; default: the target length (with pose: the original length).",
    )
    max_tokens: int | None = opt(None, "Read at most this many tokens of training data.")
    cache_dir: str | None = opt(
        None,
        "Where tokenised data is cached; default $HF_ROPE_EXT_CACHE or ~/.cache/hf_rope_ext/tokens.",
    )

    # --- optimisation
    max_steps: int = opt(400, "Optimizer steps.")
    batch_size: int = opt(1, "Sequences per process per micro-batch.")
    grad_accum: int = opt(8, "Micro-batches per optimizer step.")
    lr: float = opt(2e-4, "Peak learning rate (LoRA ~1e-4..2e-4; full fine-tuning ~2e-5).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = opt("cosine", "Decay after warmup.")
    warmup_steps: int = opt(20, "Linear warmup steps.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0: off).")
    seed: int = opt(0, "Seed for data order, PoSE sampling, masking and dropout.")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = opt(
        None,
        "accelerate mixed precision (autocast); default: what `accelerate launch` / its config says, else no.",
    )
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")

    # --- run
    output_dir: str | None = opt(None, "Run folder: checkpoints/, model/, run_config.yaml. Required.")
    save_every: int = opt(100, "Checkpoint every N optimizer steps (0: only on interruption).")
    keep_checkpoints: int = opt(2, "How many recent checkpoints to keep (0: all).")
    resume: bool | str = opt(
        False,
        "Continue from the latest checkpoint in output_dir (true) or from a given checkpoint folder.",
    )
    overwrite: bool = opt(False, "Start from scratch even if output_dir already holds checkpoints (they are deleted).")
    stop_after: int | None = opt(
        None,
        "Stop with a checkpoint after this many steps in this invocation (time-limited jobs; resume later).",
    )
    log_every: int = opt(10, "Log the loss every N steps.")
    eval_before_after: bool = opt(True, "Held-out perplexity at the target length before and after training.")
    eval_batch_size: int = opt(1, "Batch size for the held-out evaluation.")
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto",
        "dtype of the saved model; auto keeps the training dtype.",
    )
    model_card: bool = opt(True, "Write README.md with hf_rope_ext.cards when that module is available.")


# Options that must not change between a run and its resumption (they change the model or the data order).
RESUME_KEYS = (
    "model",
    "dtype",
    "method",
    "factor",
    "target_length",
    "original_length",
    "method_params",
    "train_mode",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "modules_to_save",
    "train_position_embeddings",
    "objective",
    "pose",
    "pose_chunks",
    "s2attn",
    "s2attn_group_ratio",
    "data",
    "text_field",
    "seq_len",
    "max_tokens",
    "batch_size",
    "grad_accum",
    "seed",
)


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " | ".join(_describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation)) if not typing.get_args(annotation) else str(annotation)


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation`` (str -> number for numbers written like 2e-4), or ValueError naming the option."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if isinstance(annotation, types.UnionType) or origin is typing.Union:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
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
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
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


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Options)


def options_from_dict(values: dict[str, Any], where: str = "config") -> Options:
    """Build Options from a mapping; unknown keys and wrong types raise ValueError naming them."""
    hints = _field_types()
    unknown = [k for k in values if k not in hints]
    if unknown:
        hints_text = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hints_text.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown option(s) in {where}: {', '.join(hints_text)}; run with --help for the list")
    return Options(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    return values


def _parse_override(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_options(argv: list[str] | None = None) -> Options:
    """``--config FILE`` plus ``--key value`` / ``--key=value`` overrides (values parsed as YAML)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        raise SystemExit(0)
    values: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; options are --key value (see --help)")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"option --{key} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            values.update(load_yaml(value))
        else:
            overrides[key] = _parse_override(value)
    return options_from_dict({**values, **overrides}, where="config / command line")


def help_text() -> str:
    lines = [__doc__.strip().split("\n\n")[0], "", "options (YAML keys or --key value):"]
    hints = _field_types()
    for f in dataclasses.fields(Options):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name} ({_describe(hints[f.name])}, default {default!r})\n      {f.metadata['help']}")
    return "\n".join(lines)


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
    valid = [
        f.name
        for f in dataclasses.fields(spec.params_cls)
        if f.name not in ("factor", "original_max_position_embeddings")
    ]
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
    positive = {
        "lora_r": o.lora_r,
        "lora_alpha": o.lora_alpha,
        "max_steps": o.max_steps,
        "batch_size": o.batch_size,
        "grad_accum": o.grad_accum,
        "log_every": o.log_every,
        "eval_batch_size": o.eval_batch_size,
        "pose_chunks": o.pose_chunks,
    }
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"option {name} must be >= 1, got {value}")
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


# ====================================================================================================================
# 3. Training helpers: learning rate, batches, signals, checkpoints.


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
        specials = list(tokenizer.all_special_ids)
        ids, labels = data.mask_for_mlm(
            ids,
            mask_token_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            special_ids=specials,
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


def save_checkpoint(accelerator: Any, root: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """accelerate state (model, optimizer, RNG) + trainer_state.json, written to a temporary folder then renamed."""
    final = root / io.checkpoint_name(step)
    tmp = final.with_name(f".{final.name}.partial")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / io.COMPLETE_MARKER).write_text(json.dumps(state, indent=1))
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
    inner = accelerator.unwrap_model(
        model
    )  # DDP's wrapper is not needed without gradients; sharded modules keep their hooks
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([c[0] for c in curve], [c[1] for c in curve], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_model_card(folder: Path, o: Options, plan: Plan, summary: dict[str, Any], repo_id: str) -> None:
    """README.md through ``hf_rope_ext.cards`` when that module exists (an optional feature)."""
    try:
        from hf_rope_ext import cards  # type: ignore[attr-defined]
    except ImportError:
        logger.info("hf_rope_ext.cards is not available: no model card written")
        return
    training = {
        "data": o.data,
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "seq_len": plan.seq_len,
        "batch_size": o.batch_size * o.grad_accum * summary["num_processes"],
        "gradient_accumulation_steps": o.grad_accum,
        "learning_rate": o.lr,
        "warmup_steps": o.warmup_steps,
        "optimizer": "AdamW",
        "scheduler": o.lr_scheduler,
        "precision": o.dtype
        if summary["mixed_precision"] == "no"
        else f"{summary['mixed_precision']} mixed precision",
        "seed": o.seed,
        "hardware": f"{summary['num_processes']} x {summary['device']}",
        "wall_time_s": summary["wall_time_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "final_loss": summary["loss_last"],
        "loss_curve": summary["loss_curve"],
        "method": o.method,
        "factor": plan.target_length / plan.original_length,
        "recipe": f"recipes/finetune.py ({o.train_mode}{', PoSE' if o.pose else ''}{', S2-Attn' if o.s2attn else ''})",
        "plots": [{"path": str(folder / "loss.png"), "title": "Training loss"}]
        if (folder / "loss.png").is_file()
        else [],
    }
    if summary.get("peak_memory_kind") == "cuda_max_allocated":
        training["peak_memory_bytes"] = summary["peak_memory_bytes"]
    if o.train_mode != "full":
        training["lora"] = {
            "r": o.lora_r,
            "lora_alpha": o.lora_alpha,
            "lora_dropout": o.lora_dropout,
            "target_modules": adapters.short_names(plan.lora_targets)
            if isinstance(plan.lora_targets, list)
            else plan.lora_targets,
            "modules_to_save": adapters.short_names(plan.modules_to_save) or None,
        }
    results = []
    before, after = summary["eval"]["before"], summary["eval"]["after"]
    if before and after:
        results.append(
            {
                "task": "perplexity",
                "dataset": f"held-out text ({', '.join(o.eval_data) if o.eval_data else 'tail of the training data'})",
                "results": {
                    "before fine-tuning": [{"length": plan.target_length, "perplexity": before["perplexity"]}],
                    o.method: [{"length": plan.target_length, "perplexity": after["perplexity"]}],
                },
            }
        )
    base_model = None if Path(o.model).expanduser().exists() or o.model in ("smollm2", "minilm") else o.model
    try:
        cards.write_card(folder, results=results, training=training, base_model=base_model, repo_id=repo_id)
    except Exception as err:
        logger.warning("model card not written: %s", err)


# ====================================================================================================================
# 4. The run.


@dataclass
class RunResult:
    """What ``run`` returns (on the main process; other processes get ``model=None``)."""

    stopped: bool
    """True when the run stopped early (signal or stop_after) after writing a checkpoint."""
    step: int
    """Optimizer steps done so far."""
    summary: dict[str, Any] | None = None
    """The training summary (also in OUTPUT_DIR/model/training_summary.json); None when stopped."""
    model: Any = None
    """The final, merged model in memory (main process, finished runs)."""
    checkpoint: Path | None = None
    """The checkpoint written when stopped."""


def run(o: Options) -> RunResult:
    """Train as ``o`` says: to the end (saved model) or to an early stop (checkpoint)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    check_options(o)
    accelerator = Accelerator(mixed_precision=o.mixed_precision, gradient_accumulation_steps=o.grad_accum)
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:  # e.g. torchrun / --multi_gpu on a machine without GPUs: N independent runs would collide
        raise ValueError(
            f"{launched} processes were launched but accelerate sees {world}; on CPU-only machines set "
            "ACCELERATE_USE_CPU=1 (accelerate launch --multi_gpu --num_processes N uses gloo then)"
        )
    out = Path(o.output_dir)
    ckpt_root = out / "checkpoints"
    resume_from = resume_checkpoint(o, ckpt_root)
    logger.info(
        "hf_rope_ext %s | %d process(es) on %s | output %s", hf_rope_ext.__version__, world, accelerator.device, out
    )

    # ---- model + patch (fails here on target <= original, unknown method parameters, unsupported model)
    task = {"auto": "auto", "causal": "causal-lm", "masked": "masked-lm"}[o.objective]
    try:
        model, tokenizer = load_model(o.model, dtype=o.dtype, task=task)
    except ValueError as err:
        kind = {"auto": "language", "causal": "causal", "masked": "masked"}[o.objective]
        raise ValueError(f"could not load {o.model!r} as a {kind} model: {err}") from err
    if o.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(o.tokenizer)
    patch_model(
        model,
        o.method,
        factor=o.factor,
        max_position_embeddings=o.target_length,
        original_max_position_embeddings=o.original_length,
        tokenizer=tokenizer,
        **o.method_params,
    )
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

    # ---- data: tokenise once (main process first, the others read its cache), pack, hold out evaluation chunks
    with accelerator.main_process_first():
        stream_kwargs = {
            "cache_dir": o.cache_dir,
            "text_field": o.text_field,
            "dataset_config": o.dataset_config,
            "dataset_split": o.dataset_split,
        }
        stream = data.load_token_stream(o.data, tokenizer, max_tokens=o.max_tokens, **stream_kwargs)
        eval_stream = data.load_token_stream(o.eval_data, tokenizer, **stream_kwargs) if o.eval_data else None
    wrap = (
        (tokenizer.cls_token_id, tokenizer.sep_token_id)
        if plan.objective == "masked" and tokenizer.cls_token_id is not None
        else None
    )
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

    # ---- state carried across resumptions
    state: dict[str, Any] = {
        "step": 0,
        "tokens": 0,
        "loss_curve": [],
        "elapsed_s": 0.0,
        "eval_before": None,
        "options": {k: getattr(o, k) for k in RESUME_KEYS},
        "num_processes": world,
    }
    if resume_from is not None:
        saved = json.loads((resume_from / io.COMPLETE_MARKER).read_text())
        changed = [k for k in RESUME_KEYS if saved["options"].get(k) != state["options"][k]]
        if changed:
            raise ValueError(
                f"cannot resume from {resume_from}: options changed since it was written: "
                + ", ".join(f"{k} {saved['options'].get(k)!r} -> {state['options'][k]!r}" for k in changed)
            )
        if saved.get("num_processes") != world:
            logger.warning(
                "resuming with %d processes (checkpoint had %s): the data order will differ",
                world,
                saved.get("num_processes"),
            )
        state.update({k: saved[k] for k in ("step", "tokens", "loss_curve", "elapsed_s", "eval_before")})

    eval_kwargs = {
        "objective": plan.objective,
        "batch_size": o.eval_batch_size,
        "mask_token_id": tokenizer.mask_token_id,
        "special_ids": list(tokenizer.all_special_ids),
        "vocab_size": len(tokenizer),
        "seed": o.seed,
    }

    # ---- every check passed: the run starts writing
    if main:
        if o.overwrite and ckpt_root.exists():
            import shutil

            shutil.rmtree(ckpt_root)
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.yaml").write_text(yaml.safe_dump(asdict(o), sort_keys=False))

    # ---- trainable parameters, memory savers, S²-Attn
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
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        logger.info("resumed from %s at step %d", resume_from, state["step"])
    elif eval_chunks is not None:  # the patched model before training (LoRA starts as a no-op)
        state["eval_before"] = evaluate(accelerator, model, eval_chunks, eval_kwargs)
        logger.info(
            "held-out perplexity at %d before training: %.3f", plan.target_length, state["eval_before"]["perplexity"]
        )

    # ---- training loop
    from tqdm.auto import tqdm

    tokens_per_step = o.batch_size * plan.seq_len * o.grad_accum * world
    start_step, started = state["step"], time.perf_counter()
    elapsed_before = state["elapsed_s"]
    stop_at = o.max_steps if o.stop_after is None else min(o.max_steps, start_step + o.stop_after)
    bar = tqdm(total=o.max_steps, initial=start_step, desc="fine-tune", disable=not main, dynamic_ncols=True)
    with StopRequest() as stop:
        step = start_step
        while step < stop_at:
            torch.manual_seed(step_seed(o, step, rank, world))  # dropout: identical whether or not the run resumed
            gen = torch.Generator().manual_seed(step_seed(o, step, rank, world))
            lr = lr_at(step, o)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = []
            for micro in range(o.grad_accum):
                indices = data.micro_batch_indices(
                    train_chunks.shape[0],
                    step=step,
                    micro=micro,
                    grad_accum=o.grad_accum,
                    batch_size=o.batch_size,
                    world=world,
                    rank=rank,
                    seed=o.seed,
                )
                batch = make_batch(train_chunks, indices, o, plan, tokenizer, gen)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.accumulate(model):
                    loss = model(**batch, use_cache=False).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and o.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, o.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach().float())
            step += 1
            mean_loss = float(accelerator.reduce(torch.stack(losses).mean(), reduction="mean"))
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training loss is {mean_loss} at step {step}; lower lr or check the data")
            state["loss_curve"].append([step, mean_loss])
            state["tokens"] += tokens_per_step
            state["step"] = step
            state["elapsed_s"] = elapsed_before + time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if step % o.log_every == 0 or step == 1:
                logger.info("step %d/%d loss %.4f lr %.2e", step, o.max_steps, mean_loss, lr)
            requested = stop.reason is not None
            if world > 1:  # every process must agree to stop at the same step
                flag = torch.tensor(float(requested), device=accelerator.device)
                requested = float(accelerator.reduce(flag, reduction="sum")) > 0
            if requested or (step == stop_at and step < o.max_steps):
                path = save_checkpoint(accelerator, ckpt_root, step, state, o.keep_checkpoints)
                why = stop.reason or f"stop_after={o.stop_after}"
                logger.warning("stopped at step %d (%s); continue with --resume true", step, why)
                bar.close()
                return RunResult(stopped=True, step=step, checkpoint=path)
            if o.save_every and step % o.save_every == 0 and step < o.max_steps:
                save_checkpoint(accelerator, ckpt_root, step, state, o.keep_checkpoints)
    bar.close()

    # ---- evaluation after training (on the trained, not yet merged model: same numbers, every process helps)
    eval_after = None
    if eval_chunks is not None:
        eval_after = evaluate(accelerator, model, eval_chunks, eval_kwargs)
        before = state["eval_before"]["perplexity"] if state["eval_before"] else float("nan")
        logger.info(
            "held-out perplexity at %d after training: %.3f (before: %.3f)",
            plan.target_length,
            eval_after["perplexity"],
            before,
        )

    # ---- final model: merge LoRA, restore inference settings, save atomically with summary, plot, card
    accelerator.wait_for_everyone()
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded:  # gather the full weights (collective), rebuild the model on the main process's CPU
        full_state = accelerator.get_state_dict(model)
        final = rebuild_on_cpu(o, plan, full_state) if main else None
    else:
        final = accelerator.unwrap_model(model) if main else None
        if final is not None and o.train_mode != "full":
            final = final.merge_and_unload()
    summary = None
    if main:
        summary = finalize(o, plan, final, tokenizer, state, eval_after, out, world, accelerator)
    accelerator.wait_for_everyone()
    return RunResult(stopped=False, step=state["step"], summary=summary, model=final)


def rebuild_on_cpu(o: Options, plan: Plan, full_state: dict[str, torch.Tensor]) -> Any:
    """FSDP / DeepSpeed: a fresh CPU copy of the trained model from the gathered state dict, merged."""
    model, _ = load_model(
        o.model, dtype=o.dtype, task={"auto": "auto", "causal": "causal-lm", "masked": "masked-lm"}[o.objective]
    )
    patch_model(
        model,
        o.method,
        factor=o.factor,
        max_position_embeddings=o.target_length,
        original_max_position_embeddings=o.original_length,
        **o.method_params,
    )
    model = make_trainable(model, o, plan)  # the same module names as the trained model; weights come from full_state
    missing, unexpected = model.load_state_dict(full_state, strict=False)
    storage = {name: t.data_ptr() for name, t in model.state_dict(keep_vars=True).items()}
    loaded = {storage[name] for name in full_state if name in storage}
    missing = [k for k in missing if storage.get(k) not in loaded]  # tied weights arrive once, under one name
    if missing or unexpected:
        raise RuntimeError(
            f"gathered weights do not fit the rebuilt model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model if o.train_mode == "full" else model.merge_and_unload()


def finalize(
    o: Options,
    plan: Plan,
    model: Any,
    tokenizer: Any,
    state: dict[str, Any],
    eval_after: dict[str, Any] | None,
    out: Path,
    world: int,
    accelerator: Any,
) -> dict[str, Any]:
    s2attn.disable_s2attn(model)
    if o.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.config.use_cache = True
    model.eval()
    if o.save_dtype != "auto":
        model.to(getattr(torch, o.save_dtype))
    curve = state["loss_curve"]
    k = max(1, min(10, len(curve) // 5))
    summary = {
        "steps": state["step"],
        "tokens": state["tokens"],
        "seq_len": plan.seq_len,
        "original_length": plan.original_length,
        "target_length": plan.target_length,
        "loss_first": sum(c[1] for c in curve[:k]) / k if curve else None,
        "loss_last": sum(c[1] for c in curve[-k:]) / k if curve else None,
        "loss_curve": curve,
        "wall_time_s": state["elapsed_s"],
        "tokens_per_s": state["tokens"] / state["elapsed_s"] if state["elapsed_s"] else None,
        **peak_memory(accelerator.device),
        "num_processes": world,
        "distributed_type": str(accelerator.distributed_type.value),
        "device": torch.cuda.get_device_name(accelerator.device)
        if accelerator.device.type == "cuda"
        else accelerator.device.type,
        "mixed_precision": str(accelerator.mixed_precision),
        "eval": {"before": state["eval_before"], "after": eval_after},
        "extension": patch_info(model),
        "options": asdict(o),
    }
    meta = dict(model.config.hf_rope_ext)
    meta["finetune"] = {
        "train_mode": o.train_mode,
        "steps": state["step"],
        "tokens": state["tokens"],
        "seq_len": plan.seq_len,
        "pose": o.pose,
        "s2attn": o.s2attn,
        "data": o.data,
        "lr": o.lr,
    }
    model.config.hf_rope_ext = meta
    with io.atomic_directory(out / "model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "training_summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if curve:
            plot_loss(
                curve, tmp / "loss.png", f"{o.method} x{plan.target_length / plan.original_length:g}, {o.train_mode}"
            )
        if o.model_card:
            write_model_card(tmp, o, plan, summary, repo_id=str(out / "model"))
    logger.info("saved %s (%d steps, %.0f tokens/s)", out / "model", state["step"], summary["tokens_per_s"] or 0)
    return summary


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        o = parse_options(argv)
        run(o)
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
