"""The ONLY place that knows model types: where the position modules live and the quirks of each family.

Rotary families: the rotary module is found structurally (a ``*RotaryEmbedding`` module holding ``inv_freq`` or
``{layer_type}_inv_freq`` buffers and the config they were computed from); this table lists the model types verified to
follow that layout and what differs between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class RopeFamily:
    """A group of rotary model types that are patched the same way."""

    model_types: tuple[str, ...]
    """``config.model_type`` values (of the config the rotary module holds)."""
    per_layer_type: bool = False
    """``rope_parameters`` is nested by layer type and the rotary module keeps ``{layer_type}_inv_freq`` (Gemma-3)."""
    default_layer_types: tuple[str, ...] = ("full_attention",)
    """Layer types patched by default when ``per_layer_type`` (sliding-window layers never see far positions)."""
    native_rope_types: frozenset[str] | None = None
    """rope types the config class accepts on reload; None = every type transformers knows (Phi-3: default/longrope)."""
    kind: str = field(default="rope", init=False)


ROPE_FAMILIES: tuple[RopeFamily, ...] = (
    RopeFamily(
        model_types=(
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "phi",
            "gpt_neox",
            "falcon",
            "olmo",
            "olmo2",
            "starcoder2",
            "stablelm",
            "deepseek_v3",
            "granite",
            "cohere",
            "helium",
            "smollm3",
        )
    ),
    RopeFamily(model_types=("gemma3", "gemma3_text"), per_layer_type=True),
    RopeFamily(model_types=("phi3",), native_rope_types=frozenset({"default", "longrope"})),
)

# Learned-table families are appended here by the absolute-table support (see ``TableFamily`` when present).
TABLE_FAMILIES: tuple[Any, ...] = ()


def supported_model_types() -> list[str]:
    return sorted({t for fam in (*ROPE_FAMILIES, *TABLE_FAMILIES) for t in fam.model_types})


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """Every rotary-embedding module of ``model`` (usually one, shared by all layers)."""
    found = []
    for module in model.modules():
        if not type(module).__name__.endswith("RotaryEmbedding") or getattr(module, "config", None) is None:
            continue
        if any(name.endswith("inv_freq") and not name.endswith("original_inv_freq") for name, _ in module.named_buffers(recurse=False)):
            found.append(module)
    return found


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def find_family(model: nn.Module) -> RopeFamily | Any:
    """The family entry for ``model``; unsupported models raise ``ValueError`` naming the supported model types."""
    types_seen = []
    rotary = rotary_modules(model)
    for module in rotary:
        types_seen.append(getattr(module.config, "model_type", None))
    types_seen.append(model_type_of(model))
    for model_type in types_seen:
        for fam in ROPE_FAMILIES:
            if model_type in fam.model_types and rotary:
                return fam
        for fam in TABLE_FAMILIES:
            if model_type in fam.model_types:
                return fam
    raise ValueError(
        f"model type {model_type_of(model)!r} is not supported by hf_rope_ext; supported model types: "
        f"{', '.join(supported_model_types())}"
    )


def rope_layer_prefixes(family: RopeFamily, config: Any, layer_types: list[str] | tuple[str, ...] | None) -> list[str | None]:
    """Which ``rope_parameters`` entries to patch: ``[None]`` for a flat dict, else the chosen layer types."""
    if not family.per_layer_type:
        if layer_types:
            raise ValueError(f"layer_types applies only to models with per-layer-type rope, not {config.model_type!r}")
        return [None]
    available = sorted(k for k, v in config.rope_parameters.items() if isinstance(v, dict))
    chosen = list(layer_types or family.default_layer_types)
    unknown = [lt for lt in chosen if lt not in available]
    if unknown:
        raise ValueError(f"unknown layer type(s) {unknown} for {config.model_type!r}; this model has: {', '.join(available)}")
    return chosen
