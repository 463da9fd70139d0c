"""Direct extrapolation: raise the length limit and keep the trained frequencies (the baseline every method beats)."""

from __future__ import annotations

from typing import Any

from ..registry import register_method
from ._rope_base import RopeParams, default_inv_freq


def _native(params: RopeParams, dim: int, base: float) -> dict[str, Any]:
    return {"rope_type": "default"}


@register_method(
    "extrapolate",
    kind="rope",
    params=RopeParams,
    description="raise the limit only; positions past training use the unchanged frequencies (baseline)",
    native=_native,
    paper="https://arxiv.org/abs/2104.09864",
)
def extrapolate(params: RopeParams, dim: int, base: float, device: Any = None, seq_len: Any = None):
    """theta_i = base^(-2i/d), unchanged (Su et al. 2021, RoFormer)."""
    return default_inv_freq(dim, base, device), 1.0
