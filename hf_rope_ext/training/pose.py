"""PoSE: positional skip-wise training (Zhu et al. 2023, https://arxiv.org/abs/2309.10400).

Train with short windows of ``window`` consecutive tokens whose position ids jump, so that over many samples the
positions cover the whole target length ``target`` while the attention cost stays that of the short window.

The window is cut into ``num_chunks`` chunks of random lengths l_0..l_{N-1} (sum = window). Chunk i keeps its tokens
contiguous and gets the positions ``start_i + u_i, ..., start_i + u_i + l_i - 1`` with ``start_i = l_0 + ... +
l_{i-1}`` and a skip bias ``u_0 = 0``, ``u_i ~ U{u_{i-1}, ..., target - window}``. So positions are strictly
increasing, start at 0 and end at most at ``target - 1``.

Position ids with gaps must go into the model together with an explicit attention mask: transformers reads gapped
position ids without a mask as several packed sequences and would cut attention at every jump.
"""

from __future__ import annotations

import torch


def pose_position_ids(
    window: int, target: int, *, num_chunks: int = 2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Position ids ``[window]`` (int64) for one training sample: ``num_chunks`` chunks with random skips.

    Args:
        window: tokens per training sample (the short length actually computed).
        target: the length the positions must cover (the extended context length); ``target > window``.
        num_chunks: how many chunks the window is cut into (the paper's default is 2).
        generator: source of randomness, for reproducible sampling.
    """
    if window < 1 or target <= window:
        raise ValueError(f"PoSE needs 1 <= window < target, got window={window}, target={target}")
    if not 1 <= num_chunks <= window:
        raise ValueError(f"num_chunks must be between 1 and the window length {window}, got {num_chunks}")
    # chunk boundaries: num_chunks - 1 distinct cut points in 1..window-1
    cuts = (torch.randperm(window - 1, generator=generator)[: num_chunks - 1] + 1).sort().values
    bounds = [0, *cuts.tolist(), window]
    max_skip = target - window
    positions = torch.empty(window, dtype=torch.long)
    skip = 0
    for i in range(num_chunks):
        start, end = bounds[i], bounds[i + 1]
        if i > 0:  # u_i uniform in {u_{i-1}, ..., target - window}
            skip = int(torch.randint(skip, max_skip + 1, (1,), generator=generator))
        positions[start:end] = torch.arange(start, end) + skip
    return positions


def pose_batch(
    batch_size: int, window: int, target: int, *, num_chunks: int = 2, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(position_ids [batch, window], attention_mask [batch, window])`` with independent skips per row.

    The mask is all ones: it is there so that transformers does not treat the jumps as sequence boundaries."""
    position_ids = torch.stack(
        [pose_position_ids(window, target, num_chunks=num_chunks, generator=generator) for _ in range(batch_size)]
    )
    return position_ids, torch.ones(batch_size, window, dtype=torch.long)
