"""Attention-level methods (rerope, leaky_rerope, self_extend, dca) and log-n scaling, against a naive reference.

The reference is written here from each method's relative-position formula: the model runs with its rotary
embedding replaced by the identity (cos = 1, sin = 0), so the attention function receives the raw q and k, and the
reference attention rotates each query by the relative position rel(i, j) of every pair directly -- O(n^2) rotations,
no re-rotation trick, nothing from hf_rope_ext.
"""

from __future__ import annotations

import math

import pytest
import torch
from .conftest import ORIGINAL_LEN, VOCAB, tiny_model
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from hf_rope_ext import families, patch_info, patch_model, unpatch_model

L = ORIGINAL_LEN  # 64

# method -> (params used in the tests, formula of rel(i, j) for j <= i, threshold below which nothing changes)
SETTINGS = {
    "rerope": dict(window=16),
    "leaky_rerope": dict(window=16, leak=4.0),
    "self_extend": dict(window=16, group_size=3),
    "dca": dict(chunk_size=40, local_window=8),
}


def rel_position(method: str, p: dict, i: int, j: int) -> float:
    """The relative position the method gives query i and key j (positions), from the papers / official code."""
    d = i - j
    if method == "rerope":
        return d if d < p["window"] else p["window"]
    if method == "leaky_rerope":
        w, k = p["window"], p["leak"]
        return d if d < w else w + (d - w) / k
    if method == "self_extend":
        w, g = p["window"], p["group_size"]
        return d if d < w else (i // g + w - w // g) - j // g
    if method == "dca":  # ChunkLlama: chunk_len = chunk_size - local_window; keys at j mod chunk_len
        size, lw = p["chunk_size"], p["local_window"]
        c = size - lw
        if i // c == j // c:
            q = i % c
        elif j // c == i // c - 1:
            q = min(i % c + c, size)
        else:
            q = min(2 * c - 1, size)
        return q - j % c
    if method is None:
        return d
    raise AssertionError(method)


def _rotate(x: torch.Tensor, angle: torch.Tensor, rot_dim: int) -> torch.Tensor:
    """HF rotate-half RoPE of the first rot_dim dims: x * cos + rotate_half(x) * sin, emb = cat(freqs, freqs)."""
    emb = torch.cat((angle, angle), dim=-1)
    xr, rest = x[..., :rot_dim].double(), x[..., rot_dim:].double()
    half = rot_dim // 2
    rotated = xr * emb.cos() + torch.cat((-xr[..., half:], xr[..., :half]), dim=-1) * emb.sin()
    return torch.cat((rotated, rest.expand(*rotated.shape[:-1], rest.shape[-1])), dim=-1)


class Reference:
    """Naive attention: every pair (i, j) scored with q rotated by rel(i, j), k unrotated."""

    def __init__(self, model, method: str | None, params: dict, logn: bool = False):
        self.method, self.params, self.logn = method, params, logn
        rotary = families.rotary_modules(model)[0]
        self.freqs = {name: buf.double() for name, buf in rotary.named_buffers() if name.endswith("inv_freq")}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
        config = module.config
        batch, heads, n, dim = query.shape
        groups = heads // key.shape[1]
        key = key.repeat_interleave(groups, dim=1).double()
        value = value.repeat_interleave(groups, dim=1).double()
        pos = kwargs["position_ids"].expand(batch, n)
        layer_types = getattr(config, "layer_types", None)
        layer_type = layer_types[module.layer_idx] if layer_types else None
        sliding = kwargs.get("sliding_window")
        nope = not getattr(module, "use_rope", True)
        method = None if (sliding or nope or (layer_type not in (None, "full_attention"))) else self.method
        inv = self.freqs.get(f"{layer_type}_inv_freq", self.freqs.get("inv_freq"))
        rot_dim = 2 * inv.numel()
        rel = torch.zeros(batch, n, n, dtype=torch.float64)
        for b in range(batch):
            for i in range(n):
                for j in range(i + 1):
                    rel[b, i, j] = rel_position(method, self.params, int(pos[b, i]), int(pos[b, j]))
        q = query.double()
        if self.logn and method is not None:
            q = q * (torch.log(pos.double() + 1) / math.log(L)).clamp(min=1)[:, None, :, None]
        if nope:
            rel.zero_()
        angles = rel[:, None, :, :, None] * inv  # [B, 1, n, n, rot/2]
        q_rot = _rotate(q[:, :, :, None, :], angles, rot_dim)  # [B, H, n, n, D]
        scores = (q_rot * key[:, :, None, :, :]).sum(-1) * scaling  # [B, H, n, n]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        idx = torch.arange(n)
        allowed = idx[None, :] <= idx[:, None]
        if sliding:
            allowed = allowed & (idx[:, None] - idx[None, :] < sliding)
        allowed = allowed[None, None] & self.pad[:, None, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out = probs @ value
        return out.to(query.dtype).transpose(1, 2).contiguous(), None


def reference_logits(model, method, params, ids, mask, positions, logn=False):
    ref = Reference(model, method, params, logn)
    ref.pad = mask.bool()
    AttentionInterface.register("hfre_test_reference", ref)
    AttentionMaskInterface.register("hfre_test_reference", eager_mask)
    previous = model.config._attn_implementation
    rotary = families.rotary_modules(model)[0]
    hook = rotary.register_forward_hook(lambda mod, args, out: (torch.ones_like(out[0]), torch.zeros_like(out[1])))
    try:
        model.set_attn_implementation("hfre_test_reference")
        with torch.no_grad():
            return model(ids, attention_mask=mask, position_ids=positions).logits
    finally:
        hook.remove()
        model.set_attn_implementation(previous)


def left_padded_batch(n: int, pad: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, n), generator=g)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@pytest.mark.parametrize("method", sorted(SETTINGS))
@pytest.mark.parametrize("n", [24, 100])
def test_matches_naive_reference_llama(method, n):
    """Logits equal the naive reference, batch 2 with left padding, below and above the window/chunk."""
    model = tiny_model("llama")
    ids, mask, positions = left_padded_batch(n)
    patch_model(model, method, factor=2, **SETTINGS[method])
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=positions).logits
    unpatch_model(model)
    want = reference_logits(model, method, SETTINGS[method], ids, mask, positions)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)


# model_type -> extra config overrides for the family sweep
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {},
    "gemma3_text": {},
    "phi3": {"partial_rotary_factor": 0.5},
    "gpt_neox": {},
    "smollm3": {},
}


def family_model(model_type: str):
    if model_type == "smollm3":
        from transformers import AutoModelForCausalLM, SmolLM3Config

        torch.manual_seed(0)
        config = SmolLM3Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=L, no_rope_layers=[1, 0], pad_token_id=0,
        )
        return AutoModelForCausalLM.from_config(config).eval()
    model = tiny_model(model_type, **FAMILIES[model_type])
    if model_type == "gemma2":
        model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.parametrize("method", ["self_extend", "dca"])
def test_matches_naive_reference_families(model_type, method):
    model = family_model(model_type)
    ids, mask, positions = left_padded_batch(90)
    patch_model(model, method, factor=2, **SETTINGS[method])
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=positions).logits
    unpatch_model(model)
    want = reference_logits(model, method, SETTINGS[method], ids, mask, positions)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
