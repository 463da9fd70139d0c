"""Dynamic NTK (emozilla, 2023, https://www.reddit.com/r/LocalLLaMA/comments/14mrgpr/): the NTK base is recomputed
from the current sequence length; below the original length the model is exactly the original."""

from __future__ import annotations

from typing import Any

import torch

from ..registry import register_method
from ._rope_base import RopeParams, default_inv_freq


def _native(params: RopeParams, dim: int, base: float) -> dict[str, Any]:
    return {"rope_type": "dynamic", "factor": params.factor}


@register_method(
    "dynamic_ntk",
    kind="rope",
    params=RopeParams,
    description="NTK base recomputed from the current length; original behaviour below the original length",
    native=_native,
    dynamic=True,
    paper="https://www.reddit.com/r/LocalLLaMA/comments/14mrgpr/",
)
def dynamic_ntk(params: RopeParams, dim: int, base: float, device: Any = None, seq_len: Any = None):
    """base' = base * (s * l / L - (s - 1))^(d/(d-2)) with l = max(current length, L)."""
    L = params.original_max_position_embeddings
    s = params.factor
    if seq_len is None:
        seq_len = L
    if isinstance(seq_len, torch.Tensor):
        seq_len = torch.clamp(seq_len.to(torch.float64), min=L)
        new_base = base * (s * seq_len / L - (s - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
        return 1.0 / (new_base.to(device=device, dtype=torch.float) ** exponents), 1.0
    seq_len = max(int(seq_len), L)
    new_base = base * (s * seq_len / L - (s - 1)) ** (dim / (dim - 2))
    return default_inv_freq(dim, new_base, device), 1.0
