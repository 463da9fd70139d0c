"""Each rotary method against an independent reference: transformers' own implementation where it has one
(linear, dynamic, yarn, llama3, longrope), otherwise the formula written out here."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hf_rope_ext.registry import get_method, list_methods

CASES = [(64, 10000.0, 4096, 2.0), (64, 500000.0, 8192, 8.0), (128, 1e6, 2048, 16.0), (32, 10000.0, 64, 4.0)]


def hf_reference(rope_parameters: dict, dim: int, base: float, max_pos: int, seq_len=None):
    """transformers' computation for a config carrying ``rope_parameters``."""
    config = LlamaConfig(
        hidden_size=dim * 4,
        num_attention_heads=4,
        head_dim=dim,
        max_position_embeddings=max_pos,
        rope_parameters={"rope_theta": base, **rope_parameters},
    )
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, "cpu", seq_len=seq_len)


def ours(name: str, dim: int, base: float, L: int, s: float, seq_len=None, **kw):
    spec = get_method(name)
    params = spec.make_params(factor=s, original_max_position_embeddings=L, **kw)
    return spec.compute(params, dim, base, device="cpu", seq_len=seq_len)


def theta(dim: int, base: float) -> torch.Tensor:
    """base^(-2i/d) in float64."""
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


@pytest.mark.parametrize("dim,base,L,s", CASES)
def test_linear_matches_transformers(dim, base, L, s):
    inv, att = ours("linear", dim, base, L, s)
    ref_inv, ref_att = hf_reference({"rope_type": "linear", "factor": s}, dim, base, L)
    assert_close(inv, ref_inv)
    assert att == ref_att == 1.0


@pytest.mark.parametrize("dim,base,L,s", CASES)
@pytest.mark.parametrize("length_mult", [0.5, 1.0, 1.5, 3.0, 16.0])
def test_dynamic_ntk_matches_transformers(dim, base, L, s, length_mult):
    seq_len = int(L * length_mult)
    for as_tensor in (False, True):
        arg = torch.tensor(seq_len) if as_tensor else seq_len
        inv, _ = ours("dynamic_ntk", dim, base, L, s, seq_len=arg)
        ref, _ = hf_reference({"rope_type": "dynamic", "factor": s}, dim, base, L, seq_len=arg)
        assert_close(inv, ref, rtol=1e-5, atol=0)
    if length_mult <= 1:  # below the original length: the original frequencies exactly
        assert_close(inv.double(), theta(dim, base), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dim,base,L,s", CASES)
@pytest.mark.parametrize("betas", [(32.0, 1.0), (16.0, 2.0)])
@pytest.mark.parametrize("attention_factor", [None, 1.3])
def test_yarn_matches_transformers(dim, base, L, s, betas, attention_factor):
    inv, att = ours("yarn", dim, base, L, s, beta_fast=betas[0], beta_slow=betas[1], attention_factor=attention_factor)
    rp = {
        "rope_type": "yarn",
        "factor": s,
        "original_max_position_embeddings": L,
        "beta_fast": betas[0],
        "beta_slow": betas[1],
    }
    if attention_factor is not None:
        rp["attention_factor"] = attention_factor
    ref_inv, ref_att = hf_reference(rp, dim, base, int(L * s))
    assert_close(inv, ref_inv)
    assert att == pytest.approx(ref_att)
    expected = attention_factor if attention_factor is not None else 0.1 * math.log(s) + 1  # the paper's sqrt(1/t)
    assert att == pytest.approx(expected)


@pytest.mark.parametrize("dim,base,L,s", CASES)
def test_ntk_by_parts_formula(dim, base, L, s):
    """bloc97's NTK-by-parts written out: r_d = L / wavelength_d rotations; ramp over dimension index between the
    dimensions turning beta_fast and beta_slow times (rounded outwards); no temperature."""
    beta_fast, beta_slow = 32.0, 1.0
    inv, att = ours("ntk_by_parts", dim, base, L, s)
    t = theta(dim, base)
    # dimension index at which a pair makes `beta` rotations over L: L / (2 pi base^(2i/d)) = beta
    i_at = lambda beta: dim * math.log(L / (2 * math.pi * beta)) / (2 * math.log(base))  # noqa: E731
    lo, hi = max(math.floor(i_at(beta_fast)), 0), min(math.ceil(i_at(beta_slow)), dim - 1)
    expected = []
    for i in range(dim // 2):
        gamma = 1.0 if i <= lo else 0.0 if i >= hi else 1 - (i - lo) / (hi - lo)  # 1 = keep, 0 = interpolate
        expected.append(gamma * t[i] + (1 - gamma) * t[i] / s)
    assert_close(inv.double(), torch.stack(expected), rtol=1e-6, atol=0)
    assert att == 1.0
    # and it is transformers' yarn with the temperature switched off
    ref, ref_att = hf_reference(
        {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": L, "attention_factor": 1.0},
        dim,
        base,
        int(L * s),
    )
    assert_close(inv, ref)
    assert ref_att == 1.0


@pytest.mark.parametrize("dim,base,L,s", CASES)
def test_ntk_formula(dim, base, L, s):
    inv, att = ours("ntk", dim, base, L, s)
    new_base = base * s ** (dim / (dim - 2))
    assert_close(inv.double(), theta(dim, new_base), rtol=1e-6, atol=0)
    t = theta(dim, base)
    assert inv[0].item() == pytest.approx(t[0].item())  # the fastest dimension extrapolates
    assert inv[-1].item() == pytest.approx(t[-1].item() / s, rel=1e-5)  # the slowest is interpolated by exactly s
    assert att == 1.0


@pytest.mark.parametrize("dim,base,L,s", CASES)
def test_extrapolate_is_the_original(dim, base, L, s):
    inv, att = ours("extrapolate", dim, base, L, s)
    assert_close(inv.double(), theta(dim, base), rtol=1e-6, atol=0)
    assert att == 1.0


@pytest.mark.parametrize("dim,base,L,s", CASES)
@pytest.mark.parametrize("length_mult", [0.5, 1.0, 2.5, 6.0])
def test_dynamic_yarn_is_yarn_at_current_scale(dim, base, L, s, length_mult):
    seq_len = int(L * length_mult)
    inv, att = ours("dynamic_yarn", dim, base, L, s, seq_len=seq_len)
    inv_t, att_t = ours("dynamic_yarn", dim, base, L, s, seq_len=torch.tensor(seq_len))
    current = max(1.0, seq_len / L)
    if current == 1.0:
        assert_close(inv.double(), theta(dim, base), rtol=1e-6, atol=0)
        assert att == 1.0
    else:
        ref, ref_att = hf_reference(
            {"rope_type": "yarn", "factor": current, "original_max_position_embeddings": L}, dim, base, seq_len
        )
        assert_close(inv, ref)
        assert att == pytest.approx(0.1 * math.log(current) + 1) == pytest.approx(ref_att)
    assert_close(inv_t, inv)
    assert float(att_t) == pytest.approx(att)


@pytest.mark.parametrize("dim,base,L,s", CASES)
@pytest.mark.parametrize("low,high", [(1.0, 4.0), (2.0, 8.0)])
def test_llama3_matches_transformers(dim, base, L, s, low, high):
    inv, att = ours("llama3", dim, base, L, s, low_freq_factor=low, high_freq_factor=high)
    ref, ref_att = hf_reference(
        {
            "rope_type": "llama3",
            "factor": s,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": L,
        },
        dim,
        base,
        int(L * s),
    )
    assert_close(inv, ref)
    assert att == ref_att == 1.0


@pytest.mark.parametrize("dim,base,L,s", CASES)
@pytest.mark.parametrize("attention_factor", [None, 1.0])
def test_longrope_matches_transformers(dim, base, L, s, attention_factor):
    g = torch.Generator().manual_seed(dim)
    short = (1 + torch.rand(dim // 2, generator=g)).tolist()
    long = (1 + s * torch.rand(dim // 2, generator=g)).tolist()
    rp = {
        "rope_type": "longrope",
        "short_factor": short,
        "long_factor": long,
        "factor": s,
        "original_max_position_embeddings": L,
    }
    if attention_factor is not None:
        rp["attention_factor"] = attention_factor
    for seq_len in (None, L // 2, L, L + 1, int(L * s)):
        inv, att = ours(
            "longrope",
            dim,
            base,
            L,
            s,
            seq_len=seq_len,
            short_factor=short,
            long_factor=long,
            attention_factor=attention_factor,
        )
        ref, ref_att = hf_reference(rp, dim, base, int(L * s), seq_len=seq_len)
        assert_close(inv, ref)
        assert att == pytest.approx(ref_att)


def test_longrope_needs_factors_of_the_right_length():
    with pytest.raises(ValueError, match="short_factor"):
        ours("longrope", 64, 10000.0, 4096, 2.0)
    with pytest.raises(ValueError, match="32 entries"):
        ours("longrope", 64, 10000.0, 4096, 2.0, short_factor=[1.0] * 8, long_factor=[1.0] * 8)


@pytest.mark.parametrize(
    "name", ["extrapolate", "linear", "ntk", "dynamic_ntk", "ntk_by_parts", "yarn", "dynamic_yarn", "llama3"]
)
def test_frequencies_are_float32_on_the_requested_device(name):
    inv, _ = ours(name, 64, 10000.0, 4096, 4.0)
    assert inv.dtype == torch.float32 and inv.shape == (32,) and inv.device.type == "cpu"


def test_every_method_parameter_says_what_it_means():
    """Each parameter's meaning lives in its dataclass field metadata (registry.param) and reaches list_methods."""
    import dataclasses

    from hf_rope_ext.registry import METHODS

    rows = {row["name"]: row for row in list_methods()}
    for name, spec in METHODS.items():
        for f in dataclasses.fields(spec.params_cls):
            assert len(f.metadata.get("help", "")) > 10, (name, f.name)
            if f.name in rows[name]["parameters"]:
                assert rows[name]["parameters"][f.name]["help"] == f.metadata["help"], (name, f.name)
