"""The absolute-table backend of ``patch_model``: learned position tables (GPT-2 ``wpe``, BERT ``position_embeddings``,
OPT, RoBERTa, ...) and fixed sinusoidal tables (Marian, M2M100, XGLM).

Everything sized by the table changes together, as in nanoGPT's ``crop_block_size`` run backwards: the table rows,
the config fields (``n_positions`` / ``max_position_embeddings``), buffers such as ``position_ids`` and
``token_type_ids``, square causal masks (GPT-Neo ``attn.bias``), and module attributes such as
``max_target_positions``. ``families.AbsoluteFamily`` says where those live; the method (``registry``, kind "absolute")
computes the new position rows from the trained ones and never sees the model.

The table is part of the weights, so a patched model saves and reloads as a plain transformers model. ``undo``
restores the exact original tensors kept on the modules, or, on a model reloaded from disk, cuts the original rows
back out of the extended table when the method kept them (``meta["table"]["recover"]``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import families, registry

logger = logging.getLogger(__name__)

_SAVED_TABLE = "_hf_rope_ext_table_saved"  # on a table module: the original table tensor (parameter or buffer)
_SAVED_BUFFERS = "_hf_rope_ext_buffers_saved"  # on a module: {buffer name: original tensor}


# --------------------------------------------------------------------------------------------------------------------
# locating things


def _config_length(family: families.AbsoluteFamily, config: Any) -> int:
    values = {f: getattr(config, f, None) for f in family.config_fields}
    missing = [f for f, v in values.items() if v is None]
    if missing:
        raise ValueError(f"{config.model_type!r} config has no {', '.join(missing)}")
    if len(set(values.values())) != 1:
        raise ValueError(f"config length fields disagree: {values}")
    return int(next(iter(values.values())))


def _config_offset(family: families.AbsoluteFamily, offset: int) -> int:
    return offset if family.config_counts_offset else 0


def _named_module_buffers(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    out = []
    for module_name, module in model.named_modules():
        for name in names:
            if isinstance(module._buffers.get(name), torch.Tensor):
                out.append((f"{module_name}.{name}" if module_name else name, module, name))
    return out


def _is_persistent(module: nn.Module, name: str) -> bool:
    return name not in module._non_persistent_buffers_set


# --------------------------------------------------------------------------------------------------------------------
# tensor helpers


def _recover(table: torch.Tensor, offset: int, n: int, recover: str | None, method: str) -> torch.Tensor:
    """The original table [offset + n, h] cut out of an extended one, following ``meta["table"]["recover"]``."""
    if recover == "prefix":
        return table[: offset + n].detach().clone()
    if isinstance(recover, str) and recover.startswith("stride:"):
        stride = int(recover.split(":", 1)[1])
        return torch.cat([table[:offset], table[offset::stride][:n]]).detach().clone()
    raise ValueError(
        f"cannot restore the original position table of this reloaded model: method '{method}' at this factor does "
        "not keep the trained rows (interpolation keeps them only at integer factors). Load the original checkpoint "
        "instead, or unpatch in the same process that patched."
    )


def _recover_rule(new_pos: torch.Tensor, trained: torch.Tensor) -> str | None:
    """How the trained rows sit inside the new position rows: "prefix", "stride:s" or None (not recoverable)."""
    n, new_len = trained.shape[0], new_pos.shape[0]
    if torch.equal(new_pos[:n], trained):
        return "prefix"
    if new_len % n == 0 and torch.equal(new_pos[:: new_len // n][:n], trained):
        return f"stride:{new_len // n}"
    return None


def _progression(start: torch.Tensor, step: torch.Tensor, length: int) -> torch.Tensor:
    """start + step * k along the last dimension, k = 0 .. length-1 (shape [..., length])."""
    k = torch.arange(length, device=start.device, dtype=start.dtype)
    return start + step * k


def _extend_progression(buf: torch.Tensor, length: int, where: str) -> torch.Tensor:
    """Continue an arithmetic progression along the last dimension (``position_ids`` 0, 1, 2, ...;
    ``token_type_ids`` 0, 0, ...)."""
    n = buf.shape[-1]
    start = buf[..., :1]
    step = buf[..., 1:2] - start if n > 1 else torch.zeros_like(start)
    if not torch.equal(_progression(start, step, n), buf):
        raise ValueError(f"buffer {where} is not an arithmetic progression along its last dimension; cannot extend it")
    return _progression(start, step, length).contiguous()


def _toeplitz(below: torch.Tensor, above: torch.Tensor, size: int) -> torch.Tensor:
    """[size, size] matrix with out[i, j] = below[i - j] (i >= j) / above[j - i] (j > i); past the given diagonals the
    last value repeats (a causal mask stays causal, a sliding-window mask keeps its window)."""
    far_below, far_above = below[-1], above[-1]
    idx = torch.arange(size, device=below.device)
    lower = idx[:, None] >= idx[None, :]  # [size, size]
    out = torch.where(lower, far_below, far_above)  # [size, size]
    for d in torch.nonzero(below != far_below).flatten().tolist():
        out.diagonal(-d).fill_(below[d])
    for d in torch.nonzero(above != far_above).flatten().tolist():
        if d > 0:
            out.diagonal(d).fill_(above[d])
    return out


def _extend_mask(mask: torch.Tensor, size: int, where: str) -> torch.Tensor:
    """Extend a square [..., N, N] mask whose entries depend only on i - j (checked) to [..., size, size]."""
    n = mask.shape[-1]
    lead = mask.shape[:-2]
    if mask.shape[:-2].numel() != 1:
        raise ValueError(f"mask buffer {where} of shape {tuple(mask.shape)} has more than one [N, N] matrix")
    square = mask.reshape(n, n)
    below, above = square[:, 0], square[0, :]
    if not torch.equal(_toeplitz(below, above, n), square):
        raise ValueError(f"mask buffer {where} does not depend on i - j only; cannot extend it along its diagonals")
    return _toeplitz(below, above, size).reshape(*lead, size, size)


# --------------------------------------------------------------------------------------------------------------------
# the plan


@dataclass
class _TableChange:
    modules: list[nn.Module]  # every module holding this tensor (shared tables stay shared)
    name: str  # attribute: "weight" or a buffer name
    new: torch.Tensor  # [offset + new_len, h], old dtype and device


@dataclass
class _BufferChange:
    module: nn.Module
    name: str
    new: torch.Tensor


@dataclass
class _TablePlan:
    config: Any
    tables: list[_TableChange]
    buffers: list[_BufferChange]
    attrs: list[tuple[nn.Module, str, int]]
    config_updates: dict[str, int]
    meta: dict[str, Any] = field(default_factory=dict)

    def needs_generate_wrapper(self, model: nn.Module) -> bool:
        return False

    def apply(self) -> None:
        for change in self.tables:
            current = getattr(change.modules[0], change.name)
            if isinstance(current, nn.Parameter):
                replacement: torch.Tensor = nn.Parameter(change.new, requires_grad=current.requires_grad)
            else:
                replacement = change.new
            for module in change.modules:
                module.__dict__.setdefault(_SAVED_TABLE, current)
                if isinstance(current, nn.Parameter):
                    setattr(module, change.name, replacement)
                else:
                    module.register_buffer(change.name, replacement, persistent=_is_persistent(module, change.name))
                if isinstance(module, nn.Embedding):
                    module.num_embeddings = replacement.shape[0]
        for change in self.buffers:
            saved = change.module.__dict__.setdefault(_SAVED_BUFFERS, {})
            saved.setdefault(change.name, change.module._buffers[change.name])
            change.module.register_buffer(
                change.name, change.new, persistent=_is_persistent(change.module, change.name)
            )
        for module, name, value in self.attrs:
            setattr(module, name, value)
        for key, value in self.config_updates.items():
            setattr(self.config, key, value)


def original_length(model: nn.Module, family: families.AbsoluteFamily, existing: dict[str, Any] | None) -> int:
    """Number of position rows the model had before any patch (offset rows not counted)."""
    if existing:
        return int(existing["original_max_position_embeddings"])
    _, module = families.table_modules(model, family)[0]
    return _config_length(family, model.config) - _config_offset(family, families.table_row_offset(family, module))


def _methods_for(formula: bool) -> list[str]:
    return [
        name
        for name in registry.method_names("absolute")
        if bool(getattr(registry.METHODS[name].params_cls, "needs_formula", False)) == formula
    ]


def _original_tensor(module: nn.Module, name: str, existing: dict[str, Any] | None, offset: int) -> torch.Tensor:
    """The table as it was before any patch (kept on the module, or cut out of a reloaded extended table)."""
    saved = module.__dict__.get(_SAVED_TABLE)
    if saved is not None:
        return saved
    current = getattr(module, name)
    if not existing:
        return current
    info = existing["table"]
    if info["original_rows"] != offset + existing["original_max_position_embeddings"]:
        info = {**info, "recover": None}
    return _recover(current, offset, existing["original_max_position_embeddings"], info["recover"], existing["method"])


def _original_buffer(module: nn.Module, name: str, existing: dict[str, Any] | None, length: int) -> torch.Tensor:
    saved = module.__dict__.get(_SAVED_BUFFERS, {}).get(name)
    if saved is not None:
        return saved
    current = module._buffers[name]
    if not existing:
        return current
    if current.dim() >= 2 and name in _mask_names(existing):
        return current[..., :length, :length]
    return current[..., :length]


def _mask_names(meta: dict[str, Any]) -> set[str]:
    return set(meta.get("table", {}).get("masks", []))


def plan(
    model: nn.Module,
    family: families.AbsoluteFamily,
    spec: registry.MethodSpec,
    params: Any,
    new_len: int,
    *,
    layer_types: Any,
    existing: dict[str, Any] | None,
    attn_implementation: str | None = None,
) -> _TablePlan:
    """Check everything and compute every new tensor; nothing on the model changes until ``apply()``."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if layer_types:
        raise ValueError(f"layer_types applies only to models with per-layer-type rope, not {model_type!r}")
    if attn_implementation is not None:
        raise ValueError(
            "attn_implementation applies only to attention-level methods and logn=True on rotary models, "
            f"not to {model_type!r}'s position table"
        )
    formula = family.formula(config)
    needs_formula = bool(getattr(spec.params_cls, "needs_formula", False))
    if needs_formula and formula is None:
        raise ValueError(
            f"method '{spec.name}' continues a fixed sinusoidal formula, but {model_type!r} has a learned position "
            f"table; methods for this model: {', '.join(_methods_for(False))}"
        )
    if formula is not None and not needs_formula:
        raise ValueError(
            f"{model_type!r} uses a fixed sinusoidal position table (a formula, not learned rows), which is extended "
            f"by recomputing the formula; methods for this model: {', '.join(_methods_for(True))}"
        )
    n = int(params.original_max_position_embeddings)
    original_config = (
        dict(existing["original_config"]) if existing else {f: getattr(config, f) for f in family.config_fields}
    )
    found = families.table_modules(model, family)
    offsets = {families.table_row_offset(family, module) for _, module in found}
    if len(offsets) != 1:
        raise ValueError(f"position tables of {model_type!r} have different row offsets {sorted(offsets)}")
    offset = offsets.pop()
    old_cfg = int(next(iter(original_config.values())))
    new_cfg = new_len + _config_offset(family, offset)
    cur_cfg = _config_length(family, config)

    # --- tables (a tensor shared by several table modules is extended once and stays shared)
    groups: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in found:
        groups.setdefault(id(getattr(module, family.weight)), []).append((name, module))
    table_ids = set(groups)
    table_modules = {id(m) for _, m in found}
    for owner_name, owner in model.named_modules(remove_duplicate=False):
        if id(owner) in table_modules:
            continue
        for pname, tensor in [*owner._parameters.items(), *owner._buffers.items()]:
            if tensor is not None and id(tensor) in table_ids:
                raise ValueError(
                    f"the position table is shared with {owner_name}.{pname}, which is not a position table; "
                    "extending it would change that tensor too"
                )
    changes, rules, rows_before = [], set(), set()
    for members in groups.values():
        label, module = members[0]
        current = getattr(module, family.weight)
        if current.device.type == "meta":
            raise ValueError(f"position table {label} is on the meta device (offloaded); load the model fully first")
        original = _original_tensor(module, family.weight, existing, offset)
        rows_before.add(int(original.shape[0]))
        if original.dim() != 2 or original.shape[0] < offset + n:
            raise ValueError(
                f"position table {label} has shape {tuple(original.shape)}; expected at least {offset + n} rows "
                f"({offset} offset + {n} positions)"
            )
        if formula is None and original.shape[0] != old_cfg - _config_offset(family, offset) + offset:
            raise ValueError(
                f"position table {label} has {original.shape[0]} rows but the config says {old_cfg} "
                f"({', '.join(family.config_fields)}); the model is inconsistent"
            )
        trained = original[offset : offset + n].detach()  # [n, h]
        kwargs: dict[str, Any] = {}
        if formula is not None:
            kwargs["formula"] = _position_formula(formula, module, offset)
        new_pos = spec.compute(trained, new_len, params, **kwargs)
        if not isinstance(new_pos, torch.Tensor) or tuple(new_pos.shape) != (new_len, trained.shape[1]):
            shape = tuple(new_pos.shape) if isinstance(new_pos, torch.Tensor) else type(new_pos).__name__
            raise ValueError(
                f"method '{spec.name}' returned a table of shape {shape}; expected ({new_len}, {trained.shape[1]})"
            )
        new_pos = new_pos.detach().to(device=current.device, dtype=current.dtype)
        if new_pos.is_floating_point() and not torch.isfinite(new_pos).all():
            raise ValueError(f"method '{spec.name}' returned non-finite values for {label}")
        rules.add(_recover_rule(new_pos, trained.to(device=current.device, dtype=current.dtype)))
        new_full = torch.cat([original[:offset].detach().to(current.device, current.dtype), new_pos])
        changes.append(_TableChange([m for _, m in members], family.weight, new_full.contiguous()))

    # --- buffers sized by the config length (position_ids, token_type_ids) and square masks (GPT-Neo attn.bias)
    buffer_changes = []
    for where, module, name in _named_module_buffers(model, family.buffers):
        original = _original_buffer(module, name, existing, old_cfg)
        if original.shape[-1] != old_cfg:
            raise ValueError(f"buffer {where} has {original.shape[-1]} entries; expected the config length {old_cfg}")
        new = _extend_progression(original, new_cfg, where)
        buffer_changes.append(_BufferChange(module, name, new))
    mask_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
    for where, module, name in _named_module_buffers(model, family.masks):
        original = _original_buffer(module, name, existing, old_cfg)
        if original.dim() < 2 or original.shape[-1] != old_cfg or original.shape[-2] != old_cfg:
            raise ValueError(
                f"mask buffer {where} has shape {tuple(original.shape)}; expected [..., {old_cfg}, {old_cfg}]"
            )
        new = next((ext for orig, ext in mask_cache if orig.shape == original.shape and torch.equal(orig, original)),
                   None)
        if new is None:  # layers with the same mask share one extended tensor (it is N x N: big at long lengths)
            new = _extend_mask(original, new_cfg, where)
            mask_cache.append((original, new))
        buffer_changes.append(_BufferChange(module, name, new))

    # --- int attributes holding the length (OPT max_target_positions, XGLM num_positions)
    attrs = []
    for module in model.modules():
        for name in family.module_attrs:
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == cur_cfg:
                attrs.append((module, name, new_cfg))

    recover = rules.pop() if len(rules) == 1 else None
    if any(rows != offset + n for rows in rows_before):
        recover = None  # rows past the given original length are replaced and cannot be cut back out
    result = _TablePlan(config, changes, buffer_changes, attrs, {f: new_cfg for f in family.config_fields})
    result.meta = {
        "original_config": original_config,
        "table": {
            "modules": [name for name, _ in found],
            "row_offset": offset,
            "original_rows": max(rows_before),
            "recover": recover,
            "sinusoidal": formula is not None,
            "masks": list(family.masks),
        },
    }
    if formula is None and recover is None:
        logger.info("method %s does not keep the trained rows: a reloaded copy cannot be unpatched", spec.name)
    return result


def _position_formula(formula: Callable[[nn.Module, int], torch.Tensor], module: nn.Module, offset: int):
    """The family's whole-table formula as a function of the number of positions (offset rows dropped)."""

    def positions(count: int) -> torch.Tensor:
        return formula(module, offset + int(count))[offset:]  # [count, h]

    return positions


# --------------------------------------------------------------------------------------------------------------------
# undo


def undo(model: nn.Module, meta: dict[str, Any]) -> None:
    """Restore the original table, buffers, attributes and config (exactly, when patched in this process)."""
    family = families.find_family(model)
    if not isinstance(family, families.AbsoluteFamily):
        raise ValueError(f"{families.model_type_of(model)!r} has no position table; cannot undo a table patch")
    config = model.config
    info = meta["table"]
    n, offset = int(meta["original_max_position_embeddings"]), int(info["row_offset"])
    old_cfg = int(next(iter(meta["original_config"].values())))
    cur_cfg = _config_length(family, config)

    # compute everything first: a reloaded model whose rows cannot be recovered raises before any change
    restores: list[tuple[nn.Module, torch.Tensor]] = []
    for _, module in families.table_modules(model, family):
        current = getattr(module, family.weight)
        saved = module.__dict__.get(_SAVED_TABLE)
        if saved is None:
            recover = info["recover"] if info["original_rows"] == offset + n else None
            saved = _recover(current, offset, n, recover, meta["method"])
        elif saved.dtype != current.dtype or saved.device != current.device:
            saved = saved.detach().to(current.device, current.dtype)  # the model was cast after patching
        restores.append((module, saved))
    buffers = []
    for _, module, name in _named_module_buffers(model, (*family.buffers, *family.masks)):
        saved = module.__dict__.get(_SAVED_BUFFERS, {}).get(name)
        if saved is None:
            current = module._buffers[name]
            saved = current[..., :old_cfg, :old_cfg] if name in family.masks else current[..., :old_cfg]
            saved = saved.contiguous()
        buffers.append((module, name, saved))

    restored_params: dict[int, nn.Parameter] = {}
    for module, saved in restores:
        current = getattr(module, family.weight)
        module.__dict__.pop(_SAVED_TABLE, None)
        if isinstance(current, nn.Parameter):
            if not isinstance(saved, nn.Parameter):
                fresh = nn.Parameter(saved, requires_grad=current.requires_grad)
                saved = restored_params.setdefault(id(current), fresh)
            setattr(module, family.weight, saved)
        else:
            module.register_buffer(family.weight, saved, persistent=_is_persistent(module, family.weight))
        if isinstance(module, nn.Embedding):
            module.num_embeddings = saved.shape[0]
    for module, name, saved in buffers:
        module.register_buffer(name, saved, persistent=_is_persistent(module, name))
        module.__dict__.get(_SAVED_BUFFERS, {}).pop(name, None)
    for module in model.modules():
        module.__dict__.pop(_SAVED_BUFFERS, None)
        for name in family.module_attrs:
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == cur_cfg:
                setattr(module, name, old_cfg)
    for key, value in meta["original_config"].items():
        setattr(config, key, value)

