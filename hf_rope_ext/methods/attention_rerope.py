"""ReRoPE (Su 2023, https://kexue.fm/archives/9708, https://github.com/bojone/rerope): relative positions are
clipped at a window w -- pairs closer than w see their true distance i - j, every farther pair sees exactly w.
No relative position past w is ever used, so any length works; the training length bounds only w."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import param, register_method
from ._attention_base import FAR, AttentionLayout, AttentionParams, Branch, constant, near


@dataclass
class ReRoPEParams(AttentionParams):
    window: int | None = param(
        None,
        help="w: pairs with i - j < w keep their true distance, farther ones see w. None = L // 4 (Su's ablation: w "
             "from L/8 to L/2 works, w = L collapses; the Llama-2 results use w = L/4 to L/8).",
    )

    def validate(self) -> None:
        super().validate()
        self.resolve_window("; Su: L/8 to L/2")


def rerope_layout(window: int) -> AttentionLayout:
    far = Branch(
        name="rectified",
        interval=lambda i: (torch.full_like(i, FAR), i - window),
        q_pos=constant(window),  # q at w, k at 0: relative position w for every far pair
        k_pos=constant(0.0),
    )
    return AttentionLayout(branches=(near(window), far), exact_below=window)


@register_method(
    "rerope",
    kind="attention",
    params=ReRoPEParams,
    description="ReRoPE: relative positions clipped at window w (true distance below w, w beyond); window=L/4",
    paper="https://kexue.fm/archives/9708",
)
def rerope(params: ReRoPEParams) -> AttentionLayout:
    """position(i, j) = i - j if i - j < w else w."""
    return rerope_layout(params.window)
