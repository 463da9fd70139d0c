"""Fixed sinusoidal tables (Vaswani et al. 2017, https://arxiv.org/abs/1706.03762): recompute the formula further.

Models such as Marian, M2M100, XGLM or DistilBERT with ``sinusoidal_pos_embds`` never learned their table; it is
sin/cos of position times a geometric ladder of frequencies. Extending it means evaluating the same formula past the
end. The formula differs between models (layout of sin/cos columns, frequency exponent, offset rows), so the patching
code passes the model's own formula in from ``families.py``; this function only checks it and splices it on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..registry import register_method
from ._table_base import TableParams, check_table


@dataclass
class SinusoidalParams(TableParams):
    """Parameters of the sinusoidal continuation (none beyond the lengths)."""

    needs_formula: ClassVar[bool] = True


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().max()) if a.numel() else 0.0


@register_method(
    "sinusoidal",
    kind="absolute",
    params=SinusoidalParams,
    description="fixed sinusoidal tables only (Marian, M2M100, XGLM): recompute the model's formula past the table",
    paper="https://arxiv.org/abs/1706.03762",
)
def sinusoidal_table(
    old_weight: torch.Tensor,
    new_len: int,
    params: SinusoidalParams,
    *,
    formula: Callable[[int], torch.Tensor] | None = None,
    atol: float = 1e-4,
) -> torch.Tensor:
    """q[p] = w[p] for p < n and q[p] = PE(p) beyond, PE the model's sinusoid (e.g. sin(p / 10000^(2k/d)), cos ...).

    ``formula(rows)`` returns PE for positions 0 .. rows-1, shape [rows, h]. It must reproduce the existing table
    within ``atol`` (plus one rounding step of the table's dtype); otherwise the table is not (or no longer) that
    formula and a ValueError says so.
    """
    n, h = check_table(old_weight, new_len, "sinusoidal")
    if formula is None:
        raise ValueError("method 'sinusoidal' needs the model's sinusoid (formula=); it applies only to models whose "
                         "families.py entry gives one")
    pe = formula(new_len).detach()  # [new_len, h]
    if tuple(pe.shape) != (new_len, h):
        raise ValueError(f"sinusoidal formula returned shape {tuple(pe.shape)}, expected ({new_len}, {h})")
    diff = _max_abs_diff(pe[:n].to(old_weight.dtype), old_weight.detach())
    tolerance = atol + float(torch.finfo(old_weight.dtype).eps) if old_weight.is_floating_point() else atol
    if not diff <= tolerance:
        raise ValueError(
            f"the position table differs from the model's sinusoidal formula by up to {diff:.3g} "
            f"(> {tolerance:.3g}); it was "
            "changed after initialisation, so recomputing the formula would not continue it"
        )
    q = pe.to(device=old_weight.device, dtype=old_weight.dtype).clone()
    q[:n] = old_weight.detach()  # existing positions bit for bit
    return q
