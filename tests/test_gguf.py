"""GGUF for llama.cpp (issue 13, items 3 and 4).

Fast: a tiny GGUF built here with gguf-py is rewritten for each method; every rope key is checked against llama.cpp's
own arithmetic, re-implemented below from its sources (``llama_cpp_rope``), applied to what was written and compared
with the rotary embedding transformers builds from the config the same patch writes; every other key and tensor must
come through unchanged. Refusals leave nothing written.

Slow: a real llama.cpp (llama-cpp-python 0.3.36, compiled once from the PyPI sdist into a venv cached in .cache/)
scores SmolLM2 past its trained 8192 tokens from the rewritten GGUF, next to transformers' figure for the same
checkpoint; llama.cpp's own convert_hf_to_gguf.py (from that sdist) converts a folder saved by hf-rope-ext.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import hf_rope_ext
from hf_rope_ext import gguf as hg
from hf_rope_ext.cli import main

from .conftest import ORIGINAL_LEN, tiny_model

REPO = Path(__file__).resolve().parents[1]
LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python release (PyPI sdist) the slow tests build and the card names


def _cache() -> Path:
    cache = Path(os.environ.get("HF_ROPE_EXT_TEST_CACHE", REPO / ".cache"))
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / ".gitignore").exists():
        (cache / ".gitignore").write_text("*\n")  # the cache ignores itself
    return cache


def llama_cpp_sdist() -> Path:
    """The llama-cpp-python sdist, downloaded once from PyPI into .cache/sdist/ and unpacked next to it; returns the
    unpacked folder (vendor/llama.cpp/ holds llama.cpp's sources, convert_hf_to_gguf.py and gguf-py)."""
    cache = _cache()
    src = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if (src / ".complete").is_file():
        return src
    tar = cache / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not tar.is_file():
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(tar.parent)],
            capture_output=True, text=True, timeout=900,
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot download llama-cpp-python=={LLAMA_CPP_PYTHON} (offline?): {proc.stderr[-500:]}")
    with tarfile.open(tar) as archive:
        archive.extractall(cache, filter="data")
    (src / ".complete").write_text(LLAMA_CPP_PYTHON + "\n")
    return src


def llama_cpp_python() -> Path:
    """python of a venv with llama-cpp-python LLAMA_CPP_PYTHON compiled from the sdist (cmake, CPU only, ~minutes on
    2 cores). Built once, cached in .cache/ (ignored by git), keyed by the version and the python version.
    ``HF_ROPE_EXT_LLAMA_CPP_PYTHON``: a python that already imports llama_cpp LLAMA_CPP_PYTHON (no build)."""
    if os.environ.get("HF_ROPE_EXT_LLAMA_CPP_PYTHON"):
        return Path(os.environ["HF_ROPE_EXT_LLAMA_CPP_PYTHON"])
    cache = _cache()
    venv = cache / f"llama-cpp-python-{LLAMA_CPP_PYTHON}-avx2-py{sys.version_info.major}.{sys.version_info.minor}"
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return python
    llama_cpp_sdist()
    tar = cache / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
    env = {
        **os.environ,
        "CMAKE_BUILD_PARALLEL_LEVEL": "2",
        # CPU only, no multimodal helper library: only the text model is loaded. Not GGML_NATIVE: on a virtual
        # machine whose CPU advertises AMX (this one's does), the native build's AMX kernels for quantised weights
        # (Q4_1) died with SIGILL while f16 ran; AVX2 code runs on any x86-64 machine of the last decade.
        "CMAKE_ARGS": "-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON",
    }
    start = time.time()
    try:  # minutes on 2 free cores; over an hour on 2 cores shared with four other jobs
        proc = subprocess.run(
            ["nice", "-n", "10", str(python), "-m", "pip", "install", "--quiet", str(tar)],
            capture_output=True, text=True, timeout=7200, env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"building llama-cpp-python=={LLAMA_CPP_PYTHON} took over 2 hours (a loaded machine?)")
    if proc.returncode != 0:
        pytest.skip(f"cannot build llama-cpp-python=={LLAMA_CPP_PYTHON}: {proc.stderr[-2000:]}")
    (venv / ".complete").write_text(f"{LLAMA_CPP_PYTHON}\nbuilt in {time.time() - start:.0f} s\n")
    return python


def converter_python() -> Path:
    """python that runs llama.cpp's convert_hf_to_gguf.py on a folder saved by transformers 5: this venv's packages
    (transformers 5, torch, numpy, through a .pth line) plus sentencepiece, which the converter imports for any Llama.
    The converter's own pin (requirements-convert_hf_to_gguf.txt: transformers 4.57.6) cannot read a tokenizer saved
    by transformers 5 ("Tokenizer class TokenizersBackend does not exist"). Built once, cached in .cache/."""
    venv = _cache() / f"llama-cpp-converter-py{sys.version_info.major}.{sys.version_info.minor}"
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "sentencepiece"],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"cannot install sentencepiece for llama.cpp's converter: {proc.stderr[-500:]}")
    site = next((venv / "lib").glob("python*/site-packages"))
    here = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "transformers").is_dir())
    (site / "zz_hf_rope_ext_packages.pth").write_text(f"{here}\n")  # after the venv's own site-packages
    (venv / ".complete").write_text("sentencepiece + this venv's packages\n")
    return python


# ------------------------------------------------------------------------------------------- llama.cpp's arithmetic

K = "llama."


def llama_cpp_rope(keys: dict, rope_freqs: np.ndarray | None) -> tuple[np.ndarray, float]:
    """(per-dimension rotary frequency [n_rot/2], cos/sin multiplier) as llama.cpp 0.3.36 computes them for a llama
    GGUF, written from its sources independently of hf_rope_ext: src/llama-model.cpp::load_hparams (defaults:
    base 10000, scaling type linear, factor 0 = none, original length = context length, attn_factor 1),
    src/llama-context.cpp (type none -> no scaling; yarn -> ext_factor 1 and attention 0.1 ln(s) + 1 divided out
    again, times attn_factor), ggml-cpu/ops.cpp::rope_yarn and ggml.c::ggml_rope_yarn_corr_dims (beta 32 / 1, floor /
    ceil), src/models/llama.cpp (rope_freqs divides each frequency)."""
    n_rot = int(keys[K + "rope.dimension_count"])
    base = float(keys.get(K + "rope.freq_base", 10000.0))
    kind = keys.get(K + "rope.scaling.type", "linear")
    factor = float(keys.get(K + "rope.scaling.factor", 0.0))
    freq_scale = 1.0 if factor == 0.0 or kind == "none" else 1.0 / factor
    n_orig = int(keys.get(K + "rope.scaling.original_context_length", keys[K + "context_length"]))
    attn = float(keys.get(K + "rope.scaling.attn_factor", 1.0))
    i = np.arange(n_rot // 2, dtype=np.float64)
    theta_extrap = base ** (-2 * i / n_rot)
    if rope_freqs is not None:
        theta_extrap = theta_extrap / rope_freqs.astype(np.float64)
    theta_interp = freq_scale * theta_extrap
    if kind != "yarn":
        return theta_interp, attn
    s = 1.0 / freq_scale
    mscale = (0.1 * math.log(s) + 1.0) / (1.0 + 0.1 * math.log(s)) * attn  # llama-context.cpp

    def corr_dim(rotations: float) -> float:
        return n_rot * math.log(n_orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(0.0, math.floor(corr_dim(32.0))), min(n_rot - 1.0, math.ceil(corr_dim(1.0)))
    ramp = 1 - np.clip((i - low) / max(0.001, high - low), 0, 1)  # ext_factor 1
    theta = theta_interp * (1 - ramp) + theta_extrap * ramp
    return theta, mscale * (1.0 + 0.1 * math.log(1.0 / freq_scale))  # ggml's rope_yarn


# ------------------------------------------------------------------------------------------- a tiny GGUF

N_ROT, BASE = 16, 10000.0  # the tiny Llama of conftest: hidden 64, 4 heads -> head_dim 16


def write_tiny_gguf(path: Path, arch: str = "llama", context: int | None = ORIGINAL_LEN, extra=None) -> Path:
    """A small GGUF with the keys a llama GGUF carries, arrays of strings and ints, and tensors of several types
    (F32, F16, Q8_0 quantised by gguf-py)."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_name("tiny")
    if context is not None:
        writer.add_context_length(context)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(N_ROT)
    writer.add_rope_freq_base(BASE)
    writer.add_token_list([f"w{i}" for i in range(40)])
    writer.add_key_value("tiny.int_list", [3, 1, 4, 1, 5], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    writer.add_bos_token_id(1)
    for key, value in (extra or {}).items():
        writer.add_key_value(key, *value)
    writer.add_tensor("token_embd.weight", rng.standard_normal((40, 64)).astype(np.float32))
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((64, 64)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((64, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_k.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {name: (tuple(f.types), f.contents()) for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def tensors(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type, tuple(t.shape.tolist()), np.asarray(t.data).tobytes()) for t in reader.tensors}


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


LONGROPE_DIVISORS = [1.0 + 0.2 * i for i in range(N_ROT // 2)]
# method, factor, method parameters: every static rotary method, and yarn outside llama.cpp's own yarn
STATIC_CASES = [
    ("extrapolate", 4.0, {}),
    ("linear", 4.0, {}),
    ("ntk", 4.0, {}),
    ("yarn", 4.0, {}),
    ("yarn", 2.0, {}),
    ("yarn", 4.0, {"beta_fast": 16.0, "beta_slow": 2.0}),
    ("yarn", 4.0, {"attention_factor": 1.3}),
    ("ntk_by_parts", 4.0, {}),
    ("llama3", 4.0, {}),
    ("longrope", 4.0, {"short_factor": LONGROPE_DIVISORS, "long_factor": LONGROPE_DIVISORS}),
]


def transformers_rotary(method: str, factor: float, params: dict) -> tuple[np.ndarray, float]:
    """The frequencies and attention factor transformers builds from the config hf_rope_ext saves for the tiny
    Llama patched the same way (a fresh LlamaRotaryEmbedding from that config: transformers' own rope functions)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model = tiny_model("llama")
    hf_rope_ext.patch_model(model, method, factor, **params)
    rotary = LlamaRotaryEmbedding(model.config)
    return rotary.inv_freq.double().numpy(), float(rotary.attention_scaling)


def _case_id(value):
    return "-".join(value) or "defaults" if isinstance(value, dict) else str(value)


@pytest.mark.parametrize("method,factor,params", STATIC_CASES, ids=_case_id)
def test_rewritten_gguf_makes_llama_cpp_compute_what_transformers_computes(tiny_gguf, tmp_path, method, factor,
                                                                           params):
    out = tmp_path / "out.gguf"
    hg.patch_gguf(tiny_gguf, out, method, factor, **params)
    got = hg.describe(out)
    keys = {**{k: v for k, (_, v) in fields(out).items()}}
    theta, mscale = llama_cpp_rope(keys, got["rope_freqs"])
    ref_theta, ref_scale = transformers_rotary(method, factor, params)
    np.testing.assert_allclose(theta, ref_theta, rtol=2e-6, atol=0)
    assert mscale == pytest.approx(ref_scale, rel=1e-6)
    # keys llama.cpp reads, each from its formula
    assert keys[K + "context_length"] == int(ORIGINAL_LEN * factor)
    assert keys[K + "rope.scaling.original_context_length"] == ORIGINAL_LEN
    expected_base = BASE * factor ** (N_ROT / (N_ROT - 2)) if method == "ntk" else BASE  # bloc97's NTK base
    assert keys[K + "rope.freq_base"] == pytest.approx(expected_base, rel=1e-6)
    expected_type = {"linear": "linear", "extrapolate": "none", "ntk": "none"}.get(method, "none")
    if method == "yarn" and not params:
        expected_type = "yarn"
    assert keys[K + "rope.scaling.type"] == expected_type
    if expected_type in ("linear", "yarn"):
        assert keys[K + "rope.scaling.factor"] == factor
    else:
        assert K + "rope.scaling.factor" not in keys
    per_dim = expected_type == "none" and method not in ("extrapolate", "ntk")
    assert (got["rope_freqs"] is not None) == per_dim
    if method == "llama3":  # Llama 3.1's divisors, as llama.cpp's converter computes them (conversion/llama.py)
        inv = BASE ** (-np.arange(0, N_ROT, 2) / N_ROT)
        wavelen = 2 * math.pi / inv
        smooth = (ORIGINAL_LEN / wavelen - 1.0) / (4.0 - 1.0)
        expected = np.where(wavelen < ORIGINAL_LEN / 4.0, 1.0,
                            np.where(wavelen > ORIGINAL_LEN / 1.0, factor, 1 / ((1 - smooth) / factor + smooth)))
        np.testing.assert_allclose(got["rope_freqs"], expected, rtol=1e-6)
    if method == "longrope":
        np.testing.assert_allclose(got["rope_freqs"], params["long_factor"], rtol=1e-6)
    assert got["record"]["method"] == method and got["record"]["factor"] == factor


def test_everything_but_the_rope_metadata_is_copied_unchanged(tiny_gguf, tmp_path):
    out = tmp_path / "out.gguf"
    hg.patch_gguf(tiny_gguf, out, "llama3", 4.0)
    before, after = fields(tiny_gguf), fields(out)
    rope_keys = {k for k in after if k.startswith(K + "rope.scaling.") or k.startswith("hf_rope_ext.")}
    rope_keys.add(K + "context_length")
    kept = {k: v for k, v in after.items() if k not in rope_keys}
    assert kept == {k: v for k, v in before.items() if k not in rope_keys}
    t_before, t_after = tensors(tiny_gguf), tensors(out)
    assert set(t_after) == set(t_before) | {"rope_freqs.weight"}
    for name, value in t_before.items():
        assert t_after[name] == value, name  # type, shape and bytes
    assert t_after["rope_freqs.weight"][0] == gguf.GGMLQuantizationType.F32
    assert t_after["rope_freqs.weight"][1] == (N_ROT // 2,)


@pytest.mark.parametrize(
    "method,params,reason",
    [
        ("dynamic_ntk", {}, "recomputed from the current sequence length"),
        ("dynamic_yarn", {}, "recomputed from the current sequence length"),
        ("rerope", {}, "changes attention itself"),
        ("self_extend", {}, "changes attention itself"),
        ("dca", {}, "changes attention itself"),
        ("interpolate", {}, "learned position table"),
        ("yarn", {"logn": True}, "logn=True"),
        ("longrope", {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8}, "change with the sequence length"),
    ],
)
def test_methods_llama_cpp_cannot_express_are_refused_naming_the_supported_ones(tiny_gguf, tmp_path, method, params,
                                                                               reason):
    out = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match="cannot be written to a GGUF") as err:
        hg.patch_gguf(tiny_gguf, out, method, 2.0, **params)
    assert reason in str(err.value)
    assert "extrapolate, linear, llama3, longrope, ntk, ntk_by_parts, yarn" in str(err.value)
    assert not out.exists() and list(tmp_path.iterdir()) == [tiny_gguf]


def test_bad_gguf_inputs_are_refused_before_writing(tmp_path):
    no_ctx = write_tiny_gguf(tmp_path / "noctx.gguf", context=None)
    with pytest.raises(ValueError, match="no 'llama.context_length'"):
        hg.patch_gguf(no_ctx, tmp_path / "a.gguf", "yarn", 2.0)
    other = write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="architecture .gpt2. is not supported for rope rewriting; supported: llama"):
        hg.patch_gguf(other, tmp_path / "a.gguf", "yarn", 2.0)
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    patched = tmp_path / "yarn.gguf"
    hg.patch_gguf(src, patched, "yarn", 2.0)
    with pytest.raises(ValueError, match="already has rope scaling yarn x2"):
        hg.patch_gguf(patched, tmp_path / "a.gguf", "linear", 2.0)
    scaled = write_tiny_gguf(tmp_path / "lin.gguf",
                             extra={K + "rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32)})
    with pytest.raises(ValueError, match="already has rope scaling linear x4"):
        hg.patch_gguf(scaled, tmp_path / "a.gguf", "yarn", 2.0)
    with pytest.raises(ValueError, match="is the file being read"):
        hg.patch_gguf(src, src, "yarn", 2.0, overwrite=True)
    with pytest.raises(ValueError, match="factor must be > 1"):
        hg.patch_gguf(src, tmp_path / "a.gguf", "yarn", 0.5)
    with pytest.raises(ValueError, match="unknown method 'yarnn'"):
        hg.patch_gguf(src, tmp_path / "a.gguf", "yarnn", 2.0)
    assert not (tmp_path / "a.gguf").exists()


def test_existing_output_needs_overwrite(tiny_gguf, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"user data")
    with pytest.raises(ValueError, match="exists; give a new path, or --overwrite"):
        hg.patch_gguf(tiny_gguf, out, "yarn", 2.0)
    assert out.read_bytes() == b"user data"
    hg.patch_gguf(tiny_gguf, out, "yarn", 2.0, overwrite=True)
    assert hg.describe(out)["rope"][K + "rope.scaling.type"] == "yarn"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_cli_patch_gguf(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    assert main(["patch", str(tiny_gguf), "--method", "yarn", "--factor", "2", "--out", str(out)]) == 0
    assert hg.describe(out)["rope"][K + "rope.scaling.factor"] == 2.0
    assert main(["patch", str(tiny_gguf), "--method", "yarn", "--factor", "2", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["patch", str(tiny_gguf), "--method", "dynamic_ntk", "--factor", "2",
                 "--out", str(tmp_path / "b.gguf")]) == 2
    assert "recomputed from the current sequence length" in capsys.readouterr().err
    assert main(["patch", str(tiny_gguf), "--method", "ntk_by_parts", "--target-length", "256",
                 "--param", "beta_fast=16", "--out", str(tmp_path / "c.gguf")]) == 0
    assert hg.describe(tmp_path / "c.gguf")["rope"][K + "context_length"] == 256


# ------------------------------------------------------------------------------------------- export (fast)

FAKE_CONVERTER = '''
import json, sys
from pathlib import Path
import numpy as np, gguf
folder, out = Path(sys.argv[1]), sys.argv[sys.argv.index("--outfile") + 1]
config = json.loads((folder / "config.json").read_text())
rope = config.get("rope_parameters") or {}
w = gguf.GGUFWriter(out, arch="llama")
w.add_context_length(config["max_position_embeddings"])
w.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
w.add_rope_freq_base(rope["rope_theta"])
if rope.get("rope_type") == "yarn":  # as llama.cpp's conversion/base.py maps it
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_attn_factor(rope["attention_factor"])
w.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
'''


@pytest.fixture
def fake_llama_cpp(tmp_path):
    """A stand-in for llama.cpp's convert_hf_to_gguf.py (the real one runs in the slow test): writes the rope keys
    the real converter writes for a yarn config, and one tensor."""
    root = tmp_path / "llama.cpp"
    root.mkdir()
    (root / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER)
    return root


def saved(tmp_path, method, **kwargs):
    model = tiny_model("llama")
    if method:
        hf_rope_ext.patch_model(model, method, 4.0, **kwargs)
    model.save_pretrained(tmp_path / (method or "plain"))
    return tmp_path / (method or "plain")


def test_export_replaces_the_converter_rope_keys_llama_cpp_would_misread(tmp_path, fake_llama_cpp):
    folder = saved(tmp_path, "ntk_by_parts")  # saved as transformers' yarn with attention_factor 1.0
    out = tmp_path / "m.gguf"
    result = hg.export_gguf(folder, out, llama_cpp=fake_llama_cpp)
    # the converter's form: llama.cpp would apply yarn's 0.1 ln(s) + 1 (it does not read yarn_attn_factor for llama)
    assert result["converter_rope"][K + "rope.scaling.type"] == "yarn"
    got = hg.describe(out)
    keys = {**got["rope"], K + "rope.dimension_count": N_ROT}
    theta, mscale = llama_cpp_rope(keys, got["rope_freqs"])
    ref_theta, ref_scale = transformers_rotary("ntk_by_parts", 4.0, {})
    np.testing.assert_allclose(theta, ref_theta, rtol=2e-6)
    assert mscale == pytest.approx(ref_scale) == 1.0
    assert K + "rope.scaling.yarn_attn_factor" not in got["rope"]
    assert result["dropped"] == [K + "rope.scaling.factor", K + "rope.scaling.yarn_attn_factor"]  # not the others
    assert got["rope"][K + "rope.dimension_count"] == N_ROT
    assert tensors(out)["token_embd.weight"][2] == np.arange(12, dtype=np.float32).tobytes()


def test_export_refusals(tmp_path, fake_llama_cpp):
    out = tmp_path / "m.gguf"
    for method, reason in (("dynamic_ntk", "recomputed from the current sequence length"),
                           ("self_extend", "changes attention itself")):
        with pytest.raises(ValueError, match=reason):
            hg.export_gguf(saved(tmp_path, method), out, llama_cpp=fake_llama_cpp)
    qwen = tiny_model("qwen2")
    qwen.save_pretrained(tmp_path / "qwen")
    with pytest.raises(ValueError, match="family 'Qwen2ForCausalLM' is not supported .*supported: LlamaForCausalLM"):
        hg.export_gguf(tmp_path / "qwen", out, llama_cpp=fake_llama_cpp)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hg.export_gguf(tmp_path, out, llama_cpp=fake_llama_cpp)
    with pytest.raises(ValueError, match="unknown outtype 'q4'"):
        hg.export_gguf(saved(tmp_path, "yarn"), out, outtype="q4", llama_cpp=fake_llama_cpp)
    assert not out.exists()
    out.write_bytes(b"keep")
    with pytest.raises(ValueError, match="--overwrite"):
        hg.export_gguf(tmp_path / "yarn", out, llama_cpp=fake_llama_cpp)
    assert out.read_bytes() == b"keep"
    env = {k: v for k, v in os.environ.items() if k != "HF_ROPE_EXT_LLAMA_CPP"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "environ", env)
        with pytest.raises(FileNotFoundError, match="pip download --no-deps --no-binary :all: llama-cpp-python"):
            hg.export_gguf(tmp_path / "yarn", tmp_path / "n.gguf")


def test_cli_export_refusal(tmp_path, capsys, fake_llama_cpp):
    folder = saved(tmp_path, "dynamic_yarn")
    code = main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--llama-cpp",
                 str(fake_llama_cpp)])
    assert code == 2
    assert "cannot be written to a GGUF" in capsys.readouterr().err
    assert main(["export", str(saved(tmp_path, "yarn")), "--format", "gguf", "--out", str(tmp_path / "m.gguf"),
                 "--llama-cpp", str(fake_llama_cpp)]) == 0
    assert hg.describe(tmp_path / "m.gguf")["rope"][K + "rope.scaling.type"] == "yarn"


# ------------------------------------------------------------------------------------------- a real llama.cpp (slow)

OFFSET, SCORED, TRAINED = 20000, 12288, 8192  # 12k tokens of builtin:pydoc from token 20000; SmolLM2 trained at 8k
TOLERANCE = 0.02  # relative, llama.cpp vs transformers perplexity, same Q4_1 weights; measured <= 0.5 % (docs)

_LLAMA_CPP_SCORE = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama
    ids = json.load(open(sys.argv[1]))
    report = {"version": llama_cpp.__version__, "runs": {}}
    for path in sys.argv[2:]:
        start = time.time()
        llm = Llama(model_path=path, n_ctx=len(ids), n_batch=512, n_threads=2, n_threads_batch=2, logits_all=True,
                    seed=0, verbose=True)
        llm.eval(ids)
        nll = np.empty(len(ids) - 1)
        for a in range(0, len(ids) - 1, 1024):  # nll[t] = -log p(ids[t + 1] | ids[:t + 1])
            b = min(a + 1024, len(ids) - 1)
            logits = np.asarray(llm.scores[a:b], dtype=np.float64)
            top = logits.max(axis=1)
            lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
            nll[a:b] = lse - logits[np.arange(b - a), ids[a + 1 : b + 1]]
        report["runs"][path] = {"nll": nll.tolist(), "seconds": time.time() - start}
        del llm
    print(json.dumps(report))
    """
)


def llama_cpp_nll(paths: list[Path], ids: list[int], workdir: Path) -> tuple[dict[str, np.ndarray], str, str]:
    """Per-token NLL of ``ids`` under each GGUF in a real llama.cpp (2 threads, niced), its version and its log."""
    python = llama_cpp_python()
    (workdir / "ids.json").write_text(json.dumps(ids))
    proc = subprocess.run(
        ["nice", "-n", "10", str(python), "-c", _LLAMA_CPP_SCORE, str(workdir / "ids.json"), *map(str, paths)],
        capture_output=True, text=True, timeout=3600, cwd=workdir, env={**os.environ, "PYTHONPATH": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = {p: np.array(r["nll"]) for p, r in report["runs"].items()}
    for p, r in report["runs"].items():
        print(f"llama.cpp {Path(p).name}: {r['seconds']:.0f} s")
    return runs, report["version"], proc.stderr


def ppl(nll: np.ndarray, first: int = 0) -> float:
    """exp(mean NLL) of the predictions of tokens first+1 .. end."""
    return float(np.exp(np.mean(nll[first:])))


@pytest.fixture(scope="module")
def smollm2_reference(tmp_path_factory):
    """The scored token ids and transformers' per-token NLL on them for the same checkpoint (the Q4_1 GGUF,
    dequantised): yarn x2 and unpatched (extrapolation)."""
    from hf_rope_ext.eval.perplexity import token_nll
    from hf_rope_ext.eval.text import load_text, tokenize
    from hf_rope_ext.loading import load_model, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    model, tok = load_model("smollm2", dtype="float32")
    ids = tokenize(tok, load_text("builtin:pydoc"))[OFFSET : OFFSET + SCORED]
    assert ids.numel() == SCORED
    out = {"ids": ids.tolist()}
    torch.set_num_threads(2)
    with torch.no_grad():
        start = time.time()
        out["extrapolate"] = token_nll(model, ids[None])[0, 1:].double().numpy()  # nll of tokens 1 .. end
        hf_rope_ext.patch_model(model, "yarn", 2.0)
        out["yarn"] = token_nll(model, ids[None])[0, 1:].double().numpy()
        print(f"transformers: 2 forwards of {SCORED} tokens in {time.time() - start:.0f} s")
    return out


@pytest.mark.slow
def test_llama_cpp_scores_the_rewritten_gguf_as_transformers_does_past_8k(smollm2_reference, tmp_path):
    from hf_rope_ext.loading import smollm2_gguf_path

    source = smollm2_gguf_path()  # read only
    yarn = tmp_path / "smollm2-yarn-16k.gguf"
    hg.patch_gguf(source, yarn, "yarn", 2.0)
    runs, version, log = llama_cpp_nll([yarn, source], smollm2_reference["ids"], tmp_path)
    assert version == LLAMA_CPP_PYTHON
    assert re.search(r"rope scaling\s+= yarn", log) and re.search(r"n_ctx_orig_yarn\s+= 8192", log)  # read our keys
    assert re.search(r"freq_scale_train\s+= 0.5", log) and re.search(r"n_ctx_train\s+= 16384", log)
    last = SCORED - 1 - 2048  # the last 2048 predictions: tokens 10241 .. 12287, the furthest past the trained 8192
    figures = {}
    for name, path in (("yarn", yarn), ("extrapolate", source)):
        hf, cpp = smollm2_reference[name], runs[str(path)]
        figures[name] = {"transformers": (ppl(hf), ppl(hf, TRAINED), ppl(hf, last)),
                         "llama.cpp": (ppl(cpp), ppl(cpp, TRAINED), ppl(cpp, last))}
    print(json.dumps(figures, indent=1))
    for name in figures:
        for hf_value, cpp_value in zip(figures[name]["transformers"], figures[name]["llama.cpp"], strict=True):
            # same Q4_1 weights; llama.cpp multiplies them with activations quantised to 8 bits and keeps its KV
            # cache in f16, transformers runs the dequantised weights in fp32: close, not identical (docs/serving.md)
            assert cpp_value == pytest.approx(hf_value, rel=TOLERANCE), name
    # past the trained length the unpatched GGUF collapses in llama.cpp as transformers' extrapolation does; yarn holds
    for engine in ("transformers", "llama.cpp"):
        assert figures["extrapolate"][engine][2] > 2 * figures["yarn"][engine][2], engine


@pytest.mark.slow
def test_llama_cpp_converter_reads_a_folder_saved_by_hf_rope_ext(smollm2_reference, tmp_path):
    """llama.cpp's own convert_hf_to_gguf.py (the sdist's) on SmolLM2 patched with yarn x2 and saved: it writes our
    rope keys itself, export keeps them, and llama.cpp scores the f16 export like transformers."""
    from hf_rope_ext.loading import load_model

    model, tok = load_model("smollm2", dtype="float32")
    hf_rope_ext.patch_model(model, "yarn", 2.0, tokenizer=tok)
    model.save_pretrained(tmp_path / "smollm2-yarn")
    tok.save_pretrained(tmp_path / "smollm2-yarn")
    del model
    out = tmp_path / "exported.gguf"
    result = hg.export_gguf(tmp_path / "smollm2-yarn", out, outtype="f16", llama_cpp=llama_cpp_sdist(),
                            python=str(converter_python()))
    written = result["converter_rope"]  # what llama.cpp's converter wrote, before hf-rope-ext touched anything
    assert written[K + "context_length"] == 16384
    assert written[K + "rope.scaling.type"] == "yarn"
    assert written[K + "rope.scaling.factor"] == 2.0
    assert written[K + "rope.scaling.original_context_length"] == 8192
    assert written[K + "rope.freq_base"] == 100000.0
    assert set(result["changed"]) <= {K + "rope.scaling.attn_factor"}  # only the key llama.cpp reads was added
    runs, _, _ = llama_cpp_nll([out], smollm2_reference["ids"], tmp_path)
    hf = smollm2_reference["yarn"]
    cpp = runs[str(out)]
    print("exported f16 in llama.cpp:", ppl(cpp), ppl(cpp, TRAINED), "transformers:", ppl(hf), ppl(hf, TRAINED))
    assert ppl(cpp) == pytest.approx(ppl(hf), rel=TOLERANCE)
    assert ppl(cpp, TRAINED) == pytest.approx(ppl(hf, TRAINED), rel=TOLERANCE)


def test_card_states_llama_cpp_support_as_verified(tmp_path):
    """The card's serving section: a real llama.cpp run only where the slow test ran one (yarn), the arithmetic check
    for other static methods, the refusal for the rest; the llama.cpp named is the one the slow test builds."""
    from hf_rope_ext.cards import render_card
    from hf_rope_ext.cards.papers import LLAMA_CPP, LLAMA_CPP_RUN

    assert set(LLAMA_CPP_RUN) == {"yarn"} and f"llama-cpp-python {LLAMA_CPP_PYTHON}" in LLAMA_CPP
    text = render_card(saved(tmp_path, "yarn"))
    line = next(x for x in text.splitlines() if "llama.cpp / Ollama" in x)
    assert "loaded by a real llama.cpp" in line and "llama.cpp yarn x4" in line
    text = render_card(saved(tmp_path, "ntk_by_parts"))
    line = next(x for x in text.splitlines() if "llama.cpp / Ollama" in x)
    assert "not run in a real llama.cpp" in line and "rope_freqs.weight" in line
    text = render_card(saved(tmp_path, "dynamic_ntk"))
    line = next(x for x in text.splitlines() if "llama.cpp / Ollama" in x)
    assert "no GGUF export" in line and "recomputed from the current sequence length" in line
