"""Slow: the evaluation tools on the real SmolLM2-135M (offline GGUF package). Run with `pytest -m slow`."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from hf_rope_ext.loading import load_model, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return load_model("smollm2", dtype="float32")


def test_chunked_perplexity_equals_the_model_own_loss(smollm2):
    from hf_rope_ext.eval.perplexity import perplexity_at_lengths
    from hf_rope_ext.eval.text import load_text, tokenize

    model, tok = smollm2
    ids = tokenize(tok, load_text(None))[20000 : 20000 + 1024]
    with torch.no_grad():
        reference = model(ids[None], labels=ids[None]).loss.item()  # transformers' own shifted mean loss
    report = perplexity_at_lengths(model, tok, [1024], offset=20000, progress=False)
    assert report.results[0].perplexity == pytest.approx(math.exp(reference), rel=1e-4)


def test_passkey_inside_the_trained_length(smollm2):
    from hf_rope_ext.eval.passkey import passkey_accuracy

    model, tok = smollm2
    report = passkey_accuracy(model, tok, [1024], [0.5], progress=False)
    assert report.trials[0].correct, report.trials[0].output
