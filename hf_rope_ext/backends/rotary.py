"""The rotary backend of ``patch_model``: new inverse frequencies (and attention factor) on every rotary module.

Plan-then-apply: ``plan`` computes and checks everything (the method's frequencies, the ``rope_parameters`` the config
will hold, native or plugin) and returns a ``RopePlan`` whose ``apply`` mutates the model. Exact copies of what is
replaced are kept on each rotary module, so ``undo`` restores the original bit for bit; on a model reloaded from disk
it recomputes the frequencies from the original ``rope_parameters`` kept in ``config.hf_rope_ext``.

Rotary methods may also ask for log-n query scaling (``logn=True``); that part lives in the attention backend
(``backends.attention``), which this backend calls for the switch of attention implementation.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .. import families, registry, serialization

_SAVED = "_hf_rope_ext_saved"  # on a rotary module: exact copies of what the patch replaced



@dataclass
class _RopeEntry:
    prefix: str | None  # layer type for per-layer-type rope (Gemma-3), else None
    rope_parameters: dict[str, Any]  # what the config will hold for this entry
    inv_freq: torch.Tensor  # [dim/2] float32, cpu
    attention_factor: Any
    requires_plugin: bool


@dataclass
class RopePlan:
    modules: list[nn.Module]
    config: Any
    entries: list[_RopeEntry]
    config_updates: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    switch: Any = None  # attention.AttentionSwitch when the method asked for log-n scaling

    def needs_generate_wrapper(self, model: nn.Module) -> bool:
        return has_length_dependent_rope(model)

    def apply(self) -> None:
        if self.switch is not None:
            self.switch.apply()
        config = self.config
        rope_parameters = copy.deepcopy(config.rope_parameters)
        for entry in self.entries:
            if entry.prefix is None:
                rope_parameters = copy.deepcopy(entry.rope_parameters)
            else:
                rope_parameters[entry.prefix] = copy.deepcopy(entry.rope_parameters)
        config.rope_parameters = rope_parameters
        for key, value in self.config_updates.items():
            setattr(config, key, value)
        for module in self.modules:
            saved = _snapshot(module, [e.prefix for e in self.entries])
            for entry in self.entries:
                p = f"{entry.prefix}_" if entry.prefix else ""
                device = getattr(module, f"{p}inv_freq").device
                module.register_buffer(f"{p}inv_freq", entry.inv_freq.to(device), persistent=False)
                module.register_buffer(f"{p}original_inv_freq", entry.inv_freq.clone().to(device), persistent=False)
                _set_attention_scaling(module, entry.prefix, entry.attention_factor)
                _set_rope_type(module, entry.prefix, entry.rope_parameters["rope_type"])
                module.__dict__.pop(f"{p}long_inv_freq", None)
                module.__dict__.pop(f"{entry.prefix}_max_seq_len_cached", None)
            module.max_seq_len_cached = config.max_position_embeddings
            module.original_max_seq_len = config.max_position_embeddings
            module.__dict__[_SAVED] = saved
            module.__dict__["_hf_rope_ext_fp32"] = {
                name: buf.detach().clone().cpu()
                for name, buf in module.named_buffers(recurse=False)
                if name.endswith("inv_freq")
            }
            saved["hook"] = module.register_forward_pre_hook(_keep_fp32_frequencies)


def _snapshot(module: nn.Module, prefixes: list[str | None]) -> dict[str, Any]:
    """Exact copies of everything the patch replaces on a rotary module."""
    saved: dict[str, Any] = {"buffers": {}, "attrs": {}}
    for name, buf in module.named_buffers(recurse=False):
        if name.endswith("inv_freq"):
            saved["buffers"][name] = buf.detach().clone()
    for name in ("rope_type", "max_seq_len_cached", "original_max_seq_len", "attention_scaling"):
        if hasattr(module, name):
            saved["attrs"][name] = copy.copy(getattr(module, name))
    for prefix in prefixes:
        if prefix:
            saved["attrs"][f"{prefix}_attention_scaling"] = getattr(module, f"{prefix}_attention_scaling", None)
    return saved


def _set_attention_scaling(module: nn.Module, prefix: str | None, value: Any) -> None:
    setattr(module, f"{prefix}_attention_scaling" if prefix else "attention_scaling", value)


def _set_rope_type(module: nn.Module, prefix: str | None, rope_type: str) -> None:
    if prefix is None:
        module.rope_type = rope_type
    else:
        module.rope_type = {**module.rope_type, prefix: rope_type}


def _keep_fp32_frequencies(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: ``model.to(torch.bfloat16)`` casts float buffers; frequencies must stay float32."""
    masters = module.__dict__.get("_hf_rope_ext_fp32", {})
    cast = [n for n, b in module.named_buffers(recurse=False) if n.endswith("inv_freq") and b.dtype != torch.float32]
    if not cast:
        return
    for name, buf in list(module.named_buffers(recurse=False)):
        if name in masters:
            module.register_buffer(name, masters[name].to(buf.device), persistent=False)
    module.max_seq_len_cached = module.original_max_seq_len  # dynamic types recompute from the restored copy


def _original_view(model: nn.Module, existing: dict[str, Any] | None, config: Any) -> tuple[dict[str, Any], int]:
    """rope_parameters and max_position_embeddings the model had before any patch."""
    if existing:
        return copy.deepcopy(existing["original_rope_parameters"]), existing["original_config"][
            "max_position_embeddings"
        ]
    return copy.deepcopy(config.rope_parameters), config.max_position_embeddings


def _rope_config(model: nn.Module, materialised: bool = True) -> tuple[list[nn.Module], Any]:
    """The rotary modules and their one config; ``materialised``: refuse frequencies on the meta device."""
    modules = families.rotary_modules(model)
    if not modules:
        raise ValueError(f"no rotary embedding module found in {type(model).__name__}")
    if materialised:
        _check_materialised(modules)
    config = modules[0].config
    if any(m.config is not config for m in modules):
        raise ValueError("rotary modules with different configs are not supported")
    return modules, config


def _checked_output(spec: registry.MethodSpec, params: Any, dim: int, base: float, seq_len: int | None) -> tuple:
    """``spec.compute`` on the cpu, its result checked: inverse frequencies a finite float32 tensor of shape
    [dim/2], attention factor a finite number > 0. A registered method is user code; a NaN here would make every
    logit NaN after the patch, so it is refused (naming the method) before the model changes."""
    at = "" if seq_len is None else f" at seq_len={seq_len}"
    result = spec.compute(params, dim, base, device="cpu", seq_len=seq_len)
    if not isinstance(result, tuple) or len(result) != 2:
        raise ValueError(
            f"method '{spec.name}' returned {type(result).__name__}{at}; a rope method returns "
            "(inv_freq, attention_factor)"
        )
    inv_freq, attention = result
    if (
        not isinstance(inv_freq, torch.Tensor)
        or tuple(inv_freq.shape) != (dim // 2,)
        or inv_freq.dtype != torch.float32
        or not torch.isfinite(inv_freq).all()
    ):
        what = (
            f"shape {tuple(inv_freq.shape)} and dtype {inv_freq.dtype}"
            + ("" if inv_freq.dtype != torch.float32 or torch.isfinite(inv_freq).all() else ", not all finite")
            if isinstance(inv_freq, torch.Tensor)
            else f"a {type(inv_freq).__name__}"
        )
        raise ValueError(
            f"method '{spec.name}' returned inverse frequencies of {what}{at}; expected a tensor of shape "
            f"({dim // 2},), float32, finite"
        )
    value = attention
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.detach().reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"method '{spec.name}' returned attention factor {attention!r}{at}; expected a finite number > 0 "
            "(it multiplies cos and sin; 1.0 = unchanged)"
        )
    return inv_freq, attention


def _check_materialised(modules: list[nn.Module]) -> None:
    """Refuse rotary modules whose frequencies live on the meta device (a model built under ``torch.device("meta")``
    or ``init_empty_weights(include_buffers=True)``): nothing real to patch, and nothing to restore later."""
    for module in modules:
        for name, buf in module.named_buffers(recurse=False):
            if name.endswith("inv_freq") and buf.device.type == "meta":
                raise ValueError(
                    f"{type(module).__name__}.{name} is on the meta device (the model was built without data); "
                    "load the model with its weights first (e.g. from_pretrained(path)), then patch it"
                )


def original_length(model: nn.Module, family: Any, existing: dict[str, Any] | None) -> int:
    _, config = _rope_config(model)
    return _original_view(model, existing, config)[1]


def plan(
    model: nn.Module,
    family: families.RopeFamily,
    spec: registry.MethodSpec,
    params: Any,
    new_len: int,
    *,
    layer_types: Any,
    existing: dict[str, Any] | None,
    attn_implementation: str | None = None,
) -> RopePlan:
    from . import attention  # the attention backend does log-n scaling

    modules, config = _rope_config(model)
    switch = None
    if getattr(params, "logn", False):
        switch = attention.plan_switch(model, family, attn_implementation, existing, what=f"'{spec.name}' with logn")
    elif attn_implementation is not None:
        raise ValueError(
            "attn_implementation applies only to attention-level methods and to rotary methods with logn=True; "
            f"method '{spec.name}' changes only the rotary frequencies"
        )
    original_rp, original_max = _original_view(model, existing, config)
    prefixes = families.rope_layer_prefixes(family, config, layer_types)
    entries = []
    for prefix in prefixes:
        rp = original_rp[prefix] if prefix else original_rp
        rope_type = rp.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(
                f"this {config.model_type!r} checkpoint already uses rope_type {rope_type!r}"
                f"{f' for {prefix}' if prefix else ''}; hf_rope_ext extends models trained with plain RoPE "
                "(rope_type 'default'). Edit config.rope_parameters directly to change a natively scaled model."
            )
        base = float(rp["rope_theta"])
        dim = 2 * getattr(modules[0], f"{prefix}_inv_freq" if prefix else "inv_freq").numel()
        inv_freq, attention = _checked_output(spec, params, dim, base, seq_len=None)
        if spec.dynamic:  # also at the new length, where the method recomputes in forward
            _checked_output(spec, params, dim, base, seq_len=new_len)
        native, plugin = serialization.rope_parameters_for(
            spec, params, dim, base, inv_freq, attention, family.native_rope_types, config.model_type
        )
        new_rp = {k: rp[k] for k in ("rope_theta", "partial_rotary_factor") if k in rp}
        new_rp.update(native)
        entries.append(_RopeEntry(prefix, new_rp, inv_freq, attention, plugin))

    # transformers' dynamic machinery reads max_position_embeddings as the ORIGINAL length
    updates: dict[str, Any] = {
        "max_position_embeddings": params.original_max_position_embeddings if spec.dynamic else new_len
    }
    original_config = {"max_position_embeddings": original_max}
    if hasattr(config, "original_max_position_embeddings"):  # Phi-3 keeps the pre-training length at top level
        updates["original_max_position_embeddings"] = params.original_max_position_embeddings
        original_config["original_max_position_embeddings"] = (
            existing["original_config"].get("original_max_position_embeddings")
            if existing
            else config.original_max_position_embeddings
        )
    if "head_dim" in config.to_dict() and config.head_dim is None and not existing:
        # transformers' dynamic/yarn/longrope read getattr(config, "head_dim", default) and fail on an explicit None
        updates["head_dim"] = config.hidden_size // config.num_attention_heads
        original_config["head_dim"] = None
    elif existing and "head_dim" in existing["original_config"]:
        updates["head_dim"] = config.head_dim
        original_config["head_dim"] = None
    plan = RopePlan(modules, config, entries, updates, switch=switch)
    plan.meta = {
        "layer_types": [e.prefix for e in entries] if family.per_layer_type else None,
        "rope_parameters_written": {str(e.prefix): e.rope_parameters.get("rope_type") for e in entries},
        "native": not any(e.requires_plugin for e in entries),
        "requires_plugin": any(e.requires_plugin for e in entries),
        "original_rope_parameters": original_rp,
        "original_config": original_config,
        # can transformers 4.x read config.json as the same model (serialization.legacy_mirror)? and why not
        "transformers4": serialization.transformers4_support(
            {"rope_parameters": entries[0].rope_parameters if entries[0].prefix is None
             else {str(e.prefix): e.rope_parameters for e in entries},
             "hf_rope_ext": {"original_max_position_embeddings": params.original_max_position_embeddings}}
        ),
    }
    if switch is not None:
        plan.meta["attention"] = switch.meta
    return plan


def _recompute_rotary(module: nn.Module, prefixes: list[str | None]) -> None:
    """Rebuild a rotary module's frequencies from its config the way its own ``__init__`` does."""
    config = module.config
    for prefix in prefixes:
        rp = config.rope_parameters[prefix] if prefix else config.rope_parameters
        rope_type = rp.get("rope_type", "default")
        p = f"{prefix}_" if prefix else ""
        device = getattr(module, f"{p}inv_freq").device
        kwargs = {"layer_type": prefix} if prefix else {}
        if rope_type == "default":
            inv_freq, attention = module.compute_default_rope_parameters(config, device=device, **kwargs)
        else:
            inv_freq, attention = ROPE_INIT_FUNCTIONS[rope_type](config, device=device, **kwargs)
        module.register_buffer(f"{p}inv_freq", inv_freq.to(device), persistent=False)
        module.register_buffer(f"{p}original_inv_freq", inv_freq.clone().to(device), persistent=False)
        _set_attention_scaling(module, prefix, attention)
        _set_rope_type(module, prefix, rope_type)
        module.__dict__.pop(f"{p}long_inv_freq", None)
        module.__dict__.pop(f"{prefix}_max_seq_len_cached", None)
    module.max_seq_len_cached = config.max_position_embeddings
    module.original_max_seq_len = config.max_position_embeddings


def undo(model: nn.Module, meta: dict[str, Any]) -> None:
    if meta.get("attention"):
        from . import attention

        attention.undo_switch(model, meta["attention"])
    modules, config = _rope_config(model, materialised=False)
    config.rope_parameters = copy.deepcopy(meta["original_rope_parameters"])
    for key, value in meta["original_config"].items():
        setattr(config, key, value)
    prefixes = meta.get("layer_types") or [None]
    for module in modules:
        saved = module.__dict__.pop(_SAVED, None)
        module.__dict__.pop("_hf_rope_ext_fp32", None)
        if saved is None:  # reloaded from disk: recompute exactly as a fresh load of the original would
            _recompute_rotary(module, prefixes)
            continue
        saved["hook"].remove()
        for name, buf in saved["buffers"].items():
            module.register_buffer(name, buf, persistent=False)
        for name, value in saved["attrs"].items():
            setattr(module, name, value)
        for prefix in prefixes:
            module.__dict__.pop(f"{prefix}_long_inv_freq" if prefix else "long_inv_freq", None)
            module.__dict__.pop(f"{prefix}_max_seq_len_cached", None)


def has_length_dependent_rope(model: nn.Module) -> bool:
    for module in families.rotary_modules(model):
        types = module.rope_type.values() if isinstance(module.rope_type, dict) else [module.rope_type]
        if any("dynamic" in t or t == "longrope" for t in types):
            return True
    return False


@contextlib.contextmanager
def freeze_rope_length(model: nn.Module, seq_len: int) -> Iterator[None]:
    """Hold length-dependent rope types (dynamic, longrope) at the frequencies for ``seq_len`` tokens.

    With a KV cache, dynamic scaling would otherwise change the frequencies while earlier keys stay rotated with the
    old ones. Inside this block every forward uses the frequencies a full forward over ``seq_len`` tokens uses, so
    cached generation matches an uncached forward over the final text. ``generate`` of a model patched with such a
    method is wrapped to do this with seq_len = prompt + max_new_tokens.
    """
    restore = []
    for module in families.rotary_modules(model):
        config = module.config
        per_layer = isinstance(module.rope_type, dict)
        for prefix in list(module.rope_type) if per_layer else [None]:
            rope_type = module.rope_type[prefix] if per_layer else module.rope_type
            if not ("dynamic" in rope_type or rope_type == "longrope"):
                continue
            p = f"{prefix}_" if prefix else ""
            buf = getattr(module, f"{p}inv_freq")
            attn_name = f"{prefix}_attention_scaling" if prefix else "attention_scaling"
            restore.append((module, prefix, rope_type, buf, getattr(module, attn_name), module.max_seq_len_cached))
            kwargs = {"layer_type": prefix} if prefix else {}
            length = max(int(seq_len), int(module.original_max_seq_len))
            if rope_type == "longrope":
                orig = (config.rope_parameters[prefix] if prefix else config.rope_parameters)[
                    "original_max_position_embeddings"
                ]
                length = max(int(seq_len), 1) if int(seq_len) > orig else orig
            inv_freq, attention = ROPE_INIT_FUNCTIONS[rope_type](config, buf.device, seq_len=length, **kwargs)
            if rope_type == "longrope":
                attention = getattr(module, attn_name)  # transformers keeps the init-time factor for longrope
            module.register_buffer(f"{p}inv_freq", inv_freq.to(buf.device, torch.float32), persistent=False)
            setattr(module, attn_name, attention)
            _set_rope_type(module, prefix, "default")
    try:
        yield
    finally:
        for module, prefix, rope_type, buf, attention, cached in reversed(restore):
            p = f"{prefix}_" if prefix else ""
            module.register_buffer(f"{p}inv_freq", buf, persistent=False)
            setattr(module, f"{prefix}_attention_scaling" if prefix else "attention_scaling", attention)
            _set_rope_type(module, prefix, rope_type)
            module.max_seq_len_cached = cached


def _generation_length(model: nn.Module, args: tuple, kwargs: dict) -> int | None:
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if not isinstance(inputs, torch.Tensor):
        return None
    prompt = inputs.shape[1]
    gen_config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    max_new = kwargs.get("max_new_tokens", getattr(gen_config, "max_new_tokens", None))
    if max_new is not None:
        return prompt + int(max_new)
    max_length = kwargs.get("max_length", getattr(gen_config, "max_length", None))
    return int(max_length) if max_length is not None else None


def wrap_generate(model: nn.Module) -> None:
    original = model.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        gen_config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        if (
            kwargs.get("max_new_tokens") is None
            and kwargs.get("max_length") is None
            and getattr(gen_config, "max_new_tokens", None) is None
            and getattr(gen_config, "max_length", None) is None
        ):
            # transformers' default (20 new tokens) is capped at config.max_position_embeddings, which dynamic types
            # keep at the ORIGINAL length: a prompt past it would be refused. Ask for the 20 tokens explicitly.
            kwargs["max_new_tokens"] = 20
        length = _generation_length(model, args, kwargs)
        if length is None:
            return original(*args, **kwargs)
        with freeze_rope_length(model, length):
            return original(*args, **kwargs)

    model.__dict__["generate"] = generate


