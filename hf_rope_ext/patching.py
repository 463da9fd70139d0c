"""patch_model / unpatch_model / patch_info: apply a registered method to a loaded model, in place.

Every check runs before the first change, so a refused patch leaves the model untouched. The patching code never
branches on a method's name: it asks the registry for the method and ``families`` for where things live.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from . import families, registry, serialization

logger = logging.getLogger(__name__)

META_KEY = "hf_rope_ext"
"""Config attribute (and config.json key) recording what was applied."""
_SAVED = "_hf_rope_ext_saved"  # on a rotary module: exact copies of what the patch replaced
_STATE = "_hf_rope_ext_state"  # on the patched model: in-memory extras (tokenizer, generate wrapper)


def _version() -> str:
    from . import __version__

    return __version__


def patch_info(model: nn.Module) -> dict[str, Any] | None:
    """What was applied to ``model`` (method, parameters, original and new lengths, rope_type written), or None.

    Reads the config, so it also works on a patched model saved and reloaded in another process."""
    meta = getattr(getattr(model, "config", None), META_KEY, None)
    return copy.deepcopy(meta) if meta else None


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")


def _resolve_lengths(factor: Any, max_position_embeddings: Any, original: int) -> tuple[float, int]:
    """(factor, new length) from exactly one of them."""
    if (factor is None) == (max_position_embeddings is None):
        raise ValueError(
            "give exactly one of factor= (new length / original length) or max_position_embeddings= (target length); "
            f"got factor={factor!r}, max_position_embeddings={max_position_embeddings!r}"
        )
    if factor is not None:
        _check_number("factor", factor)
        if not factor > 1:
            raise ValueError(f"factor must be > 1 (new length / original length {original}), got {factor}")
        return float(factor), int(round(original * factor))
    _check_number("max_position_embeddings", max_position_embeddings)
    if int(max_position_embeddings) != max_position_embeddings or max_position_embeddings <= original:
        raise ValueError(
            f"max_position_embeddings must be an int larger than the original length {original}, "
            f"got {max_position_embeddings!r}"
        )
    return max_position_embeddings / original, int(max_position_embeddings)


# --------------------------------------------------------------------------------------------------------------------
# rotary models


@dataclass
class _RopeEntry:
    prefix: str | None  # layer type for per-layer-type rope (Gemma-3), else None
    rope_parameters: dict[str, Any]  # what the config will hold for this entry
    inv_freq: torch.Tensor  # [dim/2] float32, cpu
    attention_factor: Any
    requires_plugin: bool


@dataclass
class _RopePlan:
    modules: list[nn.Module]
    config: Any
    entries: list[_RopeEntry]
    config_updates: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    def apply(self) -> None:
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


def _rope_config(model: nn.Module) -> tuple[list[nn.Module], Any]:
    modules = families.rotary_modules(model)
    if not modules:
        raise ValueError(f"no rotary embedding module found in {type(model).__name__}")
    config = modules[0].config
    if any(m.config is not config for m in modules):
        raise ValueError("rotary modules with different configs are not supported")
    return modules, config


def _rope_original_length(model: nn.Module, family: Any, existing: dict[str, Any] | None) -> int:
    _, config = _rope_config(model)
    return _original_view(model, existing, config)[1]


def _plan_rope(
    model: nn.Module,
    family: families.RopeFamily,
    spec: registry.MethodSpec,
    params: Any,
    new_len: int,
    layer_types: Any,
    existing: dict[str, Any] | None,
) -> _RopePlan:
    modules, config = _rope_config(model)
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
        inv_freq, attention = spec.compute(params, dim, base, device="cpu", seq_len=None)
        if inv_freq.shape != (dim // 2,) or inv_freq.dtype != torch.float32 or not torch.isfinite(inv_freq).all():
            raise ValueError(
                f"method '{spec.name}' returned inverse frequencies of shape {tuple(inv_freq.shape)} and dtype "
                f"{inv_freq.dtype}; expected ({dim // 2},) float32, finite"
            )
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
    plan = _RopePlan(modules, config, entries, updates)
    plan.meta = {
        "layer_types": [e.prefix for e in entries] if family.per_layer_type else None,
        "rope_parameters_written": {str(e.prefix): e.rope_parameters.get("rope_type") for e in entries},
        "native": not any(e.requires_plugin for e in entries),
        "requires_plugin": any(e.requires_plugin for e in entries),
        "original_rope_parameters": original_rp,
        "original_config": original_config,
    }
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


def _undo_rope(model: nn.Module, meta: dict[str, Any]) -> None:
    modules, config = _rope_config(model)
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


def _has_length_dependent_rope(model: nn.Module) -> bool:
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


def _wrap_generate(model: nn.Module) -> None:
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


# --------------------------------------------------------------------------------------------------------------------
# dispatch by kind


@dataclass(frozen=True)
class Backend:
    """How one kind of position encoding is patched: ``plan`` checks everything and returns an object whose
    ``apply()`` mutates the model and whose ``meta`` goes into the config; ``undo`` reverses it from ``meta``."""

    original_length: Any
    plan: Any
    undo: Any


BACKENDS: dict[str, Backend] = {"rope": Backend(_rope_original_length, _plan_rope, _undo_rope)}


def patch_model(
    model: nn.Module,
    method: str,
    factor: float | None = None,
    *,
    max_position_embeddings: int | None = None,
    original_max_position_embeddings: int | None = None,
    tokenizer: Any = None,
    layer_types: list[str] | None = None,
    repatch: bool = False,
    **method_params: Any,
) -> nn.Module:
    """Extend ``model``'s context window in place with a registered method; returns the model.

    Args:
        model: a loaded transformers model (also under peft, accelerate hooks, or loaded from GGUF).
        method: a name from ``list_methods()``, e.g. "linear", "ntk", "yarn".
        factor: new length / original length (> 1). Give this or ``max_position_embeddings``.
        max_position_embeddings: the target length instead of ``factor``.
        original_max_position_embeddings: the length the model was trained at; defaults to what its config says.
        tokenizer: when given, its ``model_max_length`` becomes the new length.
        layer_types: for per-layer-type rope (Gemma-3): which layer types to patch (default: global attention only).
        repatch: patch a model that is already patched, starting again from its original state.
        **method_params: the method's own parameters (e.g. ``beta_fast`` for yarn); see ``list_methods()``.
    """
    spec = registry.get_method(method)
    family = families.find_family(model)
    if spec.kind != family.kind:
        valid = ", ".join(registry.method_names(family.kind))
        what = {"rope": "rotary (RoPE)", "absolute": "learned position-table"}
        raise ValueError(
            f"method '{spec.name}' is for {what[spec.kind]} models, but {families.model_type_of(model)!r} uses "
            f"{what[family.kind]} positions; methods for this model: {valid}"
        )
    existing = patch_info(model)
    if existing and not repatch:
        raise ValueError(
            f"model is already patched ({existing['method']}, {existing['original_max_position_embeddings']} -> "
            f"{existing['max_position_embeddings']}); call unpatch_model(model) first, or pass repatch=True to "
            "re-patch starting from the original model"
        )
    backend = BACKENDS[family.kind]
    original_len = original_max_position_embeddings
    if original_len is None:
        original_len = backend.original_length(model, family, existing)
    factor, new_len = _resolve_lengths(factor, max_position_embeddings, int(original_len))
    params = spec.make_params(factor=factor, original_max_position_embeddings=original_len, **method_params)
    plan = backend.plan(model, family, spec, params, new_len, layer_types, existing)

    # every check passed: from here on the model changes
    if existing:
        unpatch_model(model)
    plan.apply()
    meta = {
        "method": spec.name,
        "kind": spec.kind,
        "factor": factor,
        "original_max_position_embeddings": params.original_max_position_embeddings,
        "max_position_embeddings": new_len,
        "parameters": {
            k: v for k, v in asdict(params).items() if k not in ("factor", "original_max_position_embeddings")
        },
        "dynamic": spec.dynamic,
        "paper": spec.paper,
        "library_version": _version(),
        **plan.meta,
    }
    setattr(model.config, META_KEY, meta)
    state: dict[str, Any] = {}
    if tokenizer is not None:
        state["tokenizer"] = (tokenizer, getattr(tokenizer, "model_max_length", None))
        set_tokenizer_length(tokenizer, new_len)
    if family.kind == "rope" and _has_length_dependent_rope(model):
        _wrap_generate(model)
        state["generate_wrapped"] = True
    model.__dict__[_STATE] = state
    logger.info("patched %s with %s: %d -> %d positions", type(model).__name__, spec.name, original_len, new_len)
    return model


def set_tokenizer_length(tokenizer: Any, length: int) -> None:
    """Set ``model_max_length`` so the tokenizer neither truncates nor warns below the new length, and saves it."""
    tokenizer.model_max_length = int(length)
    if isinstance(getattr(tokenizer, "init_kwargs", None), dict):
        tokenizer.init_kwargs["model_max_length"] = int(length)


def unpatch_model(model: nn.Module, tokenizer: Any = None) -> nn.Module:
    """Undo ``patch_model``: original config, frequencies / table and tokenizer limit. Returns the model."""
    meta = patch_info(model)
    if meta is None:
        raise ValueError("model is not patched by hf_rope_ext (its config has no 'hf_rope_ext' entry)")
    BACKENDS[meta["kind"]].undo(model, meta)
    delattr(model.config, META_KEY)
    state = model.__dict__.pop(_STATE, {})
    if state.get("generate_wrapped"):
        model.__dict__.pop("generate", None)
    if "tokenizer" in state:
        tok, old = state["tokenizer"]
        set_tokenizer_length(tok, old)
    if tokenizer is not None and (not state.get("tokenizer") or state["tokenizer"][0] is not tokenizer):
        set_tokenizer_length(tokenizer, meta["original_max_position_embeddings"])
    return model
