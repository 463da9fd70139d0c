"""LongRoPE (Ding et al. 2024, https://arxiv.org/abs/2402.13753): per-dimension rescale factors (found by search in the
paper, given by the user here): short factors up to the original length, long factors past it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..registry import param, register_method
from ._rope_base import RopeParams, default_inv_freq, longrope_attention_factor


@dataclass
class LongRopeParams(RopeParams):
    short_factor: list[float] | None = param(
        None,
        help="Per-dimension divisors (length rotary_dim / 2) used while the sequence fits the original length.",
    )
    long_factor: list[float] | None = param(
        None,
        help="Per-dimension divisors (length rotary_dim / 2) used past the original length.",
    )
    attention_factor: float | None = param(
        None,
        help="Multiplier of cos/sin; None = sqrt(1 + ln(s) / ln(L)) as in the paper / Phi-3.",
    )

    def validate(self) -> None:
        super().validate()
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"longrope needs {name}: a list of rotary_dim/2 positive numbers")
            value = [float(v) for v in value]
            bad = [i for i, v in enumerate(value) if not (v > 0 and math.isfinite(v))]
            if bad:
                raise ValueError(f"longrope {name} must be finite numbers > 0; {name}[{bad[0]}] is {value[bad[0]]!r}")
            setattr(self, name, value)
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(f"longrope attention_factor must be > 0 or None, got {self.attention_factor!r}")

    def resolved_attention_factor(self) -> float:
        if self.attention_factor is not None:
            return float(self.attention_factor)
        return longrope_attention_factor(self.factor, self.original_max_position_embeddings)

    def check_dim(self, dim: int) -> None:
        for name in ("short_factor", "long_factor"):
            if len(getattr(self, name)) != dim // 2:
                raise ValueError(
                    f"longrope {name} needs {dim // 2} entries (rotary dim {dim} / 2), got {len(getattr(self, name))}"
                )


def _native(params: LongRopeParams, dim: int, base: float) -> dict[str, Any]:
    params.check_dim(dim)
    return {
        "rope_type": "longrope",
        "short_factor": list(params.short_factor),
        "long_factor": list(params.long_factor),
        "factor": params.factor,
        "original_max_position_embeddings": params.original_max_position_embeddings,
        "attention_factor": params.resolved_attention_factor(),
    }


@register_method(
    "longrope",
    kind="rope",
    params=LongRopeParams,
    description="per-dimension rescale factors given by the user (short/long lists), LongRoPE",
    native=_native,
    paper="https://arxiv.org/abs/2402.13753",
)
def longrope(params: LongRopeParams, dim: int, base: float, device: Any = None, seq_len: Any = None):
    """inv_i = theta_i / f_i, f = long_factor when the sequence is longer than L, else short_factor."""
    params.check_dim(dim)
    use_long = seq_len is not None and seq_len > params.original_max_position_embeddings
    factors = torch.tensor(params.long_factor if use_long else params.short_factor, dtype=torch.float32, device=device)
    return default_inv_freq(dim, base, device) / factors, params.resolved_attention_factor()
