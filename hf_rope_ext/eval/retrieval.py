"""Shared machinery of the retrieval tests (passkey, needle in a haystack): prompts with a needle at a chosen depth,
greedy generation, scoring, and the length x depth accuracy grid.

A prompt is ``[instructions] [haystack before] [needle] [haystack after] [question]``. The haystack is sized so the
whole prompt has about the requested number of tokens, and the needle goes at the boundary (between two filler
sentences) nearest to ``depth`` of the haystack: depth 0 = right after the instructions, 1 = right before the question.
The prompt is tokenized as one string (so the tokens are those the model would see for that text), and the needle's
token position is recorded so a test can check the depth.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .io import save_json

logger = logging.getLogger(__name__)


@dataclass
class RetrievalPrompt:
    """One prompt with its needle, and where the needle landed."""

    input_ids: list[int]
    """The prompt's tokens (special tokens included when the tokenizer adds them)."""
    answer: str
    """The digits the model must produce."""
    depth: float
    """Requested depth in [0, 1]."""
    needle_start: int
    """Index of the needle's first token in ``input_ids``."""
    needle_end: int
    """One past the needle's last token."""
    haystack_start: int
    """Index of the first haystack token (after the instructions)."""
    haystack_end: int
    """One past the last haystack token (where the question starts), counted without the needle."""

    @property
    def actual_depth(self) -> float:
        """Where the needle is, as a fraction of the haystack's tokens before it / all haystack tokens."""
        haystack = self.haystack_end - self.haystack_start
        return (self.needle_start - self.haystack_start) / haystack if haystack else 0.0


@dataclass
class RetrievalTrial:
    """One generation and its score."""

    length: int
    """Requested prompt length in tokens."""
    depth: float
    """Requested needle depth."""
    trial: int
    """Index of the sample in this cell."""
    prompt_tokens: int
    """Actual prompt length in tokens."""
    needle_start: int
    """Token index of the needle."""
    answer: str
    """Expected digits."""
    output: str
    """What the model generated (decoded, special tokens skipped)."""
    prediction: str | None
    """First run of digits in ``output``."""
    correct: bool
    """``prediction == answer``."""


@dataclass
class RetrievalReport:
    """Accuracy of a retrieval test over a grid of lengths x depths."""

    task: str
    """``"passkey"`` or ``"needle"``."""
    model: str
    """What was evaluated."""
    patch: dict[str, Any] | None
    """``patch_info(model)`` or None."""
    lengths: list[int]
    """Prompt lengths (columns of the grid)."""
    depths: list[float]
    """Needle depths (rows of the grid)."""
    trials_per_cell: int
    """Samples per (length, depth)."""
    seed: int
    """Seed of the keys / needles."""
    accuracy: list[list[float]] = field(default_factory=list)
    """``accuracy[i][j]``: fraction correct at ``depths[i]``, ``lengths[j]``."""
    trials: list[RetrievalTrial] = field(default_factory=list)
    """Every generation."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Templates and generation settings used."""
    seconds: float = 0.0
    """Total wall time."""

    @property
    def overall_accuracy(self) -> float:
        return sum(t.correct for t in self.trials) / len(self.trials) if self.trials else float("nan")

    def accuracy_by_length(self) -> dict[int, float]:
        out = {}
        for length in self.lengths:
            cell = [t.correct for t in self.trials if t.length == length]
            out[length] = sum(cell) / len(cell) if cell else float("nan")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "retrieval", **asdict(self), "overall_accuracy": self.overall_accuracy}

    def save(self, path: str | Path) -> Path:
        return save_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrievalReport:
        data = {k: v for k, v in data.items() if k not in ("kind", "overall_accuracy")}
        trials = [RetrievalTrial(**t) for t in data.pop("trials", [])]
        return cls(**data, trials=trials)

    def table(self) -> str:
        """Markdown: depths as rows, lengths as columns, accuracy in cells."""
        head = "| depth | " + " | ".join(str(n) for n in self.lengths) + " |"
        lines = [head, "|---:|" + "---:|" * len(self.lengths)]
        for i, depth in enumerate(self.depths):
            lines.append(f"| {depth:.2f} | " + " | ".join(f"{a:.2f}" for a in self.accuracy[i]) + " |")
        return "\n".join(lines)


def score_answer(output: str, answer: str) -> tuple[str | None, bool]:
    """``(prediction, correct)``: the first run of digits in the generated text, and whether it equals ``answer``."""
    match = re.search(r"\d+", output)
    prediction = match.group(0) if match else None
    return prediction, prediction == answer


def cell_rng(seed: int, task: str, length: int, depth: float, trial: int) -> random.Random:
    """A generator for one cell, independent of which other cells are in the grid."""
    return random.Random(f"{task}|{seed}|{length}|{depth:.6f}|{trial}")


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])


def _encode_with_char_index(tokenizer: Any, text: str, chars: Sequence[int]) -> tuple[list[int], list[int]]:
    """Tokens of ``text`` and, for each character index in ``chars``, the index of the first token starting at or
    after it (offset mapping when the tokenizer has one, else counting the tokens of the text before it)."""
    try:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
        offsets = enc["offset_mapping"]
        ids = list(enc["input_ids"])
        positions = []
        for c in chars:
            idx = next((i for i, (a, b) in enumerate(offsets) if b > a and b > c), len(ids))
            positions.append(idx)
        return ids, positions
    except (NotImplementedError, TypeError, KeyError):
        ids = list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
        return ids, [_token_count(tokenizer, text[:c]) for c in chars]


def build_prompt(
    tokenizer: Any,
    length: int,
    depth: float,
    *,
    instructions: str,
    pieces: Callable[[int], list[str]],
    needle: str,
    question: str,
    answer: str,
) -> RetrievalPrompt:
    """Assemble ``instructions + haystack[:k] + needle + haystack[k:] + question`` of about ``length`` tokens.

    ``pieces(n)`` returns the haystack as a list of text pieces (each ending on a sentence boundary) holding about
    ``n`` tokens; the needle goes between the two pieces nearest to ``depth`` of the haystack (measured in
    characters). The prompt has at most ``length`` tokens: the haystack shrinks until the whole prompt fits."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    overhead = _token_count(tokenizer, instructions + needle + question)
    budget = length - overhead
    if budget < 8:
        raise ValueError(f"length {length} leaves no room for a haystack: instructions, needle and question "
                         f"already take {overhead} tokens")

    def render(n: int) -> tuple[str, list[int], int, int]:
        parts = pieces(n)
        chars = [len(p) for p in parts]
        total = sum(chars)
        target = depth * total
        cut, k, acc = 0, 0, 0  # choose the piece boundary nearest to depth * haystack
        best = abs(target)
        for i, c in enumerate(chars):
            acc += c
            if abs(acc - target) < best:
                best, cut, k = abs(acc - target), acc, i + 1
        before, after = "".join(parts[:k]), "".join(parts[k:])
        text = instructions + before + needle + after + question
        return text, [len(instructions), len(instructions) + len(before),
                      len(instructions) + len(before) + len(needle),
                      len(instructions) + len(before) + len(needle) + len(after)], cut, total

    # shrink the haystack until the joint tokenization fits (a few tokens of merging across boundaries)
    n = budget
    while True:
        text, marks, _, _ = render(n)
        ids, (hs, ns, ne, he) = _encode_with_char_index(tokenizer, text, marks)
        over = len(ids) - length
        if over <= 0:
            break
        n -= over
        if n < 1:
            raise ValueError(f"length {length} is too short for this prompt: even the smallest haystack gives "
                             f"{len(ids)} tokens")
    return RetrievalPrompt(input_ids=ids, answer=answer, depth=depth, needle_start=ns, needle_end=ne,
                           haystack_start=hs, haystack_end=he - (ne - ns))


def _model_device(model: Any) -> torch.device:
    try:
        return next(p.device for p in model.parameters())
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def generate_answers(
    model: nn.Module, tokenizer: Any, prompts: Sequence[RetrievalPrompt], *, max_new_tokens: int = 12,
    batch_size: int = 1,
) -> list[str]:
    """Greedy continuation of each prompt (left-padded batches), decoded without special tokens."""
    device = _model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        pad = 0
    outputs = []
    for i in range(0, len(prompts), batch_size):
        group = prompts[i : i + batch_size]
        width = max(len(p.input_ids) for p in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, p in enumerate(group):
            ids[row, width - len(p.input_ids):] = torch.tensor(p.input_ids)
            mask[row, width - len(p.input_ids):] = 1
        generated = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, pad_token_id=pad,
        )
        for row in range(len(group)):
            outputs.append(tokenizer.decode(generated[row, width:].tolist(), skip_special_tokens=True))
    return outputs


def run_grid(
    task: str,
    model: nn.Module,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    make_prompt: Callable[[int, float, int], RetrievalPrompt],
    *,
    trials: int = 1,
    seed: int = 0,
    max_new_tokens: int = 12,
    batch_size: int = 1,
    model_name: str = "",
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> RetrievalReport:
    """Build, generate and score every (length, depth, trial); ``make_prompt(length, depth, trial)``."""
    if not lengths or not depths:
        raise ValueError("give at least one length and one depth")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    from .. import patch_info

    start = time.perf_counter()
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    inner = getattr(model, "get_base_model", lambda: model)()
    report = RetrievalReport(task=task, model=model_name, patch=patch_info(inner) if hasattr(inner, "config") else None,
                             lengths=lengths, depths=depths, trials_per_cell=trials, seed=seed,
                             settings={**(settings or {}), "max_new_tokens": max_new_tokens, "decoding": "greedy"})
    cells = [(n, d, t) for n in lengths for d in depths for t in range(trials)]
    bar = tqdm(total=len(cells), desc=task, unit="prompt", disable=not progress, leave=False)
    for length in lengths:  # one length at a time: prompts of one length batch well
        group = [(d, t) for d in depths for t in range(trials)]
        prompts = [make_prompt(length, d, t) for d, t in group]
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            outputs = generate_answers(model, tokenizer, chunk, max_new_tokens=max_new_tokens, batch_size=batch_size)
            for (d, t), p, out in zip(group[i : i + batch_size], chunk, outputs):
                prediction, correct = score_answer(out, p.answer)
                report.trials.append(RetrievalTrial(length, d, t, len(p.input_ids), p.needle_start, p.answer, out,
                                                    prediction, correct))
                logger.info("%s length %d depth %.2f: answer %s, got %r -> %s", task, length, d, p.answer, out,
                            "ok" if correct else "wrong")
            bar.update(len(chunk))
    bar.close()
    report.accuracy = [
        [sum(t.correct for t in report.trials if t.length == n and t.depth == d) / trials for n in lengths]
        for d in depths
    ]
    report.seconds = time.perf_counter() - start
    return report


__all__ = [
    "RetrievalPrompt",
    "RetrievalReport",
    "RetrievalTrial",
    "build_prompt",
    "cell_rng",
    "generate_answers",
    "run_grid",
    "score_answer",
]
