"""Copy initialisation (Longformer, Beltagy et al. 2020, https://arxiv.org/abs/2004.05150): tile the trained table.

Longformer extended RoBERTa from 512 to 4096 positions by copying the 512 trained rows eight times; attention patterns
that depend on short relative offsets survive the copy, so the model works far better than with random new rows.
"""

from __future__ import annotations

import torch

from ..registry import register_method
from ._table_base import TableParams, check_table


@register_method(
    "copy",
    kind="absolute",
    params=TableParams,
    description="tile the trained position table to the new length (Longformer's init, RoBERTa 512 -> 4096)",
    paper="https://arxiv.org/abs/2004.05150",
)
def copy_table(old_weight: torch.Tensor, new_len: int, params: TableParams) -> torch.Tensor:
    """q[p] = w[p mod n] for p = 0 .. new_len-1; the first n rows are the trained rows, bit for bit."""
    n, _ = check_table(old_weight, new_len, "copy")
    index = torch.arange(new_len, device=old_weight.device) % n  # [new_len]
    return old_weight.detach().index_select(0, index).clone()  # [new_len, h]
