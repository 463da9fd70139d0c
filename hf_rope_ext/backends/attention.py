"""The attention backend of ``patch_model``: attention-level methods (ReRoPE, Leaky ReRoPE, Self-Extend, DCA) and
log-n query scaling.

Nothing of the model is replaced: the model is switched, with ``set_attn_implementation``, to the attention function
registered in ``attention_kernel`` ("hf_rope_ext" over sdpa, "hf_rope_ext_eager" over eager), which reads the method
from ``config.hf_rope_ext`` per layer. The rotary frequencies and ``max_position_embeddings`` stay the original ones
(the methods re-position pairs on the trained RoPE); the new length goes to ``patch_info`` and the tokenizer.

Saving: the config gets an ``attn_implementation`` entry naming the function, and the patched layers' rope_type
becomes ``serialization.ATTENTION_ROPE_TYPE`` (the trained RoPE under a plugin-only name, whose init function switches
the loaded model back to the attention function -- transformers drops ``attn_implementation`` on a load-and-save).
``import hf_rope_ext`` then ``from_pretrained(path)`` gives the patched model; without the plugin transformers and
serving engines fail on the unknown names instead of running something else.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import families, registry, serialization
from ..methods._rope_base import default_inv_freq
from . import attention_kernel
from .rotary import _rope_config

SAVED_KEY = "attn_implementation"
"""Config attribute (config.json key) that transformers reads as the attention implementation on reload."""


# --------------------------------------------------------------------------------------------------------------------
# switching the attention implementation (shared with rotary methods that ask for logn)


@dataclass
class AttentionSwitch:
    model: nn.Module
    name: str  # our registered implementation
    before: str  # the implementation the model had
    meta: dict[str, Any] = field(default_factory=dict)

    def apply(self) -> None:
        config = self.model.config
        self.model.set_attn_implementation(self.name)
        setattr(config, SAVED_KEY, self.name)


def _current_implementation(model: nn.Module, existing: dict[str, Any] | None) -> str:
    if existing and existing.get("attention"):
        return existing["attention"]["before"]
    return getattr(model.config, "_attn_implementation", None) or "eager"


def plan_switch(
    model: nn.Module, family: Any, attn_implementation: str | None, existing: dict[str, Any] | None, what: str
) -> AttentionSwitch:
    """Check that ``model`` can run the registered attention function; nothing changes until ``apply()``."""
    model_type = families.model_type_of(model)
    config_type = getattr(_rope_config(model)[1], "model_type", model_type)
    if config_type not in families.ATTENTION_MODEL_TYPES and model_type not in families.ATTENTION_MODEL_TYPES:
        raise ValueError(
            f"{what} is not supported for {config_type!r} yet; attention-level methods and logn are verified for: "
            f"{', '.join(families.ATTENTION_MODEL_TYPES)}. Rotary-frequency methods (e.g. yarn) work on this model."
        )
    before = _current_implementation(model, existing)
    base = attn_implementation
    if base is None:
        base = attention_kernel.BASES.get(before, before)
        if base not in attention_kernel.NAMES:
            base = "sdpa"
    if base not in attention_kernel.NAMES:
        cuda = " (flash attention also needs a CUDA device, and this machine has none)" if not torch.cuda.is_available() else ""
        raise ValueError(
            f"attn_implementation={base!r} cannot run {what}: the branches need the score map of every query-key "
            f"pair, which flash kernels do not expose{cuda}; choose one of: {', '.join(attention_kernel.NAMES)}"
        )
    if base == "sdpa" and getattr(model.config, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            f"{model_type!r} caps attention logits (attn_logit_softcapping), which sdpa cannot do; "
            "pass attn_implementation='eager'"
        )
    name = attention_kernel.NAMES[base]
    return AttentionSwitch(model, name, before, meta={"implementation": name, "base": base, "before": before})


def undo_switch(model: nn.Module, meta: dict[str, Any]) -> None:
    config = model.config
    if SAVED_KEY in config.__dict__:
        delattr(config, SAVED_KEY)
    model.set_attn_implementation(meta["before"])
    for module in families.attention_modules(model):
        module.__dict__.pop(attention_kernel._CACHE, None)
        module.__dict__.pop(attention_kernel._KEYS, None)


# --------------------------------------------------------------------------------------------------------------------
# attention-level methods


@dataclass
class AttentionPlan:
    switch: AttentionSwitch
    config: Any
    rope_parameters: dict[str, Any]  # what config.rope_parameters becomes (plugin rope type on the patched layers)
    meta: dict[str, Any] = field(default_factory=dict)

    def needs_generate_wrapper(self, model: nn.Module) -> bool:
        return True  # max_position_embeddings stays the original length: generate()'s default cap must not apply

    def apply(self) -> None:
        self.switch.apply()
        self.config.rope_parameters = copy.deepcopy(self.rope_parameters)


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
) -> AttentionPlan:
    modules, config = _rope_config(model)
    if layer_types:
        raise ValueError(
            f"layer_types does not apply to attention-level method '{spec.name}': it acts on every full-attention "
            "layer (sliding-window and NoPE layers stay as they are)"
        )
    switch = plan_switch(model, family, attn_implementation, existing, what=f"attention-level method '{spec.name}'")
    original_rp = copy.deepcopy(existing["original_rope_parameters"]) if existing else copy.deepcopy(config.rope_parameters)
    original_config = (
        copy.deepcopy(existing["original_config"])
        if existing
        else {"max_position_embeddings": config.max_position_embeddings}
    )
    active, skipped, prefixes = [], {}, set()
    for module in families.attention_modules(model):
        if module.config is not config:
            continue
        applies, prefix, reason = families.attention_layer(config, module)
        if not applies:
            skipped[module.layer_idx] = reason
            continue
        rp = original_rp[prefix] if prefix else original_rp
        if rp.get("rope_type", "default") != "default":
            raise ValueError(
                f"attention-level method '{spec.name}' works on the model's trained RoPE (rope_type 'default'); this "
                f"{config.model_type!r} checkpoint uses rope_type {rp.get('rope_type')!r}"
            )
        rot_dim, base = families.rotary_geometry(config, prefix)
        buffer = getattr(modules[0], f"{prefix}_inv_freq" if prefix else "inv_freq")
        if not existing and not torch.equal(buffer.detach().float().cpu(), default_inv_freq(rot_dim, base)):
            raise ValueError(
                f"the rotary frequencies of {type(modules[0]).__name__} do not match rope_theta={base} over "
                f"{rot_dim} dimensions in its config; attention-level methods re-rotate with the config's RoPE"
            )
        active.append(module.layer_idx)
        prefixes.add(prefix)
    if not active:
        reasons = sorted(set(skipped.values()))
        raise ValueError(
            f"attention-level method '{spec.name}' has no layer to act on in this {config.model_type!r} model: every "
            f"attention layer is skipped ({'; '.join(reasons)}). A model whose every layer attends through a sliding "
            "window never sees a distance past that window (Self-Extend's authors disable Mistral's window first: "
            "set model.config.sliding_window = None if the model was trained with full attention)"
        )
    layout = spec.compute(params)
    switch.meta = {**switch.meta, "layers": sorted(active), "exact_below": int(layout.exact_below)}
    rope_parameters = copy.deepcopy(original_rp)
    for prefix in prefixes:
        entry = rope_parameters[prefix] if prefix else rope_parameters
        entry["rope_type"] = serialization.ATTENTION_ROPE_TYPE
    return AttentionPlan(
        switch,
        config,
        rope_parameters,
        meta={
            "rope_parameters_written": {str(p): serialization.ATTENTION_ROPE_TYPE for p in sorted(prefixes, key=str)},
            "attention": switch.meta,
            "native": False,
            "requires_plugin": True,
            "original_rope_parameters": original_rp,
            "original_config": original_config,
            "layer_types": None,
            # transformers 4.x cannot express it (the rope type is the plugin's): patch_info and the card say so
            "transformers4": serialization.transformers4_support({"rope_parameters": rope_parameters}),
        },
    )


def undo(model: nn.Module, meta: dict[str, Any]) -> None:
    undo_switch(model, meta["attention"])
    _rope_config(model)[1].rope_parameters = copy.deepcopy(meta["original_rope_parameters"])
