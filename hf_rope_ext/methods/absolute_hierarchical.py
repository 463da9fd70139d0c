"""Hierarchical decomposition of a learned table (Su Jianlin 2020, https://kexue.fm/archives/7947).

Position p = i * n + j (0 <= j < n) is written in base n and embedded as a mix of two "digit" vectors,
q[i*n + j] = alpha * u[i] + (1 - alpha) * u[j], with u chosen so that the first n positions are unchanged:
u = (w - alpha * w[0]) / (1 - alpha). A table of n trained rows reaches n^2 positions; alpha != 0.5 keeps
(i, j) and (j, i) apart. BERT's 512 rows reach 262144 positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import param, register_method
from ._table_base import TableParams, check_table


@dataclass
class HierarchicalParams(TableParams):
    """Parameters of the hierarchical decomposition."""

    alpha: float = param(
        0.4,
        help="Weight of the \"high digit\" vector u[i]; 0 < alpha < 1 and not 0.5 (Su Jianlin uses 0.4).",
    )

    def validate(self) -> None:
        super().validate()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be a number strictly between 0 and 1, got {self.alpha!r}")
        if self.alpha == 0.5:
            raise ValueError("alpha=0.5 makes positions i*n+j and j*n+i identical; use e.g. the default alpha=0.4")
        self.alpha = float(self.alpha)


@register_method(
    "hierarchical",
    kind="absolute",
    params=HierarchicalParams,
    description="Su Jianlin's hierarchical decomposition q[i*n+j] = a*u_i + (1-a)*u_j: keeps the n rows, reaches n^2",
    paper="https://kexue.fm/archives/7947",
)
def hierarchical_table(old_weight: torch.Tensor, new_len: int, params: HierarchicalParams) -> torch.Tensor:
    """q[i*n + j] = alpha * u[i] + (1 - alpha) * u[j],  u = (w - alpha * w[0]) / (1 - alpha).

    Computed in float64 and cast back; the first n rows are copied from ``old_weight`` so they stay bit-identical.
    """
    n, _ = check_table(old_weight, new_len, "hierarchical")
    if new_len > n * n:
        raise ValueError(
            f"hierarchical decomposition of {n} rows reaches at most {n * n} positions, asked for {new_len}"
        )
    alpha = params.alpha
    w = old_weight.detach()
    w64 = w.to(torch.float64)
    u = (w64 - alpha * w64[:1]) / (1 - alpha)  # [n, h]
    p = torch.arange(new_len, device=w.device)
    i, j = torch.div(p, n, rounding_mode="floor"), p % n  # [new_len] high and low digit
    q = (alpha * u.index_select(0, i) + (1 - alpha) * u.index_select(0, j)).to(w.dtype)  # [new_len, h]
    q[:n] = w  # the identity above holds in exact arithmetic; keep the trained rows bit for bit
    return q
