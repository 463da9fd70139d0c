"""Next-token loss over long sequences without ``[tokens, vocab]`` logits.

A causal LM's own ``forward(labels=...)`` builds logits for every position before the cross-entropy: at 16k tokens
and SmolLM2's 49k vocabulary that is 3.2 GB in fp32, plus as much again for the softmax's gradient — more than the
rest of a LoRA step. :func:`chunked_causal_lm_loss` runs the model with ``logits_to_keep=1`` (so its head sees one
position), takes the final hidden states from a forward hook on the base model, and applies the head and the
cross-entropy ``chunk`` positions at a time, each chunk under activation checkpointing, so at most one chunk's logits
exist in forward or backward. The value equals ``model(**batch, labels=labels).loss`` (mean over the non-ignored
shifted labels, transformers' ``ForCausalLMLoss`` without ``num_items_in_batch``); the test compares both, and their
gradients.

The same idea as Liger-Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy (Wijmans et al. 2024,
https://arxiv.org/abs/2411.09009), in plain PyTorch: no kernel, no new dependency.

Limits (the caller falls back to the model's own loss): parameter-sharded engines (FSDP, DeepSpeed ZeRO-3) gather
the head's weight only inside the model's forward, so the head cannot be applied outside it; models whose head
does more than a linear map and an optional final-logit soft-cap (``final_logit_softcapping``, Gemma 2) are not
supported — :func:`supports_chunked_loss` says which.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _inner(model: nn.Module) -> nn.Module:
    """The transformers model under accelerate's / torch's DDP wrapper and peft's wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DataParallel
        model = model.module
    get_base = getattr(model, "get_base_model", None)  # peft
    return get_base() if callable(get_base) else model


def _base_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    inner = _inner(model)
    prefix = getattr(inner, "base_model_prefix", None)
    base = getattr(inner, prefix, None) if prefix else None
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if base is None or base is inner or head is None:
        return None
    return base, head


def supports_chunked_loss(model: nn.Module) -> str | None:
    """None when :func:`chunked_causal_lm_loss` applies to ``model``, else the reason it does not."""
    inner = _inner(model)
    if _base_and_head(model) is None:
        return f"{type(inner).__name__} has no separable base model and output embeddings"
    config = getattr(inner, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(text_config, name, None) not in (None, 1, 1.0):
            return f"{type(inner).__name__}'s head scales its logits ({name}); the chunked loss does not"
    return None


@contextlib.contextmanager
def _captured_hidden(base: nn.Module) -> Iterator[list[torch.Tensor]]:
    store: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        store.append(hidden)

    handle = base.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def chunked_causal_lm_loss(
    model: nn.Module, labels: torch.Tensor, *, chunk: int = 2048, **inputs: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``labels`` [B, T] (``-100`` ignored; shifted by one inside, as transformers
    does) for ``model(**inputs)``, with the head applied ``chunk`` positions at a time under checkpointing.

    ``model`` may be wrapped by DDP and/or peft: the forward goes through the wrapper (DDP's gradient hooks see it).
    Raises ValueError where :func:`supports_chunked_loss` gives a reason."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 positions, got {chunk}")
    reason = supports_chunked_loss(model)
    if reason is not None:
        raise ValueError(f"chunked loss unavailable: {reason}")
    base, head = _base_and_head(model)
    config = _inner(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    with _captured_hidden(base) as store:
        # the head runs on one position only; its output is discarded (but kept in the graph under DDP: see below)
        out = model(**inputs, use_cache=False, logits_to_keep=1)
    if len(store) != 1:
        raise RuntimeError(f"expected one forward of {type(base).__name__}, saw {len(store)}")
    hidden = store[0]  # [B, T, H], after the final norm
    targets = labels[:, 1:].to(hidden.device)  # position t predicts token t + 1
    count = (targets != IGNORE_INDEX).sum()

    def nll_sum(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()  # [B, c, V]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    length = targets.shape[1]
    for a in range(0, length, chunk):
        b = min(a + chunk, length)
        total = total + checkpoint(nll_sum, hidden[:, a:b], targets[:, a:b], use_reentrant=False)
    # ``0 * out.logits.sum()`` keeps the one-position head output in the graph: DDP without find_unused_parameters
    # expects every parameter the forward touched to receive a gradient in the same backward
    return total / count.clamp(min=1) + 0.0 * out.logits.float().sum()
