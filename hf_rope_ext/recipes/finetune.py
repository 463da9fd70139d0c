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

    1. Options      config.py: one dataclass, a field per option with its help; YAML (--config) then --key value
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

import copy
import json
import logging
import math
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

import hf_rope_ext
from hf_rope_ext import patch_info, patch_model
from hf_rope_ext.loading import load_model
from hf_rope_ext.training import adapters, data, distributed, io, pose, s2attn
from hf_rope_ext.training.heldout import heldout_perplexity
from hf_rope_ext.training.loss import chunked_causal_lm_loss, supports_chunked_loss
from hf_rope_ext.training.summary import TrainingSummary

from .config import (  # noqa: F401  (the recipe's options; build_parser/options_from_dict re-exported for scripts)
    EXAMPLES,
    RESUME_KEYS,
    Options,
    build_parser,
    check_options,
    load_yaml,
    options_from_dict,
    parse_options,
)

logger = logging.getLogger("finetune")




# ====================================================================================================================
# 1. Options: hf_rope_ext/recipes/config.py (Options, one field per option with its help; YAML then --key value).


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
    if o.context_parallel > 1:
        cp = o.context_parallel
        if objective != "causal":
            raise ValueError(f"context_parallel {cp}: {type(model).__name__} is a masked LM; context parallelism "
                             "computes causal attention only")
        if seq_len % (2 * cp):
            raise ValueError(f"context_parallel {cp}: seq_len {seq_len} must be a multiple of {2 * cp} (each "
                             "process holds 2 of 2 x context_parallel equal chunks of every sequence)")
        attn = getattr(model.config, "_attn_implementation", None)
        if attn != "sdpa":
            raise ValueError(f"context_parallel {cp} replaces SDPA attention with ring attention; the model uses "
                             f"{attn!r} attention (load it with attn_implementation='sdpa')")

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
    """``"key old -> new"`` for each option in RESUME_KEYS that differs between a checkpoint and ``o``. An option the
    checkpoint does not record (written before the option existed) counts as its default."""
    defaults = asdict(Options())
    old = {k: saved.get(k, defaults[k]) for k in RESUME_KEYS}
    return [f"{k} {old[k]!r} -> {getattr(o, k)!r}" for k in RESUME_KEYS if old[k] != getattr(o, k)]


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
    """The checkpoint to resume from, or None. Refuses to silently mix a new run into old checkpoints.

    ``--resume true`` takes the newest checkpoint whose files all read back; a broken one (a truncated
    ``optimizer.bin`` or ``model.safetensors``, say) is named in the log and the previous one is used instead."""
    if isinstance(o.resume, str):
        problems = io.checkpoint_problems(o.resume)
        if problems:
            raise ValueError(
                f"cannot resume from {o.resume}: {'; '.join(problems)}. Give another checkpoint folder, or "
                "--resume true for the newest complete one in output_dir"
            )
        return Path(o.resume)
    checkpoints = io.list_checkpoints(root)
    latest = checkpoints[-1][1] if checkpoints else None
    if o.resume:
        if latest is None:
            logger.warning("resume: no checkpoint in %s yet, starting from scratch", root)
            return None
        broken, found = [], []
        for _, path in reversed(checkpoints):
            problems = io.checkpoint_problems(path)
            found += problems
            if not problems:
                if broken:
                    logger.warning(
                        "resume: falling back to %s, the newest complete checkpoint; the broken %s will be moved "
                        "aside (renamed NAME.broken)", path, ", ".join(p.name for p in broken),
                    )
                return path
            logger.warning("resume: checkpoint %s is broken: %s", path, "; ".join(problems))
            broken.append(path)
        raise ValueError(
            f"no checkpoint in {root} can be resumed from; every one has a broken file: {'; '.join(found)}. "
            "Start again with --overwrite true"
        )
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
    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    part = heldout_perplexity(
        inner, mine, scored=scored, device=accelerator.device, chunked_head=not sharded,
        **{**kwargs, "seed": kwargs["seed"] + rank},
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
    loss_chunk: int = 0
    """Positions per chunk of the chunked next-token loss (:mod:`hf_rope_ext.training.loss`); 0: the model's own."""


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


def chunked_loss_size(o: Options, plan: Plan, model: Any, sharded: bool) -> int:
    """Positions per chunk of the next-token loss, or 0 where the model's own loss is used (masked objective,
    ``loss_chunk: 0``, a parameter-sharded engine, a head the chunked loss does not reproduce; the reason is
    logged)."""
    if o.loss_chunk == 0 or plan.objective != "causal":
        return 0
    reason = "FSDP / DeepSpeed shard the head's weight outside the forward" if sharded else None
    reason = reason or supports_chunked_loss(model)
    if reason is not None:
        logger.info("loss over full logits (chunked loss off: %s)", reason)
        return 0
    return o.loss_chunk


def setup(o: Options) -> Setup:
    """Check everything, load + patch the model once, read the data, make it trainable, build the optimizer, resume.
    Nothing is written to output_dir until every check has passed."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    check_options(o)
    distributed.check_context_parallel_engine(o.context_parallel)  # FSDP2 + CUDA, or refused
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    parallelism = distributed.parallelism_config(o.context_parallel, launched) if o.context_parallel > 1 else None
    accelerator = Accelerator(
        mixed_precision=o.mixed_precision, gradient_accumulation_steps=o.grad_accum, parallelism_config=parallelism
    )
    world = accelerator.num_processes
    if launched != world:  # e.g. torchrun / --multi_gpu on a machine without GPUs: N independent runs would collide
        raise ValueError(
            f"{launched} processes were launched but accelerate sees {world}; on CPU-only machines set "
            "ACCELERATE_USE_CPU=1 (accelerate launch --multi_gpu --num_processes N uses gloo then)"
        )
    engine = distributed.resolve_engine(accelerator)  # FSDP asked for but DDP set up: FSDP2 on CPU, else refused
    out = Path(o.output_dir)
    resumed_from = resume_checkpoint(o, out / "checkpoints")
    logger.info(
        "hf_rope_ext %s | %d process(es) on %s, %s%s | output %s", hf_rope_ext.__version__, world,
        accelerator.device, engine, f", {o.context_parallel}-way context parallel" if o.context_parallel > 1 else "",
        out,
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
        saved = io.read_trainer_state(resumed_from)  # checked by resume_checkpoint; names the file
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
            setattr(state, key, saved.get(key))

    # ---- every check passed: the run starts writing
    if accelerator.is_main_process:
        interrupted = (out / ".model.old").is_dir() and not (out / "model").exists()
        if interrupted:  # killed between the two renames of a final save: the moved-aside model is the only copy
            io.recover_directory(out / "model")
            logger.warning("restored %s from .model.old (an earlier final save was interrupted)", out / "model")
        if o.overwrite and (out / "checkpoints").exists():
            shutil.rmtree(out / "checkpoints")
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.yaml").write_text(yaml.safe_dump(asdict(o), sort_keys=False))
        if resumed_from is not None and o.resume is True:
            for _, path in io.list_checkpoints(out / "checkpoints"):
                if path.name > resumed_from.name:  # newer than the one resumed: broken (names are zero-padded)
                    # out of the way of pruning and of the next resume, but kept for the user to look at
                    aside = path.with_name(f"{path.name}.broken")
                    if aside.exists():
                        shutil.rmtree(aside)
                    os.replace(path, aside)

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
    loss_chunk = chunked_loss_size(o, plan, model, accelerator.distributed_type in (DistributedType.FSDP,
                                                                                     DistributedType.DEEPSPEED))
    model, optimizer = accelerator.prepare(model, optimizer)
    # FSDP2 replaces the parameters with sharded ones: clip those (the old list would have no gradients)
    params = [p for p in model.parameters() if p.requires_grad]
    if resumed_from is not None:
        try:
            accelerator.load_state(str(resumed_from))
        except Exception as err:  # a fault the file checks cannot see: name the checkpoint, keep the cause
            raise ValueError(f"could not load checkpoint {resumed_from}: {type(err).__name__}: {err}") from err
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
        resumed_from, out, skeleton, loss_chunk,
    )


def train(s: Setup) -> RunResult | None:
    """The training loop from ``s.state.step`` to max_steps; a checkpoint every save_every steps. Returns a stopped
    RunResult (with its checkpoint) on a signal or at stop_after, else None (training finished)."""
    from tqdm.auto import tqdm

    o, plan, accelerator, state = s.o, s.plan, s.accelerator, s.state
    cp = o.context_parallel
    # the data order counts data-parallel groups: the processes of one context-parallel group share each batch
    world, rank = distributed.data_parallel_position(
        accelerator.torch_device_mesh if cp > 1 else None, cp, accelerator.num_processes, accelerator.process_index
    )
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
                    if cp > 1:  # the sequence sharded over the group; forward and backward inside the context
                        full = distributed.context_parallel_batch(batch)
                        valid = int((full["shift_labels"] != distributed.IGNORE_INDEX).sum())
                        buffers = [full["input_ids"], full["position_ids"], full["shift_labels"]]
                        with accelerator.maybe_context_parallel(
                            buffers=buffers, buffer_seq_dims=[1, 1, 1], no_restore_buffers=set(buffers)
                        ):
                            loss = distributed.context_parallel_loss(s.model, full, valid, cp)
                            accelerator.backward(loss)
                    elif s.loss_chunk:  # never [tokens, vocab] logits (long sequences)
                        labels = batch.pop("labels")
                        loss = chunked_causal_lm_loss(s.model, labels, chunk=s.loss_chunk, **batch)
                    else:
                        loss = s.model(**batch, use_cache=False).loss
                    if cp == 1:
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
        batch_size=o.batch_size * o.grad_accum * (world // o.context_parallel),  # a CP group shares a batch
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
