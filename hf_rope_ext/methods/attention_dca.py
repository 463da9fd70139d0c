"""Dual Chunk Attention (An et al. 2024, "Training-Free Long-Context Scaling of LLMs", https://arxiv.org/abs/2402.17463,
https://github.com/HKUNLP/ChunkLlama): the sequence is cut into chunks of c = chunk_size - local_window tokens; keys
take their position inside their chunk (j mod c). Queries take

- intra-chunk (same chunk): i mod c -- the true distance;
- successive chunk (key in the chunk just before): min(i mod c + c, chunk_size) -- the true distance for the first
  local_window queries of a chunk, capped at chunk_size after;
- inter-chunk (any earlier chunk): min(2c - 1, chunk_size).

So no relative position exceeds chunk_size <= L, at any length. Defaults as in ChunkLlama's
``replace_with_chunkllama``: chunk_size = 3L/4, local_window = L/8. (ChunkLlama also multiplies q and k by
0.05 ln(s) + 1 past the trained length; here that role is played by the ``logn`` option, off by default.)"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import param, register_method
from ._attention_base import FAR, AttentionLayout, AttentionParams, Branch, check_int, constant


@dataclass
class DCAParams(AttentionParams):
    chunk_size: int | None = param(None, help="Largest relative position used (<= L). None = 3 * L // 4.")
    local_window: int | None = param(
        None,
        help="Queries this close to the start of their chunk see the previous chunk at true distance. None = L // 8.",
    )

    def validate(self) -> None:
        super().validate()
        L = self.original_max_position_embeddings
        if self.chunk_size is None:
            self.chunk_size = 3 * L // 4
        self.chunk_size = check_int(
            "chunk_size", self.chunk_size, 2, L + 1, f" (it may not exceed the original length {L})"
        )
        if self.local_window is None:
            self.local_window = min(L // 8, self.chunk_size - 1)
        self.local_window = check_int(
            "local_window", self.local_window, 0, self.chunk_size, f" (chunk_size is {self.chunk_size})"
        )


@register_method(
    "dca",
    kind="attention",
    params=DCAParams,
    description="Dual Chunk Attention: intra / successive / inter-chunk positions, none past chunk_size=3L/4; "
    "local_window=L/8",
    paper="https://arxiv.org/abs/2402.17463",
)
def dca(params: DCAParams) -> AttentionLayout:
    """Keys at j mod c; queries at i mod c (same chunk), min(i mod c + c, chunk_size) (previous chunk),
    min(2c - 1, chunk_size) (earlier chunks); c = chunk_size - local_window."""
    size, lw = params.chunk_size, params.local_window
    c = size - lw

    def in_chunk(p: torch.Tensor) -> torch.Tensor:
        return torch.remainder(p, c)

    def intra(i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # own chunk, plus the previous chunk for the first lw queries of a chunk: true distance either way
        start = c * (i // c)
        return torch.where(i % c < lw, start - c, start), i

    def successive(i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = c * (i // c)
        return torch.where(i % c < lw, i + 1, start - c), start - 1  # empty for the first lw queries

    def inter(i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full_like(i, FAR), c * (i // c) - c - 1

    branches = (
        Branch(name="intra", interval=intra),
        # min(i mod c + c, size) = size once i mod c >= lw
        Branch(name="successive", interval=successive, q_pos=constant(size), k_pos=in_chunk),
        Branch(name="inter", interval=inter, q_pos=constant(min(2 * c - 1, size)), k_pos=in_chunk),
    )
    return AttentionLayout(branches=branches, exact_below=min(size, 2 * c))
