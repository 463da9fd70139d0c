"""hf_rope_ext.training helpers on their own: PoSE position ids, shifted sparse attention, held-out perplexity, data
sources / caching / packing, sharded micro-batches. (The recipe that uses them is tested in test_recipes.py.)"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_rope_ext.training import data, pose, s2attn
from hf_rope_ext.training.heldout import heldout_perplexity

from . import test_recipes
from .test_recipes import make_tokenizer

pretrained_llama = test_recipes.pretrained_llama  # the pretrained tiny Llama fixture, shared with the recipe tests


# --------------------------------------------------------------------------------------------------------------------
# PoSE


def test_pose_position_ids_cover_target_with_short_windows():
    window, target = 64, 256
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([pose.pose_position_ids(window, target, generator=g) for _ in range(400)])  # [400, 64]
    assert samples.shape == (400, window)
    diffs = samples[:, 1:] - samples[:, :-1]
    assert (diffs >= 1).all()  # strictly increasing
    assert ((diffs > 1).sum(dim=1) <= 1).all()  # two chunks: at most one jump
    assert (samples[:, 0] == 0).all() and (samples <= target - 1).all()
    assert samples.max() == target - 1 or samples.max() >= target - 4  # the far end is reached
    # positions beyond the original window are trained often, and all over the target range
    beyond = samples[samples >= window]
    assert (samples.max(dim=1).values >= window).float().mean() > 0.7
    hist = torch.histc(beyond.float(), bins=6, min=window, max=target)
    assert (hist > 0).all(), hist
    # three chunks: at most two jumps; same generator seed -> same samples
    three = pose.pose_position_ids(window, target, num_chunks=3, generator=torch.Generator().manual_seed(1))
    assert ((three[1:] - three[:-1]) > 1).sum() <= 2
    again = pose.pose_position_ids(window, target, num_chunks=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(three, again)
    with pytest.raises(ValueError, match="window < target"):
        pose.pose_position_ids(256, 256)


# --------------------------------------------------------------------------------------------------------------------
# shifted sparse attention (LongLoRA)


def _reference_s2attn(q, k, v, group):
    """Dense attention with an explicit [n, n] mask per head half: plain groups, and groups shifted by group/2."""
    _b, h, n, d = q.shape
    i = torch.arange(n)
    causal = i[:, None] >= i[None, :]
    same_plain = (i[:, None] // group) == (i[None, :] // group)
    shift = group // 2
    same_shift = ((i[:, None] + shift) // group) == ((i[None, :] + shift) // group)
    out = torch.empty_like(q)
    for head in range(h):
        mask = causal & (same_plain if head < h // 2 else same_shift)
        scores = (q[:, head] @ k[:, head].transpose(-1, -2)) / d**0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        out[:, head] = scores.softmax(-1) @ v[:, head]
    return out.transpose(1, 2)


def test_shifted_sparse_attention_matches_a_dense_masked_reference():
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    q = torch.randn(2, 4, 32, 8)
    k, v = torch.randn(2, 2, 32, 8), torch.randn(2, 2, 32, 8)
    module.train()
    out, _ = s2attn.shifted_sparse_attention(module, q, k, v, None)
    expected = _reference_s2attn(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), group=8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    module.eval()  # inference: full causal attention
    full, _ = s2attn.shifted_sparse_attention(module, q, k, v, None)
    dense = _reference_s2attn(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), group=10**6)
    torch.testing.assert_close(full, dense, rtol=1e-5, atol=1e-5)
    module.train()
    with pytest.raises(ValueError, match="padding attention mask"):
        s2attn.shifted_sparse_attention(module, q, k, v, torch.ones(2, 1, 32, 32, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------------------------
# held-out perplexity


def test_heldout_perplexity_is_the_mean_token_nll(pretrained_llama, monkeypatch):
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pretrained_llama).eval()
    chunks = torch.randint(3, 200, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(chunks[:2]).logits[:, :-1]  # the third chunk is run but not scored
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunks[:2, 1:].reshape(-1)).exp().item()
    result = heldout_perplexity(model, chunks, batch_size=2, scored=2)
    assert result.tokens == 2 * 63 and result.chunks == 2
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    monkeypatch.setitem(sys.modules, "hf_rope_ext.eval.perplexity", None)  # without the eval module: plain forward
    assert heldout_perplexity(model, chunks, batch_size=2, scored=2).perplexity == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# data


def test_data_sources_cache_and_packing(tmp_path, monkeypatch):
    tokenizer = make_tokenizer()
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("abc")
    (folder / "b.jsonl").write_text('{"text": "de"}\n{"text": "f"}\n')
    (folder / "c.json").write_text('[{"text": "gh"}]')
    (folder / "ignored.csv").write_text("x")
    stream = data.load_token_stream([str(folder)], tokenizer, cache_dir=tmp_path / "cache")
    eos = tokenizer.eos_token_id
    expected = []
    for doc in ("abc", "de", "f", "gh"):
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
    assert stream.tolist() == expected

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again instead of reading the cache")

    monkeypatch.setattr(data, "tokenize_documents", no_tokenising)
    assert data.load_token_stream([str(folder)], tokenizer, cache_dir=tmp_path / "cache").tolist() == expected
    time.sleep(0.01)
    (folder / "a.txt").write_text("abcd")  # a changed file invalidates the cache
    with pytest.raises(AssertionError, match="tokenised again"):
        data.load_token_stream([str(folder)], tokenizer, cache_dir=tmp_path / "cache")
    monkeypatch.undo()

    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": ["xy", "z"]}), tmp_path / "p.parquet")
        got = data.load_token_stream(
            [str(tmp_path / "p.parquet")], tokenizer, cache_dir=tmp_path / "cache", text_field="body"
        )
        assert got.tolist() == tokenizer("xy", add_special_tokens=False)["input_ids"] + [eos] + tokenizer(
            "z", add_special_tokens=False
        )["input_ids"] + [eos]
    if importlib.util.find_spec("datasets") is not None:
        import datasets

        datasets.Dataset.from_dict({"text": ["uv", "w"]}).save_to_disk(str(tmp_path / "saved"))
        got = data.load_token_stream([str(tmp_path / "saved")], tokenizer, cache_dir=tmp_path / "cache")
        assert got.numel() == 5

    builtin = data.load_token_stream(["builtin:pydoc"], tokenizer, cache_dir=tmp_path / "cache", max_tokens=5000)
    assert builtin.numel() == 5000
    with pytest.raises(ValueError, match="no field 'content'"):
        data.load_token_stream(
            [str(folder / "b.jsonl")], tokenizer, cache_dir=tmp_path / "cache", text_field="content"
        )

    chunks = data.pack(torch.arange(10), 4)
    assert chunks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    wrapped = data.pack(torch.arange(10), 4, wrap=(100, 101))
    assert wrapped[:2].tolist() == [[100, 0, 1, 101], [100, 2, 3, 101]]


def test_builtin_corpora_mean_the_same_text_for_training_and_evaluation(tmp_path):
    import pydoc_data.topics
    import sysconfig

    from hf_rope_ext.eval.text import load_text

    tokenizer = make_tokenizer()
    expected: list[int] = []
    for doc in list(pydoc_data.topics.topics.values())[:3]:  # the topics in their stored order, EOS after each
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for name in ("builtin:pydoc", "builtin"):  # "builtin" is pydoc for evaluation, so for training too
        got = data.load_token_stream([name], tokenizer, cache_dir=tmp_path / "cache", max_tokens=len(expected))
        assert got.tolist() == expected, name
    assert load_text("builtin").text.startswith(pydoc_data.topics.topics["assert"][:200])

    # stdlib: every module file, subpackages included, tests excluded -- for both readers
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = list(data.iter_documents(data.resolve_sources(["builtin:stdlib"])))
    assert (root / "json" / "decoder.py").read_text(encoding="utf-8") in docs
    assert (root / "json" / "__init__.py").read_text(encoding="utf-8") in docs
    support = root / "test" / "support" / "__init__.py"  # the test suite is left out (when the install has one)
    assert not support.is_file() or support.read_text(encoding="utf-8") not in docs
    assert "\n\n".join(d for d in docs if d) == load_text("builtin:stdlib").text


def test_micro_batches_are_disjoint_across_processes_and_cover_each_epoch():
    n, world, bs, accum = 24, 2, 3, 2
    seen = []
    for step in range(2):  # 2 steps x 2 micro x 2 ranks x 3 = 24 = one epoch
        for micro in range(accum):
            for rank in range(world):
                seen += data.micro_batch_indices(
                    n, step=step, micro=micro, grad_accum=accum, batch_size=bs, world=world, rank=rank, seed=0
                )
    assert sorted(seen) == list(range(n))
    again = data.micro_batch_indices(n, step=1, micro=1, grad_accum=accum, batch_size=bs, world=world, rank=1, seed=0)
    assert again == seen[-3:]
