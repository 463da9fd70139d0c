"""Compare extension methods on one model: each method patches a fresh copy, then the same measurements run.

The unpatched model is the method ``"none"`` (for a rotary model past its trained length this reads the same as
``extrapolate``, which only raises the length limit).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import patch_info, patch_model, unpatch_model
from ..registry import get_method
from .io import save_json
from .passkey import DEFAULT_DEPTHS, passkey_accuracy
from .perplexity import PerplexityReport, length_dependent_positions, perplexity_at_lengths
from .retrieval import RetrievalReport
from .text import Text, load_text, tokenize

logger = logging.getLogger(__name__)

UNPATCHED = "none"
"""Method name standing for the model as loaded."""


@dataclass
class MethodRun:
    """The measurements of one method."""

    method: str
    """Method name (``"none"``: the unpatched model)."""
    patch: dict[str, Any] | None = None
    """``patch_info`` of the patched copy."""
    perplexity: PerplexityReport | None = None
    """Perplexity at every length."""
    passkey: RetrievalReport | None = None
    """Passkey accuracy, when asked for."""
    seconds: float = 0.0
    """Wall time for this method (patching and all measurements)."""
    error: str | None = None
    """Why this method has no numbers (e.g. the model refused the patch)."""


@dataclass
class CompareReport:
    """Several methods measured the same way on the same model and text."""

    model: str
    """What was evaluated."""
    original_length: int
    """The model's trained context length."""
    patch_arguments: dict[str, Any]
    """``factor`` / ``max_position_embeddings`` and shared parameters given to every method."""
    lengths: list[int]
    """Window lengths of the perplexity measurement."""
    text: str
    """Text source."""
    text_description: str
    """What the text is."""
    offset: int
    """First token of the text used."""
    runs: list[MethodRun] = field(default_factory=list)
    """One entry per method, in the order asked."""
    notes: list[str] = field(default_factory=list)
    """What was measured and how, in words (printed under the table)."""
    seconds: float = 0.0
    """Total wall time."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "compare", **asdict(self)}

    def save(self, path: str | Path) -> Path:
        return save_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareReport:
        data = {k: v for k, v in data.items() if k != "kind"}
        runs = []
        for r in data.pop("runs", []):
            r = dict(r)
            if r.get("perplexity"):
                r["perplexity"] = PerplexityReport.from_dict(r["perplexity"])
            if r.get("passkey"):
                r["passkey"] = RetrievalReport.from_dict(r["passkey"])
            runs.append(MethodRun(**r))
        return cls(**data, runs=runs)

    def perplexities(self) -> dict[str, dict[int, float]]:
        """method -> {length: perplexity}."""
        return {run.method: {r.window: r.perplexity for r in run.perplexity.results}
                for run in self.runs if run.perplexity is not None}

    def table(self, past_original: bool = True) -> str:
        """Markdown table: a row per method, perplexity per length; with ``past_original`` a column for the tokens
        past the original length at the longest length; passkey accuracy when measured."""
        longest = max(self.lengths)
        extra = past_original and longest > self.original_length
        has_passkey = any(run.passkey is not None for run in self.runs)
        head = ["method"] + [f"PPL @ {n}" for n in self.lengths]
        tail_start = self._tail_start() if extra else None
        if tail_start is not None:
            head.append(f"PPL of positions {tail_start}–{longest}")
        if has_passkey:
            head.append("passkey")
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for run in self.runs:
            if run.error:
                lines.append(f"| {run.method} | " + " | ".join(["–"] * (len(head) - 2)) + f" | {run.error} |"
                             if len(head) > 2 else f"| {run.method} | {run.error} |")
                continue
            cells = [run.method]
            by_len = {r.window: r for r in run.perplexity.results}
            cells += [_fmt(by_len[n].perplexity) for n in self.lengths]
            if tail_start is not None:
                cells.append(_fmt(tail_perplexity(by_len[longest], self.original_length)))
            if has_passkey:
                p = run.passkey
                cells.append(f"{sum(t.correct for t in p.trials)}/{len(p.trials)}" if p else "–")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


    def _tail_start(self) -> int | None:
        """First bucket start at or past the original length in the longest window's buckets."""
        longest = max(self.lengths)
        for run in self.runs:
            if run.perplexity is not None:
                result = next(r for r in run.perplexity.results if r.window == longest)
                starts = [b.start for b in result.buckets if b.start >= self.original_length]
                return min(starts) if starts else None
        return None


    def bucket_table(self, length: int | None = None) -> str:
        """Markdown: perplexity by position bucket at one window length (default the longest), a row per method."""
        length = length or max(self.lengths)
        rows = [(run.method, next(r for r in run.perplexity.results if r.window == length))
                for run in self.runs if run.perplexity is not None]
        if not rows:
            return ""
        buckets = [b for b in rows[0][1].buckets if b.tokens]
        head = ["method"] + [f"{b.start}–{b.end}" for b in buckets]
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(buckets)]
        for method, result in rows:
            by_start = {b.start: b for b in result.buckets}
            lines.append("| " + " | ".join([method] + [_fmt(by_start[b.start].perplexity) for b in buckets]) + " |")
        return "\n".join(lines)


def _fmt(x: float) -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{x:.2f}" if x < 1000 else f"{x:.3g}"


def tail_perplexity(result: Any, start: int) -> float:
    """Perplexity over the buckets that start at or after window position ``start`` (NaN when none do)."""
    buckets = [b for b in result.buckets if b.start >= start and b.tokens]
    if not buckets:
        return float("nan")
    tokens = sum(b.tokens for b in buckets)
    return math.exp(sum(b.nll * b.tokens for b in buckets) / tokens)


def original_length_of(model: nn.Module) -> int:
    """The trained context length: from ``patch_info`` when patched, else the config."""
    info = patch_info(model)
    if info:
        return int(info["original_max_position_embeddings"])
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the trained length of {type(model).__name__} from its config")


def compare_methods(
    model: nn.Module,
    tokenizer: Any,
    methods: Sequence[str],
    lengths: Sequence[int],
    *,
    factor: float | None = None,
    max_position_embeddings: int | None = None,
    method_params: dict[str, dict[str, Any]] | None = None,
    text: str | Text | None = None,
    stride: int | None = None,
    windows: int = 1,
    offset: int = 0,
    bucket_size: int | None = None,
    batch_size: int = 1,
    share_forward: bool | str = "auto",
    passkey_lengths: Sequence[int] | None = None,
    passkey_depths: Sequence[float] = DEFAULT_DEPTHS,
    passkey_trials: int = 1,
    copy_mode: str = "deepcopy",
    model_name: str = "",
    progress: bool = True,
    **patch_kwargs: Any,
) -> CompareReport:
    """Patch a fresh copy of ``model`` with each method and measure perplexity (and passkey) the same way.

    Args:
        model: the unpatched model.
        methods: method names (``list_methods()``) and/or ``"none"`` for the unpatched model.
        lengths: window lengths for perplexity.
        factor / max_position_embeddings: how far every method extends (one of them).
        method_params: per-method extra parameters, e.g. ``{"yarn": {"beta_fast": 16}}``.
        bucket_size: width of the position buckets; default original length / 4, so one starts at the original
            length and the table can show the loss past it.
        share_forward: ``"auto"`` reads all lengths off one forward at the longest length when that is exact
            (one window per length, static position encoding); True forces it, False never.
        passkey_lengths: when given, also run passkey retrieval at these lengths.
        copy_mode: ``"deepcopy"`` patches a deep copy per method; ``"inplace"`` patches the model itself and
            unpatches it afterwards (half the memory, for large models).
        **patch_kwargs: passed to every ``patch_model`` call (e.g. ``original_max_position_embeddings``).
    """
    if patch_info(model):
        raise ValueError("compare_methods needs the unpatched model; call unpatch_model(model) first")
    if copy_mode not in ("deepcopy", "inplace"):
        raise ValueError(f"unknown copy_mode {copy_mode!r}; choose one of: deepcopy, inplace")
    if not methods:
        raise ValueError("give at least one method")
    for name in methods:  # fail on a typo before any slow work
        if name != UNPATCHED:
            get_method(name)
    method_params = method_params or {}
    unknown = sorted(set(method_params) - set(methods))
    if unknown:
        raise ValueError(f"method_params for methods not compared: {', '.join(unknown)}")
    start = time.perf_counter()
    loaded = text if isinstance(text, Text) else load_text(text)
    ids = tokenize(tokenizer, loaded)
    original = original_length_of(model)
    if bucket_size is None:  # buckets that start exactly at the original length
        bucket_size = max(1, original // 4)
    report = CompareReport(
        model=model_name, original_length=original,
        patch_arguments={"factor": factor, "max_position_embeddings": max_position_embeddings, **patch_kwargs},
        lengths=[int(n) for n in lengths], text=loaded.source, text_description=loaded.description, offset=offset,
    )
    bar = tqdm(methods, desc="methods", unit="method", disable=not progress, leave=False)
    for name in bar:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        run = MethodRun(method=name)
        target = copy.deepcopy(model) if copy_mode == "deepcopy" else model
        try:
            if name != UNPATCHED:
                patch_model(target, name, factor=factor, max_position_embeddings=max_position_embeddings,
                            tokenizer=None, **patch_kwargs, **method_params.get(name, {}))
            run.patch = patch_info(target)
        except ValueError as err:
            run.error = f"not applied: {err}"
            logger.warning("%s: %s", name, run.error)
            report.runs.append(run)
            if copy_mode == "inplace" and patch_info(target):
                unpatch_model(target)
            continue
        try:
            share = share_forward
            if share == "auto":
                share = windows == 1 and stride is None and not length_dependent_positions(target)
            run.perplexity = perplexity_at_lengths(
                target, tokenizer, lengths, ids, stride=stride, windows=windows, offset=offset,
                bucket_size=bucket_size, batch_size=batch_size, share_forward=bool(share), model_name=model_name,
                progress=progress,
            )
            run.perplexity.text, run.perplexity.text_description = loaded.source, loaded.description
            if passkey_lengths:
                run.passkey = passkey_accuracy(target, tokenizer, passkey_lengths, passkey_depths,
                                               trials=passkey_trials, model_name=model_name, progress=progress)
        finally:
            if copy_mode == "inplace" and patch_info(target):
                unpatch_model(target)
            del target
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        run.seconds = time.perf_counter() - t0
        logger.info("%s done in %.1f s", name, run.seconds)
        report.runs.append(run)
    bar.close()
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["UNPATCHED", "CompareReport", "MethodRun", "compare_methods", "original_length_of", "tail_perplexity"]
