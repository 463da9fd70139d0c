"""patch_model on every rotary family x every method: forward past the original length, save, reload in a fresh
process WITHOUT the plugin (identical logits), unpatch restores the original exactly."""

from __future__ import annotations

import json

import pytest
import torch

import hf_rope_ext
from hf_rope_ext import families, patch_info, patch_model, unpatch_model
from hf_rope_ext.registry import method_names

from .conftest import ORIGINAL_LEN, ROPE_FAMILY_CONFIGS, VOCAB, tiny_model
from .utils import assert_unchanged, reload_logits_many, run_python, snapshot

FACTOR = 4
NATIVE = ["extrapolate", "linear", "ntk", "dynamic_ntk", "ntk_by_parts", "yarn", "llama3", "longrope"]


def method_kwargs(model, method: str) -> dict:
    if method != "longrope":
        return {}
    half = families.rotary_modules(model)[0].__dict__["_buffers"]
    n = next(b for name, b in half.items() if name.endswith("inv_freq")).numel()
    short = [1.0 + 0.1 * i for i in range(n)]
    return {"short_factor": short, "long_factor": [f * FACTOR for f in short]}


def config_dict(model) -> dict:
    """The config minus what save_pretrained itself fills in (architectures, dtype)."""
    return {
        k: v for k, v in model.config.to_dict().items() if k not in ("architectures", "dtype", "transformers_version")
    }


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_every_rope_method_is_registered():
    assert set(NATIVE) | {"dynamic_yarn"} <= set(method_names("rope"))


@pytest.mark.parametrize("model_type", list(ROPE_FAMILY_CONFIGS))
def test_family_method_matrix(model_type, tmp_path):
    model = tiny_model(model_type)
    ids = torch.randint(3, VOCAB, (1, ORIGINAL_LEN * FACTOR))
    base = logits(model, ids)
    config_before = config_dict(model)
    methods = NATIVE + ["dynamic_yarn"]
    if model_type == "phi3":  # Phi-3 configs accept only default / longrope: no dynamic methods
        methods = [m for m in methods if "dynamic" not in m]
    in_memory, paths = {}, []
    for method in methods:
        patch_model(model, method, FACTOR, **method_kwargs(model, method))
        info = patch_info(model)
        assert info["method"] == method and info["max_position_embeddings"] == ORIGINAL_LEN * FACTOR
        assert info["original_max_position_embeddings"] == ORIGINAL_LEN
        out = logits(model, ids)
        assert torch.isfinite(out).all()
        if method != "extrapolate" and method != "dynamic_ntk":  # both keep the trained frequencies somewhere
            assert not torch.equal(out, base), f"{method} changed nothing"
        in_memory[method] = out
        path = tmp_path / method
        model.save_pretrained(path)
        saved = json.loads((path / "config.json").read_text())
        assert saved["hf_rope_ext"]["method"] == method
        if method != "dynamic_yarn":
            paths.append(str(path))
        unpatch_model(model)
        assert torch.equal(logits(model, ids), base), f"unpatch after {method} did not restore the logits"
        assert config_dict(model) == config_before
        assert patch_info(model) is None
    reloaded = reload_logits_many(paths, ids, tmp_path)
    for path in paths:
        method = path.rsplit("/", 1)[-1]
        torch.testing.assert_close(
            reloaded[path],
            in_memory[method],
            rtol=0,
            atol=1e-5,
            msg=lambda m, method=method: f"{model_type}/{method}: {m}",
        )


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt_neox"])
def test_dynamic_yarn_needs_the_plugin_on_reload(model_type, tmp_path):
    model = tiny_model(model_type)
    ids = torch.randint(3, VOCAB, (1, ORIGINAL_LEN * 3))
    patch_model(model, "dynamic_yarn", FACTOR)
    assert patch_info(model)["requires_plugin"] is True
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    proc = run_python(
        f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})"
    )
    assert proc.returncode != 0 and "import hf_rope_ext" in proc.stderr
    reloaded = reload_logits_many([str(tmp_path)], ids, tmp_path, import_plugin=True)[str(tmp_path)]
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-5)


def test_gemma3_patches_global_layers_by_default_and_both_on_request():
    model = tiny_model("gemma3_text")
    rotary = families.rotary_modules(model)[0]
    sliding_before = rotary.sliding_attention_inv_freq.clone()
    patch_model(model, "linear", FACTOR)
    assert model.config.rope_parameters["full_attention"]["rope_type"] == "linear"
    assert model.config.rope_parameters["sliding_attention"]["rope_type"] == "default"
    assert torch.equal(rotary.sliding_attention_inv_freq, sliding_before)
    patch_model(model, "linear", FACTOR, layer_types=["full_attention", "sliding_attention"], repatch=True)
    assert model.config.rope_parameters["sliding_attention"]["rope_type"] == "linear"
    torch.testing.assert_close(rotary.sliding_attention_inv_freq, sliding_before / FACTOR)
    with pytest.raises(ValueError, match="sliding_attention"):
        patch_model(model, "linear", FACTOR, layer_types=["local"], repatch=True)


def test_target_length_and_original_length(llama):
    patch_model(llama, "yarn", max_position_embeddings=ORIGINAL_LEN * 3)
    info = patch_info(llama)
    assert info["factor"] == 3.0 and llama.config.max_position_embeddings == ORIGINAL_LEN * 3
    patch_model(llama, "linear", 2, original_max_position_embeddings=32, repatch=True)
    assert patch_info(llama)["original_max_position_embeddings"] == 32
    assert llama.config.max_position_embeddings == 64
    unpatch_model(llama)
    assert llama.config.max_position_embeddings == ORIGINAL_LEN


def test_dynamic_methods_keep_max_position_embeddings_as_original_length(llama, tmp_path):
    patch_model(llama, "dynamic_ntk", FACTOR)
    assert llama.config.max_position_embeddings == ORIGINAL_LEN  # transformers reads it as the original length
    assert patch_info(llama)["max_position_embeddings"] == ORIGINAL_LEN * FACTOR


def test_tokenizer_limit_follows_the_patch(llama, tokenizer, tmp_path):
    patch_model(llama, "ntk", FACTOR, tokenizer=tokenizer)
    assert tokenizer.model_max_length == ORIGINAL_LEN * FACTOR
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path).model_max_length == ORIGINAL_LEN * FACTOR
    unpatch_model(llama)
    assert tokenizer.model_max_length == ORIGINAL_LEN


def test_unpatch_a_reloaded_model_restores_the_original(llama, tmp_path):
    ids = torch.randint(3, VOCAB, (1, 100))
    base = logits(llama, ids)
    patch_model(llama, "yarn", FACTOR)
    llama.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert patch_info(reloaded)["method"] == "yarn"
    unpatch_model(reloaded)
    torch.testing.assert_close(logits(reloaded, ids), base, rtol=0, atol=1e-6)
    assert reloaded.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}


def test_custom_method_through_the_registry_saves_natively(llama, tmp_path):
    from dataclasses import dataclass

    from hf_rope_ext import register_method
    from hf_rope_ext.methods import RopeParams, default_inv_freq
    from hf_rope_ext.registry import METHODS

    @dataclass
    class HalfParams(RopeParams):
        power: float = 0.5
        """Exponent of the factor applied to every frequency."""

    @register_method("test_power_scale", kind="rope", params=HalfParams, description="test: theta / s^power")
    def power_scale(params, dim, base, device=None, seq_len=None):
        return default_inv_freq(dim, base, device) / params.factor**params.power, 1.0

    try:
        assert "test_power_scale" in [m["name"] for m in hf_rope_ext.list_methods()]
        ids = torch.randint(3, VOCAB, (1, 200))
        patch_model(llama, "test_power_scale", FACTOR, power=0.75)
        assert llama.config.rope_parameters["rope_type"] == "longrope"  # any static rescale is native as longrope
        expected = logits(llama, ids)
        llama.save_pretrained(tmp_path)
        reloaded = reload_logits_many([str(tmp_path)], ids, tmp_path)[str(tmp_path)]
        torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-5)
    finally:
        METHODS.pop("test_power_scale")


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="ntkk", factor=2), r"unknown method 'ntkk'; known: .*dynamic_ntk.*yarn"),
        (dict(method="yarn", factor=1.0), "factor must be > 1"),
        (dict(method="yarn", factor=0.5), "factor must be > 1"),
        (dict(method="yarn"), "exactly one of factor"),
        (dict(method="yarn", factor=2, max_position_embeddings=256), "exactly one of factor"),
        (dict(method="yarn", max_position_embeddings=32), "larger than the original length 64"),
        (dict(method="yarn", factor=2, beta_fastt=3), r"unknown parameter\(s\) 'beta_fastt'.*valid: .*beta_fast"),
        (dict(method="yarn", factor=2, beta_fast=0.5), "beta_fast > beta_slow"),
        (dict(method="longrope", factor=2), "short_factor"),
        (dict(method="longrope", factor=2, short_factor=[1.0], long_factor=[1.0]), "needs 8 entries"),
        (dict(method="linear", factor=2, layer_types=["full_attention"]), "per-layer-type"),
    ],
)
def test_bad_input_is_refused_and_leaves_the_model_untouched(llama, kwargs, match):
    snap = snapshot(llama)
    with pytest.raises(ValueError, match=match):
        patch_model(llama, **kwargs)
    assert_unchanged(llama, snap)


def test_table_method_on_a_rotary_model_is_refused(llama):
    if "copy" not in method_names("absolute"):
        pytest.skip("learned-table methods not registered")
    snap = snapshot(llama)
    with pytest.raises(ValueError, match="methods for this model: .*yarn"):
        patch_model(llama, "copy", 2)
    assert_unchanged(llama, snap)


def test_already_patched_is_refused_and_repatch_starts_from_the_original(llama):
    ids = torch.randint(3, VOCAB, (1, 150))
    patch_model(llama, "ntk", 2)
    snap = snapshot(llama)
    with pytest.raises(ValueError, match="already patched .*unpatch_model.*repatch=True"):
        patch_model(llama, "yarn", 4)
    assert_unchanged(llama, snap)
    patch_model(llama, "yarn", 4, repatch=True)
    repatched = logits(llama, ids)
    fresh = tiny_model("llama")
    patch_model(fresh, "yarn", 4)
    assert torch.equal(repatched, logits(fresh, ids))
    assert patch_info(llama)["original_rope_parameters"]["rope_type"] == "default"


def test_unsupported_model_is_refused_with_the_supported_list():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=2))
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'bloom' is not supported .*supported model types: .*llama.*qwen2"):
        patch_model(model, "yarn", 2)
    assert_unchanged(model, snap)


def test_phi3_refuses_dynamic_methods_it_cannot_reload():
    model = tiny_model("phi3")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="accept only"):
        patch_model(model, "dynamic_ntk", 2)
    assert_unchanged(model, snap)


def test_natively_scaled_checkpoint_is_refused():
    model = tiny_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="already uses rope_type 'linear'"):
        patch_model(model, "yarn", 2)
