"""Dynamic YaRN (YaRN paper section 3.3, https://arxiv.org/abs/2309.00071): the YaRN scale is recomputed from the
current length, s' = max(1, l / L), so short inputs see the original model. transformers has no native type for it:
saved models need ``import hf_rope_ext`` before loading."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..registry import register_method
from .rope_yarn import YarnParams


@register_method(
    "dynamic_yarn",
    kind="rope",
    params=YarnParams,
    description="yarn with the factor recomputed from the current length, s' = max(1, l/L) (plugin-only on reload)",
    native=None,
    dynamic=True,
    paper="https://arxiv.org/abs/2309.00071",
)
def dynamic_yarn(params: YarnParams, dim: int, base: float, device: Any = None, seq_len: Any = None):
    L = params.original_max_position_embeddings
    if seq_len is None:
        seq_len = L
    if isinstance(seq_len, torch.Tensor):
        s = torch.clamp(seq_len.to(device=device, dtype=torch.float32) / L, min=1.0)  # 0-dim tensor
        attention = params.attention_factor if params.attention_factor is not None else 0.1 * torch.log(s) + 1.0
    else:
        s = max(1.0, float(seq_len) / L)
        if params.attention_factor is not None:
            attention = float(params.attention_factor)
        else:
            attention = 0.1 * math.log(s) + 1.0
    inv_freq = params.inv_freq(dim, base, device, factor=s)
    return inv_freq, attention
