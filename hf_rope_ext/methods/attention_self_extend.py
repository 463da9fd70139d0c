"""Self-Extend (Jin et al. 2024, "LLM Maybe LongLM", https://arxiv.org/abs/2401.01325,
https://github.com/datamllab/LongLM): neighbours (i - j < W) attend at their true positions; farther pairs use
grouped positions -- query i at i // G + W - W // G, key j at j // G -- so far distances shrink G-fold and stay
inside the trained range. Reaches (L - W) * G + W tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import param, register_method
from ._attention_base import FAR, AttentionLayout, AttentionParams, Branch, check_int, near


@dataclass
class SelfExtendParams(AttentionParams):
    group_size: int | None = param(
        None,
        help="G >= 1. None = the smallest G with W + (N - W) / G <= L / 2, the conservative end of the authors' rule "
             "(1/2 to 2/3) * L > W + (N - W) / G (LongLM README): only well-trained relative positions are used.",
    )
    window: int | None = param(
        None,
        help="W, the neighbour window, 1 <= W < L. None = L // 4 (the authors use 512-1536 for Llama-2's 4096).",
    )

    def validate(self) -> None:
        super().validate()
        L, N = self.original_max_position_embeddings, self.target_length
        self.resolve_window()
        W = self.window
        if self.group_size is None:
            room = L // 2 - W
            self.group_size = max(2, math.ceil((N - W) / room)) if room > 0 else 2 * math.ceil(N / L)
        self.group_size = check_int("group_size", self.group_size, 1, None)
        reach = (L - W) * self.group_size + W
        if reach < N:
            raise ValueError(
                f"self_extend with group_size={self.group_size}, window={W} reaches (L - W) * G + W = "
                f"({L} - {W}) * {self.group_size} + {W} = {reach} tokens, short of the target {N}; "
                f"use group_size >= {math.ceil((N - W) / (L - W))} or a smaller window"
            )


@register_method(
    "self_extend",
    kind="attention",
    params=SelfExtendParams,
    description="Self-Extend: neighbours (i-j < W) at true positions, others at grouped positions i//G+W-W//G, j//G",
    paper="https://arxiv.org/abs/2401.01325",
)
def self_extend(params: SelfExtendParams) -> AttentionLayout:
    """position(i, j) = i - j if i - j < W else (i // G + W - W // G) - j // G."""
    G, W = params.group_size, params.window
    shift = W - W // G
    grouped = Branch(
        name="grouped",
        interval=lambda i: (torch.full_like(i, FAR), i - W),
        q_pos=lambda p: torch.floor(p / G) + shift,
        k_pos=lambda p: torch.floor(p / G),
    )
    return AttentionLayout(branches=(near(W), grouped), exact_below=W)
