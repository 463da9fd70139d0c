"""Perplexity on held-out chunks at one length: the before/after number of a fine-tune.

Each chunk is scored on its own (no sliding window), so every token sees at most ``seq_len - 1`` tokens of context
and the number is comparable between the model before and after training on exactly the same chunks. For the
sliding-window protocol of the papers use ``hf_rope_ext.eval`` where available.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import mask_for_mlm

logger = logging.getLogger(__name__)


@dataclass
class HeldOutResult:
    """Perplexity of a model on held-out chunks."""

    perplexity: float
    """exp(mean negative log-likelihood per scored token)."""
    nll: float
    """Mean negative log-likelihood per scored token (nats)."""
    tokens: int
    """Number of scored tokens."""
    chunks: int
    """Number of chunks."""
    length: int
    """Tokens per chunk."""
    objective: str
    """"causal" (next-token) or "masked" (15% masked tokens, fixed seed)."""


@torch.no_grad()
def heldout_perplexity(
    model: nn.Module,
    chunks: torch.Tensor,
    *,
    objective: str = "causal",
    batch_size: int = 1,
    mask_token_id: int | None = None,
    special_ids: list[int] | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    scored: int | None = None,
    device: torch.device | str | None = None,
    show_progress: bool = False,
    chunked_head: bool = True,
) -> HeldOutResult:
    """Perplexity of ``model`` on ``chunks`` ``[n, seq_len]`` (token ids).

    causal: every token after the first of each chunk is predicted from the ones before it.
    masked: BERT-style masking with a fixed seed, so two models are scored on the same masked positions.
    scored: only the first ``scored`` chunks count; the others are run and ignored (keeps the number of forward
    passes equal across processes, which sharded engines need).
    chunked_head: causal scoring through ``hf_rope_ext.eval``'s chunked LM head where available; False: one forward
    of the whole model (FSDP / DeepSpeed: their hooks gather the weights only when the root module is called).
    """
    if chunks.ndim != 2 or chunks.shape[0] == 0:
        raise ValueError(f"expected held-out chunks [n, seq_len] with n > 0, got shape {tuple(chunks.shape)}")
    was_training = model.training
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    if objective == "masked" and vocab_size is None:
        vocab_size = model.get_output_embeddings().weight.shape[0]
    scored = chunks.shape[0] if scored is None else scored
    generator = torch.Generator().manual_seed(seed)
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, chunks.shape[0], batch_size), desc="held-out ppl", disable=not show_progress):
        ids = chunks[start : start + batch_size]
        if objective == "masked":
            if mask_token_id is None:
                raise ValueError("masked perplexity needs mask_token_id")
            ids, labels = mask_for_mlm(
                ids,
                mask_token_id=mask_token_id,
                vocab_size=vocab_size,
                special_ids=special_ids or [],
                generator=generator,
            )
            logits = model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device)).logits.float()
            nll = F.cross_entropy(
                logits.transpose(1, 2), labels.to(device), ignore_index=-100, reduction="none"
            )  # [b, n]
            counted = labels.to(device) != -100
        else:
            nll = _causal_nll(model, ids.to(device), chunked_head)  # [b, n - 1]
            counted = torch.ones_like(nll, dtype=torch.bool)
        rows = torch.arange(start, start + ids.shape[0], device=nll.device) < scored  # [b]: chunks that count
        counted = counted & rows[:, None]
        total_nll += float(nll[counted].sum())
        total_tokens += int(counted.sum())
    model.train(was_training)
    mean = total_nll / max(total_tokens, 1)
    return HeldOutResult(
        math.exp(mean), mean, total_tokens, min(scored, int(chunks.shape[0])), int(chunks.shape[1]), objective
    )


def _causal_nll(model: nn.Module, ids: torch.Tensor, chunked_head: bool = True) -> torch.Tensor:
    """``[b, n - 1]`` negative log-likelihood of tokens 1..n-1. Uses ``hf_rope_ext.eval``'s chunked LM head when that
    module is present (no ``[b, n, vocab]`` logits at long lengths), else one plain forward."""
    try:
        from hf_rope_ext.eval.perplexity import token_nll
    except ImportError:
        token_nll = None
    if not chunked_head:
        token_nll = None
    if token_nll is not None:
        try:
            return token_nll(model, ids)[:, 1:].to(ids.device)  # position 0 is NaN (nothing predicts it)
        except (AttributeError, TypeError, ValueError) as err:  # a family the chunked head does not handle
            logger.warning(
                "chunked-head scoring failed for %s (%s); using one plain forward", type(model).__name__, err
            )
    logits = model(input_ids=ids, use_cache=False).logits.float()[:, :-1]  # [b, n - 1, vocab]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
