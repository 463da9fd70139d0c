"""Shared pieces of the attention-level methods: parameters, and the "branches" a method splits attention into.

An attention-level method does not change the rotary frequencies; it changes *which relative position* a query-key
pair sees. Each method describes that as a few **branches**: in a branch's region of the (query i, key j) map, the
query takes position ``q_pos(i)`` and the key ``k_pos(j)`` (RoPE then sees q_pos(i) - k_pos(j)); everywhere else in
the causal map the branches' regions do not overlap. A method never sees the model: the attention backend
(``backends.attention_kernel``) re-rotates the already rotated q/k by the position offsets (rotations compose) and
merges the branches in one softmax.

Positions are the model's own position ids (left-padding aware). ``q_pos`` / ``k_pos`` take and return float64
tensors (Leaky ReRoPE's positions are fractional); ``interval`` maps int64 query positions to the key-position range
of the branch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..registry import param


@dataclass
class AttentionParams:
    """Parameters every attention-level method receives."""

    factor: float = param(help="Scale s = new context length / original context length (> 1).")
    original_max_position_embeddings: int = param(help="Context length the model was pre-trained at (L).")
    logn: bool = param(
        False,
        help="Also multiply each query at position p by max(1, log(p + 1) / log(L)) (log-n attention scaling: Su "
             "2023, https://kexue.fm/archives/8823; Qwen-7B's ``use_logn_attn``). Inference-time only; 1 inside the "
             "trained length.",
    )

    def validate(self) -> None:
        if not isinstance(self.factor, (int, float)) or isinstance(self.factor, bool) or not math.isfinite(
            self.factor
        ) or self.factor <= 1:
            raise ValueError(f"factor must be a finite number > 1 (new length / original length), got {self.factor!r}")
        n = self.original_max_position_embeddings
        if isinstance(n, bool) or not isinstance(n, (int, float)) or int(n) != n or n < 2:
            raise ValueError(f"original_max_position_embeddings must be an int >= 2, got {n!r}")
        if not isinstance(self.logn, bool):
            raise ValueError(f"logn must be True or False, got {self.logn!r}")
        self.factor = float(self.factor)
        self.original_max_position_embeddings = int(n)

    def resolve_window(self, hint: str = "") -> int:
        """``self.window`` checked to lie in [1, L) (None: L // 4, the default of the window methods)."""
        L = self.original_max_position_embeddings
        window = L // 4 if self.window is None else self.window
        self.window = check_int("window", window, 1, L, f" (the original length is {L}{hint})")
        return self.window

    @property
    def target_length(self) -> int:
        """N = round(s * L): the length the method must reach."""
        return int(round(self.factor * self.original_max_position_embeddings))


def check_int(name: str, value: object, low: int, high: int | None, hint: str = "") -> int:
    """``value`` as an int in [low, high) (high None: no upper bound), else a ValueError naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value >= high):
        bound = f">= {low}" + (f" and < {high}" if high is not None else "")
        raise ValueError(f"{name} must be {bound}, got {value}{hint}")
    return value


FAR = -(2**62)
"""Lower bound of a key interval reaching back to the start of the sequence (and past it: left padding)."""


@dataclass(frozen=True)
class Branch:
    """One part of the attention map: for query position i, the keys at positions ``interval(i)`` (inclusive) are
    scored with q at ``q_pos(i)`` against k at ``k_pos(j)``. The intervals of a layout's branches are disjoint and
    together cover every key position <= i."""

    name: str
    interval: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = param(
        help="int64 query positions [...] -> (lo, hi) int64 [...]: the branch's inclusive key-position range (lo > "
             "hi: empty).",
    )
    q_pos: Callable[[torch.Tensor], torch.Tensor] | None = param(
        None,
        help="Query positions (float64) -> the positions the queries take in this branch; None: their own.",
    )
    k_pos: Callable[[torch.Tensor], torch.Tensor] | None = param(
        None,
        help="Key positions (float64) -> the positions the keys take in this branch; None: their own.",
    )


@dataclass(frozen=True)
class AttentionLayout:
    """What an attention-level method computes from its parameters."""

    branches: tuple[Branch, ...]
    exact_below: int = param(
        help="Queries at positions < exact_below see only true relative positions: below it the model is the "
             "original one (the backend then calls the original attention, bit-identical).",
    )


def near(window: int) -> Branch:
    """Pairs closer than ``window`` at their true positions: i - window < j <= i."""
    return Branch(name="near", interval=lambda i: (i - window + 1, i))


def constant(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda p: torch.full_like(p, float(value))
