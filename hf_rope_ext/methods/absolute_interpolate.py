"""Position interpolation on a learned table: new position p reads the trained table at p / s.

The table analogue of rotary Position Interpolation (Chen et al. 2023, https://arxiv.org/abs/2306.15595): instead of
dividing the rotation angle, the table itself is stretched by linear interpolation between neighbouring trained rows.
"""

from __future__ import annotations

import torch

from ..registry import register_method
from ._table_base import TableParams, check_table


@register_method(
    "interpolate",
    kind="absolute",
    params=TableParams,
    description="stretch the trained table: new row p is the linear interpolation of trained rows at p/s",
    paper="https://arxiv.org/abs/2306.15595",
)
def interpolate_table(old_weight: torch.Tensor, new_len: int, params: TableParams) -> torch.Tensor:
    """q[p] = (1 - f) * w[k] + f * w[k + 1] with k + f = p / s, s = new_len / n.

    Where p / s is an integer, q[p] IS the trained row w[p / s] (exactly, no arithmetic). Positions whose p / s falls
    beyond the last trained row (p / s > n - 1) hold that last row. The fraction is computed in integer arithmetic
    (p * n = k * new_len + r, f = r / new_len), so no float rounding decides which rows are exact.
    """
    n, _ = check_table(old_weight, new_len, "interpolate")
    w = old_weight.detach()
    p_times_n = torch.arange(new_len, dtype=torch.int64, device=w.device) * n  # [new_len]
    k = torch.div(p_times_n, new_len, rounding_mode="floor")  # [new_len] lower trained row
    frac = (p_times_n - k * new_len).to(torch.float64) / new_len  # [new_len] in [0, 1)
    upper = torch.clamp(k + 1, max=n - 1)
    frac = torch.where(k + 1 > n - 1, torch.zeros_like(frac), frac)  # past the last row: hold it
    low, high = w.index_select(0, k).to(torch.float64), w.index_select(0, upper).to(torch.float64)  # [new_len, h]
    mixed = (low + frac[:, None] * (high - low)).to(w.dtype)  # [new_len, h]
    exact = (frac == 0)[:, None]
    return torch.where(exact, w.index_select(0, k), mixed)  # integer p / s: the trained row itself
