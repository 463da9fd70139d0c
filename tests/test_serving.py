"""Checkpoints every reader understands (issue 13, items 1, 2, 5).

A real older client: transformers 4.57 in its own venv (cached under .cache/, keyed by the version) loads checkpoints
saved by transformers 5 for every static rotary method, in a subprocess that never imports hf_rope_ext, and its
logits past the original length must equal transformers 5's. Serving lengths are checked against the rules the
engines' own sources apply (vLLM 0.33.0 ``vllm/config/model.py::_get_and_verify_max_len``; SGLang 0.5.23
``sglang/srt/utils/hf_transformers/common.py::get_context_length``), written out here independently of the library.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import hf_rope_ext  # noqa: F401  (registers the legacy mirror)
from hf_rope_ext import patch_info, patch_model, unpatch_model
from hf_rope_ext.cards.papers import ENGINE_SUPPORT, LEGACY_TRANSFORMERS

from .conftest import ORIGINAL_LEN, VOCAB, tiny_model
from .test_patching import method_kwargs

FACTOR = 4
LEGACY_VERSION = LEGACY_TRANSFORMERS  # the transformers 4.x release the card's serving section names as verified
STATIC = ["extrapolate", "linear", "ntk", "ntk_by_parts", "yarn", "llama3", "longrope"]
EXPRESSIBLE = STATIC + ["dynamic_ntk"]  # dynamic_ntk is saved as transformers' own `dynamic`, which 4.57 has too
REFUSED = ["dynamic_yarn", "self_extend"]  # plugin rope types: 4.x must refuse them, not build plain RoPE
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- the older client


def legacy_python() -> Path:
    """python of a venv with transformers LEGACY_VERSION and this venv's torch (a .pth line placed after the new
    venv's own site-packages, so its transformers wins). Built once, cached in .cache/ (ignored by git)."""
    cache = Path(os.environ.get("HF_ROPE_EXT_TEST_CACHE", REPO / ".cache"))
    venv = cache / f"transformers-{LEGACY_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}"
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return python
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / ".gitignore").exists():
        (cache / ".gitignore").write_text("*\n")  # the cache ignores itself
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"transformers=={LEGACY_VERSION}"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot install transformers=={LEGACY_VERSION} (offline?): {proc.stderr[-500:]}")
    site = next((venv / "lib").glob("python*/site-packages"))
    torch_site = Path(torch.__file__).resolve().parents[1]
    (site / "zz_hf_rope_ext_torch.pth").write_text(f"{torch_site}\n")  # .pth lines go AFTER site-packages
    (venv / ".complete").write_text(LEGACY_VERSION + "\n")
    return python


_LEGACY_RUN = textwrap.dedent(
    """
    import json, logging, sys, warnings, torch, transformers
    assert "hf_rope_ext" not in sys.modules
    logs = []
    class Keep(logging.Handler):
        def emit(self, record):
            logs.append(record.getMessage())
    logging.getLogger("transformers").addHandler(Keep(logging.WARNING))
    warnings.simplefilter("always")
    from transformers import AutoModelForCausalLM
    ids = torch.load({ids!r})
    results, notes = {{}}, {{}}
    for path in {paths!r}:
        del logs[:]
        try:
            with warnings.catch_warnings(record=True) as caught:
                model = AutoModelForCausalLM.from_pretrained(path).eval()
        except Exception as error:  # a checkpoint 4.x must refuse
            notes[path] = {{"error": f"{{type(error).__name__}}: {{error}}"}}
            continue
        with torch.no_grad():
            results[path] = model(ids).logits
        rotary = model.model.rotary_emb
        notes[path] = {{"rope_type": rotary.rope_type, "warnings": logs + [str(w.message) for w in caught]}}
    torch.save(results, {out!r})
    print(json.dumps({{"version": transformers.__version__, "notes": notes}}))
    """
)


def legacy_logits(paths: list[Path], ids: torch.Tensor, workdir: Path) -> tuple[dict, dict]:
    """Logits of each saved model under transformers LEGACY_VERSION (one subprocess, cwd outside the repo so
    hf_rope_ext cannot be imported), and what that process reported."""
    python = legacy_python()
    torch.save(ids, workdir / "_ids.pt")
    code = _LEGACY_RUN.format(ids=str(workdir / "_ids.pt"), paths=[str(p) for p in paths], out=str(workdir / "_o.pt"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=600, cwd=workdir, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["version"] == LEGACY_VERSION
    return torch.load(workdir / "_o.pt"), report["notes"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny Llama patched by each method, saved by transformers 5: (folder, in-memory logits past the original length,
    unpatched logits, patch_info) per method."""
    root = tmp_path_factory.mktemp("serving")
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 3 * ORIGINAL_LEN))  # 192 tokens: past the original 64, inside the new 256
    base = logits(model, ids)
    out = {}
    for method in EXPRESSIBLE + REFUSED:
        patch_model(model, method, FACTOR, **method_kwargs(model, method))
        model.save_pretrained(root / method)
        out[method] = (root / method, logits(model, ids), patch_info(model))
        unpatch_model(model)
    return root, ids, base, out


@pytest.mark.slow
def test_transformers_457_builds_the_same_model_for_every_expressible_method(saved):
    root, ids, base, out = saved
    paths = [out[m][0] for m in EXPRESSIBLE]
    got, notes = legacy_logits(paths + [out[m][0] for m in REFUSED], ids, root)
    for method in EXPRESSIBLE:
        path, expected, info = out[method]
        assert info["transformers4"]["expressed"] is True, method
        torch.testing.assert_close(
            got[str(path)], expected, rtol=0, atol=1e-4, msg=lambda m, method=method: f"{method} under 4.57: {m}"
        )
        if method != "extrapolate":  # extrapolate keeps the trained frequencies
            assert not torch.allclose(got[str(path)], base, atol=1e-3), f"{method} loaded as the base model"
    # a method 4.x cannot express: config.json names the plugin rope type where 4.x reads it, so 4.57 refuses the
    # checkpoint with the fix in the message, as patch_info says, instead of building the plain trained RoPE
    for method in REFUSED:
        path, expected, info = out[method]
        assert info["transformers4"]["expressed"] is False and info["transformers4"]["refused"] is True, method
        assert str(path) not in got, f"{method}: transformers 4.57 built a model from it"
        assert "requires: import hf_rope_ext" in notes[str(path)]["error"], (method, notes[str(path)])
        assert not torch.allclose(expected, base, atol=1e-3)
    for method in ("linear", "yarn", "llama3"):  # 4.57 built the scaled type itself, not the default
        assert notes[str(out[method][0])]["rope_type"] == ("yarn" if method == "yarn" else method)


def test_transformers_5_loads_the_mirror_without_warnings_and_unpatches(saved, caplog):
    from transformers import AutoModelForCausalLM

    root, ids, base, out = saved
    for method in EXPRESSIBLE:
        path, expected, info = out[method]
        config = json.loads((path / "config.json").read_text())
        assert "rope_parameters" in config and config["rope_theta"] == config["rope_parameters"]["rope_theta"]
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="transformers"):
            warnings.simplefilter("always")
            reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
        assert [str(w.message) for w in caught] == [] and caplog.records == [], method
        assert patch_info(reloaded)["transformers4"] == info["transformers4"]
        torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=1e-5)
        unpatch_model(reloaded)
        torch.testing.assert_close(logits(reloaded, ids), base, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------- engines' served length


def vllm_max_model_len(config: dict) -> tuple[int, int]:
    """vLLM 0.33.0 vllm/config/model.py::_get_and_verify_max_len without a user max_model_len: (derived length = the
    allowed maximum, default max_model_len). Derived: max_position_embeddings times the rope factor except for
    yarn-like types; longrope's default is a top-level original_max_position_embeddings when there is one."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    derived = config["max_position_embeddings"]
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"):
        derived *= rope.get("factor", 1.0)
    default = config.get("original_max_position_embeddings", derived) if rope_type == "longrope" else derived
    return int(derived), int(default)


def sglang_context_length(config: dict) -> int:
    """SGLang 0.5.23 sglang/srt/utils/hf_transformers/common.py::get_context_length."""
    rope = config.get("rope_scaling")
    factor = 1
    if rope:
        factor = rope.get("factor", 1)
        if "original_max_position_embeddings" in rope or rope.get("rope_type") == "llama3":
            factor = 1
    return int(factor * config["max_position_embeddings"])


@pytest.mark.parametrize("method", EXPRESSIBLE)
def test_serving_engines_derive_the_patched_length(saved, method):
    path, _, info = saved[3][method]
    config = json.loads((path / "config.json").read_text())
    derived, default = vllm_max_model_len(config)
    assert derived == info["max_position_embeddings"] == ORIGINAL_LEN * FACTOR
    # vLLM serves longrope at the pre-training length unless asked (its Phi-3 rule); the top-level key that triggers
    # it is what transformers 4 needs for short/long factors that differ
    assert default == (ORIGINAL_LEN if method == "longrope" else ORIGINAL_LEN * FACTOR)
    assert sglang_context_length(config) == ORIGINAL_LEN * FACTOR


def test_card_serving_claims_name_what_was_verified():
    for rope_type in ("default", "linear", "dynamic", "yarn", "llama3", "longrope"):
        text = ENGINE_SUPPORT[rope_type]
        assert f"transformers {LEGACY_VERSION}" in text and "not verified" in text, rope_type
