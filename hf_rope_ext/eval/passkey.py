"""Passkey retrieval (Mohtashami & Jaggi 2023, landmark attention, https://arxiv.org/abs/2305.16300; used by PI,
YaRN and LongLoRA to test extended models).

Filler text, repeated: "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
A random 5-digit key sentence "The pass key is NNNNN. Remember it. NNNNN is the pass key." hidden at a chosen depth,
then "What is the pass key? The pass key is"; greedy decoding; correct when the first number generated is the key.
Accuracy is reported per (length, depth); keys come from a fixed seed, so runs are repeatable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from .retrieval import RetrievalPrompt, RetrievalReport, build_prompt, cell_rng, run_grid

INSTRUCTIONS = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _filler_tokens(tokenizer: Any) -> float:
    """Tokens per filler sentence group inside a long run of filler."""
    ids = tokenizer(FILLER * 20, add_special_tokens=False, verbose=False)["input_ids"]
    return len(ids) / 20


def random_key(rng: Any, digits: int = 5) -> str:
    """A random key of ``digits`` digits, no leading zero."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def build_passkey_prompt(tokenizer: Any, length: int, depth: float, key: str | int) -> RetrievalPrompt:
    """A passkey prompt of at most ``length`` tokens (within one filler group of it) with ``key`` at ``depth``.

    The key sentence goes between two filler groups, at the boundary nearest to ``depth`` of the filler
    (0 = first thing after the instructions, 1 = right before the question)."""
    key = str(key)
    per_unit = _filler_tokens(tokenizer)
    return build_prompt(
        tokenizer, length, depth, instructions=INSTRUCTIONS,
        pieces=lambda n: [FILLER] * max(1, math.floor(n / per_unit)),
        needle=NEEDLE.format(key=key), question=QUESTION, answer=key,
    )


def passkey_accuracy(
    model: nn.Module,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    *,
    trials: int = 1,
    seed: int = 0,
    digits: int = 5,
    max_new_tokens: int = 12,
    batch_size: int = 1,
    model_name: str = "",
    progress: bool = True,
) -> RetrievalReport:
    """Passkey accuracy over ``lengths`` x ``depths`` (``trials`` keys per cell, greedy decoding).

    The key of each cell depends only on (seed, length, depth, trial), so adding lengths keeps the others' keys."""

    def make(length: int, depth: float, trial: int) -> RetrievalPrompt:
        return build_passkey_prompt(tokenizer, length, depth, random_key(cell_rng(seed, "passkey", length, depth,
                                                                                  trial), digits))

    settings = {"instructions": INSTRUCTIONS, "filler": FILLER, "needle": NEEDLE, "question": QUESTION,
                "digits": digits}
    return run_grid("passkey", model, tokenizer, lengths, depths, make, trials=trials, seed=seed,
                    max_new_tokens=max_new_tokens, batch_size=batch_size, model_name=model_name, settings=settings,
                    progress=progress)


__all__ = [
    "DEFAULT_DEPTHS",
    "FILLER",
    "INSTRUCTIONS",
    "NEEDLE",
    "QUESTION",
    "build_passkey_prompt",
    "passkey_accuracy",
    "random_key",
]
