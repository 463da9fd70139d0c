"""Sliding-window perplexity, by length and by position bucket.

Protocol (PI, https://arxiv.org/abs/2306.15595 §3; YaRN, https://arxiv.org/abs/2309.00071 §4.3; the HF "perplexity of
fixed-length models" guide): windows of ``L`` tokens start every ``S`` tokens; each window scores only the tokens not
scored by an earlier window, so every token is scored exactly once, with at least ``L - S`` tokens of context
(except in the first window)::

    PPL = exp( (1/N) * sum_t  -log p(x_t | x_{max(0, e_t - L) .. t-1}) )    e_t = end of the window that scores x_t

``S = L`` gives the non-overlapping figure (each window scored in full); the papers use ``S = 256``.

Loss by position bucket: every scored token is also counted in the bucket of its position *inside its window*
(``position // bucket_size``), which shows where a model degrades, e.g. past its trained length. With ``S = L`` every
position is scored equally often; with small strides late positions dominate (the early ones only come from the
first window).

Memory: the model's base is run once per window and the language-model head is applied to ``loss_chunk`` positions
at a time through the model's own head code (so logit soft-capping or scaling of the family applies), so at most
``[batch, loss_chunk, vocab]`` logits exist at once — never ``[L, vocab]`` for a long window.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .io import save_json
from .text import Text, load_text, take_tokens, tokenize

logger = logging.getLogger(__name__)

LAYER_PROGRESS_FROM = 4096
"""Windows at least this long get a per-layer progress bar (one forward can take minutes on a CPU)."""


@dataclass
class Bucket:
    """Loss over the scored tokens whose position inside their window falls in ``[start, end)``."""

    start: int
    """First window position of the bucket."""
    end: int
    """One past the last window position of the bucket."""
    tokens: int
    """Scored tokens counted in this bucket."""
    nll: float
    """Mean negative log-likelihood (nats per token); NaN when ``tokens == 0``."""
    perplexity: float
    """exp(nll)."""


@dataclass
class PerplexityResult:
    """Sliding-window perplexity at one window length."""

    window: int
    """Window length L (tokens the model sees at once)."""
    stride: int
    """Stride S between window starts."""
    tokens: int
    """Length of the token stream evaluated."""
    scored_tokens: int
    """Tokens whose loss is counted: all but the first with S < L; all but each window's first with S = L."""
    windows: int
    """Forward passes over windows."""
    nll: float
    """Mean negative log-likelihood over the scored tokens (nats per token)."""
    perplexity: float
    """exp(nll)."""
    bucket_size: int
    """Width of the position buckets."""
    buckets: list[Bucket] = field(default_factory=list)
    """Loss by position inside the window, one entry per bucket of ``bucket_size`` positions."""
    seconds: float = 0.0
    """Wall time of the measurement (0 when derived from a longer window's forward)."""
    derived_from_window: int | None = None
    """Set when this length was read off the first ``window`` tokens of one longer forward (``share_forward``)."""


@dataclass
class PerplexityReport:
    """Perplexity of one model at several window lengths on one text."""

    model: str
    """What was evaluated (path, Hub id or alias)."""
    patch: dict[str, Any] | None
    """``patch_info(model)``: the method and lengths applied, or None for the unpatched model."""
    text: str
    """Text source (``builtin:pydoc``, a path, ``dataset:NAME``)."""
    text_description: str
    """One line saying what the text is."""
    offset: int
    """First token of the stream used (all lengths start here)."""
    results: list[PerplexityResult] = field(default_factory=list)
    """One result per length, in the order asked."""
    seconds: float = 0.0
    """Total wall time."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "perplexity", **asdict(self)}

    def save(self, path: str | Path) -> Path:
        return save_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerplexityReport:
        data = {k: v for k, v in data.items() if k != "kind"}
        results = []
        for r in data.pop("results", []):
            r = dict(r)
            r["buckets"] = [Bucket(**b) for b in r.get("buckets", [])]
            results.append(PerplexityResult(**r))
        return cls(**data, results=results)

    def table(self) -> str:
        """Markdown: one row per length."""
        lines = ["| length | windows | scored tokens | PPL |", "|---:|---:|---:|---:|"]
        for r in self.results:
            lines.append(f"| {r.window} | {r.windows} | {r.scored_tokens} | {r.perplexity:.3f} |")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# the model's head applied in chunks


class _PrecomputedBase(nn.Module):
    """Stands in for a causal LM's base model: returns hidden states computed earlier, so the LM's own ``forward``
    applies its head (and any logit soft-capping / scaling) to just a slice of positions."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # the richest base output: GPT-2-style heads also read `cross_attentions`
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=self.hidden)


def _unwrap(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # peft
    return get_base() if callable(get_base) else model


def _base_and_prefix(model: nn.Module) -> tuple[nn.Module, str] | None:
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if prefix else None
    if base is None or base is model or model.get_output_embeddings() is None:
        return None
    return base, prefix


@contextlib.contextmanager
def _swapped(model: nn.Module, name: str, module: nn.Module) -> Iterator[None]:
    original = getattr(model, name)
    setattr(model, name, module)
    try:
        yield
    finally:
        setattr(model, name, original)


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(p.device for p in model.parameters())
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def token_nll(
    model: nn.Module,
    input_ids: torch.Tensor,
    first_scored: Sequence[int] | int = 1,
    *,
    loss_chunk: int = 1024,
    layer_progress: bool = False,
) -> torch.Tensor:
    """Per-token negative log-likelihood of ``input_ids`` ``[B, T]`` under a causal LM, in one forward.

    Returns ``[B, T]`` float32 with ``nll[b, t] = -log p(x_t | x_<t)`` for ``t >= first_scored[b]`` and NaN before.
    The head runs on ``loss_chunk`` positions at a time, so ``[B, T, vocab]`` logits never exist at once.
    ``layer_progress`` shows a bar advancing per decoder layer (for long windows on slow hardware)."""
    model = _unwrap(model)
    batch, length = input_ids.shape
    starts = [first_scored] * batch if isinstance(first_scored, int) else list(first_scored)
    if any(s < 1 or s >= length for s in starts):
        raise ValueError(f"first_scored must be in [1, {length - 1}], got {starts}")
    device = _model_device(model)
    input_ids = input_ids.to(device)
    out = torch.full((batch, length), float("nan"), dtype=torch.float32)
    lo = min(starts) - 1  # first hidden position whose prediction is scored
    split = _base_and_prefix(model)
    if split is None:  # no separable head: one full forward, keeping only the logits needed
        logger.warning("%s has no separable LM head; computing logits for %d positions at once",
                       type(model).__name__, length - lo)
        logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=length - lo).logits  # [B, T-lo, V]
        _score(logits[:, :-1], input_ids, lo, out)
    else:
        base, prefix = split
        with _layer_bar(base, f"forward over {length} tokens", layer_progress):
            hidden = base(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, T, H]
        stand_in = _PrecomputedBase()
        output_embeddings = model.get_output_embeddings()  # looked up before the swap (OPT asks its base for it)
        head = None  # set when the LM's forward reaches into its base (OPT's self.model.decoder): use the head alone
        with _swapped(model, prefix, stand_in):
            for a in range(lo, length - 1, loss_chunk):
                b = min(a + loss_chunk, length - 1)
                stand_in.hidden = hidden[:, a:b]  # [B, c, H]: predictions for tokens a+1 .. b
                if head is None:
                    try:
                        logits = model(input_ids=input_ids[:, a:b], use_cache=False).logits  # [B, c, V]
                    except AttributeError:
                        head = output_embeddings
                        logger.info("%s reads its base's submodules; applying its output embeddings directly",
                                    type(model).__name__)
                if head is not None:
                    logits = head(hidden[:, a:b])  # [B, c, V]
                _score(logits, input_ids, a, out)
    for row, s in enumerate(starts):
        out[row, :s] = float("nan")
    return out


@contextlib.contextmanager
def _layer_bar(base: nn.Module, desc: str, enabled: bool) -> Iterator[None]:
    """A tqdm bar that advances as each block of the longest ``nn.ModuleList`` (the decoder layers) finishes."""
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)] if enabled else []
    if not lists:
        yield
        return
    layers = max(lists, key=len)
    bar = tqdm(total=len(layers), desc=desc, unit="layer", leave=False)

    def advance(*_: Any) -> None:  # a forward hook must return None, or it replaces the layer's output
        bar.update(1)

    handles = [layer.register_forward_hook(advance) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        bar.close()


def _score(logits: torch.Tensor, input_ids: torch.Tensor, a: int, out: torch.Tensor) -> None:
    """NLL of tokens ``a+1 .. a+c`` from the logits ``[B, c, V]`` at positions ``a .. a+c-1``, written to ``out``."""
    targets = input_ids[:, a + 1 : a + 1 + logits.shape[1]]  # [B, c]
    batch, c, vocab = logits.shape
    # rows of [B*c, V] (the layout transformers' loss uses; [B, V, c] takes a less accurate path on CPU)
    nll = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1), reduction="none").view(batch, c)
    out[:, a + 1 : a + 1 + c] = nll.cpu()


# --------------------------------------------------------------------------------------------------------------------
# sliding window


def plan_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of the sliding-window protocol as ``(begin, end, first_scored)`` stream indices.

    Window k covers ``[k*S, min(k*S + L, N))`` and scores from the end of the previous window on (never its own
    first token, which has no context in it: with S = L each window scores L - 1 tokens)."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if num_tokens < window:
        raise ValueError(f"the text has {num_tokens} tokens, fewer than the window of {window}")
    plan, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        first = max(prev_end, begin + 1)  # a window's first token has no context inside it
        if first < end:
            plan.append((begin, end, first))
        prev_end = end
        if end == num_tokens:
            break
    return plan


def _buckets(sums: torch.Tensor, counts: torch.Tensor, bucket_size: int, window: int) -> list[Bucket]:
    buckets = []
    for i in range(sums.numel()):
        n = int(counts[i])
        nll = float(sums[i] / n) if n else float("nan")
        buckets.append(Bucket(i * bucket_size, min((i + 1) * bucket_size, window), n, nll,
                              math.exp(nll) if n else float("nan")))
    return buckets


def _result_from_nll(
    nll_by_pos: list[tuple[torch.Tensor, int]], window: int, stride: int, tokens: int, windows: int,
    bucket_size: int, seconds: float, derived_from: int | None = None,
) -> PerplexityResult:
    """Aggregate ``(per-token nll [T] with NaN where unscored, window length)`` pairs."""
    n_buckets = math.ceil(window / bucket_size)
    sums = torch.zeros(n_buckets, dtype=torch.float64)
    counts = torch.zeros(n_buckets, dtype=torch.long)
    total, count = 0.0, 0
    for nll, _ in nll_by_pos:
        pos = torch.arange(nll.numel())
        mask = ~torch.isnan(nll)
        values = nll[mask].double()
        idx = pos[mask] // bucket_size
        sums.index_add_(0, idx, values)
        counts.index_add_(0, idx, torch.ones_like(idx))
        total += float(values.sum())
        count += int(mask.sum())
    mean = total / count
    return PerplexityResult(
        window=window, stride=stride, tokens=tokens, scored_tokens=count, windows=windows, nll=mean,
        perplexity=math.exp(mean), bucket_size=bucket_size, buckets=_buckets(sums, counts, bucket_size, window),
        seconds=seconds, derived_from_window=derived_from,
    )


def default_bucket_size(window: int) -> int:
    """Eight buckets per window, at least one position each."""
    return max(1, window // 8)


def sliding_window_perplexity(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[int],
    window: int,
    stride: int | None = None,
    *,
    bucket_size: int | None = None,
    batch_size: int = 1,
    loss_chunk: int = 1024,
    progress: bool = True,
    desc: str | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of a 1-D token stream (see the module docstring for the protocol).

    Args:
        model: a causal LM (patched or not).
        input_ids: the token stream, 1-D.
        window: window length L.
        stride: stride S (default L: non-overlapping windows).
        bucket_size: width of the position buckets (default L / 8).
        batch_size: windows of equal length run together.
        loss_chunk: positions per chunk when applying the LM head.
        progress: show a tqdm bar over windows.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
    stride = window if stride is None else int(stride)
    bucket_size = default_bucket_size(window) if bucket_size is None else int(bucket_size)
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plan = plan_windows(ids.numel(), window, stride)
    start = time.perf_counter()
    pieces: list[tuple[torch.Tensor, int]] = []
    bar = tqdm(total=len(plan), desc=desc or f"ppl @ {window}", unit="window", disable=not progress, leave=False)
    i = 0
    while i < len(plan):
        size = plan[i][1] - plan[i][0]
        group = [plan[i]]
        while len(group) < batch_size and i + len(group) < len(plan) and (
            plan[i + len(group)][1] - plan[i + len(group)][0] == size
        ):
            group.append(plan[i + len(group)])
        batch = torch.stack([ids[b:e] for b, e, _ in group])  # [B, size]
        nll = token_nll(model, batch, [f - b for b, _, f in group], loss_chunk=loss_chunk,
                        layer_progress=progress and size >= LAYER_PROGRESS_FROM)  # [B, size]
        pieces.extend((nll[row], size) for row in range(len(group)))
        i += len(group)
        bar.update(len(group))
    bar.close()
    result = _result_from_nll(pieces, window, stride, ids.numel(), len(plan), bucket_size,
                              time.perf_counter() - start)
    logger.info("window %d stride %d: PPL %.3f over %d tokens (%d windows, %.1f s)", window, stride,
                result.perplexity, result.scored_tokens, result.windows, result.seconds)
    return result


def prefix_results(
    nll: torch.Tensor, lengths: Sequence[int], bucket_size: int | None = None, seconds: float = 0.0
) -> list[PerplexityResult]:
    """Results at several lengths from the per-token NLL of ONE window (``token_nll(...)[0]``, scored from 1).

    For a causal model whose position encoding does not depend on the total length (static RoPE, learned tables),
    token t's loss does not depend on tokens after t, so the first ``l`` entries are exactly what a separate
    ``l``-token window would score (up to float rounding). Not valid for dynamic / longrope scaling."""
    longest = nll.numel()
    results = []
    for length in lengths:
        if length > longest:
            raise ValueError(f"length {length} exceeds the window of {longest} it is read from")
        size = default_bucket_size(length) if bucket_size is None else bucket_size
        results.append(_result_from_nll([(nll[:length], length)], length, length, length, 1, size,
                                        seconds if length == longest else 0.0,
                                        None if length == longest else longest))
    return results


def length_dependent_positions(model: nn.Module) -> bool:
    """True when the model's position encoding depends on the total sequence length (dynamic / longrope rope)."""
    from .. import families

    for module in families.rotary_modules(_unwrap(model)):
        types = module.rope_type.values() if isinstance(module.rope_type, dict) else [module.rope_type]
        if any("dynamic" in t or t == "longrope" for t in types):
            return True
    return False


def perplexity_at_lengths(
    model: nn.Module,
    tokenizer: Any,
    lengths: Sequence[int],
    text: str | Text | torch.Tensor | None = None,
    *,
    stride: int | None = None,
    windows: int = 1,
    offset: int = 0,
    bucket_size: int | None = None,
    batch_size: int = 1,
    loss_chunk: int = 1024,
    share_forward: bool = False,
    model_name: str = "",
    progress: bool = True,
) -> PerplexityReport:
    """Sliding-window perplexity at each window length in ``lengths`` on the same text.

    Each length ``L`` reads ``L + (windows - 1) * S`` tokens starting at token ``offset`` of the stream, so all
    lengths start from the same place.

    Args:
        text: a text source name or path (see ``eval.text``), a ``Text`` (``load_text(...)`` or
            ``Text.from_string(...)``), a 1-D tensor of token ids, or None for the offline default.
        stride: S; default L (non-overlapping). The PI / YaRN papers use 256.
        windows: how many windows per length (with S = L: how many disjoint L-token samples).
        share_forward: with ``windows=1`` and ``stride=None``, run ONE forward at the longest length and read the
            shorter lengths off its first tokens (``prefix_results``); refused for length-dependent rope.
    """
    if not lengths:
        raise ValueError("give at least one length")
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    lengths = [int(n) for n in lengths]
    start = time.perf_counter()
    if isinstance(text, torch.Tensor):
        ids, source, description = text.flatten(), "token ids", "token ids given by the caller"
    else:
        loaded = text if isinstance(text, Text) else load_text(text)
        ids, source, description = tokenize(tokenizer, loaded), loaded.source, loaded.description
    from .. import patch_info

    report = PerplexityReport(model=model_name, patch=patch_info(_unwrap(model)), text=source,
                              text_description=description, offset=offset)
    if share_forward:
        if windows != 1 or stride is not None:
            raise ValueError("share_forward needs windows=1 and the default stride (one window per length)")
        if length_dependent_positions(model):
            raise ValueError("share_forward is not valid for dynamic / longrope scaling: their frequencies depend "
                             "on the total length; evaluate each length separately")
        longest = max(lengths)
        chunk = take_tokens(ids, longest, offset, f"length {longest}")
        t0 = time.perf_counter()
        bar = tqdm(total=1, desc=f"ppl @ {longest} (shared by {len(lengths)} lengths)", disable=not progress,
                   leave=False)
        nll = token_nll(model, chunk[None], 1, loss_chunk=loss_chunk,
                        layer_progress=progress and longest >= LAYER_PROGRESS_FROM)[0]
        bar.update(1)
        bar.close()
        by_length = {r.window: r for r in prefix_results(nll, sorted(set(lengths)), bucket_size,
                                                         time.perf_counter() - t0)}
        report.results = [by_length[n] for n in lengths]
    else:
        for length in tqdm(lengths, desc="lengths", disable=not progress or len(lengths) == 1, leave=False):
            s = length if stride is None else min(int(stride), length)
            chunk = take_tokens(ids, length + (windows - 1) * s, offset, f"length {length} x {windows} windows")
            report.results.append(sliding_window_perplexity(
                model, chunk, length, s, bucket_size=bucket_size, batch_size=batch_size, loss_chunk=loss_chunk,
                progress=progress))
    report.seconds = time.perf_counter() - start
    return report


__all__ = [
    "Bucket",
    "PerplexityReport",
    "PerplexityResult",
    "default_bucket_size",
    "length_dependent_positions",
    "perplexity_at_lengths",
    "plan_windows",
    "prefix_results",
    "sliding_window_perplexity",
    "token_nll",
]
