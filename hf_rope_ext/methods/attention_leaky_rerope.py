"""Leaky ReRoPE (Su 2023, https://kexue.fm/archives/9708, https://github.com/bojone/rerope leaky_rerope_patch.py):
like ReRoPE, but past the window the relative position keeps growing, ``leak`` times slower:
w + (i - j - w) / leak. Reaches (L - w) * leak + w tokens before relative positions leave the trained range."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import param, register_method
from ._attention_base import FAR, AttentionLayout, AttentionParams, Branch, near


@dataclass
class LeakyReRoPEParams(AttentionParams):
    window: int | None = param(None, help="w: pairs with i - j < w keep their true distance. None = L // 4.")
    leak: float = param(
        16.0,
        help="k > 1: past w the relative position grows 1/k per token (Su's experiments: k = 16).",
    )

    def validate(self) -> None:
        super().validate()
        L = self.original_max_position_embeddings
        self.resolve_window()
        if isinstance(self.leak, bool) or not isinstance(self.leak, (int, float)) or not math.isfinite(self.leak):
            raise ValueError(f"leak must be a finite number > 1, got {self.leak!r}")
        if self.leak <= 1:
            raise ValueError(f"leak must be > 1 (1 is plain RoPE; use rerope for no growth), got {self.leak}")
        self.leak = float(self.leak)
        reach = (L - self.window) * self.leak + self.window
        if reach < self.target_length:
            raise ValueError(
                f"leaky_rerope with window={self.window}, leak={self.leak:g} reaches (L - w) * leak + w = "
                f"({L} - {self.window}) * {self.leak:g} + {self.window} = {reach:g} tokens, short of the target "
                f"{self.target_length}; raise leak or lower window"
            )


@register_method(
    "leaky_rerope",
    kind="attention",
    params=LeakyReRoPEParams,
    description="Leaky ReRoPE: true distance below window w, w + (i-j-w)/leak beyond; window=L/4, leak=16",
    paper="https://kexue.fm/archives/9708",
)
def leaky_rerope(params: LeakyReRoPEParams) -> AttentionLayout:
    """position(i, j) = i - j if i - j < w else w + (i - j - w) / k  (q at w + (i - w)/k, k at j/k)."""
    w, k = params.window, params.leak
    far = Branch(
        name="leaky",
        interval=lambda i: (torch.full_like(i, FAR), i - w),
        q_pos=lambda p: w + (p - w) / k,
        k_pos=lambda p: p / k,
    )
    return AttentionLayout(branches=(near(w), far), exact_below=w)
