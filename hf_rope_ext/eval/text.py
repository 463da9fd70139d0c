"""Text sources for evaluation: a built-in offline default, local text / JSONL files, and local ``datasets``.

Sources, by the string a user passes (``--text`` on the command line, ``source=`` here):

- ``None``, ``"builtin"`` or ``"builtin:pydoc"`` — **the offline default**: the topic pages of the Python language
  reference that ship inside every CPython install as ``pydoc_data.topics`` (the text behind ``help("assert")``),
  joined with blank lines in their stored order. About 465k characters of English prose with code examples
  (~113k tokens with SmolLM2's tokenizer on Python 3.11). Nothing is downloaded; the exact text depends on the
  Python version, so numbers are comparable between machines with the same Python minor version.
- ``"builtin:stdlib"`` — Python source code of the standard library (``*.py`` files under ``sysconfig``'s stdlib
  folder, sorted by path, tests and site-packages excluded), for code-flavoured evaluation.
- a path to a ``.txt`` / ``.md`` / any text file — read as UTF-8.
- a path to a ``.jsonl`` file — one JSON object per line; the ``field`` key (default ``"text"``) of each is a document.
- a path to a folder written by ``datasets.Dataset.save_to_disk`` — loaded with ``datasets.load_from_disk``.
- ``"dataset:NAME"`` (optionally ``"dataset:NAME:CONFIG"``) — ``datasets.load_dataset(NAME, CONFIG, split=split)``,
  which works offline when the dataset is in the local cache (``HF_DATASETS_OFFLINE=1``).

Documents are joined with ``separator`` (a blank line) into one stream; perplexity reads that stream with a
sliding window (the PI / YaRN protocol evaluates on long documents; concatenation lets short documents serve too).
"""

from __future__ import annotations

import json
import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

BUILTIN_SOURCES = ("builtin", "builtin:pydoc", "builtin:stdlib")
"""Names of the offline built-in sources (``builtin`` is ``builtin:pydoc``)."""


@dataclass
class Text:
    """A loaded text source."""

    text: str
    """All documents joined with the separator."""
    source: str
    """Canonical name of the source (``builtin:pydoc``, a resolved path, ``dataset:NAME``)."""
    documents: int
    """How many documents were joined."""
    description: str
    """One line saying what the text is, for reports."""

    @classmethod
    def from_string(cls, text: str, description: str = "text given by the caller") -> Text:
        """Wrap a string already in memory (a plain ``str`` argument elsewhere names a source)."""
        return cls(text=text, source="string", documents=1, description=description)


def _pydoc_documents() -> list[str]:
    import pydoc_data.topics

    return list(pydoc_data.topics.topics.values())


def _stdlib_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            docs.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return docs


def _dataset_documents(dataset: Any, field: str, origin: str) -> list[str]:
    if hasattr(dataset, "keys") and not hasattr(dataset, "column_names"):  # a DatasetDict: take the split asked for
        raise ValueError(f"{origin} holds several splits ({', '.join(dataset.keys())}); choose one with split=")
    if field not in dataset.column_names:
        raise ValueError(f"{origin} has no column {field!r}; its columns: {', '.join(dataset.column_names)}")
    return [str(t) for t in dataset[field] if t]


def load_documents(
    source: str | Path | None = None, *, field: str = "text", split: str = "test"
) -> tuple[list[str], str, str]:
    """The documents of ``source`` (see the module docstring) as ``(documents, canonical source, description)``."""
    import sys

    if source is None or str(source) in ("builtin", "builtin:pydoc"):
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        return (
            _pydoc_documents(),
            "builtin:pydoc",
            f"Python {version} language-reference topics (pydoc_data.topics, shipped with CPython; offline default)",
        )
    source = str(source)
    if source == "builtin:stdlib":
        return _stdlib_documents(), source, "Python standard-library source files (offline)"
    if source.startswith("builtin"):
        raise ValueError(f"unknown built-in text {source!r}; choose one of: {', '.join(BUILTIN_SOURCES)}")
    if source.startswith("dataset:"):
        try:
            import datasets
        except ModuleNotFoundError as err:
            raise ValueError("text sources 'dataset:...' need the datasets package: pip install datasets") from err
        name, _, config = source[len("dataset:"):].partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=split)
        except Exception as err:  # datasets raises many types for "not cached / offline"
            raise FileNotFoundError(
                f"could not load dataset {name!r} (split {split!r}): not in the local cache, or offline. "
                f"Original error: {err}"
            ) from err
        return _dataset_documents(ds, field, source), source, f"datasets: {name} {config} split {split}".replace("  ", " ")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"text source not found: {source}; give a text/JSONL file, a saved datasets folder, "
            f"'dataset:NAME', or one of: {', '.join(BUILTIN_SOURCES)}"
        )
    if path.is_dir():
        if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                or (path / "state.json").is_file()):
            raise ValueError(f"{path} is a folder but not one written by datasets' save_to_disk")
        try:
            import datasets
        except ModuleNotFoundError as err:
            raise ValueError("reading a saved dataset folder needs the datasets package: pip install datasets") from err
        ds = datasets.load_from_disk(str(path))
        if hasattr(ds, "keys") and not hasattr(ds, "column_names"):
            if split not in ds:
                raise ValueError(f"{path} has splits {', '.join(ds.keys())}; no split {split!r}")
            ds = ds[split]
        return _dataset_documents(ds, field, str(path)), str(path), f"saved dataset {path.name} (split {split})"
    if path.suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
                if not isinstance(record, dict) or field not in record:
                    keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                    raise ValueError(f"{path}:{lineno}: no field {field!r} (found: {keys}); choose one with field=")
                docs.append(str(record[field]))
        return docs, str(path), f"JSONL file {path.name} (field {field!r})"
    return [path.read_text(encoding="utf-8")], str(path), f"text file {path.name}"


def load_text(
    source: str | Path | None = None, *, field: str = "text", split: str = "test", separator: str = "\n\n"
) -> Text:
    """Load a text source (see the module docstring) as one string; ``None`` gives the offline default."""
    docs, canonical, description = load_documents(source, field=field, split=split)
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"text source {canonical} is empty")
    text = separator.join(docs)
    logger.info("text %s: %d documents, %d characters", canonical, len(docs), len(text))
    return Text(text=text, source=canonical, documents=len(docs), description=description)


def tokenize(tokenizer: Any, text: str | Text) -> torch.Tensor:
    """Token ids of ``text`` as one 1-D ``torch.long`` stream, without special tokens.

    No BOS is added: sliding windows start in the middle of the text, as in the PI / YaRN evaluation code."""
    if isinstance(text, Text):
        text = text.text
    encoded = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return torch.tensor(encoded["input_ids"], dtype=torch.long)


def take_tokens(ids: torch.Tensor, needed: int, offset: int = 0, what: str = "this evaluation") -> torch.Tensor:
    """``ids[offset : offset + needed]``, or a ``ValueError`` saying how many tokens there are and how to get more."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if offset + needed > ids.numel():
        raise ValueError(
            f"{what} needs {needed} tokens from offset {offset}, but the text has only {ids.numel()} tokens; "
            "use a smaller offset / fewer windows, or a longer text (--text FILE, or builtin:stdlib)"
        )
    return ids[offset : offset + needed]


__all__ = ["BUILTIN_SOURCES", "Text", "load_documents", "load_text", "take_tokens", "tokenize"]
