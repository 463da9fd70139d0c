"""Shared pieces of the learned-table ("absolute") methods: the parameter base class and output checks.

A table method is a pure function ``(old_weight [n, h], new_len, params) -> new_weight [new_len, h]``: it sees only the
trained position rows (offset rows such as RoBERTa's padding rows are removed and put back by the patching code) and
knows nothing about the model they came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..registry import param


@dataclass
class TableParams:
    """Parameters every learned-table method receives."""

    factor: float = param(help="Scale s = new table length / original table length (> 1).")
    original_max_position_embeddings: int = param(
        help="Number of trained position rows n (positions only, without offset rows).",
    )

    needs_formula: ClassVar[bool] = param(
        False,
        help="True for methods that continue a fixed formula (sinusoidal tables); the patching code then passes the "
             "model's formula as ``formula=`` and refuses learned tables, which have none.",
    )

    def validate(self) -> None:
        if not isinstance(self.factor, (int, float)) or isinstance(self.factor, bool) or self.factor <= 1:
            raise ValueError(f"factor must be a number > 1 (new length / original length), got {self.factor!r}")
        n = self.original_max_position_embeddings
        if isinstance(n, bool) or not isinstance(n, (int, float)) or int(n) != n or n < 1:
            raise ValueError(f"original_max_position_embeddings must be a positive int, got {n!r}")
        self.factor = float(self.factor)
        self.original_max_position_embeddings = int(n)


def check_table(old_weight: torch.Tensor, new_len: int, method: str) -> tuple[int, int]:
    """(n, h) of a position table, after checking it is a 2-D table shorter than ``new_len``."""
    if old_weight.dim() != 2:
        raise ValueError(
            f"method '{method}' expects a position table [n, hidden], got shape {tuple(old_weight.shape)}"
        )
    n, h = old_weight.shape
    if int(new_len) != new_len or new_len <= n:
        raise ValueError(
            f"method '{method}': new length must be an int larger than the table's {n} rows, got {new_len!r}"
        )
    return n, h
