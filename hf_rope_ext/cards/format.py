"""Formatting for card text: numbers, durations, sizes and Markdown tables, each written one way for the whole card.

Perplexities get two decimals (thousands separators past 1000, ``inf``/``nan`` kept visible), accuracies are
percentages with the trial count when known, token counts carry an approximate unit (``13,107,200 (≈13.1M)``),
durations read ``1h 02m 03s``, memory sizes use binary units. ``table`` escapes ``|`` and newlines inside cells,
so any value can go into a row. These helpers know nothing about cards; the section builders call them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def fmt_factor(factor: Any) -> str:
    if not isinstance(factor, (int, float)) or isinstance(factor, bool):
        return str(factor)
    return f"{factor:g}"


def fmt_value(value: Any) -> str:
    """Any JSON value on one line; long lists / objects are cut at 120 characters."""
    if isinstance(value, float):
        return f"{value:g}" if abs(value) < 1e6 else f"{value:.6g}"
    if isinstance(value, (list, dict)):
        text = json.dumps(value)
        return text if len(text) <= 120 else text[:117] + "..."
    return str(value)


def fmt_ppl(value: float) -> str:
    if not math.isfinite(value):
        return "inf" if value > 0 else "nan"
    return f"{value:.2f}" if value < 1000 else f"{value:,.0f}"


def fmt_acc(value: float, trials: int | None = None) -> str:
    text = f"{100 * value:.0f}%"
    if trials:
        text += f" ({round(value * trials)}/{trials})"
    return text


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def fmt_count(n: float) -> str:
    n = float(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{int(n):,} (≈{n / size:.3g}{unit})"
    return f"{int(n):,}" if n == int(n) else f"{n:g}"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} bytes"


def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A Markdown table; ``align`` holds one ``---`` / ``--:`` per column."""
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def group(items: Iterable[T], key: Callable[[T], Any]) -> dict[Any, list[T]]:
    """Items grouped by ``key``, groups in order of first appearance."""
    groups: dict[Any, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
