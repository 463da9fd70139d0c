"""Position Interpolation (Chen et al. 2023, https://arxiv.org/abs/2306.15595): positions are divided by s."""

from __future__ import annotations

from typing import Any

from ..registry import register_method
from ._rope_base import RopeParams, default_inv_freq


def _native(params: RopeParams, dim: int, base: float) -> dict[str, Any]:
    return {"rope_type": "linear", "factor": params.factor}


@register_method(
    "linear",
    kind="rope",
    params=RopeParams,
    description="Position Interpolation: every position divided by the factor",
    native=_native,
    paper="https://arxiv.org/abs/2306.15595",
)
def linear(params: RopeParams, dim: int, base: float, device: Any = None, seq_len: Any = None):
    """theta_i' = theta_i / s (m * theta / s == (m / s) * theta)."""
    return default_inv_freq(dim, base, device) / params.factor, 1.0
