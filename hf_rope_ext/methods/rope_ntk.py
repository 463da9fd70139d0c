"""NTK-aware scaled RoPE (bloc97, 2023, https://www.reddit.com/r/LocalLLaMA/comments/14lz7j5/):
a larger base, so the fastest dimension is untouched and the slowest is interpolated by exactly s."""

from __future__ import annotations

from typing import Any

from ..registry import register_method
from ._rope_base import RopeParams, default_inv_freq


def ntk_base(base: float, factor: float, dim: int) -> float:
    """base' = base * s^(d / (d - 2))."""
    return float(base * factor ** (dim / (dim - 2)))


def _native(params: RopeParams, dim: int, base: float) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": ntk_base(base, params.factor, dim)}


@register_method(
    "ntk",
    kind="rope",
    params=RopeParams,
    description="NTK-aware scaled base: base * s^(d/(d-2)); high frequencies extrapolate, low ones interpolate",
    native=_native,
    paper="https://www.reddit.com/r/LocalLLaMA/comments/14lz7j5/",
)
def ntk(params: RopeParams, dim: int, base: float, device: Any = None, seq_len: Any = None):
    """theta_i = (base * s^(d/(d-2)))^(-2i/d)."""
    return default_inv_freq(dim, ntk_base(base, params.factor, dim), device), 1.0
