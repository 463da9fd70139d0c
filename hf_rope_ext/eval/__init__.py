"""Evaluation at the new length: sliding-window perplexity, passkey retrieval, needle in a haystack, method comparison.

Plain functions returning dataclasses (each with ``to_dict()`` / ``save()`` for JSON); the CLI and ``plots`` use them.
"""

from .compare import CompareReport, compare_methods
from .needle import needle_grid
from .passkey import build_passkey_prompt, passkey_accuracy
from .perplexity import PerplexityReport, PerplexityResult, perplexity_at_lengths, sliding_window_perplexity, token_nll
from .retrieval import RetrievalReport, score_answer
from .text import Text, load_text, tokenize

__all__ = [
    "CompareReport",
    "PerplexityReport",
    "PerplexityResult",
    "RetrievalReport",
    "Text",
    "build_passkey_prompt",
    "compare_methods",
    "load_text",
    "needle_grid",
    "passkey_accuracy",
    "perplexity_at_lengths",
    "score_answer",
    "sliding_window_perplexity",
    "token_nll",
    "tokenize",
]
