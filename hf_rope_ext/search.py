"""LongRoPE factor search: per-dimension rotary rescale factors for a model and a target length, found by evolution.

LongRoPE (Ding et al. 2024, https://arxiv.org/abs/2402.13753, §3.2 and Algorithm 1; the official code
https://github.com/microsoft/LongRoPE, ``evolution/``) divides each rotary frequency ``theta_i`` by its own factor
``lambda_i`` and searches the factors with an evolutionary algorithm scored by perplexity at the target length:

- the initial population holds Position Interpolation (``lambda_i = s``), NTK-aware scaling
  (``lambda_i = s^(2i/(d-2))``) and YaRN's NTK-by-parts divisors (plus a start the user gives), filled up with
  mutations of them;
- each generation keeps the ``parents`` best candidates seen so far (top-k) and adds children: *mutation* (each
  searched dimension, with probability ``mutation_prob`` = 0.3, takes a value drawn uniformly from a 0.01 grid
  between its two neighbours, so the order is kept) and *crossover* (each dimension from one of two parents);
- constraints on every candidate: ``rotary_dim / 2`` factors, non-decreasing from high frequency (dimension 0) to low
  frequency, each within ``[1, 1.25 s]`` (the paper's search space); a candidate already evaluated is never
  evaluated again.

``critical_only`` (default) searches only LongRoPE2's *critical* dimensions (Shang et al. 2025,
https://arxiv.org/abs/2502.20082 §3): those whose wavelength ``2 pi / theta_i`` exceeds the original length ``L``,
i.e. that never completed a period in pre-training; the others keep fixed values (YaRN's divisors, or the user's
start). On SmolLM2 (head 64, base 1e5, L 8192) that is 12 of 32 dimensions: a far smaller space for few evaluations.

Not offered: LongRoPE's ``n̂`` leading tokens kept at their original positions (no interpolation for the first
tokens). Stock transformers' ``longrope`` rope type (and vLLM's / llama.cpp's readers of it) has no such field, so a
model searched with it could not be saved natively; it would need a plugin attention path at every reload.

The result is a plain ``longrope`` configuration (``short_factor == long_factor``, the searched factors) that stock
transformers reloads without hf_rope_ext: see :func:`apply_search_result`.

Cost control: each text is tokenized once; each evaluation is one forward over one window per text and scores only
the positions the objective needs (the language-model head runs in chunks over those positions, never over
``[seq, vocab]``); ``proxy_length`` evaluates on shorter windows than the target, validation runs at the target.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import families
from .eval.io import save_json
from .eval.perplexity import token_nll
from .eval.text import Text
from .eval.text import tokenize as tokenize_text
from .methods._rope_base import longrope_attention_factor, yarn_attention_factor
from .patching import META_KEY, patch_info, patch_model, unpatch_model

logger = logging.getLogger(__name__)

Objective = Literal["beyond", "window", "needle"]
OBJECTIVES: tuple[str, ...] = ("beyond", "window", "needle")
"""``beyond``: mean NLL of the tokens past the original length (default: what extension is for); ``window``: mean NLL
of the whole window (the LongRoPE paper's perplexity); ``needle``: NLL of a needle's answer tokens, the needle placed
early in the window and asked for at its end (LongRoPE2's needle-driven perplexity)."""
SEED_NAMES: tuple[str, ...] = ("pi", "ntk", "yarn", "start")
LOG_KIND = "hf_rope_ext.search_log"
RESULT_KIND = "search"
MAX_RATIO = 1.25
"""Upper bound of every factor, as a multiple of the scale s (the LongRoPE paper's search space)."""
NEEDLE_DEPTH = 0.1
"""Where the needle sits in the ``needle`` objective's window (fraction of the window)."""
ATTENTION_STEP = 0.005
"""Grid of the attention factor when it is searched (``search_attention``)."""
ATTENTION_RADIUS = 0.03
"""How far one mutation may move a searched attention factor."""


def default_attention_range(factor: float) -> tuple[float, float]:
    """Bounds of a searched attention factor: from 1 (no temperature change) to ``1 + 0.2 ln s``, twice YaRN's
    change."""
    return 1.0, 1.0 + 0.2 * math.log(factor)


# --------------------------------------------------------------------------------------------------------------------
# result


@dataclass
class SearchResult:
    """What :func:`search_rope_factors` found, and how."""

    factors: list[float]
    """The best per-dimension divisors (``rotary_dim / 2``, dimension 0 = highest frequency): pass them as
    ``short_factor`` and ``long_factor`` of the ``longrope`` method."""
    score: float
    """Objective value of the best candidate on the search texts (mean NLL in nats, lower is better)."""
    objective: str
    factor: float
    """Scale s = target length / original length."""
    original_length: int
    target_length: int
    eval_length: int
    """Window length of the search evaluations (``proxy_length`` or the target)."""
    rotary_dim: int
    base: float
    attention_factor: float
    """The cos/sin multiplier of the best candidate (and of the saved model); every candidate's when it was not
    searched."""
    searched_dims: list[int]
    """Indices of the dimensions searched; the others kept their fixed values."""
    seed: int
    evaluations: int
    """Candidates evaluated in total (including those read back from the log on resume)."""
    resumed_evaluations: int = 0
    """Of ``evaluations``, how many were read from the log instead of computed."""
    seconds: float = 0.0
    """Wall time of this call (search and validation)."""
    stopped: str = "budget"
    """Why the search ended: ``budget`` (evaluations), ``minutes``, or ``exhausted`` (no new candidate left)."""
    seeds: dict[str, list[float]] = field(default_factory=dict)
    """The initial candidates by name (pi, ntk, yarn, start), after projection onto the constraints."""
    candidates: list[dict[str, Any]] = field(default_factory=list)
    """Every evaluation in order: index, generation, origin, factors, score, seconds, resumed."""
    best_by_generation: list[float] = field(default_factory=list)
    """Best score seen so far at the end of each generation (generation 0 = the initial population)."""
    validation: list[dict[str, Any]] = field(default_factory=list)
    """Per validation text at the target length: whole-window and past-``L`` NLL / perplexity of the best factors
    (``method`` "longrope (searched)") and of any baselines asked for."""
    texts: list[str] = field(default_factory=list)
    """Labels of the search texts."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Population size, parents, mutation probability, grid step, critical_only, proxy length, budget, minutes."""

    @property
    def perplexity(self) -> float:
        """exp(score)."""
        return math.exp(self.score) if math.isfinite(self.score) else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"kind": RESULT_KIND, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        return save_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchResult:
        return cls(**{k: v for k, v in data.items() if k != "kind"})

    def summary(self) -> dict[str, Any]:
        """The short record :func:`apply_search_result` writes into ``config.hf_rope_ext["search"]``."""
        return {
            "objective": self.objective,
            "score_nll": self.score,
            "eval_length": self.eval_length,
            "evaluations": self.evaluations,
            "seed": self.seed,
            "searched_dims": list(self.searched_dims),
            "attention_factor": self.attention_factor,
            "attention_searched": bool(self.settings.get("search_attention", False)),
            "texts": list(self.texts),
            "seconds": round(self.seconds, 1),
            "validation": [
                {k: v for k, v in row.items() if k in ("text", "method", "length", "ppl_window", "ppl_beyond")}
                for row in self.validation
            ],
            "paper": "https://arxiv.org/abs/2402.13753",
        }


# --------------------------------------------------------------------------------------------------------------------
# the search space


def _grid(lo: float, hi: float, step: float) -> list[float]:
    """Values a mutated dimension may take between its neighbours: ``lo``, ``hi`` and the multiples of ``step``
    strictly between them (rounded to 10 decimals so the grid has no float noise)."""
    if hi <= lo:
        return [lo]
    first, last = math.floor(lo / step + 1e-9) + 1, math.ceil(hi / step - 1e-9) - 1
    return [lo, *(round(k * step, 10) for k in range(first, last + 1)), hi]


def _key(factors: np.ndarray) -> tuple[float, ...]:
    return tuple(np.round(np.asarray(factors, dtype=np.float64), 8).tolist())


class _Space:
    """Constraints and moves: full-length vectors whose ``searched`` indices change, the rest fixed.

    With ``attention`` = ``(low, high, step, radius)`` a vector carries one more value at its end, the attention
    factor (cos/sin multiplier): bounded by ``[low, high]``, outside the monotone constraint; a mutation moves it with
    probability ``mutation_prob`` to a value of the ``step`` grid within ``radius`` of where it was, a crossover takes
    it from either parent."""

    def __init__(self, fixed: np.ndarray, searched: list[int], upper: float, step: float, rng: np.random.Generator,
                 mutation_prob: float, max_tries: int = 200,
                 attention: tuple[float, float, float, float] | None = None) -> None:
        self.fixed, self.searched, self.upper, self.step = fixed, searched, upper, step
        self.rng, self.mutation_prob, self.max_tries = rng, mutation_prob, max_tries
        self.attention = attention
        self.n = len(fixed)  # factors per vector; the attention factor (if searched) sits at index n

    def genes(self) -> list[int]:
        """Indices a move may change: the searched dimensions, then the attention factor when it is searched."""
        return self.searched + ([self.n] if self.attention is not None else [])

    def project(self, factors: np.ndarray) -> np.ndarray:
        """Fixed dimensions from ``fixed``, bounds [1, upper], then a running maximum (non-decreasing)."""
        out = self.fixed.copy()
        out[self.searched] = np.asarray(factors, dtype=np.float64)[self.searched]
        return np.maximum.accumulate(np.clip(out, 1.0, self.upper))

    def valid(self, vector: np.ndarray) -> bool:
        factors = vector[: self.n]
        others = [i for i in range(self.n) if i not in set(self.searched)]
        ok = (
            len(vector) == self.n + (self.attention is not None)
            and bool(np.all(np.diff(factors) >= 0))
            and float(factors.min()) >= 1.0
            and float(factors.max()) <= self.upper + 1e-12
            and bool(np.array_equal(factors[others], self.fixed[others]))
        )
        if ok and self.attention is not None:
            low, high = self.attention[:2]
            ok = low - 1e-12 <= float(vector[self.n]) <= high + 1e-12
        return ok

    def _attention_choices(self, value: float) -> list[float]:
        low, high, step, radius = self.attention
        return _grid(max(low, value - radius), min(high, value + radius), step)

    def mutate(self, parent: np.ndarray, seen: set) -> np.ndarray | None:
        """Each searched dimension, with probability ``mutation_prob``, takes a value drawn between its neighbours
        (LongRoPE's DimMono mutation); the attention factor (if searched) a value near its own; retried until the
        child is new."""
        for _ in range(self.max_tries):
            child = parent.copy()
            for i in self.searched:
                if self.rng.random() >= self.mutation_prob:
                    continue
                lo = child[i - 1] if i > 0 else 1.0
                hi = child[i + 1] if i < self.n - 1 else self.upper
                choices = _grid(float(lo), float(hi), self.step)
                child[i] = choices[int(self.rng.integers(len(choices)))]
            if self.attention is not None and self.rng.random() < self.mutation_prob:
                choices = self._attention_choices(float(child[self.n]))
                child[self.n] = choices[int(self.rng.integers(len(choices)))]
            if _key(child) not in seen and self.valid(child):
                return child
        return None

    def crossover(self, a: np.ndarray, b: np.ndarray, seen: set) -> np.ndarray | None:
        """Each searched dimension (and the attention factor, if searched) from parent ``a`` or ``b`` (even odds);
        retried until the child is new and non-decreasing. None when the parents are equal or no such child turns
        up."""
        differ = [i for i in self.genes() if a[i] != b[i]]
        if not differ:
            return None
        for _ in range(min(self.max_tries, 4 * 2 ** len(differ))):  # 2^k - 2 children are new at most
            child = a.copy()
            take = self.rng.random(len(differ)) < 0.5
            idx = [i for i, t in zip(differ, take, strict=True) if t]
            child[idx] = b[idx]
            if _key(child) not in seen and self.valid(child):
                return child
        return None


def critical_dims(rotary_dim: int, base: float, original_length: int) -> list[int]:
    """Dimensions whose wavelength ``2 pi base^(2i/d)`` exceeds the original length (LongRoPE2's critical
    dimensions: they never completed a period in pre-training)."""
    return [i for i in range(rotary_dim // 2) if 2 * math.pi * base ** (2 * i / rotary_dim) > original_length]


def method_factors(method: str, rotary_dim: int, base: float, original_length: int, factor: float,
                   **params: Any) -> np.ndarray:
    """Per-dimension divisors ``theta_i / theta'_i`` of a registered rotary method at ``factor`` (with its
    parameters, e.g. ``beta_fast=128`` for ``yarn``): what ``patch_model`` applies, as a search start."""
    from .methods._rope_base import default_inv_freq
    from .registry import get_method

    spec = get_method(method)
    if spec.kind != "rope":
        raise ValueError(f"'{method}' is not a rotary method: it has no per-dimension divisors")
    theta = default_inv_freq(rotary_dim, base).double()  # [d/2]
    made = spec.make_params(factor=factor, original_max_position_embeddings=original_length, **params)
    inv_freq, _ = spec.compute(made, rotary_dim, float(base), device="cpu")
    return (theta / inv_freq.double()).numpy()


def seed_factors(rotary_dim: int, base: float, original_length: int, factor: float) -> dict[str, np.ndarray]:
    """Per-dimension divisors ``theta_i / theta'_i`` of PI, NTK and YaRN at ``factor``, from the registered methods
    (the same functions ``patch_model`` applies)."""
    return {name: method_factors(method, rotary_dim, base, original_length, factor)
            for name, method in (("pi", "linear"), ("ntk", "ntk"), ("yarn", "yarn"))}


# --------------------------------------------------------------------------------------------------------------------
# texts and objectives


@dataclass
class _Window:
    label: str
    ids: torch.Tensor  # [T] the tokens of one evaluation window
    first_scored: int  # first position whose NLL counts
    fingerprint: str


def _text_ids(tokenizer: Any, text: Any, label: str) -> torch.Tensor:
    if isinstance(text, torch.Tensor):
        if text.dim() != 1:
            raise ValueError(f"{label}: token ids must be a 1-D tensor, got shape {tuple(text.shape)}")
        return text.long()
    if isinstance(text, (str, Text)):
        if tokenizer is None:
            raise ValueError(f"{label}: a tokenizer is needed to tokenize texts (or pass 1-D token-id tensors)")
        return tokenize_text(tokenizer, text)
    raise ValueError(f"{label}: texts are strings, hf_rope_ext.eval.Text objects or 1-D token-id tensors; "
                     f"got {type(text).__name__}")


def _label(text: Any, i: int, what: str) -> str:
    return text.source if isinstance(text, Text) else f"{what}[{i}]"


def _needle_window(tokenizer: Any, hay: torch.Tensor, length: int, key: str, label: str) -> tuple[torch.Tensor, int]:
    """``hay[:p] + needle + hay[p:...] + question + answer`` of exactly ``length`` tokens, p = 10 % of the window;
    returns (ids, index of the first answer token)."""
    if tokenizer is None:
        raise ValueError("objective 'needle' needs a tokenizer (it writes the needle and the question)")
    needle = tokenize_text(tokenizer, f"\nThe secret passphrase is {key}. Remember it: {key} is the passphrase.\n")
    question = tokenize_text(tokenizer, "\nWhat is the secret passphrase? The secret passphrase is")
    answer = tokenize_text(tokenizer, f" {key}.")
    fill = length - needle.numel() - question.numel() - answer.numel()
    p = int(length * NEEDLE_DEPTH)
    if fill < p + 1 or hay.numel() < fill:
        raise ValueError(f"{label}: too short for the needle objective at {length} tokens")
    ids = torch.cat([hay[:p], needle, hay[p:fill], question, answer])  # [length]
    return ids, length - answer.numel()


def _windows(tokenizer: Any, texts: Sequence[Any], length: int, offset: int, objective: str, first_beyond: int,
             what: str, seed: int) -> list[_Window]:
    out = []
    for i, text in enumerate(texts):
        label = _label(text, i, what)
        ids = _text_ids(tokenizer, text, label)
        if ids.numel() < offset + length:
            raise ValueError(
                f"{what}[{i}] ({label}) has {ids.numel()} tokens; the evaluation needs {length} tokens from offset "
                f"{offset}: give a longer text, a smaller offset or a shorter proxy_length"
            )
        window = ids[offset : offset + length]
        if objective == "needle":
            key = str(random.Random(f"{seed}:{i}").randint(10000, 99999))
            window, first = _needle_window(tokenizer, window, length, key, label)
        else:
            first = first_beyond if objective == "beyond" else 1
        digest = hashlib.sha256(window.numpy().astype(np.int64).tobytes()).hexdigest()[:16]
        out.append(_Window(label, window, first, digest))
    return out


def _objective_nll(model: nn.Module, windows: list[_Window], loss_chunk: int) -> float:
    """Mean over texts of the mean NLL of each window's scored positions."""
    values = []
    for w in windows:
        with torch.inference_mode():
            nll = token_nll(model, w.ids[None], first_scored=w.first_scored, loss_chunk=loss_chunk)[0]
        values.append(float(nll[w.first_scored :].double().mean()))
    return float(np.mean(values))


# --------------------------------------------------------------------------------------------------------------------
# the log


def _read_log(path: Path, header: dict[str, Any]) -> list[dict[str, Any]]:
    """Entries of a search log written with the same settings; a torn last line (a kill mid-write) is dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        return []
    try:
        first = json.loads(lines[0])
    except json.JSONDecodeError:
        first = None
    if not isinstance(first, dict) or first.get("kind") != LOG_KIND:
        raise ValueError(f"log_path {path} is not a search log written by hf_rope_ext; give another log_path")
    old = first.get("settings", {})
    differ = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k))
    if differ:
        raise ValueError(
            f"cannot resume from {path}: it was written with different settings ({', '.join(differ)}); run with the "
            "same model, texts, factor, objective, seed and search settings, or start a new log"
        )
    entries = []
    for n, line in enumerate(lines[1:], start=2):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                logger.warning("search log %s: dropped a torn last line (the run was killed while writing)", path)
                break
            raise ValueError(f"search log {path}: line {n} is not valid JSON") from None
    return entries


def _write_log(path: Path, header: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps({"kind": LOG_KIND, "settings": header}) + "\n")
        for entry in entries:
            f.write(json.dumps(entry) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------------------------
# the search


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _rotary_geometry(model: nn.Module) -> tuple[int, float, int]:
    """(rotary dim, base, original length) of an unpatched rotary model; the global layers' for per-layer-type rope
    (the layers ``patch_model`` changes by default)."""
    from .eval.compare import original_length_of

    modules = families.rotary_modules(model) if families.model_type_of(model) is not None else []
    if not modules:
        raise ValueError(
            f"search_rope_factors needs a rotary (RoPE) model; {type(model).__name__} has no rotary embedding "
            "(learned position tables such as GPT-2's or BERT's have no per-dimension frequencies to search)"
        )
    families.find_family(model)  # an unsupported rotary model type is named here
    rp = modules[0].config.rope_parameters
    prefix = None
    if isinstance(rp, dict) and "rope_theta" not in rp:  # per-layer-type rope (Gemma-3): the global layers
        prefix = "full_attention" if "full_attention" in rp else next(iter(rp))
        rp = rp[prefix]
    inv_freq = getattr(modules[0], f"{prefix}_inv_freq" if prefix else "inv_freq")
    return 2 * inv_freq.numel(), float(rp["rope_theta"]), original_length_of(model)


def search_rope_factors(
    model: nn.Module,
    tokenizer: Any,
    factor: float,
    texts: Sequence[Any] | None = None,
    *,
    budget: int | None = 40,
    max_minutes: float | None = None,
    objective: Objective = "beyond",
    seed: int = 0,
    validation_texts: Sequence[Any] | None = None,
    validation_baselines: Sequence[str] = (),
    proxy_length: int | None = None,
    offset: int = 0,
    validation_offset: int | None = None,
    critical_only: bool = True,
    start_factors: Sequence[float] | str | None = None,
    attention_factor: float | None = None,
    search_attention: bool = False,
    attention_range: tuple[float, float] | None = None,
    population_size: int = 8,
    parents: int = 4,
    mutation_prob: float = 0.3,
    step: float = 0.01,
    log_path: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    score_fn: Callable[[list[float]], float] | None = None,
    loss_chunk: int = 1024,
    apply_best: bool = False,
    on_start: Callable[[], None] | None = None,
) -> SearchResult:
    """Search LongRoPE per-dimension rescale factors for ``model`` at ``factor`` x its original length.

    See the module docstring for the algorithm (LongRoPE, https://arxiv.org/abs/2402.13753; official code
    https://github.com/microsoft/LongRoPE ``evolution/``). The model is changed only while a candidate is scored; at
    the end (also after an error) it is **unpatched, exactly as it was** (a patched model is refused up front: call
    ``unpatch_model`` first). ``apply_best=True`` leaves it patched with the best factors instead
    (:func:`apply_search_result`).

    Args:
        model: a rotary causal LM (not patched).
        tokenizer: tokenizes ``texts`` (and writes the needle); may be None when the texts are token-id tensors.
        factor: s = target length / original length (> 1).
        texts: search texts: strings (the text itself, not a source name: see ``hf_rope_ext.eval.load_text``),
            ``Text`` objects or 1-D token-id tensors. One window per text, tokenized once. Optional with ``score_fn``.
        budget: evaluations (candidates scored) in all, counting those a resumed log already holds; None = no limit
            (then give ``max_minutes``).
        max_minutes: stop starting new evaluations after this many minutes of this call.
        objective: ``beyond`` (NLL of tokens past the original length), ``window`` (whole window) or ``needle``
            (NLL of a needle's answer asked for at the end, the needle at 10 % of the window).
        seed: the random seed; the search is deterministic for a seed (and the same scores).
        validation_texts: texts scored at the target length with the best factors (not used by the search).
        validation_baselines: methods (e.g. ``["yarn"]``) also scored on the validation texts, for comparison.
        proxy_length: window length of the search evaluations (default: the target length); validation always runs
            at the target. For ``beyond`` it must exceed the original length.
        offset / validation_offset: first token of each search / validation text used (validation default: offset).
        critical_only: search only the dimensions whose wavelength exceeds the original length (LongRoPE2); the
            others keep YaRN's divisors (or ``start_factors``' values when given).
        start_factors: an extra initial candidate (``rotary_dim / 2`` values), projected onto the constraints; or
            a rotary method's divisors at ``factor`` as ``"METHOD[:KEY=VALUE...]"``, e.g. ``"yarn:beta_fast=128"``
            (:func:`method_factors`).
        attention_factor: cos/sin multiplier for every candidate; None = LongRoPE's ``sqrt(1 + ln s / ln L)``.
            With ``search_attention`` it is one more starting value instead.
        search_attention: search the attention factor (the softmax temperature ``longrope`` saves as
            ``attention_factor``) together with the divisors: each seed starts with YaRN's ``0.1 ln s + 1`` and with
            LongRoPE's ``sqrt(1 + ln s / ln L)`` (and ``attention_factor`` when given), mutations move it on a
            0.005 grid by at most 0.03, crossovers take it from either parent. The official LongRoPE code leaves
            this as a to-do ("search mscale (attention temperature)", ``evolution/search.py``); the result still
            saves natively, as ``longrope``'s ``attention_factor``.
        attention_range: bounds of the searched attention factor (default ``(1, 1 + 0.2 ln s)``).
        population_size / parents: initial population, and candidates kept as parents (top-k) each generation;
            each generation adds ``population_size - parents`` children, half by mutation, half by crossover.
        mutation_prob / step: probability that a mutation changes a dimension; grid of the values drawn.
        log_path: JSONL file; every evaluation is appended as it finishes. Without ``resume`` it must not exist
            (unless ``overwrite``).
        resume: re-read ``log_path`` (written with the same settings) and replay: logged candidates are not
            evaluated again and the search continues to the same result as an uninterrupted run.
        overwrite: start a new log at ``log_path`` even when one exists there.
        progress: a tqdm bar with the best score so far.
        score_fn: replaces the model evaluation: ``score_fn(factors) -> float`` (``score_fn(factors, attention)``
            with ``search_attention``), lower is better (tests inject a synthetic objective here).
        loss_chunk: positions per LM-head chunk (memory).
        apply_best: leave the model patched with the best factors (``longrope``, searched record in its config).
        on_start: called once every input check has passed, before the log is written or the model changes (the
            CLI empties an ``--overwrite`` folder there).
    """
    t0 = time.perf_counter()
    # ---- every check before anything changes
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 1:
        raise ValueError(f"factor must be a number > 1 (target length / original length), got {factor!r}")
    factor = float(factor)
    if budget is None and max_minutes is None:
        raise ValueError("give budget= (evaluations) and/or max_minutes=; both are None, the search would not stop")
    if budget is not None:
        budget = _check_int("budget", budget, 1)
    if max_minutes is not None and not (_check_real("max_minutes", max_minutes) > 0):
        raise ValueError(f"max_minutes must be > 0, got {max_minutes!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    seed = _check_int("seed", seed, 0)
    population_size = _check_int("population_size", population_size, 2)
    parents = _check_int("parents", parents, 1)
    if parents >= population_size:
        raise ValueError(f"parents ({parents}) must be smaller than population_size ({population_size})")
    if not 0 < _check_real("mutation_prob", mutation_prob) <= 1:
        raise ValueError(f"mutation_prob must be in (0, 1], got {mutation_prob!r}")
    if not _check_real("step", step) > 0:
        raise ValueError(f"step must be > 0, got {step!r}")
    offset = _check_int("offset", offset, 0)
    validation_offset = offset if validation_offset is None else _check_int("validation_offset", validation_offset, 0)
    loss_chunk = _check_int("loss_chunk", loss_chunk, 1)
    rotary_dim, base, original = _rotary_geometry(model)
    if patch_info(model) is not None:
        info = patch_info(model)
        raise ValueError(f"model is already patched ({info['method']}); call unpatch_model(model) first: the search "
                         "starts from the original rotary frequencies")
    target = int(round(original * factor))
    if target <= original:
        raise ValueError(f"factor {factor!r} does not lengthen the context ({original} tokens)")
    eval_length = target if proxy_length is None else _check_int("proxy_length", proxy_length, 2)
    if eval_length > target:
        raise ValueError(f"proxy_length ({eval_length}) must not exceed the target length {target}")
    if objective == "beyond" and eval_length <= original:
        raise ValueError(f"objective 'beyond' scores tokens past the original length {original}: proxy_length must be "
                         f"> {original}, got {eval_length}")
    for name in validation_baselines:
        from .registry import get_method

        if get_method(name).kind != "rope":
            raise ValueError(f"validation_baselines: '{name}' is not a rotary method")
    n_half = rotary_dim // 2
    if isinstance(start_factors, str):
        from .registry import get_method, parse_param_items

        name, *items = start_factors.split(":")
        try:
            get_method(name)
            start = method_factors(name, rotary_dim, base, original, factor,
                                   **parse_param_items(items, "start_factors"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"start_factors {start_factors!r}: {exc}; give a rotary method as "
                             "'METHOD[:KEY=VALUE...]' (e.g. 'yarn:beta_fast=128') or rotary_dim/2 numbers") from None
    elif start_factors is not None:
        start = np.asarray([_check_real(f"start_factors[{i}]", v) for i, v in enumerate(start_factors)])
        if start.size != n_half:
            raise ValueError(f"start_factors needs {n_half} values (rotary dim {rotary_dim} / 2), got {start.size}")
    if score_fn is None and not texts:
        raise ValueError("give texts= (the search texts), or score_fn= for a synthetic objective")
    if score_fn is not None and not callable(score_fn):
        raise ValueError(f"score_fn must be callable, got {score_fn!r}")
    if attention_factor is not None and not _check_real("attention_factor", attention_factor) > 0:
        raise ValueError(f"attention_factor must be > 0 or None, got {attention_factor!r}")
    resolved_attention = (float(attention_factor) if attention_factor is not None
                          else longrope_attention_factor(factor, original))
    if not isinstance(search_attention, bool):
        raise ValueError(f"search_attention must be True or False, got {search_attention!r}")
    attention_space = None
    if attention_range is not None and not search_attention:
        raise ValueError("attention_range bounds a searched attention factor: pass search_attention=True too, or "
                         "attention_factor= for a fixed one")
    if search_attention:
        rng_bounds = default_attention_range(factor) if attention_range is None else attention_range
        if (isinstance(rng_bounds, (str, bytes)) or not hasattr(rng_bounds, "__len__") or len(rng_bounds) != 2):
            raise ValueError(f"attention_range must be (low, high), got {attention_range!r}")
        low, high = (_check_real(f"attention_range[{i}]", v) for i, v in enumerate(rng_bounds))
        if not 0 < low < high:
            raise ValueError(f"attention_range must satisfy 0 < low < high, got {attention_range!r}")
        if attention_factor is not None and not low <= resolved_attention <= high:
            raise ValueError(f"attention_factor {attention_factor!r} (a starting value of the search) lies outside "
                             f"attention_range ({low:g}, {high:g})")
        attention_space = (low, high, ATTENTION_STEP, ATTENTION_RADIUS)
        starts = (yarn_attention_factor(factor), longrope_attention_factor(factor, original))
        seed_attentions = [min(max(a, low), high) for a in starts]
        if attention_factor is not None:
            seed_attentions.append(resolved_attention)
        seed_attentions = list(dict.fromkeys(round(a, 10) for a in seed_attentions))
    windows = [] if score_fn is not None and not texts else _windows(
        tokenizer, texts, eval_length, offset, objective, original, "texts", seed)
    val_windows = _windows(tokenizer, validation_texts or [], target, validation_offset, "window", original,
                           "validation_texts", seed)
    log = Path(log_path).expanduser() if log_path is not None else None
    if resume and overwrite:
        raise ValueError("resume=True continues the log, overwrite=True replaces it: give one of them")
    if log is not None and log.exists() and log.stat().st_size > 0 and not (resume or overwrite):
        raise ValueError(f"log_path {log} exists; pass resume=True to continue that search, overwrite=True to start "
                         "a new one, or give a new path")
    if resume and log is None:
        raise ValueError("resume=True needs log_path= (the log of the search to continue)")
    if resume and not log.exists():
        raise ValueError(f"resume=True but log_path {log} does not exist: nothing to resume")

    # ---- the space
    seeds_raw = seed_factors(rotary_dim, base, original, factor)
    if start_factors is not None:
        seeds_raw["start"] = start
    upper = MAX_RATIO * factor
    searched = critical_dims(rotary_dim, base, original) if critical_only else list(range(n_half))
    if not searched:
        raise ValueError(f"no dimension has a wavelength above the original length {original} (rotary dim "
                         f"{rotary_dim}, base {base:g}); use critical_only=False")
    fixed = np.asarray(seeds_raw["start"] if start_factors is not None else seeds_raw["yarn"], dtype=np.float64)
    fixed = np.maximum.accumulate(np.clip(fixed, 1.0, upper))
    rng = np.random.default_rng(seed)
    space = _Space(fixed, searched, upper, step, rng, mutation_prob, attention=attention_space)
    seeds = {name: space.project(values) for name, values in seeds_raw.items()}

    header = {
        "factor": factor, "objective": objective, "seed": seed, "original_length": original, "target_length": target,
        "eval_length": eval_length, "rotary_dim": rotary_dim, "base": base, "critical_only": bool(critical_only),
        "searched_dims": searched, "fixed": [float(x) for x in fixed], "attention_factor": resolved_attention,
        "population_size": population_size, "parents": parents, "mutation_prob": float(mutation_prob),
        "step": float(step), "offset": offset, "texts": [w.fingerprint for w in windows],
        "score": "score_fn" if score_fn is not None else "model",
    }
    if search_attention:  # only then: logs of fixed-attention searches keep their header (and stay resumable)
        header.update({"attention_factor": "searched", "attention_range": [attention_space[0], attention_space[1]],
                       "attention_step": ATTENTION_STEP, "attention_radius": ATTENTION_RADIUS,
                       "attention_seeds": seed_attentions})
    entries: list[dict[str, Any]] = []
    if resume:
        entries = _read_log(log, header)
    cache = {_key(np.asarray(e["factors"] + ([e["attention"]] if search_attention else []))): e for e in entries}
    if on_start is not None:
        on_start()
    if log is not None:
        _write_log(log, header, entries)  # a clean file (no torn line) to append to

    evaluated: list[dict[str, Any]] = []
    seen: set = set()
    best: dict[str, Any] | None = None
    best_by_generation: list[float] = []
    resumed = 0
    stopped = "budget"
    bar = tqdm(total=budget, desc="LongRoPE search", unit="eval", disable=not progress)

    class _Stop(Exception):
        pass

    def evaluate(factors: np.ndarray, origin: str, generation: int) -> None:
        nonlocal best, resumed, stopped
        if budget is not None and len(evaluated) >= budget:
            stopped = "budget"
            raise _Stop
        key = _key(factors)
        seen.add(key)
        cached = cache.get(key)
        if cached is not None:
            score, seconds, was_resumed = float(cached["score"]), float(cached.get("seconds", 0.0)), True
            resumed += 1
        else:
            if max_minutes is not None and time.perf_counter() - t0 >= 60 * max_minutes:
                stopped = "minutes"
                raise _Stop
            t = time.perf_counter()
            score = _score(factors)
            seconds, was_resumed = time.perf_counter() - t, False
        if not math.isfinite(score):
            score = math.inf
        entry = {"index": len(evaluated), "generation": generation, "origin": origin,
                 "factors": [float(x) for x in factors[:n_half]], "score": score, "seconds": round(seconds, 3)}
        if search_attention:
            entry["attention"] = float(factors[n_half])
        evaluated.append({**entry, "resumed": was_resumed})
        if log is not None and not was_resumed:
            with log.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        if best is None or score < best["score"]:
            best = entry
        bar.update(1)
        bar.set_postfix(best=f"{best['score']:.4f}", gen=generation)

    def _score(vector: np.ndarray) -> float:
        values = [float(x) for x in vector[:n_half]]
        attention = float(vector[n_half]) if search_attention else resolved_attention
        if score_fn is not None:
            return float(score_fn(values, attention) if search_attention else score_fn(values))
        patch_model(model, "longrope", factor, original_max_position_embeddings=original, short_factor=values,
                    long_factor=values, attention_factor=attention, repatch=True)
        return _objective_nll(model, windows, loss_chunk)

    validation: list[dict[str, Any]] = []
    try:
        try:
            # generation 0: the seeds, then mutations of them until the population is full
            population: list[np.ndarray] = []
            for name in SEED_NAMES:
                if name not in seeds:
                    continue
                for a in (seed_attentions if search_attention else [None]):
                    vector = seeds[name] if a is None else np.append(seeds[name], a)
                    if _key(vector) not in seen:
                        population.append(vector)
                        evaluate(vector, f"seed:{name}", 0)
            k = 0
            seed_list = list(population)
            while len(population) < population_size:
                child = space.mutate(seed_list[k % len(seed_list)], seen)
                k += 1
                if child is None:
                    if k > 50 * population_size:
                        break
                    continue
                population.append(child)
                evaluate(child, "mutation", 0)
            best_by_generation.append(best["score"])
            generation = 0
            n_children = population_size - parents
            n_mut = (n_children + 1) // 2
            while True:
                generation += 1
                before = len(evaluated)
                ranked = sorted(evaluated, key=lambda e: (e["score"], e["index"]))[:parents]
                top = [np.asarray(e["factors"] + ([e["attention"]] if search_attention else [])) for e in ranked]
                for _ in range(n_mut):
                    parent = top[int(rng.integers(len(top)))]
                    child = space.mutate(parent, seen)
                    if child is not None:
                        evaluate(child, "mutation", generation)
                for _ in range(n_children - n_mut):
                    if len(top) < 2:
                        i = j = 0
                    else:
                        i, j = sorted(int(x) for x in rng.choice(len(top), 2, replace=False))
                    child = space.crossover(top[i], top[j], seen)
                    origin = "crossover"
                    if child is None:
                        child, origin = space.mutate(top[i], seen), "mutation"
                    if child is not None:
                        evaluate(child, origin, generation)
                best_by_generation.append(best["score"])
                if len(evaluated) == before:  # no new candidate fits the constraints: the space is exhausted
                    stopped = "exhausted"
                    break
        except _Stop:
            if best is not None and (not best_by_generation or best_by_generation[-1] != best["score"]):
                best_by_generation.append(best["score"])
        finally:
            bar.close()
        if best is None:
            raise ValueError("the search evaluated no candidate (max_minutes too small?)")
        best_factors = list(best["factors"])
        best_attention = float(best["attention"]) if search_attention else resolved_attention
        if val_windows:
            validation = _validate(model, best_factors, factor, original, best_attention, val_windows,
                                   validation_baselines, loss_chunk)
    finally:
        if patch_info(model) is not None:
            unpatch_model(model)

    result = SearchResult(
        factors=best_factors, score=float(best["score"]), objective=objective, factor=factor,
        original_length=original, target_length=target, eval_length=eval_length, rotary_dim=rotary_dim, base=base,
        attention_factor=best_attention, searched_dims=searched, seed=seed, evaluations=len(evaluated),
        resumed_evaluations=resumed, seconds=time.perf_counter() - t0, stopped=stopped,
        seeds={name: [float(x) for x in v] for name, v in seeds.items()}, candidates=evaluated,
        best_by_generation=best_by_generation, validation=validation, texts=[w.label for w in windows],
        settings={"population_size": population_size, "parents": parents, "mutation_prob": float(mutation_prob),
                  "step": float(step), "critical_only": bool(critical_only), "proxy_length": proxy_length,
                  "budget": budget, "max_minutes": max_minutes, "offset": offset,
                  "validation_offset": validation_offset, "max_ratio": MAX_RATIO,
                  "search_attention": search_attention,
                  **({"attention_range": [attention_space[0], attention_space[1]], "attention_step": ATTENTION_STEP,
                      "attention_radius": ATTENTION_RADIUS, "attention_seeds": seed_attentions}
                     if search_attention else {}),
                  "log_path": str(log) if log is not None else None},
    )
    if apply_best:
        apply_search_result(model, result)
    return result


def _validate(model: nn.Module, factors: list[float], factor: float, original: int, attention: float,
              windows: list[_Window], baselines: Sequence[str], loss_chunk: int) -> list[dict[str, Any]]:
    """Whole-window and past-``original`` NLL / PPL of each validation window, for the searched factors and each
    baseline method (``patch_model(model, name, factor)``)."""
    runs: list[tuple[str, str, dict[str, Any]]] = [
        ("longrope (searched)", "longrope", dict(short_factor=factors, long_factor=factors,
                                                 attention_factor=attention))]
    runs += [(name, name, {}) for name in baselines]
    rows = []
    for label, method, params in runs:
        patch_model(model, method, factor, original_max_position_embeddings=original, repatch=True, **params)
        for w in windows:
            with torch.inference_mode():
                nll = token_nll(model, w.ids[None], first_scored=1, loss_chunk=loss_chunk)[0]
            whole, beyond = float(nll[1:].double().mean()), float(nll[original:].double().mean())
            rows.append({"text": w.label, "method": label, "length": int(w.ids.numel()),
                         "nll_window": whole, "ppl_window": math.exp(whole),
                         "nll_beyond": beyond, "ppl_beyond": math.exp(beyond)})
    return rows


def apply_search_result(model: nn.Module, result: SearchResult, tokenizer: Any = None) -> nn.Module:
    """Patch ``model`` (unpatched, or patched: it is re-patched) with the searched factors as ``longrope``
    (``short_factor == long_factor``, the search's attention factor), and record the search in
    ``config.hf_rope_ext["search"]``. ``save_pretrained`` then writes a plain ``longrope`` config that stock
    transformers reloads without hf_rope_ext."""
    patch_model(model, "longrope", result.factor, original_max_position_embeddings=result.original_length,
                short_factor=list(result.factors), long_factor=list(result.factors),
                attention_factor=result.attention_factor, tokenizer=tokenizer, repatch=True)
    meta = getattr(model.config, META_KEY)
    meta["search"] = result.summary()
    return model


__all__ = ["OBJECTIVES", "SearchResult", "apply_search_result", "critical_dims", "method_factors",
           "search_rope_factors", "seed_factors"]
