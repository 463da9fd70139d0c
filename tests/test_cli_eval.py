"""The evaluation subcommands end to end on a tiny saved model: valid JSON and PNG files, tables printed."""

from __future__ import annotations

import json

import pytest

from hf_rope_ext.cli import main

from .eval_utils import bpe_tokenizer, tiny_llama
from .test_plots import assert_png


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tok = bpe_tokenizer()
    tiny_llama(max_positions=64, vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run(argv, capsys) -> str:
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_eval_ppl(model_dir, tmp_path, capsys):
    out = run(["eval", "ppl", model_dir, "--method", "yarn", "--factor", "2", "--lengths", "32,64,128",
               "--windows", "2", "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png"),
               "--no-progress"], capsys)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["kind"] == "perplexity" and data["patch"]["method"] == "yarn"
    assert [r["window"] for r in data["results"]] == [32, 64, 128]
    assert all(r["windows"] == 2 and r["perplexity"] > 1 for r in data["results"])
    assert "| 128 | 2 |" in out and "builtin" not in out.split("\n")[0]
    assert_png(tmp_path / "p.png")
    assert_png(tmp_path / "p_positions.png")


def test_eval_ppl_stride_and_shared_forward(model_dir, tmp_path, capsys):
    run(["eval", "ppl", model_dir, "--lengths", "64", "--stride", "16", "--windows", "3", "--bucket-size", "16",
         "--out", str(tmp_path / "s.json"), "--no-progress"], capsys)
    result = json.loads((tmp_path / "s.json").read_text())["results"][0]
    assert result["stride"] == 16 and result["tokens"] == 64 + 2 * 16 and result["scored_tokens"] == 95
    run(["eval", "ppl", model_dir, "--lengths", "32,64", "--share-forward", "--out", str(tmp_path / "f.json"),
         "--no-progress"], capsys)
    results = json.loads((tmp_path / "f.json").read_text())["results"]
    assert results[0]["derived_from_window"] == 64


@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_eval_retrieval(model_dir, tmp_path, capsys, task):
    out = run(["eval", task, model_dir, "--method", "linear", "--factor", "8", "--lengths", "256,400",
               "--depths", "0,0.5,1", "--max-new-tokens", "3", "--out", str(tmp_path / "r.json"),
               "--plot", str(tmp_path / "h.png"), "--no-progress"], capsys)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["kind"] == "retrieval" and data["task"] == task
    assert len(data["accuracy"]) == 3 and len(data["accuracy"][0]) == 2
    assert len(data["trials"]) == 6
    assert "overall accuracy" in out
    assert_png(tmp_path / "h.png", min_width=200)


def test_compare_and_plot_subcommands(model_dir, tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    out = run(["compare", model_dir, "--methods", "none,extrapolate,linear,yarn,dynamic_ntk", "--factor", "2",
               "--lengths", "32,64,128", "--param", "yarn.beta_fast=16", "--out-dir", str(out_dir),
               "--no-progress"], capsys)
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert lines[0] == "| method | PPL @ 32 | PPL @ 64 | PPL @ 128 | PPL of positions 64–128 |"
    assert [line.split("|")[1].strip() for line in lines[2:7]] == ["none", "extrapolate", "linear", "yarn",
                                                                   "dynamic_ntk"]
    assert "Perplexity by position in the 128-token window" in out
    data = json.loads((out_dir / "compare.json").read_text())
    assert data["kind"] == "compare" and data["original_length"] == 64
    runs = {r["method"]: r for r in data["runs"]}
    assert runs["yarn"]["patch"]["parameters"]["beta_fast"] == 16
    assert runs["none"]["patch"] is None
    # static methods share one forward, dynamic_ntk is measured per length
    assert runs["yarn"]["perplexity"]["results"][0]["derived_from_window"] == 128
    assert runs["dynamic_ntk"]["perplexity"]["results"][0]["derived_from_window"] is None
    # the unpatched model and 'extrapolate' read the same numbers (same frequencies)
    for a, b in zip(runs["none"]["perplexity"]["results"], runs["extrapolate"]["perplexity"]["results"]):
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6)
    assert (out_dir / "compare.md").read_text().startswith("| method |")
    assert_png(out_dir / "ppl_vs_length.png")
    assert_png(out_dir / "loss_by_position.png")

    run(["plot", "ppl", str(out_dir / "compare.json"), "--out", str(tmp_path / "a.png")], capsys)
    run(["plot", "positions", str(out_dir / "compare.json"), "--length", "64", "--out", str(tmp_path / "b.png")],
        capsys)
    run(["plot", "wavelengths", model_dir, "--factor", "4", "--out", str(tmp_path / "c.png"),
         "--json", str(tmp_path / "c.json")], capsys)
    run(["plot", "wavelengths", "--head-dim", "64", "--base", "10000", "--original-length", "2048", "--factor", "8",
         "--methods", "linear,yarn", "--out", str(tmp_path / "d.png")], capsys)
    for name in "abcd":
        assert_png(tmp_path / f"{name}.png")
    geometry = json.loads((tmp_path / "c.json").read_text())
    assert geometry["head_dim"] == 16 and geometry["original_length"] == 64 and len(geometry["methods"]) == 4


def test_plot_heatmap_from_eval_json(model_dir, tmp_path, capsys):
    run(["eval", "passkey", model_dir, "--lengths", "300", "--depths", "0.5", "--max-new-tokens", "2",
         "--out", str(tmp_path / "p.json"), "--no-progress"], capsys)
    run(["plot", "heatmap", str(tmp_path / "p.json"), "--out", str(tmp_path / "h.png")], capsys)
    assert_png(tmp_path / "h.png", min_width=200)


def test_demo_on_a_tiny_model(model_dir, tmp_path, capsys):
    out = run(["demo", "--model", model_dir, "--device", "cpu", "--methods", "extrapolate,yarn", "--factor", "2",
               "--lengths", "32,64,96", "--out-dir", str(tmp_path / "demo"), "--no-progress"], capsys)
    assert "| method | PPL @ 32 | PPL @ 64 | PPL @ 96 | PPL of positions 64–96 |" in out
    assert "wall time" in out and "Perplexity by position in the 96-token window" in out
    for name in ("compare.json", "compare.md"):
        assert (tmp_path / "demo" / name).is_file()
    for name in ("ppl_vs_length.png", "loss_by_position.png", "rope_wavelengths.png"):
        assert_png(tmp_path / "demo" / name)


def test_missing_model_is_a_clear_error_not_a_hang(tmp_path, capsys):
    code = main(["eval", "ppl", str(tmp_path / "nowhere"), "--lengths", "32"])
    assert code == 2
    assert "not found" in capsys.readouterr().err
    code = main(["compare", str(tmp_path / "nowhere"), "--methods", "yarnn", "--factor", "2", "--lengths", "32"])
    assert code == 2


def test_unknown_method_in_compare_names_the_known_ones(model_dir, capsys):
    code = main(["compare", model_dir, "--methods", "yarn,ntkk", "--factor", "2", "--lengths", "32"])
    assert code == 2
    assert "unknown method 'ntkk'; known:" in capsys.readouterr().err
