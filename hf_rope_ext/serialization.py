"""Native-first config writing, and the plugin rope types for what transformers cannot express.

Order of preference for the ``rope_parameters`` written into a patched config:

1. the method's own native type (linear, dynamic, yarn, llama3, longrope, or default with a larger ``rope_theta``),
   when the model's config class accepts it;
2. for any static method: ``longrope`` with ``short_factor == long_factor`` = the per-frequency divisors, and an
   explicit ``attention_factor`` -- every fixed per-frequency rescale reloads in stock transformers that way;
3. dynamic methods without a native type: a plugin type registered in ``ROPE_INIT_FUNCTIONS`` when ``hf_rope_ext`` is
   imported. Its name says so, so loading without the plugin fails with a message naming the fix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import modeling_rope_utils
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RotaryEmbeddingConfigMixin

from . import families, registry
from .methods._rope_base import default_inv_freq

PLUGIN_SUFFIX = " (requires: import hf_rope_ext)"
METHOD_KEY = "hf_rope_ext_method"


def plugin_rope_type(method_name: str) -> str:
    """rope_type string for a plugin-only method; contains "dynamic" so transformers recomputes it per length."""
    stem = method_name if "dynamic" in method_name else f"{method_name}_dynamic"
    return stem + PLUGIN_SUFFIX


def is_plugin_rope_type(rope_type: str) -> bool:
    return isinstance(rope_type, str) and rope_type.endswith(PLUGIN_SUFFIX)


def rope_parameters_for(
    spec: registry.MethodSpec,
    params: Any,
    dim: int,
    base: float,
    inv_freq: torch.Tensor,
    attention_factor: float,
    native_rope_types: frozenset[str] | None,
    model_type: str,
) -> tuple[dict[str, Any], bool]:
    """The rope_parameters entries describing ``spec`` with ``params`` (without rope_theta unless it changes), and
    whether reloading needs the plugin."""
    accepted = (lambda t: True) if native_rope_types is None else (lambda t: t in native_rope_types)
    if spec.native is not None:
        native = spec.native(params, dim, base)
        if accepted(native["rope_type"]):
            return native, False
    if not spec.dynamic:
        if not accepted("longrope"):
            raise ValueError(
                f"method '{spec.name}' cannot be saved for {model_type!r}: its config accepts only "
                f"{sorted(native_rope_types or ())}"
            )
        divisors = (default_inv_freq(dim, base) / inv_freq.detach().float().cpu()).tolist()  # [d/2]
        return {
            "rope_type": "longrope",
            "short_factor": divisors,
            "long_factor": divisors,
            "factor": float(params.factor),
            "original_max_position_embeddings": int(params.original_max_position_embeddings),
            "attention_factor": float(attention_factor),
        }, False
    plugin_type = plugin_rope_type(spec.name)
    if not accepted(plugin_type):
        raise ValueError(
            f"method '{spec.name}' is dynamic and cannot be written for {model_type!r}: its configs accept only "
            f"{sorted(native_rope_types or ())}. Use a static method (e.g. yarn, ntk, longrope) for this model."
        )
    stored = {k: v for k, v in dataclasses.asdict(params).items()}
    return {"rope_type": plugin_type, METHOD_KEY: spec.name, **stored}, True


def _plugin_init_fn(config: Any, device: Any = None, seq_len: Any = None, layer_type: str | None = None):
    """ROPE_INIT_FUNCTIONS entry shared by all plugin types: rebuild the method's parameters from the config."""
    rope_parameters = config.rope_parameters[layer_type] if layer_type is not None else config.rope_parameters
    spec = registry.get_method(rope_parameters[METHOD_KEY])
    names = {f.name for f in dataclasses.fields(spec.params_cls)}
    params = spec.params_cls(**{k: v for k, v in rope_parameters.items() if k in names})
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * rope_parameters.get("partial_rotary_factor", 1.0))
    return spec.compute(params, dim, float(rope_parameters["rope_theta"]), device=device, seq_len=seq_len)


def _validate_plugin(self: Any, rope_parameters: dict[str, Any], ignore_keys: Any = None) -> None:
    registry.get_method(rope_parameters.get(METHOD_KEY, "?"))  # a clear error for an unknown method name


def register_plugin_type(spec: registry.MethodSpec) -> None:
    """Make a dynamic method without native type loadable by ``from_pretrained`` (called on registration)."""
    if spec.kind != "rope" or spec.native is not None or not spec.dynamic:
        return
    rope_type = plugin_rope_type(spec.name)
    ROPE_INIT_FUNCTIONS[rope_type] = _plugin_init_fn
    # config validation looks up `_validate_{rope_type}_rope_parameters`; without one it only logs a warning
    setattr(RotaryEmbeddingConfigMixin, f"_validate_{rope_type}_rope_parameters", _validate_plugin)


ATTENTION_ROPE_TYPE = "hf_rope_ext_attention" + PLUGIN_SUFFIX
"""rope_type written for the layers an attention-level method acts on: the trained RoPE, unchanged, under a name that
only exists with the plugin. Loading re-attaches the attention implementation (transformers does not keep
``attn_implementation`` through a load and a save), and readers without the plugin fail instead of silently running
the original model."""


def _attention_init_fn(config: Any, device: Any = None, seq_len: Any = None, layer_type: str | None = None):
    """ROPE_INIT_FUNCTIONS entry of ``ATTENTION_ROPE_TYPE``: the default RoPE frequencies, as the models' own
    ``compute_default_rope_parameters``; and the model switched to the attention implementation its record names."""
    dim, base = families.rotary_geometry(config, layer_type)
    name = ((getattr(config, "hf_rope_ext", None) or {}).get("attention") or {}).get("implementation")
    if name and getattr(config, "_attn_implementation", None) != name:
        config._attn_implementation = name
        config.attn_implementation = name  # written again by the next save_pretrained
    return default_inv_freq(dim, base, device), 1.0


def register_all() -> None:
    for spec in registry.METHODS.values():
        register_plugin_type(spec)
    registry.ON_REGISTER.append(register_plugin_type)
    ROPE_INIT_FUNCTIONS[ATTENTION_ROPE_TYPE] = _attention_init_fn
    setattr(RotaryEmbeddingConfigMixin, f"_validate_{ATTENTION_ROPE_TYPE}_rope_parameters", lambda *a, **k: None)


assert modeling_rope_utils.ROPE_INIT_FUNCTIONS is ROPE_INIT_FUNCTIONS
