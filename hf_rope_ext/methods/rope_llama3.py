"""Llama-3.1 frequency-dependent scaling (Meta, 2024, https://arxiv.org/abs/2407.21783): wavelengths shorter than
L/high_freq_factor are kept, longer than L/low_freq_factor divided by s, a smooth blend in between."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..registry import param, register_method
from ._rope_base import RopeParams, default_inv_freq


@dataclass
class Llama3Params(RopeParams):
    low_freq_factor: float = param(
        1.0,
        help="Wavelengths above L / low_freq_factor are interpolated by the full factor.",
    )
    high_freq_factor: float = param(4.0, help="Wavelengths below L / high_freq_factor are kept unchanged.")

    def validate(self) -> None:
        super().validate()
        if not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(
                f"need high_freq_factor > low_freq_factor > 0, got {self.high_freq_factor} and {self.low_freq_factor}"
            )


def _native(params: Llama3Params, dim: int, base: float) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "factor": params.factor,
        "low_freq_factor": float(params.low_freq_factor),
        "high_freq_factor": float(params.high_freq_factor),
        "original_max_position_embeddings": params.original_max_position_embeddings,
    }


@register_method(
    "llama3",
    kind="rope",
    params=Llama3Params,
    description="Meta's Llama-3.1 frequency-dependent scaling (low/high frequency factors)",
    native=_native,
    paper="https://arxiv.org/abs/2407.21783",
)
def llama3(params: Llama3Params, dim: int, base: float, device: Any = None, seq_len: Any = None):
    """smooth = (L / wavelen - low) / (high - low); inv = (1 - smooth) * theta / s + smooth * theta in the middle."""
    theta = default_inv_freq(dim, base, device)  # [d/2]
    L, s = params.original_max_position_embeddings, params.factor
    low, high = params.low_freq_factor, params.high_freq_factor
    wavelen = 2 * math.pi / theta
    smooth = ((L / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 1 for short wavelengths, 0 for long ones
    blended = (1 - smooth) * theta / s + smooth * theta
    inv_freq = torch.where(wavelen < L / high, theta, torch.where(wavelen > L / low, theta / s, blended))
    return inv_freq, 1.0
