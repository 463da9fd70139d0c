"""Which engine a launched run really trains with, and the batches of context parallelism.

**Engine.** ``accelerate launch --config_file fsdp.yaml`` only sets environment variables (``ACCELERATE_USE_FSDP``,
``FSDP_VERSION``, ``ACCELERATE_USE_DEEPSPEED``); ``AcceleratorState`` then decides. In accelerate 1.15
(``accelerate/state.py``, ``AcceleratorState.__init__``, the ``elif self.distributed_type in [MULTI_GPU, ...]``
branch) FSDP is switched on only for GPU-like device types, so on CPU processes (``ACCELERATE_USE_CPU=1``) an FSDP
config silently runs ``MULTI_CPU``, i.e. DDP. torch 2.13's FSDP2 (``fully_shard``) itself runs on CPU over gloo, and
accelerate's FSDP2 preparation, sharded checkpoints and state-dict gathering work there once the state says FSDP, so
:func:`resolve_engine` switches a CPU run to FSDP2 instead of letting it fall back to DDP; every other mismatch
between the engine asked for and the one accelerate set up is refused.

**Context parallelism** (``context_parallel: N``): accelerate's ``ParallelismConfig(cp_size=N)`` with FSDP2
(``accelerate/parallelism_config.py``; ``Accelerator.maybe_context_parallel`` in ``accelerate/accelerator.py`` wraps
``torch.distributed.tensor.experimental.context_parallel``). Every process of a context-parallel group receives the
same whole sequence; the context manager shards the buffers it is given along the sequence (head-tail load
balancing: of 2N chunks rank r keeps chunks r and 2N-1-r) and swaps SDPA for ring attention. Hence
:func:`context_parallel_batch`: the position ids are always passed explicitly (the global ones, or PoSE's), so each
shard keeps the global positions of its tokens and the rotary patch sees them; the labels are shifted *before*
sharding (``shift_labels``), since a shard's last token is predicted from a token another process holds.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def requested_engine() -> str | None:
    """The sharded engine ``accelerate launch`` was asked for (from the variables it sets), or None."""
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _env_true("ACCELERATE_USE_FSDP"):
        return f"fsdp{os.environ.get('FSDP_VERSION', '1')}"
    return None


def resolve_engine(accelerator: Any) -> str:
    """Make the run train with the engine that was asked for, or refuse before anything is written.

    Returns the engine in words (for the log). FSDP2 asked for on CPU processes, where accelerate 1.15 sets up
    ``MULTI_CPU`` (DDP), is switched on here: the FSDP plugin is built from the launch variables, as accelerate does
    on GPUs. Refused: FSDP1 or mixed precision on CPU processes (not tried), FSDP / DeepSpeed asked for but not set
    up (a single process, an accelerate that ignored the config)."""
    from accelerate.utils import DistributedType

    wanted = requested_engine()
    actual = accelerator.distributed_type
    if wanted is None:
        return str(actual.value)
    if wanted == "deepspeed":
        if actual != DistributedType.DEEPSPEED:
            raise ValueError(
                f"DeepSpeed was asked for (ACCELERATE_USE_DEEPSPEED=true, from the accelerate config) but accelerate "
                f"set up {actual.value} on {accelerator.device}: the run would not be sharded. Launch on GPUs with "
                "`pip install deepspeed`, or use the ddp / fsdp config"
            )
        return "deepspeed"
    if actual == DistributedType.FSDP:
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    if actual == DistributedType.MULTI_CPU:
        if wanted != "fsdp2":
            raise ValueError(
                f"FSDP version {wanted[4:]} was asked for on CPU processes, where accelerate 1.15 runs DDP instead "
                "and the recipe can only switch on FSDP2: set fsdp_version: 2 in the accelerate config"
            )
        if accelerator.mixed_precision != "no":
            raise ValueError(
                f"FSDP2 on CPU processes is run with mixed_precision no only (asked: {accelerator.mixed_precision}); "
                "launch with --mixed_precision no"
            )
        enable_fsdp2_on_cpu(accelerator)
        logger.warning(
            "FSDP2 on CPU processes: accelerate %s would run DDP here; switched to FSDP2 over gloo",
            _accelerate_version(),
        )
        return "FSDP2 (CPU, gloo)"
    raise ValueError(
        f"FSDP was asked for (ACCELERATE_USE_FSDP=true, from the accelerate config) but accelerate set up "
        f"{actual.value} with {accelerator.num_processes} process(es) on {accelerator.device}: the run would not be "
        "sharded. Launch at least 2 processes (accelerate launch --num_processes N), or use the ddp config"
    )


def _accelerate_version() -> str:
    import accelerate

    return accelerate.__version__


def enable_fsdp2_on_cpu(accelerator: Any) -> None:
    """Put a ``MULTI_CPU`` accelerator into FSDP mode with the plugin the launch variables describe (what
    ``AcceleratorState`` does for GPU device types). Call before ``prepare``."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # FSDP_* variables set by accelerate launch from the config file
    if plugin.fsdp_version != 2:
        raise ValueError(f"expected FSDP2 from the launch variables, got version {plugin.fsdp_version}")
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP


# --------------------------------------------------------------------------------------------------------------------
# context parallelism


def check_context_parallel_engine(cp: int) -> None:
    """``context_parallel > 1`` needs FSDP2 and CUDA (torch's ring attention replaces the GPU SDPA kernels);
    refused otherwise, before the Accelerator is built."""
    launched_cp = int(os.environ.get("PARALLELISM_CONFIG_CP_SIZE", "1")) if _env_true(
        "ACCELERATE_USE_PARALLELISM_CONFIG"
    ) else 1
    if launched_cp > 1 and launched_cp != cp:
        raise ValueError(
            f"the accelerate config asks for context parallelism of {launched_cp} (parallelism_config_cp_size) but "
            f"the recipe's context_parallel is {cp}: set context_parallel: {launched_cp} (the recipe must shard its "
            "batches to match)"
        )
    if cp <= 1:
        return
    wanted = requested_engine()
    if wanted != "fsdp2":
        raise ValueError(
            f"context_parallel {cp} shards the sequence with accelerate's ParallelismConfig, which needs FSDP2 "
            f"(launched with: {wanted or 'no sharded engine'}); launch with "
            "--config_file recipes/accelerate/fsdp_context_parallel.yaml"
        )
    if not torch.cuda.is_available() or _env_true("ACCELERATE_USE_CPU"):
        raise ValueError(
            f"context_parallel {cp} needs CUDA GPUs: torch's context parallelism replaces the GPU attention kernels "
            "(flash / efficient / cuDNN SDPA) with ring attention; there is no CPU path. Set context_parallel: 1 here"
        )


def parallelism_config(cp: int, world: int) -> Any:
    """``ParallelismConfig`` for ``cp``-way context parallelism, the rest of the processes sharding data (FSDP)."""
    from accelerate.parallelism_config import ParallelismConfig

    if world % cp:
        raise ValueError(f"context_parallel {cp} must divide the number of processes {world}")
    return ParallelismConfig(dp_shard_size=world // cp, cp_size=cp)


def data_parallel_position(mesh: Any, cp: int, world: int, rank: int) -> tuple[int, int]:
    """``(data-parallel world, data-parallel rank)``: processes of one context-parallel group share a batch, so the
    data order counts groups, not processes. ``mesh`` is accelerate's ``torch_device_mesh`` (named dims
    ``dp_replicate``, ``dp_shard``, ``cp``, ``tp``); without context parallelism every process is its own group."""
    if cp <= 1:
        return world, rank
    names, coordinate = mesh.mesh_dim_names, mesh.get_coordinate()
    dp_world, dp_rank = 1, 0
    for i, name in enumerate(names):
        if name.startswith("dp"):
            dp_world, dp_rank = dp_world * mesh.size(i), dp_rank * mesh.size(i) + coordinate[i]
    if dp_world * cp != world:
        raise ValueError(f"device mesh {names} does not split {world} processes into {cp}-way context parallel")
    return dp_world, dp_rank


def context_parallel_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A causal micro-batch ready to be sharded along the sequence: explicit global ``position_ids`` (``arange``
    unless PoSE gave its own), ``labels`` and ``shift_labels`` = the next token of each position, ``IGNORE_INDEX``
    at the last one, and no ``attention_mask`` (context parallelism computes causal attention only; the PoSE mask
    is all ones). Every tensor is ``[batch, seq]``: shard them all along dim 1 together."""
    ids = batch["input_ids"]
    b, n = ids.shape
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(n, device=ids.device).expand(b, n)
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("context parallelism computes causal attention only: padded batches are not supported")
    labels = batch["labels"]
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return {"input_ids": ids, "position_ids": position_ids.contiguous().clone(), "shift_labels": shifted}


def context_parallel_loss(model: Any, shard: dict[str, torch.Tensor], valid_tokens: int, cp: int) -> torch.Tensor:
    """Next-token loss of this process's shard, scaled so that averaging over the ``cp`` processes of the group
    (what FSDP's gradient reduction does) gives the mean over the ``valid_tokens`` of the whole sequence."""
    out = model(
        input_ids=shard["input_ids"],
        position_ids=shard["position_ids"],
        labels=shard["shift_labels"],
        shift_labels=shard["shift_labels"],
        num_items_in_batch=max(valid_tokens, 1) / cp,
        use_cache=False,
    )
    return out.loss
