"""Shared pieces of the rotary methods: the parameter base class and the standard RoPE frequency formulas.

All frequencies are computed in float32 on the requested device, whatever the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..registry import param


@dataclass
class RopeParams:
    """Parameters every rotary method receives."""

    factor: float = param(help="Scale s = new context length / original context length (> 1).")
    original_max_position_embeddings: int = param(help="Context length the model was pre-trained at (L).")
    logn: bool = param(
        False,
        help="Also multiply each query at position p by max(1, log(p + 1) / log(L)) (log-n scaling, Su 2023, "
             "https://kexue.fm/archives/8823; Qwen-7B's ``use_logn_attn``). Done by the attention backend, inference "
             "only; stock transformers and serving engines do not know it (a saved model names the attention "
             "implementation).",
    )

    def validate(self) -> None:
        if not isinstance(self.factor, (int, float)) or isinstance(self.factor, bool) or self.factor <= 1:
            raise ValueError(f"factor must be a number > 1 (new length / original length), got {self.factor!r}")
        if int(self.original_max_position_embeddings) != self.original_max_position_embeddings or (
            self.original_max_position_embeddings < 1
        ):
            raise ValueError(
                "original_max_position_embeddings must be a positive int, "
                f"got {self.original_max_position_embeddings!r}"
            )
        if not isinstance(self.logn, bool):
            raise ValueError(f"logn must be True or False, got {self.logn!r}")
        self.factor = float(self.factor)
        self.original_max_position_embeddings = int(self.original_max_position_embeddings)


def default_inv_freq(dim: int, base: float, device: Any = None) -> torch.Tensor:
    """Standard RoPE inverse frequencies: theta_i = base^(-2i/d), i = 0 .. d/2-1. Shape [dim // 2], float32."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim  # [d/2]
    return 1.0 / (base**exponents)


def yarn_correction_range(
    beta_fast: float, beta_slow: float, dim: int, base: float, original_len: int, truncate: bool = True
) -> tuple[float, float]:
    """Dimension indices where a dimension completes ``beta_fast`` resp. ``beta_slow`` rotations over ``original_len``.

    Dimension 2i has wavelength 2*pi*base^(2i/d); it turns r = L / wavelength times over the original context, so
    r = beta  <=>  i = d * ln(L / (2*pi*beta)) / (2 * ln(base)). (bloc97's NTK-by-parts, YaRN section 3.2.)
    """

    def dim_at(rotations: float) -> float:
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_at(beta_fast), dim_at(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def by_parts_inv_freq(
    dim: int,
    base: float,
    factor: float | torch.Tensor,
    original_len: int,
    beta_fast: float,
    beta_slow: float,
    truncate: bool,
    device: Any = None,
) -> torch.Tensor:
    """NTK-by-parts blend: fast dimensions (many rotations in L) keep their frequency, slow ones are divided by s,
    a linear ramp in dimension index between them.  inv_i = (1 - g_i) * theta_i / s + g_i * theta_i."""
    theta = default_inv_freq(dim, base, device)  # [d/2]
    low, high = yarn_correction_range(beta_fast, beta_slow, dim, base, original_len, truncate)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    idx = torch.arange(dim // 2, dtype=torch.float32, device=device)
    interp_weight = torch.clamp((idx - low) / (high - low), 0.0, 1.0)  # 0 = keep (extrapolate), 1 = divide by s
    extrap_weight = 1.0 - interp_weight
    return (theta / factor) * (1.0 - extrap_weight) + theta * extrap_weight


def yarn_attention_factor(factor: float) -> float:
    """YaRN temperature sqrt(1/t) = 0.1 * ln(s) + 1 (multiplies cos and sin: logits scale by its square)."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def longrope_attention_factor(factor: float, original_length: int) -> float:
    """LongRoPE's (and transformers' ``longrope`` default) cos/sin multiplier sqrt(1 + ln s / ln L)."""
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original_length))
