"""The ONLY place that knows model types: where the position modules live and the quirks of each family.

Rotary families: the rotary module is found structurally (a ``*RotaryEmbedding`` module holding ``inv_freq`` or
``{layer_type}_inv_freq`` buffers and the config they were computed from); this table lists the model types verified to
follow that layout and what differs between them.

Table families (learned or fixed sinusoidal absolute positions): ``AbsoluteFamily`` says where the table lives, how many
leading rows are not positions, which config fields, buffers and module attributes are sized by it, and for fixed
sinusoidal tables the model's own formula.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
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
    """rope types the config class accepts on reload; None = all that transformers knows (Phi-3: default/longrope)."""
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

def _fairseq_sinusoid(module: nn.Module, rows: int) -> torch.Tensor:
    """XGLM / M2M100: tensor2tensor layout [sin | cos], frequencies exp(-k ln(10000) / (d/2 - 1)), padding row 0."""
    return type(module).get_embedding(rows, module.embedding_dim, module.padding_idx)  # [rows, d]


def _marian_sinusoid(module: nn.Module, rows: int) -> torch.Tensor:
    """Marian: [sin | cos] halves with frequencies 10000^(-2k/d), computed by the module's own ``create_weight``."""
    with torch.device("meta"):  # only the shape is read from the throwaway module
        shaped = type(module)(rows, module.embedding_dim)
    return shaped.create_weight()  # [rows, d]


def _distilbert_sinusoid(module: nn.Module, rows: int) -> torch.Tensor:
    """DistilBERT with ``sinusoidal_pos_embds``: interleaved sin/cos columns, frequencies 10000^(-2k/d)."""
    from transformers.models.distilbert import modeling_distilbert

    out = torch.empty(rows, module.embedding_dim)
    return modeling_distilbert._create_sinusoidal_embeddings(n_pos=rows, dim=module.embedding_dim, out=out)


@dataclass(frozen=True)
class AbsoluteFamily:
    """A group of model types whose absolute position table is extended the same way."""

    model_types: tuple[str, ...]
    """``config.model_type`` values."""
    tables: tuple[str, ...]
    """Dotted module names of the table modules, matched as suffixes of ``model.named_modules()`` names (so the same
    entry finds ``wpe`` in GPT2Model and ``transformer.wpe`` in GPT2LMHeadModel); every match is extended (encoder and
    decoder of a seq2seq model)."""
    weight: str = "weight"
    """Attribute of a table module holding the table [rows, hidden]: a parameter, or a buffer (XGLM, M2M100)."""
    row_offset: int = 0
    """Leading table rows that are not positions 0, 1, ...: 2 for OPT, BioGPT, XGLM, M2M100."""
    row_offset_from_padding_idx: bool = False
    """The offset is the table module's ``padding_idx + 1`` (RoBERTa: positions start after the padding row, 2)."""
    config_fields: tuple[str, ...] = ("max_position_embeddings",)
    """Config fields holding the table length (GPT-2: ``n_positions``; ``max_position_embeddings`` is its alias)."""
    config_counts_offset: bool = False
    """The config fields count the offset rows too (RoBERTa: 514 for 512 positions; OPT says 2048 for 2050 rows)."""
    buffers: tuple[str, ...] = ()
    """Buffers (anywhere in the model) whose last dimension is the config length, continued as arithmetic
    progressions: BERT's ``position_ids`` (0, 1, 2, ...) and ``token_type_ids`` (0, 0, ...)."""
    masks: tuple[str, ...] = ()
    """Square [..., N, N] buffers sized by the config length, extended along their diagonals: GPT-Neo's causal and
    local ``attn.bias``, GPTBigCode's ``bias``."""
    module_attrs: tuple[str, ...] = ()
    """Int attributes of any module that equal the config length (OPT ``max_target_positions``, XGLM
    ``num_positions``); ``num_embeddings`` of an ``nn.Embedding`` table is always kept equal to its rows."""
    sinusoid: Callable[[nn.Module, int], torch.Tensor] | None = None
    """Fixed sinusoidal table: ``(table module, rows) -> [rows, hidden]``, the model's own formula for the whole
    table including offset rows. None for learned tables."""
    sinusoid_flag: str | None = None
    """Config flag that switches ``sinusoid`` on (DistilBERT ``sinusoidal_pos_embds``); None: always on."""
    kind: str = field(default="absolute", init=False)

    def formula(self, config: Any) -> Callable[[nn.Module, int], torch.Tensor] | None:
        """The sinusoid formula when this model's table is a fixed sinusoid, else None (learned table)."""
        if self.sinusoid is None or (self.sinusoid_flag and not getattr(config, self.sinusoid_flag, False)):
            return None
        return self.sinusoid


_BERT_BUFFERS = ("position_ids", "token_type_ids")

ABSOLUTE_FAMILIES: tuple[AbsoluteFamily, ...] = (
    AbsoluteFamily(model_types=("gpt2",), tables=("wpe",), config_fields=("n_positions",)),  # also DistilGPT-2
    AbsoluteFamily(model_types=("gpt_bigcode",), tables=("wpe",), config_fields=("n_positions",), masks=("bias",)),
    AbsoluteFamily(model_types=("gpt_neo",), tables=("wpe",), masks=("bias",)),
    AbsoluteFamily(
        model_types=("opt",), tables=("embed_positions",), row_offset=2, module_attrs=("max_target_positions",)
    ),
    AbsoluteFamily(model_types=("biogpt",), tables=("embed_positions",), row_offset=2),
    AbsoluteFamily(
        model_types=("bert", "electra", "ernie", "megatron-bert"),
        tables=("embeddings.position_embeddings",),
        buffers=_BERT_BUFFERS,
    ),
    AbsoluteFamily(
        model_types=("roberta", "xlm-roberta", "camembert", "data2vec-text", "roberta-prelayernorm", "xlm-roberta-xl"),
        tables=("embeddings.position_embeddings",),
        row_offset_from_padding_idx=True,
        config_counts_offset=True,
        buffers=_BERT_BUFFERS,
    ),
    AbsoluteFamily(
        model_types=("distilbert",),
        tables=("embeddings.position_embeddings",),
        buffers=("position_ids",),
        sinusoid=_distilbert_sinusoid,
        sinusoid_flag="sinusoidal_pos_embds",
    ),
    AbsoluteFamily(
        model_types=("xglm",),
        tables=("embed_positions",),
        weight="weights",
        row_offset=2,
        module_attrs=("max_target_positions", "num_positions"),
        sinusoid=_fairseq_sinusoid,
    ),
    AbsoluteFamily(
        model_types=("m2m_100",),
        tables=("embed_positions",),
        weight="weights",
        row_offset=2,
        module_attrs=("max_source_positions", "max_target_positions", "num_positions"),
        sinusoid=_fairseq_sinusoid,
    ),
    AbsoluteFamily(
        model_types=("marian",),
        tables=("embed_positions",),
        module_attrs=("max_source_positions", "max_target_positions"),
        sinusoid=_marian_sinusoid,
    ),
)


def supported_model_types() -> list[str]:
    return sorted({t for fam in (*ROPE_FAMILIES, *ABSOLUTE_FAMILIES) for t in fam.model_types})


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """Every rotary-embedding module of ``model`` (usually one, shared by all layers)."""
    found = []
    for module in model.modules():
        if not type(module).__name__.endswith("RotaryEmbedding") or getattr(module, "config", None) is None:
            continue
        names = [name for name, _ in module.named_buffers(recurse=False)]
        if any(n.endswith("inv_freq") and not n.endswith("original_inv_freq") for n in names):
            found.append(module)
    return found


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def find_family(model: nn.Module) -> RopeFamily | AbsoluteFamily:
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
        for fam in ABSOLUTE_FAMILIES:
            if model_type in fam.model_types:
                return fam
    raise ValueError(
        f"model type {model_type_of(model)!r} is not supported by hf_rope_ext; supported model types: "
        f"{', '.join(supported_model_types())}"
    )


def table_modules(model: nn.Module, family: AbsoluteFamily) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every position table of ``family`` in ``model`` (encoder and decoder of a seq2seq model);
    none found raises ``ValueError`` naming what was looked for. The one position-table finder of the library."""
    found = []
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in family.tables):
            continue
        if isinstance(getattr(module, family.weight, None), torch.Tensor):
            found.append((name, module))
    if not found:
        raise ValueError(
            f"no position table found in {type(model).__name__}: expected a module named {' or '.join(family.tables)} "
            f"with a '{family.weight}' tensor"
        )
    return found


def table_row_offset(family: AbsoluteFamily, module: nn.Module) -> int:
    """Leading rows of ``module``'s table that are not positions 0, 1, ... (OPT 2; RoBERTa padding_idx + 1)."""
    if not family.row_offset_from_padding_idx:
        return family.row_offset
    padding_idx = getattr(module, "padding_idx", None)
    if padding_idx is None:
        raise ValueError(
            f"{type(module).__name__} has no padding_idx; this family's positions start after the padding row"
        )
    return family.row_offset + int(padding_idx) + 1


def table_family(model: nn.Module) -> AbsoluteFamily:
    """The model's learned/fixed position-table family; a rotary or unsupported model raises ``ValueError``."""
    family = find_family(model)
    if not isinstance(family, AbsoluteFamily):
        raise ValueError(f"{type(model).__name__} uses rotary position encodings, not a position table")
    return family


def rope_layer_prefixes(
    family: RopeFamily, config: Any, layer_types: list[str] | tuple[str, ...] | None
) -> list[str | None]:
    """Which ``rope_parameters`` entries to patch: ``[None]`` for a flat dict, else the chosen layer types."""
    if not family.per_layer_type:
        if layer_types:
            raise ValueError(f"layer_types applies only to models with per-layer-type rope, not {config.model_type!r}")
        return [None]
    available = sorted(k for k, v in config.rope_parameters.items() if isinstance(v, dict))
    chosen = list(layer_types or family.default_layer_types)
    unknown = [lt for lt in chosen if lt not in available]
    if unknown:
        raise ValueError(
            f"unknown layer type(s) {unknown} for {config.model_type!r}; this model has: {', '.join(available)}"
        )
    return chosen


# --------------------------------------------------------------------------------------------------------------------
# attention-level methods

ATTENTION_MODEL_TYPES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "phi3",
    "smollm3",
    "gpt_neox",
)
"""Model types verified for attention-level methods (each against a naive reference in the tests): their attention
modules keep ``layer_idx``, rotate the first ``rot_dim`` dimensions of q and k in the rotate-half layout, and pass
``scaling`` (Gemma-2: also ``softcap``) to the attention function."""


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Every self-attention module (class name ``*Attention`` with an int ``layer_idx`` and a config)."""
    return [
        m
        for m in model.modules()
        if type(m).__name__.endswith("Attention")
        and isinstance(getattr(m, "layer_idx", None), int)
        and getattr(m, "config", None) is not None
    ]


def attention_layer(config: Any, module: nn.Module) -> tuple[bool, str | None, str]:
    """How an attention-level method treats one attention layer: (applies, rope_parameters key, reason if not).

    Sliding-window layers (Gemma-2/3 local layers) never see a distance past their window and NoPE layers (SmolLM3)
    have no positions: both stay as they are. Per-layer-type rope (Gemma-3) gives the key of the layer's entry."""
    if not getattr(module, "use_rope", True):
        return False, None, "no rotary positions (NoPE layer)"
    layer_types = getattr(config, "layer_types", None)
    layer_type = layer_types[module.layer_idx] if layer_types else None
    if layer_type is not None and layer_type != "full_attention":
        return False, None, f"layer type {layer_type!r}"
    if layer_type is None and getattr(config, "sliding_window", None) is not None:
        return False, None, f"sliding window of {config.sliding_window} tokens"
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    prefix = layer_type if isinstance(rope_parameters.get(layer_type or ""), dict) else None
    return True, prefix, ""


def rotary_geometry(config: Any, prefix: str | None) -> tuple[int, float]:
    """(rotated dimensions per head, rope_theta) of a layer's rotary encoding, read from the config the way the
    models' ``compute_default_rope_parameters`` read it."""
    rp = config.rope_parameters[prefix] if prefix else config.rope_parameters
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * rp.get("partial_rotary_factor", 1.0)), float(rp["rope_theta"])
