"""Pictures: the numbers behind them (wavelengths against the formulas, similarity matrices) and valid PNG files."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from hf_rope_ext import list_methods, patch_model
from hf_rope_ext.eval.perplexity import Bucket, PerplexityReport, PerplexityResult
from hf_rope_ext.eval.retrieval import RetrievalReport, RetrievalTrial
from hf_rope_ext.plots import (
    load_result,
    plot_perplexity_vs_length,
    plot_position_loss,
    plot_position_similarity,
    plot_retrieval_heatmap,
    plot_rope_wavelengths,
    position_similarity,
    position_table,
    rope_geometry,
    rope_wavelengths,
)

from .eval_utils import tiny_llama

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_width: int = 300) -> None:
    import matplotlib.image

    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[1] >= min_width
    assert image[..., :3].std() > 0.01  # not a blank canvas


D, BASE, L, S = 64, 10000.0, 2048, 4.0


def theta(i: int) -> float:
    return BASE ** (-2 * i / D)


def test_wavelengths_follow_each_method_formula():
    rows = {r.method: r for r in rope_wavelengths(["extrapolate", "linear", "ntk", "yarn"], S, head_dim=D, base=BASE,
                                                 original_length=L)}
    for i in range(D // 2):
        original = 2 * math.pi / theta(i)
        assert rows["extrapolate"].wavelengths[i] == pytest.approx(original, rel=1e-5)
        assert rows["linear"].wavelengths[i] == pytest.approx(S * original, rel=1e-5)
        ntk_base = BASE * S ** (D / (D - 2))  # bloc97's NTK-aware base
        assert rows["ntk"].wavelengths[i] == pytest.approx(2 * math.pi * ntk_base ** (2 * i / D), rel=1e-4)
        # YaRN: r = L / wavelength turns in training; r > beta_fast=32 kept, r < beta_slow=1 interpolated
        turns = L / original
        if turns > 32 * 1.2:
            assert rows["yarn"].regime[i] == "extrapolated"
        elif turns < 1 / 1.2:
            assert rows["yarn"].regime[i] == "interpolated"
    assert set(rows["extrapolate"].regime) == {"extrapolated"}
    assert set(rows["linear"].regime) == {"interpolated"}
    assert rows["ntk"].regime[0] == "extrapolated" and "blended" in rows["ntk"].regime
    assert {"extrapolated", "blended", "interpolated"} <= set(rows["yarn"].regime)
    assert rows["yarn"].attention_factor == pytest.approx(0.1 * math.log(S) + 1)


def test_rope_geometry_reads_the_original_values_of_a_patched_model():
    model = tiny_llama(max_positions=64)
    expected = {"head_dim": 16, "base": 10000.0, "original_length": 64}
    assert rope_geometry(model) == expected
    patch_model(model, "ntk", factor=4)
    assert rope_geometry(model) == expected


def test_wavelength_plot(tmp_path):
    path = plot_rope_wavelengths(["extrapolate", "linear", "ntk", "yarn", "dynamic_ntk"], S, tmp_path / "w.png",
                                 head_dim=D, base=BASE, original_length=L)
    assert_png(path)
    with pytest.raises(ValueError, match="unknown method"):
        rope_wavelengths(["yarnn"], S, head_dim=D, base=BASE, original_length=L)


def test_similarity_matrix_and_plot(tmp_path):
    torch.manual_seed(0)
    before = torch.randn(32, 16)
    after = torch.repeat_interleave(before, 2, dim=0)  # a crude "interpolation": neighbours identical
    sim = position_similarity(after)
    assert sim.shape == (64, 64)
    torch.testing.assert_close(sim.diagonal(), torch.ones(64))
    torch.testing.assert_close(sim, sim.T)
    assert sim[0, 1] == pytest.approx(1.0, abs=1e-6)
    ref = torch.nn.functional.cosine_similarity(before[3], before[7], dim=0)
    assert position_similarity(before)[3, 7] == pytest.approx(float(ref), abs=1e-6)
    assert position_similarity(after, max_points=16).shape == (16, 16)
    assert_png(plot_position_similarity(before, after, tmp_path / "s.png", original_length=32))


def test_similarity_plot_on_a_learned_table_model(tmp_path):
    methods = [m["name"] for m in list_methods("absolute")]
    if "interpolate" not in methods:
        pytest.skip("no learned-table methods registered")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=32, n_layer=1, n_head=2, vocab_size=64)).eval()
    before = position_table(model)
    extended = patch_model(copy.deepcopy(model), "interpolate", factor=2)
    after = position_table(extended)
    assert before.shape == (32, 32) and after.shape == (64, 32)
    assert_png(plot_position_similarity(model, extended, tmp_path / "gpt2.png"))


def ppl_report(method: str | None, values: dict[int, float]) -> PerplexityReport:
    results = []
    for n, ppl in values.items():
        nll = math.log(ppl)
        buckets = [Bucket(i * n // 4, (i + 1) * n // 4, n // 4, nll + 0.1 * i, math.exp(nll + 0.1 * i))
                   for i in range(4)]
        results.append(PerplexityResult(n, n, n, n - 1, 1, nll, ppl, n // 4, buckets))
    patch = {"method": method, "factor": 2.0, "original_max_position_embeddings": 64} if method else None
    return PerplexityReport("tiny", patch, "builtin:pydoc", "docs", 0, results)


def test_perplexity_plots_from_reports_and_json(tmp_path):
    a = ppl_report("yarn", {32: 10.0, 64: 11.0, 128: 12.0})
    b = ppl_report(None, {32: 10.0, 64: 11.0, 128: 90.0})
    assert_png(plot_perplexity_vs_length([a, b], tmp_path / "p.png"))
    a.save(tmp_path / "a.json")
    assert load_result(tmp_path / "a.json") == a
    assert_png(plot_position_loss([str(tmp_path / "a.json"), b], tmp_path / "q.png", length=64))
    with pytest.raises(ValueError, match="kind"):
        load_result({"kind": "other"})


def test_heatmap_from_json(tmp_path):
    trials = [RetrievalTrial(n, d, 0, n, 5, "12345", " 12345", "12345", n < 100) for d in (0.0, 0.5, 1.0)
              for n in (64, 128)]
    report = RetrievalReport("passkey", "tiny", None, [64, 128], [0.0, 0.5, 1.0], 1, 0,
                             [[1.0, 0.0]] * 3, trials)
    report.save(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["overall_accuracy"] == 0.5
    assert_png(plot_retrieval_heatmap(tmp_path / "r.json", tmp_path / "h.png"), min_width=200)
