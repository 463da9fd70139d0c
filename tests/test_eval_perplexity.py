"""Sliding-window perplexity against naive per-token references written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_rope_ext import patch_model
from hf_rope_ext.eval.perplexity import (
    PerplexityReport,
    perplexity_at_lengths,
    plan_windows,
    sliding_window_perplexity,
    token_nll,
)
from hf_rope_ext.eval.text import Text

from .eval_utils import tiny_llama


def naive_sliding_window(model, ids: torch.Tensor, window: int, stride: int, bucket: int):
    """Token t is read by the first window k = 0, 1, ... whose end min(k*S + L, N) lies past t, with context
    [k*S, t); it counts when that context is not empty: -log p(x_t | context) from a plain forward over the context
    and x_t. Returns (ppl, {bucket: ppl}, tokens counted)."""
    n = ids.numel()
    nll, by_bucket = [], {}
    for t in range(1, n):
        k = 0
        while min(k * stride + window, n) <= t:
            k += 1
        begin = k * stride
        if begin == t:  # first token of a window that overlaps nothing: no context
            continue
        with torch.no_grad():
            logits = model(ids[begin : t + 1][None]).logits[0, -2]  # predicts x_t
        value = -F.log_softmax(logits.double(), dim=-1)[ids[t]].item()
        nll.append(value)
        by_bucket.setdefault((t - begin) // bucket, []).append(value)
    ppl = math.exp(sum(nll) / len(nll))
    return ppl, {b: math.exp(sum(v) / len(v)) for b, v in by_bucket.items()}, len(nll)


@pytest.mark.parametrize(("n", "window", "stride"), [(150, 48, 16), (97, 32, 32), (64, 40, 7)])
def test_sliding_window_agrees_with_naive_per_token(n, window, stride):
    model = tiny_llama()
    ids = torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(n))
    ref_ppl, ref_buckets, ref_count = naive_sliding_window(model, ids, window, stride, bucket=8)
    result = sliding_window_perplexity(model, ids, window, stride, bucket_size=8, loss_chunk=5, progress=False)
    assert result.scored_tokens == ref_count
    assert result.perplexity == pytest.approx(ref_ppl, rel=1e-5)
    got = {b.start // 8: b.perplexity for b in result.buckets if b.tokens}
    assert got.keys() == ref_buckets.keys()
    for key, value in ref_buckets.items():
        assert got[key] == pytest.approx(value, rel=1e-5)


def test_stride_equal_to_window_gives_the_non_overlapping_figure():
    model = tiny_llama()
    window, n = 32, 32 * 5
    ids = torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(1))
    total, count = 0.0, 0
    for i in range(0, n, window):  # independent chunks, transformers' own shifted loss over each
        chunk = ids[i : i + window][None]
        with torch.no_grad():
            loss = model(chunk, labels=chunk).loss.item()
        total += loss * (window - 1)
        count += window - 1
    result = sliding_window_perplexity(model, ids, window, window, batch_size=2, progress=False)
    assert result.windows == 5
    assert result.scored_tokens == count
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert {b.tokens for b in result.buckets} == {5 * 4, 5 * 4 - 5}  # position 0 of each window is never scored


def test_windows_plan_scores_every_token_once():
    for n, window, stride in [(100, 30, 10), (31, 30, 1), (256, 64, 48), (100, 30, 30), (91, 30, 30)]:
        plan = plan_windows(n, window, stride)
        scored = [t for b, e, f in plan for t in range(f, e)]
        assert len(scored) == len(set(scored))
        assert all(e - b <= window and b < f < e for b, e, f in plan)
        if stride < window:  # overlapping windows: every token but the first
            assert scored == list(range(1, n))
        else:  # disjoint windows: all but each window's first token
            assert scored == [t for t in range(n) if t % window]


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "opt"])
def test_chunked_head_matches_a_full_forward_on_other_architectures(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    kwargs = {"gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=64),
              "gpt_neox": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                               max_position_embeddings=64),
              "opt": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                          word_embed_proj_dim=64, max_position_embeddings=64)}[model_type]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=200, **kwargs)).eval()
    ids = torch.randint(3, 200, (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits.double()
    expected = -F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    got = token_nll(model, ids, 1, loss_chunk=7)
    torch.testing.assert_close(got[0, 1:].double(), expected[0], rtol=1e-5, atol=1e-5)


def test_chunked_head_keeps_the_model_own_logit_softcapping():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("gemma2", vocab_size=384, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=64, sliding_window=16, final_logit_softcapping=2.0,
                                  initializer_range=0.5)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 384, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits.double()  # [2, 40, V], capped by the model
    expected = -F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    got = token_nll(model, ids, [1, 10], loss_chunk=7)
    assert torch.isnan(got[0, :1]).all() and torch.isnan(got[1, :10]).all()
    torch.testing.assert_close(got[0, 1:].double(), expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 10:].double(), expected[1, 9:], rtol=1e-5, atol=1e-5)
    uncapped = F.log_softmax(model.lm_head(model.model(ids).last_hidden_state).double(), -1)
    assert not torch.allclose(uncapped[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].neg(), expected, atol=1e-3)


def test_one_shared_forward_gives_the_same_numbers_as_separate_windows():
    model = tiny_llama(max_positions=64)
    patch_model(model, "yarn", factor=2)
    ids = torch.randint(3, 384, (400,), generator=torch.Generator().manual_seed(2))
    separate = perplexity_at_lengths(model, None, [32, 64, 128], ids, offset=50, bucket_size=16, progress=False)
    shared = perplexity_at_lengths(model, None, [32, 64, 128], ids, offset=50, bucket_size=16, share_forward=True,
                                   progress=False)
    for a, b in zip(separate.results, shared.results):
        assert (a.window, a.scored_tokens) == (b.window, b.scored_tokens)
        assert b.perplexity == pytest.approx(a.perplexity, rel=1e-4)
        assert [x.tokens for x in a.buckets] == [x.tokens for x in b.buckets]
    assert shared.results[0].derived_from_window == 128 and shared.results[-1].derived_from_window is None
    assert separate.patch["method"] == "yarn"


def test_shared_forward_is_refused_for_length_dependent_rope():
    model = tiny_llama(max_positions=64)
    patch_model(model, "dynamic_ntk", factor=2)
    ids = torch.randint(3, 384, (200,))
    with pytest.raises(ValueError, match="dynamic"):
        perplexity_at_lengths(model, None, [32, 128], ids, share_forward=True, progress=False)


def test_too_short_text_says_how_many_tokens_there_are():
    model = tiny_llama()
    with pytest.raises(ValueError, match="only 50 tokens"):
        perplexity_at_lengths(model, None, [64], torch.arange(3, 53), progress=False)


def test_report_round_trips_through_json(tmp_path):
    from .eval_utils import bpe_tokenizer

    tok = bpe_tokenizer()
    model = tiny_llama()
    report = perplexity_at_lengths(model, tok, [16, 32], Text.from_string("x = 1\n" * 200), windows=2,
                                   model_name="tiny", progress=False)
    path = report.save(tmp_path / "r.json")
    again = PerplexityReport.from_dict(__import__("json").loads(path.read_text()))
    assert again == report
    assert [r.windows for r in report.results] == [2, 2]
    assert "| 32 |" in report.table()


def test_extrapolation_at_8x_is_worse_than_at_1x_on_a_briefly_trained_model():
    """A tiny Llama learns x_t = x_{t-2} at 32 tokens (40 steps); read at 8x with its trained frequencies, the
    measurement must see it get worse — and see it in the positions past 32."""

    def periodic(n: int, gen: torch.Generator) -> torch.Tensor:
        out: list[int] = []
        while len(out) < n:  # segments "a b a b ..." of 8-23 tokens
            a, b = torch.randint(3, 40, (2,), generator=gen).tolist()
            out += [a, b] * (int(torch.randint(8, 24, (1,), generator=gen)) // 2)
        return torch.tensor(out[:n])

    gen = torch.Generator().manual_seed(0)
    model = tiny_llama(max_positions=32, seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        batch = torch.stack([periodic(32, gen) for _ in range(16)])  # [16, 32]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    held_out = periodic(2048, torch.Generator().manual_seed(1))
    at_1x = sliding_window_perplexity(model, held_out, 32, progress=False)
    patch_model(model, "extrapolate", factor=8)
    at_8x = sliding_window_perplexity(model, held_out, 256, bucket_size=32, progress=False)
    assert at_8x.perplexity > 1.5 * at_1x.perplexity
    inside, past = at_8x.buckets[0].perplexity, [b.perplexity for b in at_8x.buckets[1:]]
    assert inside < min(past)


def test_layer_progress_bar_leaves_the_numbers_and_the_model_alone():
    model = tiny_llama()
    ids = torch.randint(3, 384, (2, 40), generator=torch.Generator().manual_seed(4))
    quiet = token_nll(model, ids, 1)
    shown = token_nll(model, ids, 1, layer_progress=True)
    torch.testing.assert_close(quiet, shown, equal_nan=True)
    assert all(not layer._forward_hooks for layer in model.model.layers)
