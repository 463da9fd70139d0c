"""Needle in a haystack (Kamradt 2023, https://github.com/gkamradt/LLMTest_NeedleInAHaystack; the numeric variant
of RULER, https://arxiv.org/abs/2404.06654): a fact hidden in real text at a grid of context lengths x depths.

The haystack is real text (the offline default, or any text source), cut into sentences; the needle
"The special magic number for CITY is NNNNNNN." goes at the sentence boundary nearest to the requested depth; the
question asks for the number. Greedy decoding; correct when the first number generated is the needle's. Scoring by
exact match replaces the original's LLM judge, so the test runs offline and is deterministic. The result is the
length x depth accuracy grid that ``plots.plot_retrieval_heatmap`` draws.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .passkey import random_key
from .retrieval import RetrievalPrompt, RetrievalReport, build_prompt, cell_rng, run_grid
from .text import Text, load_text, tokenize

INSTRUCTIONS = ("Below is a long text. Somewhere inside it is a special magic number. Read the text, then answer the "
                "question at the end.\n\n")
NEEDLE = "The special magic number for {city} is {number}. "
QUESTION = ("\n\nWhat is the special magic number for {city} mentioned in the text above? "
            "The special magic number for {city} is")
CITIES = ("Lisbon", "Nairobi", "Osaka", "Quito", "Tbilisi", "Bergen", "Hobart", "Tromso", "Cusco", "Zanzibar",
          "Valletta", "Kraków", "Manaus", "Ushuaia", "Lhasa", "Da Nang", "Tallinn", "Windhoek", "Reykjavik", "Oaxaca")
DEFAULT_DEPTHS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TRIAL_SHIFT = 1000
"""Each trial reads its haystack this many tokens further into the text, so trials differ in their haystack."""

_BOUNDARY = re.compile(r"[.!?]\s+|\n\s*\n")


def sentence_pieces(text: str) -> list[str]:
    """``text`` cut after each sentence end ('. ', '! ', '? ' and blank lines); joining the pieces gives ``text``."""
    pieces, start = [], 0
    for match in _BOUNDARY.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def build_needle_prompt(
    tokenizer: Any, haystack_ids: torch.Tensor, length: int, depth: float, city: str, number: str
) -> RetrievalPrompt:
    """A prompt of at most ``length`` tokens: real text from ``haystack_ids`` (a 1-D token stream, read from its
    start) with the needle at the sentence boundary nearest to ``depth``."""

    def pieces(n: int) -> list[str]:
        if n > haystack_ids.numel():
            raise ValueError(f"the haystack text has {haystack_ids.numel()} tokens; length {length} needs about {n}")
        text = tokenizer.decode(haystack_ids[:n].tolist(), skip_special_tokens=True)
        parts = sentence_pieces(text) or [text]
        if len(parts) > 1 and not _BOUNDARY.search(parts[-1]):
            parts.pop()  # the cut fell mid-sentence: end the haystack on a sentence boundary
        return parts

    return build_prompt(tokenizer, length, depth, instructions=INSTRUCTIONS, pieces=pieces,
                        needle=NEEDLE.format(city=city, number=number), question=QUESTION.format(city=city),
                        answer=number)


def needle_grid(
    model: nn.Module,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    text: str | Text | None = None,
    *,
    trials: int = 1,
    seed: int = 0,
    digits: int = 7,
    offset: int = 0,
    max_new_tokens: int = 16,
    batch_size: int = 1,
    model_name: str = "",
    progress: bool = True,
) -> RetrievalReport:
    """Needle-in-a-haystack accuracy over ``lengths`` x ``depths``.

    Args:
        text: haystack source (see ``eval.text``); None = the offline default.
        trials: needles per cell; trial k reads the haystack from token ``offset + k * 1000``.
        digits: digits of the magic number.
    """
    loaded = text if isinstance(text, Text) else load_text(text)
    stream = tokenize(tokenizer, loaded)

    def make(length: int, depth: float, trial: int) -> RetrievalPrompt:
        rng = cell_rng(seed, "needle", length, depth, trial)
        city = rng.choice(CITIES)
        start = offset + trial * TRIAL_SHIFT
        return build_needle_prompt(tokenizer, stream[start:], length, depth, city, random_key(rng, digits))

    settings = {"instructions": INSTRUCTIONS, "needle": NEEDLE, "question": QUESTION, "digits": digits,
                "text": loaded.source, "text_description": loaded.description, "offset": offset}
    return run_grid("needle", model, tokenizer, lengths, depths, make, trials=trials, seed=seed,
                    max_new_tokens=max_new_tokens, batch_size=batch_size, model_name=model_name, settings=settings,
                    progress=progress)


__all__ = ["DEFAULT_DEPTHS", "build_needle_prompt", "needle_grid", "sentence_pieces"]
