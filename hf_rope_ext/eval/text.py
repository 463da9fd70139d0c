"""Text sources for evaluation: a built-in offline default, local text / JSONL files, and local ``datasets``.

Sources, by the string a user passes (``--text`` on the command line, ``source=`` here):

- ``None``, ``"builtin"`` or ``"builtin:pydoc"`` — **the offline default**: Python's language-reference topics
  (``pydoc_data.topics``); ``"builtin:stdlib"`` — the standard library's source code. Both are defined in
  :mod:`hf_rope_ext.text`, the one place that says what a source name means (training data reads the same).
  Numbers are comparable between machines with the same Python minor version.
- a path to a file: ``.jsonl`` (one record per line, the ``field`` key, default ``"text"``), ``.json`` (a list of
  records), ``.parquet`` (column ``field``), anything else read as UTF-8 text.
- a path to a folder written by ``datasets.Dataset.save_to_disk`` — loaded with ``datasets.load_from_disk``.
- ``"dataset:NAME"`` (optionally ``"dataset:NAME:CONFIG"``) — ``datasets.load_dataset(NAME, CONFIG, split=split)``,
  which works offline when the dataset is in the local cache (``HF_DATASETS_OFFLINE=1``).

Documents are joined with ``separator`` (a blank line) into one stream; perplexity reads that stream with a
sliding window (the PI / YaRN protocol evaluates on long documents; concatenation lets short documents serve too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..text import (
    BUILTIN_SOURCES,
    builtin_description,
    builtin_documents,
    builtin_source,
    dataset_documents,
    file_documents,
    is_saved_dataset,
)

logger = logging.getLogger(__name__)


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


def load_documents(
    source: str | Path | None = None, *, field: str = "text", split: str = "test"
) -> tuple[list[str], str, str]:
    """The documents of ``source`` (see the module docstring) as ``(documents, canonical source, description)``."""
    source = "builtin:pydoc" if source is None else str(source)
    builtin = builtin_source(source)  # an unknown builtin:... name is refused here, naming the valid ones
    if builtin is not None:
        return builtin_documents(builtin), builtin, builtin_description(builtin)
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
        description = f"datasets: {name} {config} split {split}".replace("  ", " ")
        return dataset_documents(ds, field, source), source, description
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"text source not found: {source}; give a text/JSONL file, a saved datasets folder, "
            f"'dataset:NAME', or one of: {', '.join(BUILTIN_SOURCES)}"
        )
    if path.is_dir():
        if not is_saved_dataset(path):
            raise ValueError(f"{path} is a folder but not one written by datasets' save_to_disk")
        try:
            import datasets
        except ModuleNotFoundError as err:
            raise ValueError(
                "reading a saved dataset folder needs the datasets package: pip install datasets"
            ) from err
        ds = datasets.load_from_disk(str(path))
        if hasattr(ds, "keys") and not hasattr(ds, "column_names"):
            if split not in ds:
                raise ValueError(f"{path} has splits {', '.join(ds.keys())}; no split {split!r}")
            ds = ds[split]
        return dataset_documents(ds, field, str(path)), str(path), f"saved dataset {path.name} (split {split})"
    kind = {".jsonl": "JSONL file", ".json": "JSON file", ".parquet": "parquet file"}.get(path.suffix.lower())
    docs = list(file_documents(path, field))
    return docs, str(path), f"{kind} {path.name} (field {field!r})" if kind else f"text file {path.name}"


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
