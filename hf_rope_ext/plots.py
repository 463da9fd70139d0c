"""Pictures (PNG, matplotlib's Agg canvas; pyplot and the global backend are never touched).

From evaluation results (the dataclasses of ``hf_rope_ext.eval`` or their JSON):

- ``plot_perplexity_vs_length``: perplexity against window length, one line per method.
- ``plot_position_loss``: perplexity by position bucket inside the window, one line per method — where it degrades.
- ``plot_retrieval_heatmap``: passkey / needle accuracy over context length x depth.

From the position encoding itself:

- ``plot_rope_wavelengths``: for a rotary model, each dimension pair's wavelength ``lambda_i = 2*pi / theta_i``
  against the original length, per method, and the per-dimension scale ``theta_i / theta'_i``: 1 = the dimension
  keeps its trained frequency (extrapolated), s = it is interpolated like PI, in between = blended (NTK, YaRN's ramp;
  https://arxiv.org/abs/2309.00071 §3).
- ``plot_position_similarity``: for a learned position table, the cosine-similarity matrix of the position vectors
  (diagonal 1), before and after extension.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from . import families, patching
from .eval.io import load_result  # noqa: F401  (re-exported: plots read reports through it)
from .registry import get_method

REGIME_TOLERANCE = 0.01
"""Relative tolerance when classifying a dimension as kept (scale 1) or interpolated (scale s)."""


def _figure(width: float = 8.0, height: float = 5.0, rows: int = 1, cols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, **kwargs)


def _plain_log_axis(axis: Any) -> None:
    """Log-scale axis labelled with plain numbers (12.5, not 1.25x10^1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    formatter = FuncFormatter(lambda value, _: f"{value:.3g}")
    axis.set_major_formatter(formatter)
    axis.set_minor_locator(LogLocator(subs=(2, 3, 5, 7)))
    axis.set_minor_formatter(formatter)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _label(report: Any) -> str:
    from .eval.compare import UNPATCHED

    patch = getattr(report, "patch", None)
    if not patch:
        return UNPATCHED
    return f"{patch['method']} ×{patch['factor']:g}"


def _series(data: Any) -> tuple[dict[str, Any], int | None]:
    """{label: PerplexityReport} and the original length, from a compare report, one or several ppl reports."""
    from .eval.compare import CompareReport

    items = data if isinstance(data, (list, tuple)) else [data]
    series: dict[str, Any] = {}
    original = None
    for item in items:
        item = load_result(item)
        if isinstance(item, CompareReport):
            original = item.original_length
            for run in item.runs:
                if run.perplexity is not None:
                    series[run.method] = run.perplexity
        elif hasattr(item, "results"):
            label = _label(item)
            while label in series:
                label += "'"
            series[label] = item
            if item.patch:
                original = item.patch["original_max_position_embeddings"]
        else:
            raise ValueError(f"expected perplexity or compare results, got {type(item).__name__}")
    if not series:
        raise ValueError("no perplexity results to plot")
    return series, original


def plot_perplexity_vs_length(
    data: Any, path: str | Path, *, original_length: int | None = None, title: str | None = None
) -> Path:
    """Perplexity against window length, one line per method (log-log axes); a dashed line marks the original
    length. ``data``: a ``CompareReport``, one or several ``PerplexityReport``, or their JSON."""
    series, original = _series(data)
    original = original_length or original
    fig, ax = _figure()
    lengths: set[int] = set()
    for label, report in series.items():
        points = sorted((r.window, r.perplexity) for r in report.results)
        lengths.update(p[0] for p in points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if original:
        ax.axvline(original, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"trained length {original}", (original, 1), xycoords=("data", "axes fraction"),
                    xytext=(4, -14), textcoords="offset points", color="grey", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(lengths), [str(n) for n in sorted(lengths)])
    ax.minorticks_off()
    ax.set_yscale("log")
    _plain_log_axis(ax.yaxis)
    ax.set_xlabel("window length (tokens)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title or "Perplexity vs length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_position_loss(
    data: Any, path: str | Path, *, length: int | None = None, original_length: int | None = None,
    title: str | None = None,
) -> Path:
    """Perplexity by position bucket inside the window at one window length (default the longest), one line per
    method; a dashed line marks the original length."""
    series, original = _series(data)
    original = original_length or original
    fig, ax = _figure()
    chosen = None
    for label, report in series.items():
        windows = [r.window for r in report.results]
        chosen = length or max(windows)
        result = next((r for r in report.results if r.window == chosen), None)
        if result is None:
            raise ValueError(f"no result at length {chosen} for {label}; lengths: {windows}")
        buckets = [b for b in result.buckets if b.tokens]
        ax.plot([(b.start + b.end) / 2 for b in buckets], [b.perplexity for b in buckets], marker="o", label=label)
    if original and chosen and original < chosen:
        ax.axvline(original, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"trained length {original}", (original, 1), xycoords=("data", "axes fraction"),
                    xytext=(4, -14), textcoords="offset points", color="grey", fontsize=8)
    ax.set_yscale("log")
    _plain_log_axis(ax.yaxis)
    ax.set_xlabel("position in the window (bucket centre)")
    ax.set_ylabel("perplexity of the bucket")
    ax.set_title(title or f"Loss by position, window {chosen}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_retrieval_heatmap(data: Any, path: str | Path, *, title: str | None = None) -> Path:
    """Accuracy heatmap: context length (x) against needle depth (y), green = found, red = missed."""
    report = load_result(data)
    if not hasattr(report, "accuracy") or not report.accuracy:
        raise ValueError("expected a passkey / needle result")
    grid = torch.tensor(report.accuracy, dtype=torch.float32)  # [depths, lengths]
    fig, ax = _figure(max(4.0, 1.1 * len(report.lengths) + 2), max(3.0, 0.45 * len(report.depths) + 1.5))
    image = ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(report.lengths)), [str(n) for n in report.lengths])
    ax.set_yticks(range(len(report.depths)), [f"{d:.0%}" for d in report.depths])
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    fig.colorbar(image, ax=ax, label="accuracy")
    what = {"passkey": "Passkey retrieval", "needle": "Needle in a haystack"}.get(report.task, report.task)
    ax.set_title(title or f"{what} — {_label(report)}")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------------------------
# rotary wavelengths


@dataclass
class RopeWavelengths:
    """Per-dimension-pair frequencies of one method, against the original ones."""

    method: str
    """Method name."""
    factor: float
    """Extension factor s."""
    wavelengths: list[float]
    """``2*pi / theta'_i`` after the method, one per dimension pair i (tokens per full turn)."""
    original_wavelengths: list[float]
    """``2*pi / theta_i`` of the trained model."""
    scale: list[float]
    """``theta_i / theta'_i``: 1 = kept (extrapolated), s = interpolated, in between = blended."""
    regime: list[str]
    """``"extrapolated"``, ``"interpolated"`` or ``"blended"`` per dimension pair."""
    attention_factor: float = 1.0
    """Multiplier of cos and sin (YaRN's temperature); logits scale by its square."""
    params: dict[str, Any] = field(default_factory=dict)
    """Extra method parameters used."""


def _regime(scale: float, factor: float) -> str:
    if abs(scale - 1.0) <= REGIME_TOLERANCE:
        return "extrapolated"
    if abs(scale - factor) <= REGIME_TOLERANCE * factor:
        return "interpolated"
    return "blended"


def rope_wavelengths(
    methods: Sequence[str],
    factor: float,
    *,
    head_dim: int,
    base: float,
    original_length: int,
    method_params: dict[str, dict[str, Any]] | None = None,
) -> list[RopeWavelengths]:
    """Wavelength and scale of every dimension pair for each rotary method (dynamic methods at the new length).

    Original frequencies ``theta_i = base^(-2i/d)``; the method's come from its registered function."""
    from .methods import default_inv_freq

    original = default_inv_freq(head_dim, base).double()  # [d/2]
    new_len = round(original_length * factor)
    out = []
    for name in methods:
        spec = get_method(name)
        if spec.kind != "rope":
            raise ValueError(f"method '{spec.name}' is not a rotary method; wavelengths apply to RoPE methods only")
        extra = (method_params or {}).get(name, {})
        params = spec.make_params(factor=factor, original_max_position_embeddings=original_length, **extra)
        inv_freq, attention = spec.compute(params, head_dim, float(base), device="cpu",
                                           seq_len=new_len if spec.dynamic else None)
        inv_freq = inv_freq.double()  # [d/2]
        scale = (original / inv_freq).tolist()
        out.append(RopeWavelengths(
            method=spec.name, factor=float(factor), wavelengths=(2 * math.pi / inv_freq).tolist(),
            original_wavelengths=(2 * math.pi / original).tolist(), scale=scale,
            regime=[_regime(x, factor) for x in scale], attention_factor=float(attention), params=dict(extra),
        ))
    return out


def rope_geometry(model: nn.Module) -> dict[str, Any]:
    """``head_dim`` (rotary dimensions), ``base`` and ``original_length`` of a rotary model (its original values
    when it is patched)."""
    from . import patch_info
    from .eval.compare import original_length_of

    modules = families.rotary_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no rotary embedding; wavelength plots apply to RoPE models")
    module = modules[0]
    info = patch_info(model)
    rp = info["original_rope_parameters"] if info else module.config.rope_parameters
    prefix = None
    if isinstance(rp, Mapping) and "rope_theta" not in rp:  # per-layer-type (Gemma-3): the global layers
        prefix = "full_attention" if "full_attention" in rp else next(iter(rp))
        rp = rp[prefix]
    inv_freq = getattr(module, f"{prefix}_inv_freq" if prefix else "inv_freq")
    return {"head_dim": 2 * inv_freq.numel(), "base": float(rp["rope_theta"]), "original_length": original_length_of(model)}


def config_rope_geometry(config: Any) -> dict[str, Any]:
    """:func:`rope_geometry` from a config alone (no weights): the original rotary parameters when it is patched."""
    import copy

    meta = getattr(config, patching.META_KEY, None)
    rp = meta["original_rope_parameters"] if meta else getattr(config, "rope_parameters", None)
    if not isinstance(rp, Mapping):
        raise ValueError(f"{type(config).__name__} has no rotary parameters; wavelength plots apply to RoPE models")
    prefix = None
    if "rope_theta" not in rp:  # per-layer-type (Gemma-3): the global layers
        prefix = "full_attention" if "full_attention" in rp else next(iter(rp))
    config = copy.copy(config)
    config.rope_parameters = rp
    head_dim, base = families.rotary_geometry(config, prefix)
    if meta:
        original = int(meta["original_max_position_embeddings"])
    else:
        original = next((v for v in (getattr(config, n, None) for n in ("max_position_embeddings", "n_positions",
                                                                         "max_sequence_length", "seq_length"))
                         if isinstance(v, int)), None)
        if original is None:
            raise ValueError(f"cannot tell the trained length of {type(config).__name__} from its config")
    return {"head_dim": head_dim, "base": base, "original_length": original}


def plot_rope_wavelengths(
    methods: Sequence[str],
    factor: float,
    path: str | Path,
    *,
    head_dim: int,
    base: float,
    original_length: int,
    method_params: dict[str, dict[str, Any]] | None = None,
    title: str | None = None,
) -> Path:
    """Two panels: each dimension pair's wavelength per method (log scale, with the original length L and s*L),
    and its scale theta/theta' (1 = extrapolated, s = interpolated, between = blended)."""
    data = rope_wavelengths(methods, factor, head_dim=head_dim, base=base, original_length=original_length,
                            method_params=method_params)
    fig, (top, bottom) = _figure(9.0, 7.5, 2, 1, sharex=True)
    dims = list(range(head_dim // 2))
    top.plot(dims, data[0].original_wavelengths, color="black", linestyle=":", linewidth=2, label="original")
    for d in data:
        top.plot(dims, d.wavelengths, label=d.method)
        bottom.plot(dims, d.scale, label=d.method)
    for value, text in ((original_length, f"L = {original_length}"), (original_length * factor, f"s·L = {original_length * factor:g}")):
        top.axhline(value, color="grey", linestyle="--", linewidth=1)
        top.annotate(text, (0, value), xytext=(2, 3), textcoords="offset points", color="grey", fontsize=8)
    beyond = [i for i, w in enumerate(data[0].original_wavelengths) if w > original_length]
    if beyond:  # dimensions that never completed a turn within the trained length
        for ax in (top, bottom):
            ax.axvspan(beyond[0] - 0.5, dims[-1] + 0.5, color="orange", alpha=0.08, linewidth=0)
        top.annotate("wavelength > L: never a full turn in training", (beyond[0], 1), xycoords=("data", "axes fraction"),
                     xytext=(3, -12), textcoords="offset points", fontsize=8, color="darkorange")
    top.set_yscale("log")
    top.set_ylabel("wavelength 2π/θ (tokens)")
    top.set_title(title or f"RoPE per-dimension wavelengths, d={head_dim}, base={base:g}, s={factor:g}")
    top.legend(fontsize=8)
    top.grid(True, which="both", alpha=0.3)
    bottom.axhline(1, color="grey", linewidth=1)
    bottom.axhline(factor, color="grey", linewidth=1)
    bottom.annotate("extrapolated (kept)", (0, 1), xytext=(2, 3), textcoords="offset points", fontsize=8)
    bottom.annotate(f"interpolated (÷{factor:g})", (0, factor), xytext=(2, -11), textcoords="offset points", fontsize=8)
    bottom.set_yscale("log")
    bottom.set_xlabel("dimension pair i")
    bottom.set_ylabel("scale θ_i / θ'_i")
    bottom.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------------------------
# LongRoPE factor search


def _search_dict(result: Any) -> dict[str, Any]:
    """A ``SearchResult``, its dict, or the path of its ``search.json``."""
    if isinstance(result, (str, Path)):
        import json

        result = json.loads(Path(result).read_text(encoding="utf-8"))
    if hasattr(result, "to_dict"):
        result = result.to_dict()
    if not isinstance(result, Mapping) or "factors" not in result or "best_by_generation" not in result:
        raise ValueError("plot_search needs a SearchResult, its dict or a search.json written by search_rope_factors")
    return dict(result)


def plot_search(result: Any, path: str | Path, *, title: str | None = None) -> Path:
    """Two panels of a LongRoPE factor search (``hf_rope_ext.search``): the best per-dimension divisors against
    PI's, NTK's and YaRN's at the same scale (searched dimensions shaded), and the best score so far per generation.
    ``result``: a ``SearchResult``, its dict, or the path of a ``search.json``."""
    from .search import seed_factors

    data = _search_dict(result)
    factor, dims = float(data["factor"]), list(range(len(data["factors"])))
    seeds = seed_factors(int(data["rotary_dim"]), float(data["base"]), int(data["original_length"]), factor)
    fig, (top, bottom) = _figure(9.0, 7.5, 2, 1)
    for name, style in (("pi", ":"), ("ntk", "--"), ("yarn", "-.")):
        top.plot(dims, seeds[name], linestyle=style, label={"pi": "PI (linear)", "ntk": "NTK", "yarn": "YaRN"}[name])
    searched_attention = (data.get("settings") or {}).get("search_attention")
    label = (f"searched (best; attention factor {float(data['attention_factor']):.4f}, searched)"
             if searched_attention else "searched (best)")
    top.plot(dims, data["factors"], color="black", marker="o", markersize=3, linewidth=2, label=label)
    searched = data.get("searched_dims") or []
    if searched and len(searched) < len(dims):
        top.axvspan(searched[0] - 0.5, searched[-1] + 0.5, color="orange", alpha=0.1, linewidth=0,
                    label="searched dimensions")
    top.axhline(1.25 * factor, color="grey", linewidth=1, linestyle="--")
    top.set_xlabel("dimension pair i (0 = highest frequency)")
    top.set_ylabel("divisor λ_i = θ_i / θ'_i")
    top.set_title(title or f"LongRoPE search: s = {factor:g}, {data['original_length']} → {data['target_length']} "
                           f"tokens, objective {data['objective']}")
    top.legend(fontsize=8)
    top.grid(True, alpha=0.3)
    scores = data["best_by_generation"]
    bottom.plot(range(len(scores)), scores, marker="o")
    bottom.set_xlabel("generation (0 = initial population)")
    bottom.set_ylabel(f"best {data['objective']} NLL so far (nats)")
    bottom.grid(True, alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------------------------
# learned position tables



def position_table(model: nn.Module) -> torch.Tensor:
    """The absolute position table of ``model`` as ``[positions, hidden]``, rows for real positions only (a leading
    offset such as RoBERTa's or OPT's 2 rows is dropped), found through its ``families`` entry."""
    family = families.table_family(model)
    _, module = families.table_modules(model, family)[0]
    weight = getattr(module, family.weight)
    return weight.detach().float().cpu()[families.table_row_offset(family, module):]  # [n, h]


def position_similarity(weight: torch.Tensor, max_points: int | None = None) -> torch.Tensor:
    """Cosine similarity of every pair of position vectors ``[n, n]`` (diagonal 1); with ``max_points`` the rows
    are subsampled evenly first."""
    w = weight.detach().float()
    if max_points and w.shape[0] > max_points:
        w = w[torch.linspace(0, w.shape[0] - 1, max_points).round().long()]
    w = torch.nn.functional.normalize(w, dim=-1)  # [n, h]
    return w @ w.T  # [n, n]


def plot_position_similarity(
    before: torch.Tensor | nn.Module,
    after: torch.Tensor | nn.Module,
    path: str | Path,
    *,
    original_length: int | None = None,
    max_points: int = 512,
    title: str | None = None,
) -> Path:
    """Cosine-similarity matrices of the learned position vectors, before and after extension, side by side."""
    tables = [position_table(t) if isinstance(t, nn.Module) else t.detach().float().cpu() for t in (before, after)]
    original_length = original_length or tables[0].shape[0]
    fig, axes = _figure(11.0, 5.0, 1, 2)
    image = None
    for ax, table, name in zip(axes, tables, ("before", "after")):
        n = table.shape[0]
        sim = position_similarity(table, max_points)
        image = ax.imshow(sim.numpy(), cmap="viridis", vmin=-1.0, vmax=1.0, extent=(0, n, n, 0))
        if name == "after" and n > original_length:
            for line in (ax.axvline, ax.axhline):
                line(original_length, color="white", linestyle="--", linewidth=1)
        ax.set_title(f"{name}: {n} positions")
        ax.set_xlabel("position")
        ax.set_ylabel("position")
    fig.colorbar(image, ax=list(axes), label="cosine similarity")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


__all__ = [
    "RopeWavelengths",
    "load_result",
    "plot_perplexity_vs_length",
    "plot_position_loss",
    "plot_position_similarity",
    "plot_retrieval_heatmap",
    "plot_rope_wavelengths",
    "plot_search",
    "position_similarity",
    "position_table",
    "rope_geometry",
    "rope_wavelengths",
]
