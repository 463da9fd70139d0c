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

QUERY_BLOCK = 512
"""Queries per block on the fused CPU path: each branch's part of a block splits into key columns inside every row's
interval (no mask: the fused kernel at full speed) and the few edge columns around the interval's ends (masked)."""

_CACHE = "_hf_rope_ext_attention"  # on an attention module: (meta it was built from, LayerSettings)
_KEYS = "_hf_rope_ext_rotated_keys"  # on an attention module while generating: re-rotated keys per key map


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
    if not kwargs.get("use_cache"):
        module.__dict__.pop(_KEYS, None)  # a forward without a cache: nothing to keep for the next step
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
        key_store=module.__dict__.setdefault(_KEYS, {}) if kwargs.get("use_cache") else None,
    )
    return out, None


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


def _rotated_keys(key, k_pos_f, fn, inv_freq, rot_dim, store: dict | None, past: int):
    """``key`` re-rotated to the positions ``fn`` gives. With ``store`` (a layer's cache of rotated keys, kept while
    generating), the keys before index ``past`` are reused when they are the ones rotated last time (same count,
    same last raw key row), so a decoding step rotates only its new keys."""
    entry = store.get(fn) if store is not None else None
    if (
        entry is not None
        and past > 0
        and entry["n"] == past
        and entry["rot"].shape[0] == key.shape[0]
        and torch.equal(entry["last"], key[:, :, past - 1])
        and torch.equal(entry["last_pos"], k_pos_f[:, past - 1])
    ):
        new = rerotate(key[:, :, past:], fn(k_pos_f[:, past:]) - k_pos_f[:, past:], inv_freq, rot_dim)
        rot = torch.cat((entry["rot"], new), dim=2)
    else:
        rot = rerotate(key, fn(k_pos_f) - k_pos_f, inv_freq, rot_dim)
    if store is not None:
        store[fn] = {"n": key.shape[2], "last": key[:, :, -1].clone(), "last_pos": k_pos_f[:, -1].clone(), "rot": rot}
    return rot


def _rotated_branches(query, key, q_pos, k_pos, layout, inv_freq, rot_dim, key_store=None, past=0):
    """Per branch: (branch, q rotated to its query positions, k rotated to its key positions)."""
    q_pos_f, k_pos_f = q_pos.double(), k_pos.double()
    out, keys_for = [], {}
    for branch in layout.branches:
        qb = query if branch.q_pos is None else rerotate(query, branch.q_pos(q_pos_f) - q_pos_f, inv_freq, rot_dim)
        if branch.k_pos not in keys_for:  # branches sharing a key map share the rotated keys
            keys_for[branch.k_pos] = (
                key
                if branch.k_pos is None
                else _rotated_keys(key, k_pos_f, branch.k_pos, inv_freq, rot_dim, key_store, past)
            )
        out.append((branch, qb, keys_for[branch.k_pos]))
    return out


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
    key_store: dict | None = None,
) -> torch.Tensor:
    """Causal attention where each branch of ``layout`` scores its own key interval with its own positions.

    query [B, H, q, D], key / value [B, Hk, k, D] (H a multiple of Hk), attention_mask None (causal by index),
    bool [B, 1, q, k] (True = attend) or additive float [B, 1, q, k]; q_pos [B, q] int64 positions of the queries,
    q_index [q] their cache indices. Returns [B, q, H, D] (the layout transformers' attention functions return).

    On CPU without softcap, dropout or gradients, each branch's part of a query block goes through torch's fused CPU
    flash kernel, which also returns the log-sum-exp, and the parts are merged exactly by log-sum-exp; otherwise the
    branches' scores are merged into one explicit score map per block (differentiable)."""
    offsets = _row_offsets(q_pos, q_index)  # [B]
    k_pos = torch.arange(key.shape[2], device=key.device)[None, :] - offsets[:, None]  # [B, k] int64
    past = key.shape[2] - query.shape[2]  # keys already in the cache before this call
    branches = _rotated_branches(query, key, q_pos, k_pos, layout, inv_freq, rot_dim, key_store, past)
    fused = (
        query.device.type == "cpu"
        and softcap is None
        and not dropout
        and query.dtype in (torch.float32, torch.bfloat16)
        and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
    )  # the fused kernel's log-sum-exp carries no gradient: training takes the explicit-scores path
    run = _merged_by_lse if fused else _merged_scores
    return run(query, value, attention_mask, branches, q_pos, q_index, k_pos, offsets, scaling, softcap, dropout)


def _key_range(branch, qp, lo_off, hi_off, end):
    """Inclusive key-index range a branch can touch for query positions ``qp`` [B, n], and its intervals."""
    lo, hi = branch.interval(qp)  # [B, n] inclusive key positions
    first = max(0, int(lo.min().clamp(min=-(2**40))) + lo_off)
    last = min(end - 1, int(hi.max()) + hi_off)
    return lo, hi, first, last


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hk, n, D] -> [B, Hk * groups, n, D], head h reading kv head h // groups (as transformers' repeat_kv)."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def _pieces(qp, lo, hi, first, last, offset, n, simple):
    """Split a branch's key columns [first, last] for one query block into pieces: "full" (inside every row's
    interval: no mask), "causal" (row t reaches exactly column a + t: hi(i) = i - d), "mask" (the rest).

    ``simple``: every row has the same index offset and no padding mask, so intervals map to columns uniformly."""
    if not simple:
        return [(first, last, "mask")]
    inner_lo = max(first, int(lo.max()) + offset)
    inner_hi = min(last, int(hi.min()) + offset)
    gap = qp - hi  # [1, n]: constant d when the upper end follows the queries (hi = i - d)
    p0 = int(qp[0, 0])
    if bool((gap == gap[0, 0]).all()) and bool((qp[0] == torch.arange(p0, p0 + n, device=qp.device)).all()):
        a = p0 - int(gap[0, 0]) + offset  # column of the first row's last key
        if a >= 0 and a + n - 1 == last and inner_lo <= a:
            return [(first, inner_lo - 1, "mask"), (inner_lo, a - 1, "full"), (a, last, "causal")]
    if inner_lo > inner_hi:
        return [(first, last, "mask")]
    return [(first, inner_lo - 1, "mask"), (inner_lo, inner_hi, "full"), (inner_hi + 1, last, "mask")]


def _merged_by_lse(query, value, attention_mask, branches, q_pos, q_index, k_pos, offsets, scaling, softcap, dropout):
    """Fused CPU path. Rows of a block are laid out (query, group) so that one kv head serves its G query heads
    without copying keys: q [B, Hk, n*G, D] against k [B, Hk, span, D]. Returns [B, q, H, D]."""
    batch, heads, q_len, dim = query.shape
    kv_heads = value.shape[1]
    groups = heads // kv_heads
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    lo_off, hi_off = int(offsets.min()), int(offsets.max())
    even = lo_off == hi_off  # no padding offsets: intervals in index space are the same for every row
    grouped = [qb.view(batch, kv_heads, groups, q_len, dim).transpose(2, 3).contiguous() for _, qb, _ in branches]
    outputs = []
    for start in range(0, q_len, QUERY_BLOCK):
        stop = min(q_len, start + QUERY_BLOCK)
        n = stop - start
        rows = n * groups
        end = int(q_index[stop - 1]) + 1  # causal: no key past the block's last query
        qp = q_pos[:, start:stop]  # [B, n]
        pad = None if attention_mask is None else attention_mask[:, 0, start:stop, :end]  # [B, n, end]
        if pad is not None and pad.dtype != torch.bool:
            pad = pad > torch.finfo(pad.dtype).min / 2
        parts, lses = [], []  # per piece: output [B, Hk, rows, D], log-sum-exp [B, Hk, rows]
        for (branch, qb, kb), qg in zip(branches, grouped):
            lo, hi, first, last = _key_range(branch, qp, lo_off, hi_off, end)
            if last < first:
                continue
            q_blk = qg[:, :, start:stop].view(batch, kv_heads, rows, dim)
            for a, b, kind in _pieces(qp, lo, hi, first, last, lo_off, n, simple=even and pad is None):
                if b < a:
                    continue
                empty = None
                if kind == "causal":  # row t attends key columns a .. a + t: the fused kernel's own causal mode
                    o, l = flash(
                        qb[:, :, start:stop],
                        _repeat_heads(kb[:, :, a : b + 1], groups),
                        _repeat_heads(value[:, :, a : b + 1], groups),
                        0.0,
                        True,
                        scale=scaling,
                    )  # [B, H, n, D], [B, H, n] -> (query, group) rows
                    o = o.view(batch, kv_heads, groups, n, -1).transpose(2, 3).reshape(batch, kv_heads, rows, -1)
                    l = l.view(batch, kv_heads, groups, n).transpose(2, 3).reshape(batch, kv_heads, rows)
                else:
                    mask = None
                    if kind == "mask":
                        kp = k_pos[:, None, a : b + 1]  # [B, 1, span]
                        allowed = (kp >= lo[:, :, None]) & (kp <= hi[:, :, None])  # [B, n, span]
                        if pad is not None:
                            allowed &= pad[:, :, a : b + 1]
                        empty = ~allowed.any(dim=-1)  # [B, n]: rows with nothing to attend in this piece
                        if bool(empty.all()):
                            continue
                        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
                        mask.masked_fill_(~allowed, float("-inf"))
                        mask = mask[:, None, :, None].expand(batch, 1, n, groups, b + 1 - a).reshape(batch, 1, rows, -1)
                    o, l = flash(q_blk, kb[:, :, a : b + 1], value[:, :, a : b + 1], 0.0, False, attn_mask=mask,
                                 scale=scaling)
                if empty is not None and bool(empty.any()):  # the kernel reports 0 there, not -inf
                    l = l.masked_fill(empty[:, None, :, None].expand(batch, 1, n, groups).reshape(batch, 1, rows),
                                      float("-inf"))
                parts.append(o)
                lses.append(l)
        if not parts:  # no key at all (fully padded rows)
            out = torch.zeros(batch, kv_heads, rows, value.shape[-1], dtype=value.dtype, device=query.device)
        elif len(parts) == 1:
            out = parts[0]
        else:
            stacked = torch.stack(lses)  # [P, B, Hk, rows]
            total = torch.logsumexp(stacked, dim=0)  # -inf only for rows with no key in any piece
            weights = torch.exp(stacked - total).nan_to_num_(0.0)  # [P, B, Hk, rows]
            out = sum(w[..., None] * o.float() for w, o in zip(weights, parts))
        outputs.append(out.to(value.dtype).view(batch, kv_heads, n, groups, -1))
    out = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]  # [B, Hk, q, G, D]
    return out.permute(0, 2, 1, 3, 4).reshape(batch, q_len, heads, -1)


def _merged_scores(query, value, attention_mask, branches, q_pos, q_index, k_pos, offsets, scaling, softcap, dropout):
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = value.shape[1], value.shape[2]
    groups = heads // kv_heads
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
        for branch, qb, kb in branches:
            lo, hi, first, last = _key_range(branch, qp, lo_off, hi_off, end)
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
    out = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    return out.transpose(1, 2).contiguous()  # [B, q, H, D]
