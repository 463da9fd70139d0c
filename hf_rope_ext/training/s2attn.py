"""Shifted sparse attention (S²-Attn) from LongLoRA (Chen et al. 2023, https://arxiv.org/abs/2309.12307).

A training-time approximation of full causal attention at long lengths: the sequence of ``n`` tokens is cut into
groups of ``g = n * group_size_ratio`` tokens and attention runs inside each group only. Half of the heads see groups
shifted by ``g / 2``, so information flows between neighbouring groups. At inference the model uses full attention
again (the paper's point: the fine-tuned weights work with standard attention).

Unlike the reference implementation, which rolls the shifted half of the sequence around (so the first tokens land in
one group with the last ones and can see the future), this one pads the shifted half by ``g / 2`` on both sides and
masks the padding: no token ever attends to a later one.

Enabled through transformers' attention interface (``AttentionInterface.register``) under the name ``"s2attn"``; the
attention function receives already-rotated queries and keys, so it works for every rope method.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

S2ATTN = "s2attn"
"""The attention implementation name registered with transformers."""

S2ATTN_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
"""Model types whose attention calls transformers' attention interface with the Llama layout (q/k/v as
``[batch, heads, seq, head_dim]``, GQA via ``num_key_value_groups``, no softcap / sinks / bias) and that the tests
cover. Other families are refused rather than trained silently wrong."""

_RATIO_ATTR = "_hf_rope_ext_s2attn_ratio"
_PREVIOUS_ATTR = "_hf_rope_ext_s2attn_previous"


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, h_kv, n, d] -> [b, h_kv * n_rep, n, d] (each key/value head serves n_rep query heads)."""
    if n_rep == 1:
        return x
    b, h_kv, n, d = x.shape
    return x[:, :, None].expand(b, h_kv, n_rep, n, d).reshape(b, h_kv * n_rep, n, d)


def _grouped_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: int, mask: torch.Tensor | None, dropout: float, scale: Any
) -> torch.Tensor:
    """Causal attention inside consecutive groups of g tokens. q/k/v: [b, h, m*g, d] -> [b, h, m*g, d].

    ``mask``: optional [m, g, g] boolean mask (True = attend) used instead of plain causal."""
    b, h, n, _d = q.shape
    m = n // g

    def split(x: torch.Tensor) -> torch.Tensor:  # [b, h, m*g, d] -> [b*m, h, g, d]
        return x.view(b, h, m, g, x.shape[-1]).transpose(1, 2).reshape(b * m, h, g, x.shape[-1])

    attn_mask = None
    if mask is not None:  # [m, g, g] -> [b*m, 1, g, g]
        attn_mask = mask[None].expand(b, m, g, g).reshape(b * m, 1, g, g)
    out = F.scaled_dot_product_attention(
        split(q), split(k), split(v), attn_mask=attn_mask, dropout_p=dropout, is_causal=mask is None, scale=scale
    )  # [b*m, h, g, d_v]
    return out.view(b, m, h, g, -1).transpose(1, 2).reshape(b, h, n, -1)


def shifted_sparse_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function for ``AttentionInterface``: S²-Attn while training, full (sdpa) attention otherwise.

    query: [b, h, n, d]; key/value: [b, h_kv, n, d]. Returns ([b, n, h, d], None) like transformers' sdpa.
    Falls back to full attention in eval mode, with a KV cache (key longer than query), or when n is not a multiple of
    the group size. While training, padding masks are refused: S²-Attn here assumes packed, unpadded chunks.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _b, h, n, _d = query.shape
    ratio = getattr(module, _RATIO_ATTR, 0.25)
    g = int(n * ratio)
    if not module.training or key.shape[2] != n or g < 2 or g % 2 or n % g:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if attention_mask is not None:
        raise ValueError(
            "S²-Attn got a padding attention mask; it trains on packed, unpadded chunks only "
            "(pass no mask, or an all-ones mask, which transformers drops)"
        )
    n_rep = h // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    half, s = h // 2, g // 2

    # heads [0, half): plain groups [0, g), [g, 2g), ...
    out_plain = _grouped_causal(query[:, :half], key[:, :half], value[:, :half], g, None, dropout, scaling)

    # heads [half, h): groups shifted by s. Pad s tokens on both sides -> n + g tokens = m + 1 groups.
    def pad(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, s, s))

    m = n // g + 1
    idx = torch.arange(g, device=query.device)
    mask = (idx[:, None] >= idx[None, :]).expand(m, g, g).clone()  # causal inside each group
    mask[0, :, :s] = False  # nobody attends to the front padding ...
    mask[0, idx[:s], idx[:s]] = True  # ... except the padding queries themselves (their output is dropped; avoids NaN)
    out_shift = _grouped_causal(
        pad(query[:, half:]), pad(key[:, half:]), pad(value[:, half:]), g, mask, dropout, scaling
    )
    out_shift = out_shift[:, :, s : s + n]

    out = torch.cat([out_plain, out_shift], dim=1)  # [b, h, n, d_v]
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(S2ATTN, shifted_sparse_attention)
    AttentionMaskInterface.register(S2ATTN, sdpa_mask)  # without a mask function, padding masks would vanish


def check_s2attn_supported(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` is of a family S²-Attn is implemented and tested for."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in S2ATTN_MODEL_TYPES:
        raise ValueError(
            f"shifted sparse attention (s2attn) supports model types {', '.join(S2ATTN_MODEL_TYPES)}; "
            f"got {model_type!r}. Set s2attn: false (full attention) for this model."
        )


def enable_s2attn(model: nn.Module, group_size_ratio: float = 0.25) -> None:
    """Switch ``model`` (a transformers model, before peft/accelerate wrapping) to S²-Attn for training.

    ``group_size_ratio``: group size as a fraction of the training length (LongLoRA uses 1/4)."""
    check_s2attn_supported(model)
    if not 0 < group_size_ratio < 1:
        raise ValueError(f"s2attn group_size_ratio must be in (0, 1), got {group_size_ratio}")
    _register()
    previous = model.config._attn_implementation
    for module in model.modules():
        if hasattr(module, "num_key_value_groups"):
            setattr(module, _RATIO_ATTR, group_size_ratio)
    model.set_attn_implementation(S2ATTN)
    model.__dict__[_PREVIOUS_ATTR] = previous if previous != S2ATTN else "sdpa"


def disable_s2attn(model: nn.Module) -> None:
    """Restore the attention implementation used before ``enable_s2attn`` (call before saving)."""
    if model.config._attn_implementation != S2ATTN:
        return
    model.set_attn_implementation(model.__dict__.pop(_PREVIOUS_ATTR, "sdpa"))
    for module in model.modules():
        if hasattr(module, _RATIO_ATTR):
            delattr(module, _RATIO_ATTR)


def s2attn_group_size(seq_len: int, group_size_ratio: float) -> int:
    """The group size used for training sequences of ``seq_len`` tokens; raises when S²-Attn cannot split them."""
    g = int(seq_len * group_size_ratio)
    if g < 2 or g % 2 or seq_len % g:
        raise ValueError(
            f"s2attn needs the training length to be a multiple of an even group size; seq_len={seq_len} with "
            f"group_size_ratio={group_size_ratio} gives group size {g}. Pick a seq_len divisible by "
            f"{max(2, round(1 / group_size_ratio) * 2)}."
        )
    return g
