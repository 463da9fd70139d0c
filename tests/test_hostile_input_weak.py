"""Issue 14, "weak today": absurd numbers, the order of checks, saved configs edited by hand, and the command line's
errors. One test per class of input (parametrized over its cases); each asserts the error says what is wrong and
where, and that nothing changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_rope_ext import patch_info, patch_model, unpatch_model
from hf_rope_ext.cli import main
from hf_rope_ext.loading import load_model
from hf_rope_ext.patching import MAX_POSITIONS

from .conftest import ORIGINAL_LEN, tiny_model
from .model_folders import save_patched_llama, tiny_tokenizer
from .utils import assert_unchanged as _assert_unchanged
from .utils import snapshot

INF, NAN = float("inf"), float("nan")
HALF = 8  # rotary dim / 2 of the tiny llama (head_dim 16)


def assert_unchanged(model, snap):
    _assert_unchanged(model, snap)
    assert patch_info(model) is None


# --------------------------------------------------------------------------------- non-finite and absurd numbers


@pytest.mark.parametrize(
    "method,args,kwargs,match",
    [
        ("yarn", (INF,), {}, r"factor must be a finite number, got inf"),
        ("yarn", (NAN,), {}, r"factor must be a finite number, got nan"),
        ("yarn", (1e9,), {}, r"64000000000 positions .* beyond what the model can address.*2\*\*24"),
        ("linear", (None,), dict(max_position_embeddings=2**40), r"beyond what the model can address"),
        ("yarn", (1.0000001,), {}, r"does not lengthen the context: round\(64 \* factor\) = 64"),
        ("yarn", (None,), dict(max_position_embeddings=INF), r"max_position_embeddings must be a finite number"),
        ("yarn", (None,), dict(max_position_embeddings=NAN), r"max_position_embeddings must be a finite number"),
        ("yarn", (4,), dict(original_max_position_embeddings=INF), r"original_max_position_embeddings must be a "
                                                                   r"positive integer .*got inf"),
        ("yarn", (4,), dict(original_max_position_embeddings=0), r"original_max_position_embeddings must be a "
                                                                 r"positive integer .*got 0"),
        ("yarn", (4,), dict(original_max_position_embeddings="64"), r"original_max_position_embeddings .*got '64'"),
        ("yarn", (4,), dict(beta_fast="32"), r"parameter beta_fast must be a finite number, got '32'"),
        ("yarn", (4,), dict(beta_fast=INF), r"parameter beta_fast must be a finite number, got inf"),
        ("yarn", (4,), dict(attention_factor="1.2"), r"parameter attention_factor must be a finite number or None"),
        ("longrope", (4,), dict(short_factor=["a"] * HALF, long_factor=[1.0] * HALF), r"short_factor\[0\] is 'a'"),
        ("longrope", (4,), dict(short_factor=3.0, long_factor=[1.0] * HALF),
         r"parameter short_factor must be a list of finite numbers or None, got 3.0"),
        ("longrope", (4,), dict(short_factor=[1.0] * HALF, long_factor=[1.0] * 7 + [INF]), r"long_factor\[7\] is inf"),
        ("yarn", (4,), dict(layer_types="full_attention"), r"layer_types must be a list of layer type names"),
        ("yarn", (4,), dict(repatch="yes"), r"repatch must be True or False, got 'yes'"),
    ],
)
def test_absurd_numbers_are_refused_before_any_change(method, args, kwargs, match):
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        patch_model(model, method, *args, **kwargs)
    assert_unchanged(model, snap)


def test_the_length_limit_is_where_float32_positions_stop_being_exact():
    """The reference: float32 holds every integer up to 2**24 and no further, so past it two positions share one
    rotary angle. The limit itself is accepted, one more position is not."""
    assert MAX_POSITIONS == 2**24
    positions = torch.tensor([MAX_POSITIONS - 1, MAX_POSITIONS, MAX_POSITIONS + 1], dtype=torch.float64)
    as_fp32 = positions.float().double()
    assert as_fp32[0] != as_fp32[1] and as_fp32[1] == as_fp32[2]  # 2**24 + 1 rounds to 2**24
    model = tiny_model("llama")
    patch_model(model, "yarn", max_position_embeddings=MAX_POSITIONS)
    assert patch_info(model)["max_position_embeddings"] == MAX_POSITIONS
    snap = snapshot(unpatch_model(model))
    with pytest.raises(ValueError, match="beyond what the model can address"):
        patch_model(model, "yarn", max_position_embeddings=MAX_POSITIONS + 1)
    assert_unchanged(model, snap)


# ------------------------------------------------------------------------------------------------- order of checks


@pytest.mark.parametrize("tokenizer", [object(), "tokenizer", 5])
def test_a_tokenizer_that_is_not_one_is_refused_before_the_model_changes(tokenizer):
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"tokenizer must be a transformers tokenizer \(with model_max_length\)"):
        patch_model(model, "yarn", 4, tokenizer=tokenizer)
    assert_unchanged(model, snap)
    # a real tokenizer still goes through and gets the new length
    tok = tiny_tokenizer(ORIGINAL_LEN)
    patch_model(model, "yarn", 4, tokenizer=tok)
    assert tok.model_max_length == 4 * ORIGINAL_LEN


@pytest.mark.parametrize("model", [None, "llama", object(), torch.nn.Linear(2, 2)])
def test_something_that_is_not_a_model_gets_a_clear_error(model):
    for call in (lambda: patch_model(model, "yarn", 4), lambda: unpatch_model(model)):
        with pytest.raises(ValueError, match=r"model must be a loaded transformers model .*got "
                                             f"{type(model).__name__}"):
            call()


# ---------------------------------------------------------------------------------- saved configs edited by hand


def _rope(config):
    return [config[k] for k in ("rope_parameters", "rope_scaling") if k in config]


EDITS = {
    # name: (method, edit of the config.json dict, what the error says)
    "record is a string": ("yarn", lambda c: c.update(hf_rope_ext="garbage"), r"is str 'garbage', not the object"),
    "record is a list": ("yarn", lambda c: c.update(hf_rope_ext=[1, 2]), r"is list \[1, 2\], not the object"),
    "record without method": ("yarn", lambda c: c["hf_rope_ext"].pop("method"), r"has no 'method'"),
    "record without original_config": ("yarn", lambda c: c["hf_rope_ext"].pop("original_config"),
                                       r"has no 'original_config'"),
    "unknown method": ("yarn", lambda c: c["hf_rope_ext"].update(method="yarnn"),
                       r"names method 'yarnn', which is not registered here \(known: .*yarn"),
    "wrong kind": ("yarn", lambda c: c["hf_rope_ext"].update(kind="absolute"),
                   r"says kind 'absolute', but method 'yarn' is of kind 'rope'"),
    "method of another kind": ("yarn", lambda c: c["hf_rope_ext"].update(method="interpolate", kind="absolute"),
                               r"names 'interpolate', a method for learned position-table models"),
    "edited original length": ("yarn", lambda c: c["hf_rope_ext"].update(original_max_position_embeddings=128),
                               r"inconsistent: factor 4.0 x original_max_position_embeddings 128 != "
                               r"max_position_embeddings 256"),
    "edited original_config": ("yarn", lambda c: c["hf_rope_ext"]["original_config"].update(
        max_position_embeddings=128), r"original_max_position_embeddings 64 was read from the config, which said "
                                      r"max_position_embeddings 128"),
    "lengths edited together": ("yarn", lambda c: c["hf_rope_ext"].update(original_max_position_embeddings=128,
                                                                          max_position_embeddings=512),
                                r"original_max_position_embeddings 128 was read from the config"),
    "length not an integer": ("yarn", lambda c: c["hf_rope_ext"].update(max_position_embeddings="256"),
                              r"has max_position_embeddings = '256', not a positive integer"),
    "garbled parameter": ("yarn", lambda c: c["hf_rope_ext"]["parameters"].update(beta_fast="x"),
                          r"parameters that 'yarn' refuses: .*beta_fast must be a finite number, got 'x'"),
    "rope factor edited": ("yarn", lambda c: [rp.update(factor=8.0) for rp in _rope(c)],
                           r"says factor 4.0, but rope_parameters.factor is 8.0"),
    "rope original length edited": ("yarn", lambda c: [rp.update(original_max_position_embeddings=32)
                                                       for rp in _rope(c)],
                                    r"rope_parameters.original_max_position_embeddings is 32"),
    "rope type swapped": ("yarn", lambda c: [rp.update(rope_type="linear", type="linear") for rp in _rope(c)],
                          r"says rope_parameters.rope_type 'yarn' was written, but the config now has 'linear'"),
    "attention record garbled": ("rerope", lambda c: c.update(hf_rope_ext="garbage"), r"is str 'garbage'"),
}

LOAD_ONLY = {
    # edits that stop transformers itself from building the model: load_model says what and where first
    "unknown rope_type": ("yarn", lambda c: [rp.update(rope_type="yarnn", type="yarnn") for rp in _rope(c)],
                          r"rope_scaling.rope_type is 'yarnn', which this transformers does not know; known: .*yarn"),
    "unknown rope_type in rope_parameters only": ("yarn", lambda c: c["rope_parameters"].update(rope_type="yarnn"),
                                                  r"rope_parameters.rope_type is 'yarnn'"),
    "attention record removed": ("rerope", lambda c: c.pop("hf_rope_ext"),
                                 r"an attention-level hf_rope_ext method\) but no 'hf_rope_ext' record"),
    "config.json not JSON": ("yarn", None, r"config.json is not valid JSON \(line 1, column 2"),
}


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    return {m: save_patched_llama(root / m, m) for m in ("yarn", "rerope")}


def _edited(saved_folders, tmp_path, method, edit):
    folder = tmp_path / "edited"
    shutil.copytree(saved_folders[method], folder)
    path = folder / "config.json"
    if edit is None:
        path.write_text("{" + path.read_text()[:40])
    else:
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name", list(EDITS))
def test_a_record_edited_by_hand_is_named_by_load_patch_info_and_unpatch(name, saved_folders, tmp_path):
    from transformers import AutoModelForCausalLM

    method, edit, match = EDITS[name]
    folder = _edited(saved_folders, tmp_path, method, edit)
    where = rf"\({folder / 'config.json'}, key 'hf_rope_ext'\)"
    with pytest.raises(ValueError, match=rf"the patch record {where} (.* )?{match}"):
        load_model(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)  # transformers itself ignores the record
    snap = snapshot(model)
    with pytest.raises(ValueError, match=rf"the patch record {where} (.* )?{match}"):
        patch_info(model)
    with pytest.raises(ValueError, match=rf"the patch record {where} (.* )?{match}"):
        unpatch_model(model)  # never "restores" from a record that disagrees with itself or the config
    with pytest.raises(ValueError, match=rf"the patch record {where} (.* )?{match}"):
        patch_model(model, "linear", 2, repatch=True)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("name", list(LOAD_ONLY))
def test_a_config_transformers_cannot_build_is_named_by_load(name, saved_folders, tmp_path, capsys):
    method, edit, match = LOAD_ONLY[name]
    folder = _edited(saved_folders, tmp_path, method, edit)
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'}:? .*{match}|{match}") as err:
        load_model(folder)
    assert str(folder / "config.json") in str(err.value)
    # and the command line says the same, in one line, exit 2
    assert main(["eval", "ppl", str(folder), "--lengths", "32"]) == 2
    assert _one_error_line(capsys).startswith(f"error: {folder / 'config.json'}")


def test_unedited_records_still_load_and_unpatch(saved_folders):
    """The checks refuse only what was edited: the folders as saved load, report and unpatch (rerope back to the
    original attention, yarn back to rope_type default at the original length)."""
    for method, folder in saved_folders.items():
        model, _ = load_model(folder)
        assert patch_info(model)["method"] == method
        unpatch_model(model)
        assert model.config.rope_parameters["rope_type"] == "default"
        assert model.config.max_position_embeddings == ORIGINAL_LEN


# ----------------------------------------------------------------------------------------------------------- CLI


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_cli_exit_codes_usage_2_runtime_1_traceback_only_with_v(saved_folders, tmp_path, capsys, monkeypatch):
    folder = saved_folders["yarn"]
    # usage: a bad option value (argparse), a bad --param (the library), a missing folder
    assert main(["eval", "ppl", str(folder), "--lengths", "32", "--loss-chunk", "0"]) == 2
    line = _one_error_line(capsys)
    assert "--loss-chunk" in line and "must be a positive integer, got 0" in line
    assert main(["eval", "ppl", str(folder), "--lengths", "32", "--factor", "4"]) == 2
    assert "--factor given without --method" in _one_error_line(capsys)
    assert main(["eval", "ppl", str(folder), "--lengths", "32", "--param", "beta_fast=4"]) == 2
    assert "--param given without --method" in _one_error_line(capsys)
    assert main(["patch", str(tmp_path / "nowhere"), "--method", "yarn", "--factor", "2",
                 "--out", str(tmp_path / "o")]) == 2
    assert "model folder not found" in _one_error_line(capsys)
    # a failure while running: exit 1, its type named, the traceback only with -v
    import hf_rope_ext.loading

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory\nTried to allocate 2 GiB")

    monkeypatch.setattr(hf_rope_ext.loading, "load_model", boom)
    argv = ["eval", "ppl", str(folder), "--lengths", "32"]
    assert main(argv) == 1
    line = _one_error_line(capsys)
    assert line == "error: RuntimeError: CUDA out of memory Tried to allocate 2 GiB (run again with -v for the " \
                   "traceback)"
    assert main([*argv, "-v"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in boom" in err and err.splitlines()[-1].startswith("error: RuntimeError")


def test_cli_patch_a_folder_without_tokenizer_says_so(saved_folders, tmp_path, capsys):
    folder = tmp_path / "no_tokenizer"
    tiny_model("llama").save_pretrained(folder)
    out = tmp_path / "out"
    capsys.readouterr()  # the progress bar of save_pretrained
    assert main(["patch", str(folder), "--method", "yarn", "--factor", "2", "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert f"{folder} has no tokenizer" in line and "save_pretrained" in line
    assert not out.exists()


@pytest.fixture(scope="module")
def carded(saved_folders, tmp_path_factory):
    """The saved yarn folder with its card: ready to push."""
    folder = tmp_path_factory.mktemp("carded") / "tiny-yarn"
    shutil.copytree(saved_folders["yarn"], folder)
    assert main(["card", str(folder)]) == 0
    return folder


@pytest.mark.parametrize("repo_id", ["me/has space", "a/b/c", "me/x--y", "https://huggingface.co/me/x"])
def test_cli_push_dry_run_validates_the_repo_id(carded, repo_id, capsys):
    assert main(["push", str(carded), "me/tiny-yarn", "--dry-run"]) == 0  # the folder itself is pushable
    capsys.readouterr()
    assert main(["push", str(carded), repo_id, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert f"refused: invalid repo id {repo_id!r}" in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: dry run: this push would be refused: invalid repo id "
                                                   f"{repo_id!r}")


def test_cli_card_keeps_a_hand_written_readme(saved_folders, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(saved_folders["yarn"], folder)
    mine = "# My model\n\nNotes I wrote by hand.\n"
    (folder / "README.md").write_text(mine)
    assert main(["card", str(folder)]) == 2
    line = _one_error_line(capsys)
    assert "README.md was not written by hf-rope-ext" in line and "--overwrite" in line
    assert (folder / "README.md").read_text() == mine and not (folder / "README.md.bak").exists()
    assert main(["card", str(folder), "--overwrite"]) == 0
    assert (folder / "README.md.bak").read_text() == mine
    card = (folder / "README.md").read_text()
    assert "hf-rope-ext" in card and "My model" not in card
    # a card hf-rope-ext wrote is its own to re-render: no --overwrite needed, the backup is left as it was
    assert main(["card", str(folder), "--license", "mit"]) == 0
    assert "license: mit" in (folder / "README.md").read_text() and (folder / "README.md.bak").read_text() == mine
    # and the backup stays local on push
    from hf_rope_ext.hub import plan_push

    plan = plan_push(folder)
    assert "README.md.bak" not in dict(plan.files) and "README.md.bak" in dict(plan.excluded)


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"kind": "perplexity", ', r"is not valid JSON \(line 1, column 24"),
        ("[1, 2]", r"holds a JSON list, not a report object"),
        ('{"kind": "perplexity"}', r"not a valid perplexity report \(.*missing"),
        ('{"kind": "nope"}', r"kind 'nope'"),
    ],
)
def test_cli_a_broken_json_input_names_the_file(saved_folders, tmp_path, content, match, capsys):
    bad = tmp_path / "results.json"
    bad.write_text(content)
    folder = tmp_path / "model"
    shutil.copytree(saved_folders["yarn"], folder)
    assert main(["card", str(folder), "--results", str(bad)]) == 2
    line = _one_error_line(capsys)
    assert str(bad) in line
    assert not (folder / "README.md").exists()
    from hf_rope_ext.eval.io import load_result

    with pytest.raises(ValueError, match=match):
        load_result(bad)


def test_cli_argparse_errors_are_one_line(capsys):
    assert main(["patch", "x", "--method", "yarn", "--factor", "four", "--out", "y"]) == 2
    line = _one_error_line(capsys)
    assert line == "hf-rope-ext patch: error: argument --factor: invalid float value: 'four' (see hf-rope-ext patch " \
                   "--help)"


# ------------------------------------------------------------------------------------------------ RUN_SLOW=1 is read


@pytest.mark.parametrize(("env", "selected"), [({}, False), ({"RUN_SLOW": "1"}, True)])
def test_run_slow_selects_the_slow_tests(env, selected, tmp_path):
    """pyproject leaves slow tests out (-m 'not slow'); RUN_SLOW=1 brings them in. The reference: pytest's own
    collection report in a fresh process, over a slow test of this suite."""
    environ = {k: v for k, v in os.environ.items() if k != "RUN_SLOW"} | env
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/test_eval_smollm2.py"],
        capture_output=True, text=True, env=environ, timeout=300, cwd=Path(__file__).parents[1],
    )
    assert proc.returncode in (0, 5), proc.stdout + proc.stderr  # 5: nothing selected
    collected = [line for line in proc.stdout.splitlines() if "test_eval_smollm2.py::" in line]
    assert bool(collected) == selected, proc.stdout[-2000:]
