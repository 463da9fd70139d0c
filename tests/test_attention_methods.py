"""Attention-level methods (rerope, leaky_rerope, self_extend, dca) and log-n scaling, against a naive reference.

The reference is written here from each method's relative-position formula: the model runs with its rotary
embedding replaced by the identity (cos = 1, sin = 0), so the attention function receives the raw q and k, and the
reference attention rotates each query by the relative position rel(i, j) of every pair directly -- O(n^2) rotations,
no re-rotation trick, nothing from hf_rope_ext.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from hf_rope_ext import families, patch_info, patch_model, unpatch_model

from .conftest import ORIGINAL_LEN, VOCAB, tiny_model

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


def assert_matches_reference(model, method: str, n: int, logn: bool = False) -> None:
    """Patched logits equal the naive reference on a left-padded batch of 2 (real tokens compared)."""
    ids, mask, positions = left_padded_batch(n)
    patch_model(model, method, factor=2, logn=logn, **SETTINGS[method])
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=positions).logits
    unpatch_model(model)
    want = reference_logits(model, method, SETTINGS[method], ids, mask, positions, logn=logn)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", sorted(SETTINGS))
@pytest.mark.parametrize("n", [24, 100])
def test_matches_naive_reference_llama(method, n):
    """Logits equal the naive reference, batch 2 with left padding, below and above the window/chunk."""
    assert_matches_reference(tiny_model("llama"), method, n)


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
    assert_matches_reference(family_model(model_type), method, 90)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_long_unpadded_input_matches_reference(method, monkeypatch):
    """No padding: the fused path (full / causal / masked pieces per query block, merged by log-sum-exp) is used.
    Small query blocks make every kind of piece occur at this length."""
    from hf_rope_ext.backends import attention_kernel

    monkeypatch.setattr(attention_kernel, "QUERY_BLOCK", 8)
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (1, 120), generator=g)
    mask = torch.ones_like(ids)
    positions = torch.arange(120)[None]
    patch_model(model, method, factor=2, **SETTINGS[method])
    with torch.no_grad():
        got = model(ids).logits
    unpatch_model(model)
    want = reference_logits(model, method, SETTINGS[method], ids, mask, positions)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_below_the_window_identical_to_the_unpatched_model(method):
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2, 16))  # every window/chunk in SETTINGS is >= 16
    with torch.no_grad():
        before = model(ids).logits
        patch_model(model, method, factor=2, **SETTINGS[method])
        during = model(ids).logits
        # and with a window as long as the input
        unpatch_model(model)
        after = model(ids).logits
    assert torch.equal(before, during)
    assert torch.equal(before, after)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_unpatch_restores_the_original_model_exactly(method):
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 100))
    with torch.no_grad():
        before = model(ids).logits
        patch_model(model, method, factor=2, **SETTINGS[method])
        changed = model(ids).logits
        assert model.config._attn_implementation == "hf_rope_ext"
        unpatch_model(model)
        after = model(ids).logits
    assert not torch.allclose(before, changed)
    assert torch.equal(before, after)
    assert model.config._attn_implementation == "sdpa"
    assert "attn_implementation" not in model.config.to_dict()
    assert patch_info(model) is None


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_cached_generation_across_the_window_equals_an_uncached_forward(method):
    model = tiny_model("llama")
    patch_model(model, method, factor=2, **SETTINGS[method])
    prompt = torch.randint(3, VOCAB, (1, 10))  # below every window; generation crosses windows and L = 64
    new = 90
    out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    steps = torch.stack(out.logits, dim=1)[0]  # [new, vocab]
    with torch.no_grad():
        full = model(out.sequences[:, :-1]).logits[0, prompt.shape[1] - 1 :]
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


def test_batched_left_padded_generation_equals_single_rows():
    model = tiny_model("llama")
    patch_model(model, "self_extend", factor=2, **SETTINGS["self_extend"])
    long_row = torch.randint(3, VOCAB, (1, 70))
    short_row = torch.randint(3, VOCAB, (1, 60))
    batch = torch.cat([long_row, torch.cat([torch.zeros(1, 10, dtype=torch.long), short_row], 1)])
    mask = torch.ones_like(batch)
    mask[1, :10] = 0
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    together = model.generate(batch, attention_mask=mask, **kw)
    for row, single in ((0, long_row), (1, short_row)):
        alone = model.generate(single, **kw)
        assert torch.equal(together.sequences[row, -12:], alone.sequences[0, -12:])
        torch.testing.assert_close(torch.stack(together.logits, 1)[row], torch.stack(alone.logits, 1)[0],
                                   rtol=1e-4, atol=1e-4)


def test_bf16_close_to_fp32():
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 100))
    patch_model(model, "dca", factor=2, **SETTINGS["dca"])
    with torch.no_grad():
        fp32 = model(ids).logits
        model.to(torch.bfloat16)
        bf16 = model(ids).logits.float()
    assert torch.isfinite(bf16).all()
    assert (bf16 - fp32).abs().max() < 0.1 * fp32.abs().max()


def test_logn_on_a_rotary_method_matches_reference():
    """yarn with logn: every query at position p >= L scaled by log(p + 1) / log(L), the frequencies yarn's."""
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 100))
    with torch.no_grad():
        patch_model(model, "yarn", factor=2)
        plain = model(ids).logits
        patch_model(model, "yarn", factor=2, logn=True, repatch=True)
        got = model(ids).logits
        # reference: scale the queries by hand with a pre-hook on every q_proj output
        unpatch_model(model)
        patch_model(model, "yarn", factor=2)
        scale = (torch.log(torch.arange(100, dtype=torch.float64) + 1) / math.log(L)).clamp(min=1).float()
        hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, a, out: out * scale[None, :, None])
                 for layer in model.model.layers]
        want = model(ids).logits
        for h in hooks:
            h.remove()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got[:, :L], plain[:, :L])  # inside the trained length: no scaling at all
    assert not torch.allclose(got[:, L:], plain[:, L:])


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_logn_on_attention_methods_matches_reference(method):
    assert_matches_reference(tiny_model("llama"), method, 100, logn=True)


@pytest.mark.parametrize("model_type", ["llama", "phi3"])  # phi3: its config class accepts only default/longrope
def test_save_and_reload_with_and_without_the_plugin(tmp_path, model_type):
    from .utils import run_python

    model = family_model(model_type)
    ids = torch.randint(3, VOCAB, (1, 100))
    patch_model(model, "dca", factor=2, **SETTINGS["dca"])
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "m")
    torch.save(ids, tmp_path / "ids.pt")
    code = f"""
import torch, hf_rope_ext
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "m")!r}).eval()
assert m.config._attn_implementation == "hf_rope_ext", m.config._attn_implementation
with torch.no_grad():
    torch.save(m(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
print(hf_rope_ext.patch_info(m)["method"])
hf_rope_ext.unpatch_model(m)
assert m.config._attn_implementation == "sdpa"
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("dca")
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want, atol=1e-5, rtol=1e-5)
    # without the plugin: a clear failure, not a silently different model
    proc = run_python(f"from transformers import AutoModelForCausalLM\n"
                      f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})")
    assert proc.returncode != 0
    assert "hf_rope_ext" in proc.stderr


@pytest.mark.parametrize(
    "method, params, message",
    [
        ("rerope", dict(window=64), "window must be >= 1 and < 64"),
        ("leaky_rerope", dict(window=16, leak=1.0), "leak must be > 1"),
        ("leaky_rerope", dict(window=16, leak=float("inf")), "leak must be a finite number"),
        ("self_extend", dict(group_size=0), "group_size must be >= 1"),
        ("self_extend", dict(group_size=1, window=16), "reaches (L - W) * G + W = (64 - 16) * 1 + 16 = 64"),
        ("self_extend", dict(window=100), "window must be >= 1 and < 64"),
        ("dca", dict(chunk_size=65), "it may not exceed the original length 64"),
        ("dca", dict(chunk_size=40, local_window=40), "local_window must be >= 0 and < 40"),
        ("rerope", dict(window="16"), "window must be an int"),
        ("dca", dict(logn="yes"), "logn must be True or False"),
        ("yarn", dict(logn=1), "logn must be True or False"),
        ("rerope", dict(attn_implementation="flash_attention_2"), "choose one of: sdpa, eager"),
        ("yarn", dict(attn_implementation="eager"), "attn_implementation applies only"),
    ],
)
def test_bad_input_is_refused_before_any_change(method, params, message):
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 80))
    with torch.no_grad():
        before = model(ids).logits
    config_before = model.config.to_dict()
    with pytest.raises(ValueError) as err:
        patch_model(model, method, factor=2, **params)
    assert message in str(err.value)
    assert model.config.to_dict() == config_before
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_unsupported_family_and_sliding_window_models_are_refused_by_name():
    model = tiny_model("olmo")
    with pytest.raises(ValueError, match="not supported for 'olmo' yet; attention-level methods .* verified for: llama"):
        patch_model(model, "dca", factor=2)
    assert patch_info(model) is None
    mistral = tiny_model("mistral", sliding_window=32)
    with pytest.raises(ValueError, match="sliding window of 32 tokens"):
        patch_model(mistral, "self_extend", factor=2)
    assert mistral.config._attn_implementation == "sdpa"
    gemma2 = tiny_model("gemma2")
    gemma2.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        patch_model(gemma2, "dca", factor=2, attn_implementation="sdpa")


def test_attention_method_config_keeps_the_trained_rope_under_a_plugin_name():
    model = tiny_model("llama")
    original = model.config.to_dict()
    patch_model(model, "rerope", factor=4)
    config = model.config.to_dict()
    rope = dict(config["rope_parameters"])
    assert rope.pop("rope_type") == "hf_rope_ext_attention (requires: import hf_rope_ext)"
    assert rope == {k: v for k, v in original["rope_parameters"].items() if k != "rope_type"}
    assert config["max_position_embeddings"] == L
    assert config["attn_implementation"] == "hf_rope_ext"
    info = patch_info(model)
    assert info["max_position_embeddings"] == 4 * L and info["kind"] == "attention"
    assert info["parameters"]["window"] == L // 4  # the default, resolved and recorded
    unpatch_model(model)
    assert model.config.to_dict() == original


def test_reload_then_save_again_stays_extended(tmp_path):
    """transformers does not carry attn_implementation through a load and a save; the plugin rope type puts it back."""
    from .utils import run_python

    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 100))
    patch_model(model, "rerope", factor=2, window=16)
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "a")
    torch.save(ids, tmp_path / "ids.pt")
    code = f"""
import torch, hf_rope_ext
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained({str(tmp_path / "a")!r}).save_pretrained({str(tmp_path / "b")!r})
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "b")!r}).eval()
with torch.no_grad():
    torch.save(m(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want, atol=1e-5, rtol=1e-5)


def test_training_takes_the_differentiable_path_and_agrees_with_inference():
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 100))
    patch_model(model, "self_extend", factor=2, **SETTINGS["self_extend"])
    with torch.no_grad():
        fused = model(ids).logits
    out = model(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.logits, fused, atol=1e-4, rtol=1e-4)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_compare_and_eval_accept_attention_methods_and_logn(tokenizer):
    from hf_rope_ext.eval.compare import compare_methods
    from hf_rope_ext.eval.text import Text

    model = tiny_model("llama")
    text = Text.from_string(" ".join(f"w{3 + (i * 7) % 120}" for i in range(400)))
    report = compare_methods(model, tokenizer, ["none", "dca", "yarn"], [128], factor=2,
                             method_params={"dca": SETTINGS["dca"], "yarn": {"logn": True}}, text=text, progress=False)
    by = {run.method: run.perplexity.results[0].perplexity for run in report.runs}
    assert set(by) == {"none", "dca", "yarn"} and all(math.isfinite(v) for v in by.values())
    assert by["dca"] != by["none"]
    assert patch_info(model) is None and model.config._attn_implementation == "sdpa"



def test_cli_patch_with_an_attention_method_then_eval_reloads_it(tmp_path, tokenizer):
    import json

    from .utils import run_python

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    code = (
        f"import sys; from hf_rope_ext.cli import main; sys.exit(main(['patch', {str(tmp_path / 'base')!r}, "
        "'--method', 'self_extend', '--factor', '2', '--param', 'group_size=3', '--param', 'window=16', "
        f"'--param', 'logn=true', '--attn-implementation', 'eager', '--out', {str(tmp_path / 'out')!r}]))"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["attn_implementation"] == "hf_rope_ext_eager"
    assert config["hf_rope_ext"]["parameters"] == {"logn": True, "group_size": 3, "window": 16}
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_max_length"] == 2 * L
    check = (
        "import torch; from hf_rope_ext.loading import load_model\n"
        f"m, tok = load_model({str(tmp_path / 'out')!r})\n"
        "assert m.config._attn_implementation == 'hf_rope_ext_eager', m.config._attn_implementation\n"
        "print(tok.model_max_length)\n"
    )
    proc = run_python(check)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith(str(2 * L))


@pytest.mark.slow
@pytest.mark.parametrize("method, params", [("self_extend", dict(window=16, group_size=16)),
                                            ("dca", dict(chunk_size=40, local_window=8)), ("rerope", dict(window=16))])
def test_long_sequence_with_default_query_blocks_matches_reference(method, params):
    """700 tokens, the default 512-query blocks (two blocks, every piece kind at full size), against the naive
    reference; prints the largest difference (RESULTS.md §5 quotes it)."""
    model = tiny_model("llama")
    n = 700
    ids = torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(0))
    patch_model(model, method, max_position_embeddings=768, **params)
    with torch.no_grad():
        got = model(ids).logits
    unpatch_model(model)
    want = reference_logits(model, method, params, ids, torch.ones_like(ids), torch.arange(n)[None])
    print(f"{method}: max |logit difference| {float((got - want).abs().max()):.2e}")
    torch.testing.assert_close(got, want, atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_patch_info_says_transformers4_cannot_express_it(method):
    """The attention methods' rope type exists only with the plugin: patch_info says transformers 4 cannot build it,
    and config.json names the type in rope_scaling (what 4.x reads), so 4.x refuses it (tests/test_serving.py loads
    one in a real 4.57) instead of building plain RoPE."""
    model = tiny_model("llama")
    patch_model(model, method, factor=2, **SETTINGS[method])
    legacy = patch_info(model)["transformers4"]
    assert legacy["expressed"] is False and legacy["refused"] is True
    assert "does not exist in transformers 4" in legacy["reason"] and "refuses" in legacy["reason"]
    config = json.loads(model.config.to_json_string())
    rope_type = config["rope_parameters"]["rope_type"]
    assert config["rope_scaling"]["rope_type"] == config["rope_scaling"]["type"] == rope_type
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
