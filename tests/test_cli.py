"""The command line as a whole: every --help ends with an example, -v on either side of the subcommand, --version,
patch / unpatch / --repatch on saved folders (against the library called directly), --out safety, plot wavelengths
from a config alone, eval naming the method found in a saved model."""

from __future__ import annotations

import argparse
import json
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from hf_rope_ext.cli import build_parser, main
from hf_rope_ext.cli._common import SUBCOMMANDS

from .model_folders import ORIGINAL, tiny_tokenizer


def _base(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ORIGINAL)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer(ORIGINAL).save_pretrained(folder)
    return folder


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _nested(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_help_ends_with_an_example(capsys):
    top = build_parser()
    commands = _nested(top)
    assert set(commands) == set(SUBCOMMANDS)
    paths = [[name] for name in commands]
    paths += [[name, sub] for name, p in commands.items() for sub in _nested(p)]
    assert ["eval", "ppl"] in paths and ["plot", "wavelengths"] in paths and ["recipes", "cp"] in paths
    for path in [[]] + paths:
        if path == ["finetune"]:
            continue  # the recipe's own help: tests/test_packaging.py
        text = _help(path, capsys)
        tail = text[text.lower().rindex("example"):]
        runnable = [line.strip() for line in tail.splitlines()[1:] if line.strip()]
        assert runnable and runnable[0].startswith(("hf-rope-ext", "accelerate")), (path, tail)
        if path:
            assert any(" ".join(path) in line for line in runnable), (path, tail)


def test_verbose_before_or_after_the_subcommand():
    parser = build_parser()
    assert parser.parse_args(["methods"]).verbose is False
    assert parser.parse_args(["-v", "methods"]).verbose is True
    assert parser.parse_args(["methods", "-v"]).verbose is True
    assert parser.parse_args(["eval", "ppl", "m", "--lengths", "8", "-v"]).verbose is True


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"hf-rope-ext {version('hf_rope_ext')}"


def _logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.arange(4, 4 + 3 * ORIGINAL).unsqueeze(0) % 120).logits


def test_patch_unpatch_and_repatch_saved_folders(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from hf_rope_ext import patch_model

    base = _base(tmp_path / "base")
    assert main(["patch", str(base), "--method", "yarn", "--factor", "4", "--out", str(tmp_path / "yarn")]) == 0
    # unpatch: the original config and outputs, as saved before any patch
    assert main(["unpatch", str(tmp_path / "yarn"), "--out", str(tmp_path / "back")]) == 0
    assert "removed yarn x4" in capsys.readouterr().out
    original, back = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("base", "back"))
    assert "hf_rope_ext" not in back
    for key in ("rope_parameters", "max_position_embeddings"):
        assert back[key] == original[key], key
    torch.testing.assert_close(_logits(tmp_path / "back"), _logits(base), rtol=0, atol=0)
    # a model that is not extended: refused, nothing written
    assert main(["unpatch", str(base), "--out", str(tmp_path / "nothing")]) == 2
    assert "not extended" in capsys.readouterr().err and not (tmp_path / "nothing").exists()
    # repatch: refused without --repatch; with it, the same as patching the original directly
    assert main(["patch", str(tmp_path / "yarn"), "--method", "ntk", "--factor", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert "repatch" in capsys.readouterr().err
    assert main(["patch", str(tmp_path / "yarn"), "--method", "ntk", "--factor", "2", "--repatch",
                 "--out", str(tmp_path / "ntk")]) == 0
    direct = patch_model(AutoModelForCausalLM.from_pretrained(base), "ntk", 2)
    direct.save_pretrained(tmp_path / "direct")
    saved, expected = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("ntk", "direct"))
    assert saved["rope_parameters"] == expected["rope_parameters"]
    assert saved["max_position_embeddings"] == expected["max_position_embeddings"] == 2 * ORIGINAL
    assert saved["hf_rope_ext"]["original_max_position_embeddings"] == ORIGINAL
    torch.testing.assert_close(_logits(tmp_path / "ntk"), _logits(tmp_path / "direct"), rtol=0, atol=0)


def test_out_is_never_overwritten_unasked(tmp_path, capsys):
    base = _base(tmp_path / "base")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["patch", str(base), "--method", "linear", "--factor", "2", "--out", str(out)]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(["patch", str(base), "--method", "linear", "--factor", "2", "--out", str(base)]) == 2
    assert "being read" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0  # asked: the folder is replaced as a whole (issue 14, item 6)
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()


def test_plot_wavelengths_reads_the_config_only(tmp_path):
    base = _base(tmp_path / "base")
    assert main(["patch", str(base), "--method", "yarn", "--factor", "4", "--out", str(tmp_path / "yarn")]) == 0
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.json").write_text((tmp_path / "yarn" / "config.json").read_text())  # no weights at all
    assert main(["plot", "wavelengths", str(only_config), "--factor", "4", "--methods", "linear,yarn",
                 "--out", str(tmp_path / "w.png"), "--json", str(tmp_path / "w.json")]) == 0
    data = json.loads((tmp_path / "w.json").read_text())
    config = json.loads((base / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert (data["head_dim"], data["base"], data["original_length"]) == (
        head_dim, config["rope_parameters"]["rope_theta"], ORIGINAL)
    assert (tmp_path / "w.png").stat().st_size > 0


def test_eval_names_the_method_found_in_a_saved_model(tmp_path, capsys):
    base = _base(tmp_path / "base")
    assert main(["patch", str(base), "--method", "yarn", "--factor", "4", "--out", str(tmp_path / "yarn")]) == 0
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(i * 5) % 120}" for i in range(600)))
    capsys.readouterr()
    assert main(["eval", "ppl", str(tmp_path / "yarn"), "--lengths", "128", "--text", str(text), "--no-progress"]) == 0
    assert "yarn x4 (found in the saved model)" in capsys.readouterr().out
    assert main(["eval", "ppl", str(base), "--lengths", "32", "--text", str(text), "--no-progress",
                 "--method", "linear", "--factor", "2"]) == 0
    assert "linear x2 (patched here)" in capsys.readouterr().out
