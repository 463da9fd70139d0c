"""The attention function behind the attention-level methods (and log-n scaling), registered with transformers'
``AttentionInterface`` under two names:

- ``"hf_rope_ext"``: everything the method does not change runs on transformers' ``sdpa`` attention (mask: ``sdpa_mask``);
- ``"hf_rope_ext_eager"``: the same on the model's own ``eager`` attention (mask: ``eager_mask``; Gemma-2 softcap).

The function is called by every attention layer after the rotary embedding and the cache update, with q rotated at
the query positions and k at the key positions. Per layer it reads the method from ``module.config.hf_rope_ext``
(so a reloaded model needs no set-up beyond ``attn_implementation``), and:

1. if the layer is not patched (sliding-window or NoPE layer), or every query lies below the method's window and
   inside the trained length, it calls the base attention unchanged -- bit-identical to the unpatched model;
2. otherwise it re-rotates q and k per branch by ``q_pos(i) - i`` and ``k_pos(j) - j`` (RoPE rotations compose;
   offsets computed in float64), computes each branch's scores only on the key range its interval can hold, merges
   them in one score map and takes one softmax -- query block by query block, so at most a
   [batch, heads, block, keys] float32 map exists at a time (``BLOCK_BYTES``), never [keys, keys] per head.

Key positions are not passed to attention functions: they are the query positions shifted by the cache index
(``key position = index - (query index - query position)``, per batch row), which holds for contiguous position
ids, left padding included.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .. import families, registry
from ..methods._attention_base import AttentionLayout
from ..methods._rope_base import default_inv_freq

NAMES: dict[str, str] = {"sdpa": "hf_rope_ext", "eager": "hf_rope_ext_eager"}
"""Base attention -> the name this module registers for it."""
BASES: dict[str, str] = {name: base for base, name in NAMES.items()}

BLOCK_BYTES = 256 * 2**20
"""Budget for one query block's float32 score map [batch, heads, block, keys]; the block size follows from it."""

_CACHE = "_hf_rope_ext_attention"  # on an attention module: (meta it was built from, LayerSettings)


@dataclass
class LayerSettings:
    """What the attention function does in one layer (built once per layer from ``config.hf_rope_ext``)."""

    active: bool
    """The method applies to this layer (False: sliding-window or NoPE layer, base attention unchanged)."""
    layout: AttentionLayout | None
    """The method's branches; None for a rotary method with log-n scaling only."""
    logn_length: int | None
    """L for log-n query scaling max(1, log(p + 1) / log(L)); None: no scaling."""
    inv_freq: torch.Tensor | None
    """float64 [rot_dim / 2] inverse frequencies of this layer's rotary encoding (for re-rotation)."""
    rot_dim: int


def layer_settings(module: nn.Module) -> LayerSettings | None:
    """The settings of ``module``'s layer, or None when its model is not patched with an attention-level method."""
    meta = getattr(module.config, "hf_rope_ext", None)
    cached = module.__dict__.get(_CACHE)
    if cached is not None and cached[0] is meta:
        return cached[1]
    settings = build_settings(module.config, module, meta)
    module.__dict__[_CACHE] = (meta, settings)
    return settings


def build_settings(config: Any, module: nn.Module, meta: dict[str, Any] | None) -> LayerSettings | None:
    if not meta or not meta.get("attention"):
        return None
    spec = registry.get_method(meta["method"])
    params = spec.make_params(
        factor=meta["factor"],
        original_max_position_embeddings=meta["original_max_position_embeddings"],
        **meta["parameters"],
    )
    logn = int(params.original_max_position_embeddings) if getattr(params, "logn", False) else None
    active, prefix, _ = families.attention_layer(config, module)
    if not active:
        return LayerSettings(active=False, layout=None, logn_length=None, inv_freq=None, rot_dim=0)
    if spec.kind != "attention":
        return LayerSettings(active=logn is not None, layout=None, logn_length=logn, inv_freq=None, rot_dim=0)
    rot_dim, base = families.rotary_geometry(config, prefix)
    inv_freq = default_inv_freq(rot_dim, base).double()  # the model's float32 frequencies, widened
    return LayerSettings(active=active, layout=spec.compute(params), logn_length=logn, inv_freq=inv_freq, rot_dim=rot_dim)


def _base_function(module: nn.Module, base: str):
    if base == "sdpa":
        return sdpa_attention_forward
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{type(module).__name__}'s modeling file has no eager_attention_forward; use sdpa")
    return eager


def _attention(module: nn.Module, query, key, value, attention_mask, *, _base: str, **kwargs: Any):
    settings = layer_settings(module)
    base_fn = _base_function(module, _base)
    if settings is None or not settings.active:
        return base_fn(module, query, key, value, attention_mask, **kwargs)
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    position_ids = kwargs.get("position_ids")
    q_index = torch.arange(kv_len - q_len, kv_len, device=query.device)  # cache index of each query
    if position_ids is None:
        q_pos = q_index.expand(batch, q_len)
    else:
        q_pos = position_ids.to(device=query.device, dtype=torch.long).expand(batch, q_len)
    last = int(q_pos.max())
    logn = settings.logn_length is not None and last + 1 > settings.logn_length
    if logn:
        query = query * logn_scale(q_pos, settings.logn_length).to(query.dtype)[:, None, :, None]
    if settings.layout is None or last < settings.layout.exact_below:
        return base_fn(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"layer {module.layer_idx} has a sliding window; attention-level methods need full attention")
    out = branched_attention(
        query,
        key,
        value,
        attention_mask,
        q_pos=q_pos,
        q_index=q_index,
        layout=settings.layout,
        inv_freq=settings.inv_freq,
        rot_dim=settings.rot_dim,
        scaling=kwargs.get("scaling") if kwargs.get("scaling") is not None else query.shape[-1] ** -0.5,
        softcap=kwargs.get("softcap"),
        dropout=float(kwargs.get("dropout") or 0.0) if module.training else 0.0,
    )
    return out.transpose(1, 2).contiguous(), None  # [B, q, H, D] like transformers' attention functions


def sdpa_attention(module: nn.Module, query, key, value, attention_mask, **kwargs: Any):
    """``AttentionInterface`` entry ``"hf_rope_ext"`` (base: sdpa)."""
    return _attention(module, query, key, value, attention_mask, _base="sdpa", **kwargs)


def eager_attention(module: nn.Module, query, key, value, attention_mask, **kwargs: Any):
    """``AttentionInterface`` entry ``"hf_rope_ext_eager"`` (base: the model's eager attention)."""
    return _attention(module, query, key, value, attention_mask, _base="eager", **kwargs)


def register() -> None:
    """Register both names with transformers (idempotent); done on ``import hf_rope_ext``."""
    AttentionInterface.register(NAMES["sdpa"], sdpa_attention)
    AttentionMaskInterface.register(NAMES["sdpa"], sdpa_mask)
    AttentionInterface.register(NAMES["eager"], eager_attention)
    AttentionMaskInterface.register(NAMES["eager"], eager_mask)


# --------------------------------------------------------------------------------------------------------------------
# the math


def logn_scale(positions: torch.Tensor, length: int) -> torch.Tensor:
    """max(1, log(p + 1) / log(L)) per position (Su 2023; Qwen-7B ``logn_attn``). float32, shape of ``positions``."""
    return (torch.log(positions.double() + 1) / math.log(length)).clamp(min=1.0).float()


def rerotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, rot_dim: int) -> torch.Tensor:
    """Rotate the first ``rot_dim`` dims of ``x`` [B, H, n, D] (rotate-half layout) by ``delta`` [B, n] positions.

    RoPE at position p multiplies each pair (x_k, x_{k+d/2}) by the rotation of angle p * theta_k, so rotating an
    already-rotated vector by delta gives the vector at p + delta. Angles in float64, product in float32."""
    angles = delta.double()[:, None, :, None] * inv_freq.to(delta.device)  # [B, 1, n, rot/2]
    cos, sin = angles.cos().float(), angles.sin().float()
    half = rot_dim // 2
    x1, x2 = x[..., :half].float(), x[..., half:rot_dim].float()
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return torch.cat((rotated, x[..., rot_dim:]), dim=-1) if rot_dim < x.shape[-1] else rotated


def _row_offsets(q_pos: torch.Tensor, q_index: torch.Tensor) -> torch.Tensor:
    """Per batch row: cache index - position, read at the row's largest position (a real token with left or right
    padding). [B] int64."""
    at = q_pos.argmax(dim=1)  # [B]
    return q_index[at] - q_pos.gather(1, at[:, None])[:, 0]


def branched_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    q_pos: torch.Tensor,
    q_index: torch.Tensor,
    layout: AttentionLayout,
    inv_freq: torch.Tensor,
    rot_dim: int,
    scaling: float,
    softcap: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Causal attention where each branch of ``layout`` scores its own key interval with its own positions.

    query [B, H, q, D], key / value [B, Hk, k, D] (H a multiple of Hk), attention_mask None (causal by index),
    bool [B, 1, q, k] (True = attend) or additive float [B, 1, q, k]; q_pos [B, q] int64 positions of the queries,
    q_index [q] their cache indices. Returns [B, H, q, D]."""
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    offsets = _row_offsets(q_pos, q_index)  # [B]
    k_pos = torch.arange(kv_len, device=key.device)[None, :] - offsets[:, None]  # [B, k] int64
    q_pos_f, k_pos_f = q_pos.double(), k_pos.double()

    rotated_q, rotated_k, keys_for = [], [], {}
    for branch in layout.branches:
        rotated_q.append(
            query if branch.q_pos is None else rerotate(query, branch.q_pos(q_pos_f) - q_pos_f, inv_freq, rot_dim)
        )
        if branch.k_pos not in keys_for:  # branches sharing a key map share the rotated keys
            keys_for[branch.k_pos] = (
                key if branch.k_pos is None else rerotate(key, branch.k_pos(k_pos_f) - k_pos_f, inv_freq, rot_dim)
            )
        rotated_k.append(keys_for[branch.k_pos])

    block = max(1, min(q_len, BLOCK_BYTES // max(1, batch * heads * kv_len * 4)))
    low = torch.finfo(torch.float32).min
    lo_off, hi_off = int(offsets.min()), int(offsets.max())
    outputs = []
    for start in range(0, q_len, block):
        stop = min(q_len, start + block)
        n = stop - start
        end = int(q_index[stop - 1]) + 1  # causal: no key past the block's last query
        qp = q_pos[:, start:stop]  # [B, n]
        scores = torch.full((batch, kv_heads, groups, n, end), low, dtype=torch.float32, device=query.device)
        for branch, qb, kb in zip(layout.branches, rotated_q, rotated_k):
            lo, hi = branch.interval(qp)  # [B, n] inclusive key positions
            first = max(0, int(lo.min().clamp(min=-(2**40))) + lo_off)
            last = min(end - 1, int(hi.max()) + hi_off)
            if last < first:
                continue
            q_blk = qb[:, :, start:stop].reshape(batch, kv_heads, groups * n, dim)
            s = torch.matmul(q_blk, kb[:, :, first : last + 1].transpose(-1, -2)).float()  # [B, Hk, G*n, span]
            s = s.view(batch, kv_heads, groups, n, last + 1 - first).mul_(scaling)
            if softcap is not None:
                s = torch.tanh(s / softcap).mul_(softcap)
            kp = k_pos[:, None, first : last + 1]  # [B, 1, span]
            inside = (kp >= lo[:, :, None]) & (kp <= hi[:, :, None])  # [B, n, span]
            window = scores[..., first : last + 1]
            window.copy_(torch.where(inside[:, None, None], s, window))
        if attention_mask is not None:
            mask = attention_mask[:, :, start:stop, :end]  # [B, 1, n, end]
            if mask.dtype == torch.bool:
                scores.masked_fill_(~mask[:, :, None], low)
            else:
                scores.add_(mask[:, :, None].float()).clamp_(min=low)
        probs = torch.softmax(scores, dim=-1)
        if dropout:
            probs = nn.functional.dropout(probs, p=dropout, training=True)
        probs = probs.to(value.dtype).view(batch, kv_heads, groups * n, end)
        out = torch.matmul(probs, value[:, :, :end])  # [B, Hk, G*n, D]
        outputs.append(out.view(batch, heads, n, value.shape[-1]))
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
