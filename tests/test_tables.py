"""Learned and fixed-sinusoidal absolute position tables: methods against formulas written here, every family on tiny
configs (fails before / works after at 4x, outputs, buffers against transformers' own init at the new length, unpatch),
save + reload in a fresh process without the plugin, and the real all-MiniLM-L6-v2 extended 512 -> 2048."""

from __future__ import annotations

import math
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_rope_ext import list_methods, patch_info, patch_model, unpatch_model
from hf_rope_ext.families import ABSOLUTE_FAMILIES, AbsoluteFamily, find_family
from hf_rope_ext.registry import get_method

from .utils import reload_outputs, run_python

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N = 32  # positions the tiny models are "trained" at
FACTOR = 4
LONG = N * FACTOR
VOCAB = 128
TABLE_METHODS = ("copy", "interpolate", "hierarchical")

_BERT = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=N, pad_token_id=1)
_ROBERTA = {**_BERT, "max_position_embeddings": N + 2}  # RoBERTa counts the 2 offset rows in its config
_GPT2 = dict(n_embd=64, n_layer=2, n_head=4, n_positions=N, vocab_size=VOCAB, bos_token_id=2, eos_token_id=2)
_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=N,
                pad_token_id=1, decoder_start_token_id=2, bos_token_id=0, eos_token_id=2)

# the families the issue names (learned tables)
LEARNED: dict[str, dict] = {
    "gpt2": _GPT2,
    "gpt_neo": dict(hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=N, vocab_size=VOCAB,
                    attention_types=[[["global", "local"], 1]], window_size=8, bos_token_id=2, eos_token_id=2),
    "opt": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, max_position_embeddings=N,
                word_embed_proj_dim=64, vocab_size=VOCAB, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "bert": _BERT,
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "camembert": _ROBERTA,
    "distilbert": dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=N,
                       pad_token_id=1),
    "electra": {**_BERT, "embedding_size": 32},
}
# further model types with the same layouts
EXTRA: dict[str, dict] = {
    "gpt_bigcode": _GPT2,
    "biogpt": {**_BERT},
    "ernie": _BERT,
    "megatron-bert": _BERT,
    "data2vec-text": _ROBERTA,
    "roberta-prelayernorm": _ROBERTA,
    "xlm-roberta-xl": _ROBERTA,
}
SINUSOIDAL: dict[str, dict] = {
    "xglm": dict(vocab_size=VOCAB, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128, max_position_embeddings=N,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "m2m_100": _SEQ2SEQ,
    "marian": _SEQ2SEQ,
}
SEQ2SEQ = {"m2m_100", "marian"}
ALL = {**LEARNED, **EXTRA, **SINUSOIDAL}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**ALL[model_type], **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides):
    from transformers import AutoModel

    torch.manual_seed(seed)
    return AutoModel.from_config(tiny_config(model_type, **overrides)).eval()


def long_ids(length: int = LONG, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def forward(model, ids: torch.Tensor) -> torch.Tensor:
    kwargs = {"decoder_input_ids": ids} if model.config.model_type in SEQ2SEQ else {}
    with torch.no_grad():
        out = model(ids, **kwargs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def snapshot(model) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "config": model.config.to_dict(),
        "requires_grad": {k: v.requires_grad for k, v in model.named_parameters()},
    }


_LOAD_KEYS = ("_name_or_path", "dtype", "architectures", "transformers_version")  # set by save / from_pretrained


def assert_same_state(model, before: dict, reloaded: bool = False) -> None:
    after = snapshot(model)
    if reloaded:
        after["config"] = {k: v for k, v in after["config"].items() if k not in _LOAD_KEYS}
        before = {**before, "config": {k: v for k, v in before["config"].items() if k not in _LOAD_KEYS}}
    assert after["params"].keys() == before["params"].keys()
    for key, value in before["params"].items():
        assert torch.equal(after["params"][key], value), key
    assert after["buffers"].keys() == before["buffers"].keys()
    for key, value in before["buffers"].items():
        assert after["buffers"][key].shape == value.shape and torch.equal(after["buffers"][key], value), key
    assert after["config"] == before["config"]
    assert after["requires_grad"] == before["requires_grad"]


def assert_like_fresh_model(model, model_type: str, new_config_len: int) -> None:
    """Buffers (position_ids, token_type_ids, causal masks, sinusoid tables) and parameter shapes equal what
    transformers itself builds for a model configured at the new length: an independent reference."""
    fields = {"gpt2": "n_positions", "gpt_bigcode": "n_positions"}
    fresh = tiny_model(model_type, **{fields.get(model_type, "max_position_embeddings"): new_config_len})
    fresh_buffers = dict(fresh.named_buffers())
    for name, buf in model.named_buffers():
        assert buf.shape == fresh_buffers[name].shape, name
        assert torch.equal(buf, fresh_buffers[name]), name
    fresh_shapes = {k: v.shape for k, v in fresh.named_parameters()}
    assert {k: v.shape for k, v in model.named_parameters()} == fresh_shapes
    fresh_modules = dict(fresh.named_modules())
    attrs = (*find_family(model).module_attrs, "num_embeddings")
    for name, module in model.named_modules():  # OPT max_target_positions, XGLM num_positions, nn.Embedding sizes
        for attr in attrs:
            if hasattr(module, attr):
                assert getattr(module, attr) == getattr(fresh_modules[name], attr), (name, attr)
    for field in find_family(model).config_fields:
        assert getattr(model.config, field) == getattr(fresh.config, field)


def table_of(model) -> torch.Tensor:
    family = find_family(model)
    for name, module in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in family.tables):
            return getattr(module, family.weight)
    raise AssertionError("no table")


# --------------------------------------------------------------------------------------------------------------------
# the methods, against formulas written here


def _table(n: int = 8, h: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, h, generator=torch.Generator().manual_seed(seed))


def _params(method: str, n: int, new_len: int, **kw):
    return get_method(method).make_params(factor=new_len / n, original_max_position_embeddings=n, **kw)


def test_methods_are_registered_as_absolute():
    rows = {r["name"]: r for r in list_methods("absolute")}
    assert {"copy", "interpolate", "hierarchical", "sinusoidal"} <= set(rows)
    assert rows["hierarchical"]["parameters"]["alpha"]["default"] == 0.4
    assert "2004.05150" in rows["copy"]["paper"] and "kexue.fm/archives/7947" in rows["hierarchical"]["paper"]


def test_copy_tiles_the_table():
    w = _table()
    q = get_method("copy").compute(w, 21, _params("copy", 8, 21))
    assert q.shape == (21, 5)
    for p in range(21):
        assert torch.equal(q[p], w[p % 8])


@pytest.mark.parametrize("new_len", [32, 20, 17])
def test_interpolate_is_linear_interpolation_at_p_over_s(new_len):
    n = 8
    w = _table(n).double()
    q = get_method("interpolate").compute(w, new_len, _params("interpolate", n, new_len))
    s = new_len / n
    for p in range(new_len):
        x = p / s
        k = math.floor(x)
        if k >= n - 1:
            expected = w[n - 1]  # past the last trained row: hold it
        else:
            f = x - k
            expected = (1 - f) * w[k] + f * w[k + 1]
        torch.testing.assert_close(q[p], expected, rtol=0, atol=1e-12)
        if (p * n) % new_len == 0:  # p / s is an integer: exactly the trained row
            assert torch.equal(q[p], w[p * n // new_len])


def test_interpolate_exact_rows_in_float32():
    w = _table(16, 7).float()
    q = get_method("interpolate").compute(w, 64, _params("interpolate", 16, 64))
    for k in range(16):
        assert torch.equal(q[4 * k], w[k])


@pytest.mark.parametrize("alpha", [0.4, 0.3])
def test_hierarchical_formula(alpha):
    n, new_len = 6, 30
    w = _table(n, 4).double()
    q = get_method("hierarchical").compute(w, new_len, _params("hierarchical", n, new_len, alpha=alpha))
    u = [(w[i] - alpha * w[0]) / (1 - alpha) for i in range(n)]  # Su Jianlin: u_i = (p_i - alpha p_1) / (1 - alpha)
    for p in range(new_len):
        i, j = divmod(p, n)
        torch.testing.assert_close(q[p], alpha * u[i] + (1 - alpha) * u[j], rtol=0, atol=1e-12)
    assert torch.equal(q[:n], w)


def test_hierarchical_keeps_first_rows_bit_identical_in_low_precision():
    w = _table(16, 8).to(torch.bfloat16)
    q = get_method("hierarchical").compute(w, 64, _params("hierarchical", 16, 64))
    assert q.dtype == torch.bfloat16 and torch.equal(q[:16], w)


def test_hierarchical_limits_and_alpha_validation():
    with pytest.raises(ValueError, match="at most 64 positions"):
        get_method("hierarchical").compute(_table(8), 65, _params("hierarchical", 8, 65))
    with pytest.raises(ValueError, match="alpha=0.5"):
        _params("hierarchical", 8, 16, alpha=0.5)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        _params("hierarchical", 8, 16, alpha=1.0)
    with pytest.raises(ValueError, match="valid: factor, original_max_position_embeddings, alpha"):
        _params("hierarchical", 8, 16, beta=0.1)


def test_sinusoidal_method_checks_the_formula():
    def pe(rows: int) -> torch.Tensor:
        pos = torch.arange(rows, dtype=torch.float64)[:, None]
        freq = 10000 ** (-torch.arange(3, dtype=torch.float64) / 3)
        return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], 1).float()

    params = _params("sinusoidal", 10, 40)
    q = get_method("sinusoidal").compute(pe(10), 40, params, formula=pe)
    torch.testing.assert_close(q, pe(40), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="changed after initialisation"):
        get_method("sinusoidal").compute(pe(10) + 0.01, 40, params, formula=pe)
    with pytest.raises(ValueError, match="needs the model's sinusoid"):
        get_method("sinusoidal").compute(pe(10), 40, params)


# --------------------------------------------------------------------------------------------------------------------
# families


def test_families_table_knows_the_issue_families():
    types = {t for fam in ABSOLUTE_FAMILIES for t in fam.model_types}
    assert set(ALL) <= types
    assert all(isinstance(f, AbsoluteFamily) and f.kind == "absolute" for f in ABSOLUTE_FAMILIES)


def _check_family(model_type: str, method: str) -> None:
    model = tiny_model(model_type)
    before = snapshot(model)
    ids = long_ids()
    short = ids[:, :N]
    ref_short = forward(model, short)
    if model_type not in ("xglm", "m2m_100"):  # those two regrow their sinusoid table on the fly already
        with pytest.raises((IndexError, RuntimeError)):
            forward(model, ids)
    patch_model(model, method, factor=FACTOR)
    out = forward(model, ids)
    assert out.shape[1] == LONG and torch.isfinite(out).all()
    short_after = forward(model, short)
    if method in ("copy", "hierarchical", "sinusoidal"):
        assert torch.equal(short_after, ref_short)
    else:
        assert not torch.equal(short_after, ref_short)  # interpolation moves every position but multiples of s
    info = patch_info(model)
    offset = info["table"]["row_offset"]
    config_len = LONG + (offset if model_type in ("roberta", "xlm-roberta", "camembert", "data2vec-text",
                                                  "roberta-prelayernorm", "xlm-roberta-xl") else 0)
    assert model.config.max_position_embeddings == config_len
    assert table_of(model).shape[0] == LONG + offset
    assert_like_fresh_model(model, model_type, config_len)
    unpatch_model(model)
    assert patch_info(model) is None
    assert_same_state(model, before)
    assert torch.equal(forward(model, short), ref_short)


@pytest.mark.parametrize("method", TABLE_METHODS)
@pytest.mark.parametrize("model_type", list(LEARNED))
def test_learned_family(model_type, method):
    _check_family(model_type, method)


@pytest.mark.parametrize("model_type", list(EXTRA))
def test_more_learned_families(model_type):
    _check_family(model_type, "copy")


@pytest.mark.parametrize("model_type", list(SINUSOIDAL))
def test_sinusoidal_family(model_type):
    _check_family(model_type, "sinusoidal")


def _fairseq_pe(rows: int, dim: int, padding_idx: int) -> torch.Tensor:
    half = dim // 2
    freq = torch.exp(-torch.arange(half, dtype=torch.float64) * math.log(10000) / (half - 1))
    angle = torch.arange(rows, dtype=torch.float64)[:, None] * freq
    pe = torch.cat([torch.sin(angle), torch.cos(angle)], 1)
    pe[padding_idx] = 0
    return pe


def _vaswani_pe(rows: int, dim: int, interleaved: bool) -> torch.Tensor:
    freq = 10000 ** (-2 * torch.arange(dim // 2, dtype=torch.float64) / dim)
    angle = torch.arange(rows, dtype=torch.float64)[:, None] * freq
    if interleaved:
        return torch.stack([torch.sin(angle), torch.cos(angle)], -1).reshape(rows, dim)
    return torch.cat([torch.sin(angle), torch.cos(angle)], 1)


@pytest.mark.parametrize("model_type", list(SINUSOIDAL))
def test_sinusoidal_tables_follow_the_formula_past_the_end(model_type):
    model = tiny_model(model_type)
    patch_model(model, "sinusoidal", factor=FACTOR)
    for name, module in model.named_modules():
        if name.endswith("embed_positions"):
            table = (module.weights if model_type != "marian" else module.weight).double()
            if model_type == "marian":
                expected = _vaswani_pe(LONG, 64, interleaved=False)
            else:
                expected = _fairseq_pe(LONG + 2, 64, padding_idx=1)
            torch.testing.assert_close(table, expected, rtol=0, atol=1e-4)


def test_distilbert_sinusoidal_option():
    model = tiny_model("distilbert", sinusoidal_pos_embds=True)
    with pytest.raises(ValueError, match="methods for this model: sinusoidal"):
        patch_model(model, "copy", factor=FACTOR)
    patch_model(model, "sinusoidal", factor=FACTOR)
    expected = _vaswani_pe(LONG, 64, interleaved=True)
    torch.testing.assert_close(table_of(model).double(), expected, rtol=0, atol=1e-6)
    assert forward(model, long_ids()).shape[1] == LONG


@pytest.mark.parametrize(("model_type", "field"),
                         [("gpt_neo", "max_position_embeddings"), ("gpt_bigcode", "n_positions")])
def test_causal_masks_match_transformers_at_new_length(model_type, field):
    model = tiny_model(model_type)
    patch_model(model, "copy", factor=FACTOR)
    fresh_buffers = dict(tiny_model(model_type, **{field: LONG}).named_buffers())
    masks = {k: v for k, v in model.named_buffers() if k.endswith("bias")}
    assert masks and all(v.shape[-2:] == (LONG, LONG) for v in masks.values())
    for name, mask in masks.items():
        assert torch.equal(mask, fresh_buffers[name]), name
    if model_type == "gpt_neo":  # the local layer keeps its sliding window (8), the global layer stays causal
        local, full = model.h[1].attn.attention.bias[0, 0], model.h[0].attn.attention.bias[0, 0]
        assert local[LONG - 1, LONG - 8] and not local[LONG - 1, LONG - 9] and not local[LONG - 9, LONG - 1]
        assert full[LONG - 1, 0] and not full[0, LONG - 1]


# --------------------------------------------------------------------------------------------------------------------
# errors: every refusal leaves the model untouched


def test_extrapolate_on_a_table_names_the_table_methods():
    model = tiny_model("bert")
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        patch_model(model, "extrapolate", factor=FACTOR)
    for name in TABLE_METHODS:
        assert name in str(err.value)
    assert patch_info(model) is None
    assert_same_state(model, before)


def test_sinusoidal_on_a_learned_table_is_refused():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="learned position table; methods for this model: copy, hierarchical, interp"):
        patch_model(model, "sinusoidal", factor=FACTOR)


def test_learned_methods_on_a_sinusoidal_table_are_refused():
    model = tiny_model("marian")
    before = snapshot(model)
    with pytest.raises(ValueError, match="fixed sinusoidal.*methods for this model: sinusoidal"):
        patch_model(model, "interpolate", factor=FACTOR)
    assert_same_state(model, before)


def test_refused_patch_changes_nothing():
    model = tiny_model("bert")
    before = snapshot(model)
    with pytest.raises(ValueError, match="at most 1024 positions"):
        patch_model(model, "hierarchical", factor=40)  # 1280 > 32 ** 2
    with pytest.raises(ValueError, match="layer_types"):
        patch_model(model, "copy", factor=2, layer_types=["full_attention"])
    assert patch_info(model) is None
    assert_same_state(model, before)


def test_table_shared_with_another_tensor_is_refused():
    model = tiny_model("gpt2")
    model.h[0].register_parameter("alias", model.wpe.weight)
    with pytest.raises(ValueError, match="shared with h.0.alias"):
        patch_model(model, "copy", factor=FACTOR)
    assert model.wpe.weight.shape[0] == N


def test_table_shared_between_encoder_and_decoder_stays_shared():
    model = tiny_model("marian")
    model.decoder.embed_positions.weight = model.encoder.embed_positions.weight
    patch_model(model, "sinusoidal", factor=FACTOR)
    assert model.decoder.embed_positions.weight is model.encoder.embed_positions.weight
    assert model.encoder.embed_positions.weight.shape[0] == LONG
    unpatch_model(model)
    assert model.decoder.embed_positions.weight is model.encoder.embed_positions.weight
    assert model.encoder.embed_positions.weight.shape[0] == N


def test_word_embedding_tying_is_untouched():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config("gpt2")).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    patch_model(model, "copy", factor=FACTOR)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert forward(model, long_ids()).shape == (1, LONG, VOCAB)


# --------------------------------------------------------------------------------------------------------------------
# dtype, requires_grad, tokenizer, repatch


def _tiny_tokenizer(max_len: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   model_max_length=max_len)


def test_dtype_device_requires_grad_and_tokenizer():
    model = tiny_model("roberta").to(torch.bfloat16)
    tok = _tiny_tokenizer(N)
    patch_model(model, "hierarchical", factor=FACTOR, tokenizer=tok)
    weight = model.embeddings.position_embeddings.weight
    assert weight.dtype == torch.bfloat16 and weight.requires_grad and isinstance(weight, torch.nn.Parameter)
    assert model.embeddings.position_embeddings.num_embeddings == LONG + 2
    assert tok.model_max_length == LONG and tok.init_kwargs["model_max_length"] == LONG
    unpatch_model(model)
    assert tok.model_max_length == N
    marian = tiny_model("marian")
    patch_model(marian, "sinusoidal", factor=FACTOR)
    assert not marian.encoder.embed_positions.weight.requires_grad  # the sinusoid stays frozen


def test_repatch_starts_from_the_original_table():
    model = tiny_model("bert")
    original = model.embeddings.position_embeddings.weight.detach().clone()
    patch_model(model, "copy", factor=FACTOR)
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, "interpolate", factor=2)
    patch_model(model, "interpolate", factor=2, repatch=True)
    expected = get_method("interpolate").compute(original, 2 * N, _params("interpolate", N, 2 * N))
    assert torch.equal(model.embeddings.position_embeddings.weight, expected)
    assert model.embeddings.position_ids.shape[-1] == 2 * N
    unpatch_model(model)
    assert torch.equal(model.embeddings.position_embeddings.weight, original)


# --------------------------------------------------------------------------------------------------------------------
# save, reload in a fresh process without the plugin, unpatch a reloaded model

_RELOAD_ALL = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModel
    assert "hf_rope_ext" not in sys.modules
    ids = torch.load({ids!r})
    out = {{}}
    for path, seq2seq in {paths!r}:
        model = AutoModel.from_pretrained(path).eval()
        with torch.no_grad():
            result = model(ids, **({{"decoder_input_ids": ids}} if seq2seq else {{}}))
        out[path] = (result.last_hidden_state, model.config.max_position_embeddings)
    assert "hf_rope_ext" not in sys.modules
    torch.save(out, {out!r})
    """
)


def _reload_cases() -> list[tuple[str, str]]:
    cases = []
    for i, model_type in enumerate(LEARNED):
        cases.append((model_type, TABLE_METHODS[i % 3]))
    cases += [(t, "copy") for t in EXTRA] + [(t, "sinusoidal") for t in SINUSOIDAL]
    return cases


def test_save_and_reload_in_fresh_process_gives_identical_outputs(tmp_path):
    """All families in ONE fresh interpreter (saves start-up time); it never imports hf_rope_ext."""
    ids = long_ids()
    expected, paths = {}, []
    for model_type, method in _reload_cases():
        model = tiny_model(model_type)
        patch_model(model, method, factor=FACTOR)
        path = tmp_path / f"{model_type}-{method}"
        model.save_pretrained(path)
        expected[str(path)] = (forward(model, ids), model.config.max_position_embeddings)
        paths.append((str(path), model_type in SEQ2SEQ))
    torch.save(ids, tmp_path / "ids.pt")
    code = _RELOAD_ALL.format(ids=str(tmp_path / "ids.pt"), paths=paths, out=str(tmp_path / "out.pt"))
    proc = run_python(code, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = torch.load(tmp_path / "out.pt")
    for path, (logits, config_len) in expected.items():
        got, got_len = reloaded[path]
        assert got_len == config_len, path
        assert torch.equal(got, logits), path


def test_reload_lm_head_model_with_reload_outputs(tmp_path):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config("gpt2")).eval()
    patch_model(model, "hierarchical", factor=FACTOR)
    model.save_pretrained(tmp_path)
    ids = long_ids()
    got = reload_outputs(tmp_path, ids, auto_class="AutoModelForCausalLM")
    assert torch.equal(got, forward(model, ids))


@pytest.mark.parametrize(("model_type", "method", "factor"),
                         [("bert", "copy", 4), ("roberta", "hierarchical", 4), ("opt", "interpolate", 4),
                          ("gpt_neo", "copy", 4), ("m2m_100", "sinusoidal", 4)])
def test_unpatch_after_reload_restores_the_original(tmp_path, model_type, method, factor):
    from transformers import AutoModel

    model = tiny_model(model_type)
    before = snapshot(model)
    patch_model(model, method, factor=factor)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert patch_info(reloaded)["method"] == method
    unpatch_model(reloaded)
    assert_same_state(reloaded, before, reloaded=True)


def test_unpatch_after_reload_of_noninteger_interpolation_is_refused(tmp_path):
    from transformers import AutoModel

    model = tiny_model("bert")
    patch_model(model, "interpolate", factor=2.5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    before = snapshot(reloaded)
    with pytest.raises(ValueError, match="cannot restore the original position table"):
        unpatch_model(reloaded)
    assert patch_info(reloaded)["method"] == "interpolate"
    assert_same_state(reloaded, before)
    # in the process that patched, the exact original is kept and unpatch works
    unpatch_model(model)
    assert model.embeddings.position_embeddings.weight.shape[0] == N


# --------------------------------------------------------------------------------------------------------------------
# the real all-MiniLM-L6-v2: 512 -> 2048


def _minilm():
    from transformers import AutoModel, AutoTokenizer

    from hf_rope_ext.loading import minilm_path

    try:
        path = minilm_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _embed(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    return hidden.mean(1)  # every position is real text: mean pooling over the mask is the plain mean


def test_minilm_extended_to_2048():
    from pydoc_data.topics import topics

    model, tok = _minilm()
    text_ids = tok(topics["specialnames"], add_special_tokens=False)["input_ids"]
    cls, sep = tok.cls_token_id, tok.sep_token_id
    inputs = {length: torch.tensor([[cls, *text_ids[: length - 2], sep]]) for length in (100, 512, 2000)}
    with pytest.raises((IndexError, RuntimeError)):
        _embed(model, inputs[2000])
    before = {length: _embed(model, inputs[length]) for length in (100, 512)}
    original_table = model.embeddings.position_embeddings.weight.detach().clone()
    for method in TABLE_METHODS:
        patch_model(model, method, factor=4, tokenizer=tok)
        assert model.config.max_position_embeddings == 2048 and tok.model_max_length == 2048
        for length in (100, 512):
            same = torch.equal(_embed(model, inputs[length]), before[length])
            assert same == (method != "interpolate"), (method, length)
        long = _embed(model, inputs[2000])
        assert long.shape == (1, 384) and torch.isfinite(long).all()
        unpatch_model(model)
        assert tok.model_max_length == 512
        assert torch.equal(model.embeddings.position_embeddings.weight, original_table)


def _load_bench():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_minilm_retrieval.py"
    spec = importlib.util.spec_from_file_location("bench_minilm_retrieval", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_minilm_uses_text_past_token_512():
    """An excerpt from past token 512 retrieves its own document far more often with the extended model
    (scripts/bench_minilm_retrieval.py, smaller: 25 documents per corpus, copy method)."""
    _minilm()  # skips when the package is missing
    bench = _load_bench()
    results = bench.run(["copy"], max_docs=25, progress=False)
    far = {(r.corpus, r.model): r.top1 for r in results if r.query == "far"}
    original = sum(far[(c, "original@512")] for c in ("prose", "code")) / 2
    extended = sum(far[(c, "copy@2048")] for c in ("prose", "code")) / 2
    assert extended >= original + MARGIN, (original, extended)


MARGIN = 0.2
