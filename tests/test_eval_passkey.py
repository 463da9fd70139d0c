"""Passkey and needle prompts (the key lands at the requested depth, checked by token position) and the scorer
(a stub model that echoes the key scores 1, one that never does scores 0)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from hf_rope_ext.eval.needle import build_needle_prompt, needle_grid, sentence_pieces
from hf_rope_ext.eval.passkey import FILLER, build_passkey_prompt, passkey_accuracy
from hf_rope_ext.eval.retrieval import RetrievalReport, generate_answers, score_answer
from hf_rope_ext.eval.text import Text, load_text, tokenize

from .eval_utils import bpe_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


def filler_unit_tokens(tok) -> float:
    return len(tok(FILLER * 10, add_special_tokens=False)["input_ids"]) / 10


@pytest.mark.parametrize("length", [300, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_passkey_prompt_hides_the_key_at_the_requested_depth(tok, length, depth):
    unit = filler_unit_tokens(tok)
    prompt = build_passkey_prompt(tok, length, depth, 48213)
    ids = prompt.input_ids
    assert length - unit - 8 <= len(ids) <= length
    # the needle's tokens are the key sentence, and the key appears nowhere else
    assert tok.decode(ids[prompt.needle_start : prompt.needle_end]).strip() == (
        "The pass key is 48213. Remember it. 48213 is the pass key."
    )
    assert tok.decode(ids).count("48213") == 2
    # by token position: the filler before the needle is depth x all filler, to within half a filler group
    haystack = prompt.haystack_end - prompt.haystack_start
    before = prompt.needle_start - prompt.haystack_start
    assert abs(before - depth * haystack) <= unit / 2 + 2
    text_before = tok.decode(ids[prompt.haystack_start : prompt.needle_start])
    assert text_before.count("The grass is green.") == round(before / unit)
    assert tok.decode(ids).rstrip().endswith("What is the pass key? The pass key is")


class EchoStub(nn.Module):
    """A stand-in for a causal LM that reads only what one can: the attended tokens (attention mask 1) of the last
    ``window`` positions, continuing from the LAST position. A row whose last position is padding (right-padded) has
    no question (regex ``question``) to answer there, and one whose key is beyond the window answers a wrong number:
    the stub answers only what a model seeing these inputs could. ``echo=False``: always wrong."""

    QUESTION = r"The pass key is"

    def __init__(self, tokenizer, pattern: str, echo: bool, window: int | None = None, question: str | None = None):
        super().__init__()
        self.tokenizer, self.pattern, self.echo, self.window = tokenizer, pattern, echo, window
        self.question = question or self.QUESTION
        self.calls = 0
        self.padded_rows = 0

    def _answer(self, row, mask) -> str:
        if mask[-1] == 0:  # right padding: generation would continue after pad tokens
            return "0"
        if (mask.diff() < 0).any():  # padding inside the row: not a left-padded batch
            return "0"
        self.padded_rows += int(mask[0] == 0)
        seen = slice(-self.window, None) if self.window else slice(None)
        text = self.tokenizer.decode(row[seen][mask[seen].bool()].tolist())
        found = re.search(self.pattern, text)
        if found is None or not re.search(self.question + r"\s*$", text):
            return "0"
        key = found.group(1)
        return key if self.echo else str(int(key) + 1)

    def generate(self, input_ids, attention_mask=None, max_new_tokens=8, **kwargs):
        rows = []
        for row, mask in zip(input_ids, attention_mask, strict=True):
            new = self.tokenizer(f" {self._answer(row, mask)}. Remember", add_special_tokens=False)["input_ids"]
            rows.append(torch.cat([row, torch.tensor(new[:max_new_tokens])]))
        self.calls += 1
        return torch.stack(rows)


@pytest.mark.parametrize(("echo", "expected"), [(True, 1.0), (False, 0.0)])
def test_passkey_scorer_on_stub_models(tok, echo, expected):
    stub = EchoStub(tok, r"pass key is (\d+)\.", echo)
    report = passkey_accuracy(stub, tok, [300, 400], [0.0, 0.5, 1.0], trials=2, seed=3, batch_size=2, progress=False)
    assert report.accuracy == [[expected, expected]] * 3
    assert report.overall_accuracy == expected
    assert len(report.trials) == 12 and stub.calls == 6
    assert all(len(t.answer) == 5 for t in report.trials)
    assert len({t.answer for t in report.trials}) > 6  # keys differ between cells
    again = passkey_accuracy(stub, tok, [400], [0.5], trials=2, seed=3, progress=False)
    assert [t.answer for t in again.trials] == [t.answer for t in report.trials if t.length == 400 and t.depth == 0.5]


def test_passkey_accuracy_follows_where_the_key_is(tok):
    """A stub that sees only the last 120 tokens finds the key at depth 1 (just before the question) and never at
    depth 0 (the start of a 300-400 token prompt): the expected grid follows from the depths alone, not from the
    stub reading the key wherever it is."""
    stub = EchoStub(tok, r"pass key is (\d+)\.", True, window=120)
    report = passkey_accuracy(stub, tok, [300, 400], [0.0, 1.0], trials=2, seed=1, batch_size=2, progress=False)
    assert report.accuracy == [[0.0, 0.0], [1.0, 1.0]]
    for t in report.trials:
        assert t.correct == (t.prompt_tokens - t.needle_start <= 120)  # the reference: where the needle landed


def test_prompts_of_unequal_length_are_left_padded(tok):
    """Prompts of different lengths in one batch: each row ends at the last position (left padding), so every key
    is found; right padding would leave the shorter row's question before pad tokens."""
    keys = ["48213", "90817", "11235"]
    prompts = [build_passkey_prompt(tok, n, 0.5, k) for n, k in zip((256, 300, 420), keys, strict=True)]
    assert len({len(p.input_ids) for p in prompts}) == 3
    stub = EchoStub(tok, r"pass key is (\d+)\.", True)
    outputs = generate_answers(stub, tok, prompts, max_new_tokens=8, batch_size=3)
    assert stub.calls == 1 and stub.padded_rows == 2
    assert [score_answer(o, k)[1] for o, k in zip(outputs, keys, strict=True)] == [True, True, True]


def test_too_short_a_length_is_refused_clearly(tok):
    with pytest.raises(ValueError, match="too short|no room"):
        build_passkey_prompt(tok, 120, 0.5, 12345)


def test_score_answer():
    assert score_answer(" 48213. Remember it", "48213") == ("48213", True)
    assert score_answer("48213", "48213") == ("48213", True)
    assert score_answer(" 4821", "48213") == ("4821", False)
    assert score_answer(" 482135", "48213") == ("482135", False)
    assert score_answer(" the key", "48213") == (None, False)
    assert score_answer(" 11111 48213", "48213") == ("11111", False)  # only the first number counts


def test_needle_prompt_puts_the_needle_between_sentences_at_the_depth(tok):
    stream = tokenize(tok, load_text(None))[5000:]
    for depth in (0.0, 0.3, 0.5, 1.0):
        prompt = build_needle_prompt(tok, stream, 800, depth, "Lisbon", "7364519")
        ids = prompt.input_ids
        assert 700 <= len(ids) <= 800
        text = tok.decode(ids)
        assert text.count("7364519") == 1
        needle = tok.decode(ids[prompt.needle_start : prompt.needle_end])
        assert needle.strip() == "The special magic number for Lisbon is 7364519."
        before = tok.decode(ids[prompt.haystack_start : prompt.needle_start])
        assert before == "" or re.search(r"([.!?]\s+|\n\s*\n)$", before)  # a sentence ended just before
        assert abs(prompt.actual_depth - depth) < 0.1


def test_sentence_pieces_rejoin():
    text = "One. Two!  Three?\n\nFour five. six"
    pieces = sentence_pieces(text)
    assert "".join(pieces) == text
    assert pieces == ["One. ", "Two!  ", "Three?\n\n", "Four five. ", "six"]


def test_needle_grid_with_stubs(tok, tmp_path):
    text = Text.from_string(load_text(None).text[:200_000])
    question = r"magic number for \w+ is"
    good = needle_grid(EchoStub(tok, r"number for [^.]*? is (\d+)\.", True, question=question), tok, [300, 600],
                       [0.0, 0.5, 1.0], text, progress=False)
    bad = needle_grid(EchoStub(tok, r"number for [^.]*? is (\d+)\.", False, question=question), tok, [300], [0.5],
                      text, progress=False)
    assert good.accuracy == [[1.0, 1.0]] * 3 and bad.accuracy == [[0.0]]
    assert all(len(t.answer) == 7 for t in good.trials)
    path = good.save(tmp_path / "needle.json")
    assert RetrievalReport.from_dict(__import__("json").loads(path.read_text())) == good
    assert "| 0.50 | 1.00 | 1.00 |" in good.table()


def test_passkey_runs_through_a_real_generate(tok):
    """A real model, prompts of unequal length in one left-padded batch: each output is what greedy ``generate``
    gives for that prompt alone (no batch, no padding: the reference), and each score is that output's first number
    compared with the key."""
    model = tiny_llama(max_positions=512, vocab_size=len(tok))
    keys = ["48213", "90817", "11235"]
    lengths, depths = (256, 300, 420), (0.0, 0.5, 1.0)
    prompts = [build_passkey_prompt(tok, n, d, k) for n, d, k in zip(lengths, depths, keys, strict=True)]
    assert len({len(p.input_ids) for p in prompts}) == 3
    outputs = generate_answers(model, tok, prompts, max_new_tokens=4, batch_size=3)
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = torch.tensor([prompt.input_ids])
        alone = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                               pad_token_id=tok.pad_token_id)
        assert output == tok.decode(alone[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    # the grid over a real generate: every trial scored from its own output
    report = passkey_accuracy(model, tok, [256], [0.0, 1.0], max_new_tokens=4, batch_size=2, progress=False)
    assert len(report.trials) == 2
    for t in report.trials:
        digits = re.search(r"\d+", t.output)
        assert t.correct == (digits is not None and digits.group() == t.answer)
        assert t.prediction == (digits.group() if digits else None)
    assert report.accuracy == [[float(t.correct)] for t in report.trials]
