"""Reading results for a card: the project's own typed reports, chosen by their ``kind``, and one row format.

A results item is a JSON file, its parsed value, or the report object itself. Accepted kinds:

- ``perplexity``, ``retrieval``, ``compare``: the reports ``hf_rope_ext.eval`` writes (``PerplexityReport``,
  ``RetrievalReport``, ``CompareReport``), read by their own ``from_dict`` (through ``eval.io.load_result``);
- ``training_summary``: the :class:`~hf_rope_ext.training.summary.TrainingSummary` the fine-tune recipe writes; its
  held-out perplexity before and after training becomes two perplexity rows;
- ``rows``: results measured elsewhere, ``{"kind": "rows", "rows": [{"task": "perplexity", "length": 8192,
  "value": 7.1, "method": "yarn"}, ...], "plots": [...]}`` — each row is a :class:`ScoreRow` (see docs/cards.md).

Anything else is refused with the list of accepted kinds; nothing is guessed from key spellings or file names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..eval.compare import UNPATCHED
from ..training.summary import FILE_NAME as TRAINING_FILE
from ..training.summary import KIND as TRAINING_KIND
from ..training.summary import TrainingSummary

Task = Literal["perplexity", "passkey", "needle"]
TASKS: tuple[str, ...] = ("perplexity", "passkey", "needle")
ROWS_KIND = "rows"
REPORT_KINDS: tuple[str, ...] = ("perplexity", "retrieval", "compare")
"""Kinds of the ``hf_rope_ext.eval`` reports (``eval.io.load_result`` reads them)."""
ACCEPTED_KINDS: tuple[str, ...] = (*REPORT_KINDS, TRAINING_KIND, ROWS_KIND)
PLOT_SECTIONS: tuple[str, ...] = (*TASKS, "training")

UNPATCHED_LABEL = UNPATCHED
"""The one label of the model without any extension, ``"none"`` as everywhere in hf_rope_ext (``eval.compare``): a
report with ``"patch": null``, a compare run of method ``"none"``, a row with ``"method": "none"``."""
BEFORE_TRAINING_LABEL = "before fine-tuning"
"""Label of a training summary's ``eval_before`` row (the patched model before training)."""
HELD_OUT_DATASET = "held-out text"


@dataclass
class ScoreRow:
    """One measurement: perplexity, or retrieval accuracy (passkey / needle), at one context length.

    Also the row of the ``{"kind": "rows"}`` format: its JSON keys are exactly these field names."""

    task: Task
    """``perplexity``, ``passkey`` or ``needle``."""
    length: int
    """Context length in tokens."""
    value: float
    """Perplexity (> 0; ``Infinity`` for a diverged run), or accuracy as a fraction in [0, 1]."""
    method: str | None = None
    """Label of the model or method measured ("yarn", "unpatched", ...); None = this model."""
    depth: float | None = None
    """Needle / passkey position as a fraction of the context (0 = start, 1 = end); retrieval rows only."""
    trials: int | None = None
    """Samples behind an accuracy."""
    dataset: str | None = None
    """Text or task the measurement used."""

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ScoreRow:
        """A row of the ``rows`` format, every key checked; ``where`` names it in errors."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: a row must be an object with keys {', '.join(names)}; got {data!r}")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a row has: {', '.join(names)}")
        missing = [k for k in ("task", "length", "value") if k not in data]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(map(repr, missing))} (required: task, length, value)")
        task = data["task"]
        if task not in TASKS:
            raise ValueError(f"{where}: task must be one of {', '.join(TASKS)}; got {task!r}")
        length = data["length"]
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"{where}: length must be a positive integer (tokens); got {length!r}")
        value = _number(data["value"], "value", where)
        if task == "perplexity" and not value > 0:  # NaN fails too; +inf (diverged) passes
            raise ValueError(f"{where}: a perplexity value must be > 0; got {data['value']!r}")
        if task != "perplexity" and not 0 <= value <= 1:
            raise ValueError(f"{where}: a {task} value is an accuracy, a fraction in [0, 1]; got {data['value']!r}")
        depth = data.get("depth")
        if depth is not None:
            if task == "perplexity":
                raise ValueError(f"{where}: depth applies to passkey / needle rows only")
            depth = _number(depth, "depth", where)
            if not 0 <= depth <= 1:
                raise ValueError(f"{where}: depth must be a fraction in [0, 1]; got {data['depth']!r}")
        trials = data.get("trials")
        if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
            raise ValueError(f"{where}: trials must be a positive integer; got {trials!r}")
        method, dataset = data.get("method"), data.get("dataset")
        for key, text in (("method", method), ("dataset", dataset)):
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{where}: {key} must be a string or null; got {text!r}")
        if method is not None and method.strip().lower() == "unpatched":
            raise ValueError(f"{where}: method {method!r}: the model without extension is {UNPATCHED_LABEL!r} in "
                             "hf_rope_ext (null = this model)")
        return cls(task, length, value, method, depth, trials, dataset)


@dataclass
class Plot:
    path: Path
    """The image file (source location)."""
    title: str
    task: str | None = None
    """Section the plot belongs to (perplexity, passkey, needle, training) or None."""


@dataclass
class Results:
    """Everything read from results, ready for the card."""

    rows: list[ScoreRow] = field(default_factory=list)
    training: TrainingSummary | None = None
    plots: list[Plot] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def of(self, task: str) -> list[ScoreRow]:
        return [r for r in self.rows if r.task == task]


def is_this_model(label: str | None, method: str) -> bool:
    """Rows labelled None or with the saved method's name (any case) measure the model the card describes."""
    return label is None or label.strip().lower() == method.lower()


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {what} must be a number; got {value!r}")
    return float(value)


def title_from_name(path: Path) -> str:
    return re.sub(r"[_\-]+", " ", path.stem).strip().capitalize() or path.name


def _plots(raw: Any, base: Path, where: str, task: str | None = None) -> list[Plot]:
    """``[path, {"path": ..., "title": ..., "task": ...}, ...]``; relative paths are relative to ``base``."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError(f"{where}: plots must be a list of paths or {{path, title}} objects; got {raw!r}")
    plots = []
    for item in raw:
        title, section = None, task
        if isinstance(item, Mapping):
            unknown = sorted(set(item) - {"path", "title", "task"})
            if unknown or not isinstance(item.get("path"), str):
                raise ValueError(f"{where}: a plot object has a string 'path' and optional 'title', 'task'; got "
                                 f"{dict(item)!r}")
            title, section, item = item.get("title"), item.get("task", task), item["path"]
            if section is not None and section not in PLOT_SECTIONS:
                raise ValueError(f"{where}: plot task must be one of {', '.join(PLOT_SECTIONS)}; got {section!r}")
        if not isinstance(item, str):
            raise ValueError(f"{where}: plots must be paths (strings) or {{path, title}} objects; got {item!r}")
        path = Path(item).expanduser()
        path = path if path.is_absolute() else base / path
        plots.append(Plot(path, str(title) if title else title_from_name(path), section))
    return plots


def _report_label(patch: Mapping[str, Any] | None) -> str:
    return patch["method"] if patch else UNPATCHED_LABEL


def _perplexity_rows(report: Any, label: str, dataset: str | None) -> list[ScoreRow]:
    return [ScoreRow("perplexity", r.window, float(r.perplexity), label, dataset=dataset) for r in report.results]


def _retrieval_rows(report: Any, label: str, where: str) -> list[ScoreRow]:
    if report.task not in ("passkey", "needle"):
        raise ValueError(f"{where}: retrieval task must be passkey or needle; got {report.task!r}")
    grid = report.accuracy  # [depth][length]
    if len(grid) != len(report.depths) or any(len(row) != len(report.lengths) for row in grid):
        raise ValueError(f"{where}: the accuracy grid must have one row per depth and one column per length")
    return [
        ScoreRow(report.task, int(length), float(value), label, float(depth), report.trials_per_cell or None)
        for depth, row in zip(report.depths, grid, strict=True)
        for length, value in zip(report.lengths, row, strict=True)
    ]


def _report_rows(report: Any, where: str) -> list[ScoreRow]:
    """ScoreRows from a PerplexityReport, RetrievalReport or CompareReport."""
    from ..eval.compare import CompareReport
    from ..eval.perplexity import PerplexityReport

    if isinstance(report, PerplexityReport):
        return _perplexity_rows(report, _report_label(report.patch), report.text)
    if isinstance(report, CompareReport):
        rows = []
        for run in report.runs:  # a run that failed (error) has no numbers
            label = run.method  # "none" (UNPATCHED_LABEL) for the model as loaded
            if run.perplexity is not None:
                rows += _perplexity_rows(run.perplexity, label, report.text)
            if run.passkey is not None:
                rows += _retrieval_rows(run.passkey, label, where)
        return rows
    return _retrieval_rows(report, _report_label(report.patch), where)


def _held_out_rows(summary: TrainingSummary, where: str) -> list[ScoreRow]:
    """The summary's held-out perplexity: before training (labelled) and after (this model)."""
    rows = []
    for name, label in (("eval_before", BEFORE_TRAINING_LABEL), ("eval_after", None)):
        result = getattr(summary, name)
        if not result:
            continue
        if not isinstance(result, Mapping) or not isinstance(result.get("perplexity"), (int, float)):
            raise ValueError(f"{where}: {name} must be an object with a numeric 'perplexity'; got {result!r}")
        length = result.get("length") or summary.target_length or summary.seq_len
        if not isinstance(length, int):
            raise ValueError(f"{where}: {name} has no 'length' and the summary no target_length / seq_len")
        eval_data = getattr(summary, "eval_data", None)  # what was held out, when the summary says
        notes = [", ".join(map(str, eval_data)) if isinstance(eval_data, list) else eval_data,
                 "masked tokens" if result.get("objective") == "masked" else None]
        notes = [n for n in notes if n]
        dataset = HELD_OUT_DATASET + (f" ({'; '.join(notes)})" if notes else "")
        rows.append(ScoreRow("perplexity", length, float(result["perplexity"]), label, dataset=dataset))
    return rows


def add_training(results: Results, summary: TrainingSummary, base: Path, where: str) -> None:
    """Put a training summary into ``results``: the record, its plots (relative to ``base``) and its held-out rows."""
    if results.training is not None:
        raise ValueError(f"{where}: a second training summary; give one per card")
    results.training = summary
    results.rows += _held_out_rows(summary, where)
    results.plots += _plots(summary.plots or None, base, f"{where} (plots)", "training")
    results.sources.append(where)


def read_training(training: Any, folder: Path) -> tuple[TrainingSummary, Path, str]:
    """(summary, folder its plot paths are relative to, name for errors) from what ``training=`` accepts."""
    if isinstance(training, TrainingSummary):
        return training, folder, "training"
    if isinstance(training, Mapping):
        try:
            return TrainingSummary.from_dict(dict(training)), folder, "training"
        except (TypeError, ValueError) as err:
            raise ValueError(f"training: {err}") from None
    if isinstance(training, (str, Path)):
        path = Path(training).expanduser()
        if path.is_dir():
            path = path / TRAINING_FILE
        if not path.is_file():
            raise FileNotFoundError(f"training: {path} not found (give {TRAINING_FILE} or the folder holding it)")
        try:
            return TrainingSummary.from_dict(_read_json(path)), path.parent, str(path)
        except (TypeError, ValueError) as err:
            raise ValueError(f"training: {path}: {err}") from None
    raise ValueError(f"training must be a TrainingSummary, a path to {TRAINING_FILE} or the folder holding it; got "
                     f"{type(training).__name__}")


def _read_json(path: Path) -> Any:
    from ..eval.io import read_json

    return read_json(path)


def _refuse(where: str, what: str) -> ValueError:
    return ValueError(
        f"{where}: {what}; results must carry \"kind\": one of {', '.join(ACCEPTED_KINDS)} (the reports hf_rope_ext "
        f"writes, or {{\"kind\": \"rows\", \"rows\": [...]}} for results from elsewhere; see docs/cards.md)"
    )


def _add(results: Results, data: Any, where: str, base: Path) -> None:
    from ..eval.compare import CompareReport
    from ..eval.perplexity import PerplexityReport
    from ..eval.retrieval import RetrievalReport

    if isinstance(data, TrainingSummary):
        add_training(results, data, base, where)
        return
    if isinstance(data, (PerplexityReport, RetrievalReport, CompareReport)):
        results.rows += _report_rows(data, where)
        results.sources.append(where)
        return
    if not isinstance(data, Mapping):
        raise _refuse(where, f"got {type(data).__name__}")
    kind = data.get("kind")
    if kind == TRAINING_KIND:
        try:
            summary = TrainingSummary.from_dict(dict(data))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None
        add_training(results, summary, base, where)
    elif kind == ROWS_KIND:
        unknown = sorted(set(data) - {"kind", "rows", "plots"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} in a rows file; it has: kind, "
                             "rows, plots")
        if not isinstance(data.get("rows"), list):
            raise ValueError(f"{where}: \"rows\" must be a list of row objects")
        results.rows += [ScoreRow.from_dict(row, f"{where}: rows[{i}]") for i, row in enumerate(data["rows"])]
        results.plots += _plots(data.get("plots"), base, where)
        results.sources.append(where)
    elif kind in REPORT_KINDS:
        from ..eval.io import load_result

        try:
            report = load_result(data)
        except (TypeError, KeyError, ValueError) as err:
            raise ValueError(f"{where}: not a valid {kind} report ({err})") from None
        results.rows += _report_rows(report, where)
        results.sources.append(where)
    else:
        raise _refuse(where, f"unknown kind {kind!r}" if kind is not None else "no \"kind\"")


def load_results(items: Sequence[Any], *, base_dir: str | Path | None = None) -> Results:
    """Read results: JSON files, their parsed values, or report objects (kinds in ``ACCEPTED_KINDS``).

    Plot paths in a file are relative to the file; in a parsed value or object, relative to ``base_dir``
    (default: the current folder).
    """
    if isinstance(items, (str, Path, Mapping)):
        raise ValueError("results must be a list of files / reports, not a single one: results=[...]")
    results = Results()
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            path = Path(item).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"results file not found: {path}")
            _add(results, _read_json(path), str(path), path.parent)
        else:
            _add(results, item, f"results[{i}]", base)
    return results
