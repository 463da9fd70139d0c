"""Which modules a fine-tune touches: LoRA targets and the modules trained fully.

- ``attention_lora_targets``: every linear layer inside the attention blocks (q/k/v/o projections, GPT-2's ``c_attn``,
  BERT's ``query/key/value``), found structurally, as full module names (exact matches for peft).
- ``longlora_modules_to_save``: embeddings and every normalisation layer — LongLoRA's "LoRA+" (Chen et al. 2023,
  https://arxiv.org/abs/2309.12307) shows LoRA alone does not adapt to long contexts, LoRA plus trainable embeddings
  and norms does (PG19 at 32k: 11.44 vs 8.12 perplexity).
- ``position_table_modules``: learned position tables (GPT-2 ``wpe``, BERT ``position_embeddings``), trained fully when
  a learned table was extended, since its new rows are only initialisations.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def _is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with transposed weights; peft handles both
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every linear (or Conv1D) layer, excluding the output head."""
    head = _output_head(model)
    return [name for name, module in model.named_modules() if _is_linear(module) and module is not head]


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def attention_lora_targets(model: nn.Module) -> list[str]:
    """Full names of the linear layers inside attention blocks (a module whose class name contains "Attention")."""
    targets: list[str] = []
    for name, module in model.named_modules():
        if "Attention" not in type(module).__name__:
            continue
        for child_name, child in module.named_modules():
            full = f"{name}.{child_name}" if name else child_name
            if child_name and _is_linear(child) and full not in targets:
                targets.append(full)
    return targets


def matches(module_name: str, pattern: str) -> bool:
    """peft's rule for a name in ``target_modules`` / ``modules_to_save``: exact or a dotted suffix."""
    return module_name == pattern or module_name.endswith("." + pattern)


def unmatched_targets(model: nn.Module, patterns: Iterable[str], candidates: list[str] | None = None) -> list[str]:
    """The patterns that match no module of ``model`` (among ``candidates`` when given)."""
    names = candidates if candidates is not None else [n for n, _ in model.named_modules() if n]
    return [p for p in patterns if not any(matches(n, p) for n in names)]


def short_names(names: Iterable[str]) -> list[str]:
    """Distinct last components (``model.layers.0.self_attn.q_proj`` -> ``q_proj``), for error messages."""
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def norm_modules(model: nn.Module) -> list[str]:
    """Full names of normalisation layers (LayerNorm, RMSNorm and the families' own ``*Norm`` classes)."""
    return [
        name
        for name, module in model.named_modules()
        if name
        and ("Norm" in type(module).__name__ or isinstance(module, nn.LayerNorm))
        and not _has_norm_child(module)
    ]


def _has_norm_child(module: nn.Module) -> bool:
    return any("Norm" in type(c).__name__ for _, c in module.named_modules() if c is not module)


def position_table_modules(model: nn.Module) -> list[str]:
    """Full names of the model's learned position tables (GPT-2 ``wpe``, BERT ``position_embeddings``), found by
    :func:`hf_rope_ext.families.table_modules`; none for rotary models and fixed sinusoidal tables."""
    from .. import families

    try:
        family = families.table_family(model)
        found = families.table_modules(model, family)
    except ValueError:
        return []
    if family.sinusoid is not None:
        return []
    return [name for name, module in found if isinstance(module, nn.Embedding)]


def embedding_modules(model: nn.Module) -> list[str]:
    """Full names of the input token embedding and any learned position tables."""
    names = []
    get = getattr(model, "get_input_embeddings", None)
    token = get() if callable(get) else None
    for name, module in model.named_modules():
        if module is token and name:
            names.append(name)
    return names + [n for n in position_table_modules(model) if n not in names]


def longlora_modules_to_save(model: nn.Module) -> list[str]:
    """Embeddings (token + position tables) and every norm: what LongLoRA trains fully next to the LoRA adapters."""
    return embedding_modules(model) + [n for n in norm_modules(model)]
