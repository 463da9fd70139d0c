"""LongRoPE factor search (issue 11): constraints, a known optimum, resume, native reload, refusals, the CLI.

References are independent of the code under test: PI / NTK divisors from their formulas, YaRN's from transformers'
own ``ROPE_INIT_FUNCTIONS["yarn"]``, critical dimensions from the wavelength formula, reload in a fresh process
that never imports hf_rope_ext."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_rope_ext import apply_search_result, patch_info, patch_model, search_rope_factors
from hf_rope_ext.search import SearchResult

from .eval_utils import _training_text, bpe_tokenizer, tiny_llama
from .utils import assert_unchanged, reload_outputs, snapshot

L = 64  # original length of the tiny Llama
S = 2.0
HEAD = 16  # hidden 64 / 4 heads
BASE = 10000.0


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.fixture
def model(tok):
    return tiny_llama(max_positions=L, vocab_size=len(tok))


@pytest.fixture(scope="module")
def text():
    return _training_text()


def _critical_reference() -> list[int]:
    """Dimensions whose wavelength 2*pi*base^(2i/d) exceeds L (LongRoPE2's critical dimensions)."""
    return [i for i in range(HEAD // 2) if 2 * math.pi * BASE ** (2 * i / HEAD) > L]


def _yarn_reference(**extra) -> np.ndarray:
    """YaRN's per-dimension divisors from transformers' own implementation."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=int(L * S),
                         rope_parameters={"rope_type": "yarn", "factor": S, "rope_theta": BASE,
                                          "original_max_position_embeddings": L, **extra})
    inv, _ = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    theta = 1.0 / BASE ** (torch.arange(0, HEAD, 2, dtype=torch.float64) / HEAD)
    return (theta / inv.double()).numpy()


def test_method_factors_match_transformers_for_a_yarn_start():
    from hf_rope_ext.search import method_factors

    for extra in ({}, {"beta_slow": 2.0}, {"beta_fast": 8.0, "beta_slow": 2.0}):
        np.testing.assert_allclose(method_factors("yarn", HEAD, BASE, L, S, **extra), _yarn_reference(**extra),
                                   rtol=1e-6)
    assert not np.allclose(_yarn_reference(beta_slow=2.0), _yarn_reference())  # the parameter matters here
    with pytest.raises(ValueError, match="'self_extend' is not a rotary method"):
        method_factors("self_extend", HEAD, BASE, L, S)



def test_start_given_as_a_method_spec(model):
    result = search_rope_factors(model, None, S, budget=2, score_fn=lambda f: 0.0, start_factors="yarn:beta_slow=2",
                                 progress=False)
    np.testing.assert_allclose(result.seeds["start"], _yarn_reference(beta_slow=2.0), rtol=1e-6)


def _synthetic(target: np.ndarray):
    """Known optimum ``target``: L1 distance, counted."""
    calls = []

    def score(factors: list[float]) -> float:
        calls.append(list(factors))
        return float(np.abs(np.asarray(factors) - target).sum())

    score.calls = calls
    return score


@pytest.mark.parametrize("critical_only", [True, False])
def test_every_candidate_meets_the_constraints(model, critical_only):
    rng = np.random.default_rng(1)
    noise = {}

    def score(factors):  # an arbitrary but fixed landscape: every candidate gets a random score
        return noise.setdefault(tuple(factors), float(rng.random()))

    result = search_rope_factors(model, None, S, budget=60, score_fn=score, critical_only=critical_only,
                                 progress=False, seed=3)
    assert result.evaluations == len(result.candidates) == 60
    yarn = _yarn_reference()
    searched = _critical_reference() if critical_only else list(range(HEAD // 2))
    assert result.searched_dims == searched
    keys = set()
    for c in result.candidates:
        f = np.asarray(c["factors"])
        assert f.shape == (HEAD // 2,)
        assert np.all(np.diff(f) >= 0), c  # non-decreasing from high to low frequency
        assert f.min() >= 1.0 and f.max() <= 1.25 * S + 1e-12, c
        fixed = [i for i in range(HEAD // 2) if i not in searched]
        np.testing.assert_allclose(f[fixed], yarn[fixed], rtol=1e-6)  # the rest fixed to yarn's divisors
        keys.add(tuple(np.round(f, 8)))
    assert len(keys) == 60  # no candidate evaluated twice
    # mutated values lie on the 0.01 grid or copy a neighbour / a seed value
    seed_values = {round(v, 8) for vs in result.seeds.values() for v in vs}
    for c in result.candidates[len(result.seeds):]:
        for v in c["factors"]:
            assert abs(v * 100 - round(v * 100)) < 1e-6 or round(v, 8) in seed_values, v
    # the seeds: PI = s, NTK = s^(2i/(d-2)), YaRN = transformers' divisors (projected onto the searched dims)
    i = np.arange(HEAD // 2)
    references = {"pi": np.full(HEAD // 2, S), "ntk": S ** (2 * i / (HEAD - 2)), "yarn": yarn}
    for name, ref in references.items():
        expected = ref.copy()
        expected[[j for j in i if j not in searched]] = yarn[[j for j in i if j not in searched]]
        expected = np.maximum.accumulate(np.clip(expected, 1, 1.25 * S))
        np.testing.assert_allclose(result.seeds[name], expected, rtol=1e-6)


def test_a_known_optimum_is_found(model):
    crit = _critical_reference()
    target = _yarn_reference()
    target[crit] = [1.73, 1.95, 2.07, 2.21, 2.43][: len(crit)]  # monotone, on the grid, inside [1, 2.5]
    score = _synthetic(target)
    result = search_rope_factors(model, None, S, budget=1000, score_fn=score, progress=False, seed=0)
    seed_best = min(c["score"] for c in result.candidates if c["origin"].startswith("seed"))
    assert seed_best > 0.5
    np.testing.assert_allclose(result.factors, target, atol=1e-9)
    assert result.score < 1e-6  # yarn's fixed dims come from float32 frequencies
    assert result.best_by_generation == sorted(result.best_by_generation, reverse=True)  # never gets worse


def test_resume_after_a_kill_reaches_the_same_result(model, tmp_path):
    target = _yarn_reference()
    target[_critical_reference()] = [1.5, 1.8, 2.0, 2.2, 2.4]
    full = search_rope_factors(model, None, S, budget=40, score_fn=_synthetic(target), progress=False, seed=7,
                               log_path=tmp_path / "full.jsonl")

    class Killed(Exception):
        pass

    def dies_at_17(factors):
        if len(dies_at_17.calls) == 16:
            raise Killed
        dies_at_17.calls.append(factors)
        return float(np.abs(np.asarray(factors) - target).sum())

    dies_at_17.calls = []
    log = tmp_path / "killed.jsonl"
    with pytest.raises(Killed):
        search_rope_factors(model, None, S, budget=40, score_fn=dies_at_17, progress=False, seed=7, log_path=log)
    assert len(log.read_text().splitlines()) == 1 + 16  # header + one line per finished evaluation
    with log.open("a") as f:
        f.write('{"index": 16, "generation": 2, "fac')  # a kill while writing: a torn last line
    again = _synthetic(target)
    resumed = search_rope_factors(model, None, S, budget=40, score_fn=again, progress=False, seed=7, log_path=log,
                                  resume=True)
    assert len(again.calls) == 40 - 16  # logged candidates are not evaluated again
    assert resumed.resumed_evaluations == 16
    assert resumed.factors == full.factors and resumed.score == full.score
    assert [c["factors"] for c in resumed.candidates] == [c["factors"] for c in full.candidates]
    assert [c["score"] for c in resumed.candidates] == [c["score"] for c in full.candidates]
    # and the log now holds the whole search, as the uninterrupted one
    lines = [json.loads(x) for x in log.read_text().splitlines()[1:]]
    assert [x["factors"] for x in lines] == [c["factors"] for c in full.candidates]
    # a log of other settings is refused
    with pytest.raises(ValueError, match="different settings.*seed"):
        search_rope_factors(model, None, S, budget=40, score_fn=again, progress=False, seed=8, log_path=log,
                            resume=True)


def _attention_synthetic(target: np.ndarray, attention: float):
    """Known optimum: ``target`` divisors and ``attention`` as the cos/sin multiplier (L1 distance, counted)."""
    calls = []

    def score(factors: list[float], att: float) -> float:
        calls.append((list(factors), att))
        return float(np.abs(np.asarray(factors) - target).sum()) + 10 * abs(att - attention)

    score.calls = calls
    return score


def test_attention_search_finds_a_known_optimum_within_its_bounds(model):
    crit = _critical_reference()
    target = _yarn_reference()
    target[crit] = [1.73, 1.95, 2.07, 2.21, 2.43][: len(crit)]
    score = _attention_synthetic(target, 1.115)  # on the 0.005 grid, away from both starting values
    result = search_rope_factors(model, None, S, budget=1500, score_fn=score, search_attention=True,
                                 progress=False, seed=0)
    yarn_att, longrope_att = 0.1 * math.log(S) + 1, math.sqrt(1 + math.log(S) / math.log(L))
    high = 1 + 0.2 * math.log(S)
    starts = {c["attention"] for c in result.candidates if c["origin"].startswith("seed")}
    assert sorted(starts) == pytest.approx(sorted([yarn_att, longrope_att]))
    for c in result.candidates:
        assert 1.0 <= c["attention"] <= high + 1e-12, c
        f = np.asarray(c["factors"])
        assert np.all(np.diff(f) >= 0) and f.min() >= 1.0 and f.max() <= 1.25 * S + 1e-12, c
    keys = {(tuple(np.round(c["factors"], 8)), round(c["attention"], 8)) for c in result.candidates}
    assert len(keys) == len(result.candidates)  # no (factors, attention) pair evaluated twice
    np.testing.assert_allclose(result.factors, target, atol=1e-9)
    assert result.attention_factor == pytest.approx(1.115, abs=1e-9)
    assert result.score < 1e-6
    assert result.summary()["attention_searched"] is True
    # one evaluation per call, and each call saw the vector the log records
    assert [(c["factors"], c["attention"]) for c in result.candidates] == score.calls


def test_attention_search_resumes_to_the_same_result(model, tmp_path):
    target = _yarn_reference()
    target[_critical_reference()] = [1.5, 1.8, 2.0, 2.2, 2.4]
    full = search_rope_factors(model, None, S, budget=30, score_fn=_attention_synthetic(target, 1.02),
                               search_attention=True, progress=False, seed=5, log_path=tmp_path / "full.jsonl")

    class Killed(Exception):
        pass

    first = _attention_synthetic(target, 1.02)

    def dies_at_12(factors, att):
        if len(first.calls) == 11:
            raise Killed
        return first(factors, att)

    log = tmp_path / "killed.jsonl"
    with pytest.raises(Killed):
        search_rope_factors(model, None, S, budget=30, score_fn=dies_at_12, search_attention=True, progress=False,
                            seed=5, log_path=log)
    again = _attention_synthetic(target, 1.02)
    resumed = search_rope_factors(model, None, S, budget=30, score_fn=again, search_attention=True, progress=False,
                                  seed=5, log_path=log, resume=True)
    assert len(again.calls) == 30 - 11
    assert [(c["factors"], c["attention"], c["score"]) for c in resumed.candidates] == \
        [(c["factors"], c["attention"], c["score"]) for c in full.candidates]
    assert resumed.attention_factor == full.attention_factor
    # a log of a fixed-attention search is not resumed as an attention search (and the other way round)
    with pytest.raises(ValueError, match="different settings.*attention"):
        search_rope_factors(model, None, S, budget=30, score_fn=_synthetic(target), progress=False, seed=5,
                            log_path=log, resume=True)


def test_searched_attention_factor_is_saved_natively(model, tok, text, tmp_path):
    result = search_rope_factors(model, tok, S, [text], budget=7, proxy_length=96, progress=False,
                                 search_attention=True, attention_range=(1.0, 3.0), attention_factor=2.5, seed=2)
    assert result.attention_factor == next(c["attention"] for c in result.candidates if c["score"] == result.score)
    apply_search_result(model, result, tok)
    model.save_pretrained(tmp_path)
    rp = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    assert rp["rope_type"] == "longrope" and rp["attention_factor"] == result.attention_factor
    ids = torch.randint(3, len(tok), (1, 2 * L))
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        expected = model(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path).eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # each candidate's score is the model's objective under that candidate's attention factor (reference: patch
    # by hand and compute the NLL of the tokens past L)
    window = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :96]
    assert {c["attention"] for c in result.candidates} >= {2.5}  # a start far from YaRN's and LongRoPE's
    for c in result.candidates:
        patch_model(model, "longrope", S, short_factor=c["factors"], long_factor=c["factors"],
                    attention_factor=c["attention"], repatch=True)
        with torch.no_grad():
            logits = model(window).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits.float(), window[0, 1:], reduction="none")
        assert c["score"] == pytest.approx(float(nll[L - 1 :].mean()), rel=1e-5), c


def test_model_objective_resume_restores_the_model(model, tok, text, tmp_path, monkeypatch):
    """The real objective on a model: a budget stop then a resume equals one run; the model is unpatched after."""
    import hf_rope_ext.search as search_module

    before = snapshot(model)
    kwargs = dict(factor=S, texts=[text], objective="beyond", seed=1, progress=False, proxy_length=96)
    one = search_rope_factors(model, tok, budget=6, **kwargs)
    assert_unchanged(model, before)
    assert patch_info(model) is None
    # the objective independently: mean NLL of tokens 64..95 of the window under the patched model
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :96]
    patch_model(model, "longrope", S, short_factor=one.factors, long_factor=one.factors,
                attention_factor=math.sqrt(1 + math.log(S) / math.log(L)))
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="none")
    assert one.score == pytest.approx(float(nll[L - 1 :].mean()), abs=1e-5)
    from hf_rope_ext import unpatch_model

    unpatch_model(model)

    log = tmp_path / "log.jsonl"
    search_rope_factors(model, tok, budget=3, log_path=log, **kwargs)
    calls = []
    real = search_module.token_nll
    monkeypatch.setattr(search_module, "token_nll", lambda *a, **k: calls.append(1) or real(*a, **k))
    two = search_rope_factors(model, tok, budget=6, log_path=log, resume=True, **kwargs)
    assert len(calls) == 3
    assert two.factors == one.factors and two.score == pytest.approx(one.score, abs=0)
    assert_unchanged(model, before)

    # an error in the middle of a search also leaves the model as it was
    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(search_module, "token_nll", broken)
    with pytest.raises(RuntimeError):
        search_rope_factors(model, tok, budget=2, **kwargs)
    assert_unchanged(model, before)


def test_saved_model_is_plain_longrope(model, tok, text, tmp_path):
    result = search_rope_factors(model, tok, S, [text], budget=6, proxy_length=96, progress=False,
                                 validation_texts=[text], validation_offset=300)
    assert {r["method"] for r in result.validation} == {"longrope (searched)"}
    apply_search_result(model, result, tok)
    assert patch_info(model)["search"]["evaluations"] == 6
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rp = config["rope_parameters"]
    assert rp["rope_type"] == "longrope" and rp["short_factor"] == rp["long_factor"] == result.factors
    ids = torch.randint(3, len(tok), (1, 2 * L))  # past the original length
    with torch.no_grad():
        expected = model(ids).logits
    from transformers import AutoModelForCausalLM

    with torch.no_grad():  # (the fresh-process reload, without hf_rope_ext: test_cli_end_to_end)
        got = AutoModelForCausalLM.from_pretrained(tmp_path).eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the validation figure independently: whole-window PPL of tokens 300..427 under the patched model
    window = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[:, 300 : 300 + 2 * L]
    with torch.no_grad():
        logits = model(window).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits.float(), window[0, 1:], reduction="none")
    assert result.validation[0]["ppl_window"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)
    assert result.validation[0]["ppl_beyond"] == pytest.approx(math.exp(float(nll[L - 1 :].mean())), rel=1e-5)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=128)).eval()


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=64, vocab_size=128)).eval()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(factor=1), "factor must be a number > 1"),
        (dict(factor=0.5), "factor must be a number > 1"),
        (dict(factor=True), "factor must be a number > 1"),
        (dict(budget=0), "budget must be an integer >= 1"),
        (dict(budget=-3), "budget must be an integer >= 1"),
        (dict(budget=None), "budget= .* and/or max_minutes="),
        (dict(objective="ppl"), "objective must be one of beyond, window, needle"),
        (dict(proxy_length=64), "proxy_length must be > 64"),
        (dict(proxy_length=1000), "must not exceed the target length 128"),
        (dict(texts=["w1 w2 w3"]), r"texts\[0\] .* has \d+ tokens; the evaluation needs 128"),
        (dict(validation_texts=["short"]), r"validation_texts\[0\] .* the evaluation needs 128"),
        (dict(texts=[]), "give texts="),
        (dict(start_factors=[1.0, 2.0]), "start_factors needs 8 values"),
        (dict(parents=8), "parents .* must be smaller than population_size"),
        (dict(start_factors="self_extend"), "start_factors 'self_extend': .*not a rotary method"),
        (dict(start_factors="yarn:bogus=1"), "start_factors 'yarn:bogus=1': unknown parameter.*'yarn:beta_fast=128'"),
        (dict(start_factors="yarn:beta_fast"), "start_factors 'yarn:beta_fast': start_factors expects key=value"),
        (dict(attention_range=(1.0, 1.2)), "attention_range bounds a searched attention factor.*search_attention"),
        (dict(search_attention=True, attention_range=(1.2, 1.1)), "attention_range must satisfy 0 < low < high"),
        (dict(search_attention=True, attention_range=(1.0,)), r"attention_range must be \(low, high\)"),
        (dict(search_attention=True, attention_factor=1.5), "attention_factor 1.5 .* outside attention_range"),
        (dict(search_attention="yes"), "search_attention must be True or False"),
    ],
)
def test_bad_input_is_refused_before_anything_changes(model, tok, text, tmp_path, kwargs, message):
    before = snapshot(model)
    args = dict(factor=S, texts=[text], budget=5, progress=False, log_path=tmp_path / "log.jsonl")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        search_rope_factors(model, tok, **args)
    assert_unchanged(model, before)
    assert not (tmp_path / "log.jsonl").exists()


@pytest.mark.parametrize("build", [_gpt2, _bert])
def test_non_rotary_models_are_refused(build, tok, text):
    with pytest.raises(ValueError, match="needs a rotary \\(RoPE\\) model"):
        search_rope_factors(build(), tok, S, [text], budget=3, progress=False)


def test_patched_model_and_existing_log_are_refused(model, tok, text, tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("something the user wrote\n")
    with pytest.raises(ValueError, match="exists; pass resume=True"):
        search_rope_factors(model, tok, S, [text], budget=3, progress=False, log_path=log)
    assert log.read_text() == "something the user wrote\n"
    with pytest.raises(ValueError, match="not a search log"):
        search_rope_factors(model, tok, S, [text], budget=3, progress=False, log_path=log, resume=True)
    patch_model(model, "yarn", S)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already patched .*unpatch_model"):
        search_rope_factors(model, tok, S, [text], budget=3, progress=False)
    assert_unchanged(model, before)


def test_needle_objective_scores_the_answer(model, tok, text):
    import re

    from hf_rope_ext.search import _windows

    result = search_rope_factors(model, tok, S, [text], budget=1, objective="needle", progress=False, seed=5)
    assert SearchResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    # the window: the needle early (at 10 %), the question and the answer at the very end
    (window,) = _windows(tok, [text], 2 * L, 0, "needle", L, "texts", 5)
    decoded = tok.decode(window.ids)
    key = re.search(r"The secret passphrase is (\d{5})\.", decoded).group(1)
    assert decoded.endswith(f"What is the secret passphrase? The secret passphrase is {key}.")
    assert len(tok(decoded[: decoded.index("The secret passphrase")]).input_ids) <= 0.1 * 2 * L + 2
    # the score: NLL of exactly the answer tokens " KEY." under the patched model, computed here
    answer = len(tok(f" {key}.", add_special_tokens=False).input_ids)
    patch_model(model, "longrope", S, short_factor=result.factors, long_factor=result.factors,
                attention_factor=math.sqrt(1 + math.log(S) / math.log(L)))
    with torch.no_grad():
        logits = model(window.ids[None]).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits.float(), window.ids[1:], reduction="none")
    assert result.score == pytest.approx(float(nll[-answer:].mean()), abs=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# command line


def test_cli_end_to_end(tmp_path, tok, text, capsys):
    from hf_rope_ext.cli import main

    base = tmp_path / "base"
    tiny_llama(max_positions=L, vocab_size=len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    search_text, held_out = tmp_path / "search.txt", tmp_path / "held_out.txt"
    search_text.write_text(text[:20000])
    held_out.write_text(text[20000:40000])
    out = tmp_path / "out"
    argv = ["search", str(base), "--factor", "2", "--text", str(search_text), "--validation-text", str(held_out),
            "--baseline", "yarn", "--budget", "4", "--out", str(out), "--no-progress"]

    # refusals before anything loads or changes
    for bad, message in ((["--factor", "1"], "--factor must be a number > 1"),
                         (["--budget", "0"], "--budget must be at least 1"),
                         (["--proxy-length", "32"], "proxy_length must be > 64"),
                         (["--text", str(tmp_path / "missing.txt")], "not found"),
                         (["--attention-range", "1", "1.2"], "--attention-range bounds a searched attention factor")):
        assert main([*argv, *bad]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    assert main(["search", "gpt2-folder-that-does-not-exist", *argv[2:]]) == 2
    capsys.readouterr()

    assert main(argv) == 0
    shown = json.loads(capsys.readouterr().out.split("\nsaved to")[0])
    assert shown["evaluations"] == 4
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "longrope"
    assert config["rope_parameters"]["short_factor"] == shown["factors"] or np.allclose(
        config["rope_parameters"]["short_factor"], shown["factors"], atol=1e-4)
    saved = json.loads((out / "search.json").read_text())
    assert saved["kind"] == "search" and len(saved["candidates"]) == 4
    assert {r["method"] for r in saved["validation"]} == {"longrope (searched)", "yarn"}
    assert len((out / "search_log.jsonl").read_text().splitlines()) == 1 + 4
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert "evolutionary search" in card and "search.png" in card and "held_out.txt" in card

    # the saved model reloads in a fresh process that never imports hf_rope_ext, with the logits of the base model
    # patched here with the searched factors
    reference = tiny_llama(max_positions=L, vocab_size=len(tok))
    patch_model(reference, "longrope", 2, short_factor=saved["factors"], long_factor=saved["factors"],
                attention_factor=math.sqrt(1 + math.log(2) / math.log(L)))
    ids = torch.randint(3, len(tok), (1, 2 * L))  # past the original length
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(reload_outputs(out, ids), expected, rtol=1e-5, atol=1e-5)

    # an existing folder is not overwritten unasked; --resume continues the logged search
    assert main(argv) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    short = ["search", str(base), "--factor", "2", "--text", str(search_text), "--out", str(out), "--no-progress"]
    assert main([*short, "--budget", "6", "--resume"]) == 0
    shown = json.loads(capsys.readouterr().out.split("\nsaved to")[0])
    assert shown["evaluations"] == 6 and shown["resumed"] == 4
    assert len((out / "search_log.jsonl").read_text().splitlines()) == 1 + 6
    (out / "user-file.txt").write_text("mine")
    assert main([*short, "--budget", "2", "--overwrite"]) == 0
    assert not (out / "user-file.txt").exists()
    assert len((out / "search_log.jsonl").read_text().splitlines()) == 1 + 2

    # the attention factor searched too: the saved config carries the best one, the card says it was searched
    capsys.readouterr()
    assert main([*short, "--budget", "5", "--overwrite", "--search-attention", "--attention-range", "1", "2.5",
                 "--attention-factor", "2.2", "--start", "yarn:beta_slow=2"]) == 0
    shown = json.loads(capsys.readouterr().out.split("\nsaved to")[0])
    saved = json.loads((out / "search.json").read_text())
    assert {c["attention"] for c in saved["candidates"]} >= {2.2}
    np.testing.assert_allclose(saved["seeds"]["start"], _yarn_reference(beta_slow=2.0), rtol=1e-6)
    best = min(saved["candidates"], key=lambda c: (c["score"], c["index"]))
    rp = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert rp["attention_factor"] == saved["attention_factor"] == best["attention"]
    assert shown["attention_factor"] == round(best["attention"], 5)
    assert f"the attention factor (best {best['attention']:.4f})" in (out / "README.md").read_text()


def test_cli_refuses_a_non_rotary_model(tmp_path, tok, text, capsys):
    from hf_rope_ext.cli import main

    base = tmp_path / "gpt2"
    _gpt2().save_pretrained(base)
    tok.save_pretrained(base)
    (tmp_path / "t.txt").write_text(text[:20000])
    out = tmp_path / "out"
    assert main(["search", str(base), "--factor", "2", "--text", str(tmp_path / "t.txt"), "--out", str(out),
                 "--no-progress"]) == 2
    assert "needs a rotary (RoPE) model" in capsys.readouterr().err
    assert not out.exists()


def test_benchmark_report_is_generated_from_its_json(tmp_path, capsys):
    """benchmarks/bench_search.py --report-only: the table from a JSON (no model loaded)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_search", Path(__file__).parent.parent / "benchmarks" /
                                                  "bench_search.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [{"text": "builtin:pydoc@20000", "method": "longrope (searched)", "length": 16384, "ppl_window": 10.5,
             "ppl_beyond": 11.0},
            {"text": "builtin:pydoc@20000", "method": "yarn", "length": 16384, "ppl_window": 11.2,
             "ppl_beyond": 11.73}]
    search = {"objective": "beyond", "eval_length": 16384, "texts": ["builtin:pydoc@60000"], "evaluations": 3,
              "resumed_evaluations": 0, "seconds": 510.0, "stopped": "budget", "searched_dims": [20, 31],
              "score": 2.3, "factors": [1.0, 2.0], "attention_factor": 1.0693,
              "candidates": [{"index": 0, "generation": 0, "origin": "seed:pi", "score": 2.5, "seconds": 140.0},
                             {"index": 1, "generation": 0, "origin": "seed:yarn", "score": 2.4, "seconds": 150.0},
                             {"index": 2, "generation": 1, "origin": "mutation", "score": 2.3, "seconds": 160.0}]}
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"search": search, "validation": rows,
                               "control": {"builtin:pydoc@20000": {"ppl_8k_16k": 11.41}}}))
    assert bench.main(["--report-only", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| builtin:pydoc@20000 | longrope (searched) | 10.50 | 11.00 | -6.2 % |" in text  # 10.5 / 11.2 - 1
    assert "| builtin:pydoc@20000 | none, 8k sliding window (control) | – | 11.41 | – |" in text
    # the evaluations' own seconds (450 s); the rest of the 510 s is validation
    assert "3 evaluations in 7.5 min (150 s each" in text and "validation 1.0 min more" in text
    assert "pi 2.5000, yarn 2.4000" in text
    assert "Best candidate: #2 (mutation, generation 1); best candidate the search itself made: 2.3000." in text
    assert "attention factor 1.0693 (fixed)." in text
    # vs yarn on both spans and vs the control past 8k: 11.0 / 11.73 - 1 = -6.2 %, 11.0 / 11.41 - 1 = -3.6 %
    assert "| builtin:pydoc@20000 | longrope (searched) | 10.50 | 11.00 | -6.2 % | -6.2 % | -3.6 % |" in text
    assert "| builtin:pydoc@20000 | yarn | 11.20 | 11.73 | – | – | +2.8 % |" in text

    # a search of the attention factor too: each seed's and the best factor's attention are reported
    for c, a in zip(search["candidates"], (1.0693, 1.0377, 1.045), strict=True):
        c["attention"] = a
    search["attention_factor"] = 1.045
    out.write_text(json.dumps({"search": search, "validation": rows}))
    assert bench.main(["--report-only", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dimensions 20–31 and the attention factor searched" in text
    assert "pi (attention 1.0693) 2.5000, yarn (attention 1.0377) 2.4000" in text
    assert "attention factor 1.0450 (searched)." in text

    # stage 4: passkey cells of the searched factors, summed over depths
    passkey = {"longrope (searched)|0.1": {"correct": 2, "total": 2, "outputs": ["1->'1.'", "2->'2.'"]},
               "longrope (searched)|0.5": {"correct": 1, "total": 2, "outputs": ["3->'3.'", "4->'x'"]}}
    out.write_text(json.dumps({"search": search, "validation": rows, "passkey": passkey}))
    assert bench.main(["--report-only", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| 0.5 | 1/2 | 3->'3.', 4->'x' |" in text and "Passkey at 16k, searched factors: 3/4 keys" in text

    # a 32k run (GPU plan): the spans follow the length, the control is read from ppl_beyond
    for r in rows:
        r["length"] = 32768
    out.write_text(json.dumps({"search": search, "validation": rows, "meta": {"length": 32768},
                               "control": {"builtin:pydoc@20000": {"ppl_beyond": 12.0}}}))
    assert bench.main(["--report-only", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| text (32768 tokens) | method | PPL 0–32k | PPL 8k–32k | vs yarn (0–32k) |" in text
    assert "| builtin:pydoc@20000 | longrope (searched) | 10.50 | 11.00 | -6.2 % | -6.2 % | -8.3 % |" in text
