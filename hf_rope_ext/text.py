"""Text sources with one meaning everywhere: what a source name gives, for evaluation (``hf_rope_ext.eval.text``) and
for training data (``hf_rope_ext.training.data``) alike.

Built-in offline corpora (nothing is downloaded; the text depends on the Python version):

- ``builtin:pydoc`` (also plain ``builtin``): the topic pages of the Python language reference that ship inside every
  CPython install as ``pydoc_data.topics`` (the text behind ``help("assert")``), one document per topic in their
  stored order. About 465k characters of English prose with code examples (~113k tokens with SmolLM2's tokenizer on
  Python 3.11).
- ``builtin:stdlib``: Python source code of the standard library, one document per ``*.py`` file under
  ``sysconfig``'s stdlib folder, sorted by path, tests and site-packages excluded.

Files, by suffix: ``.jsonl`` (one JSON record per line: an object whose ``field`` is the text, or a string),
``.json`` (a list of such records, or ``{"data": [...]}``), ``.parquet`` (column ``field``; needs pyarrow), anything
else is one document of UTF-8 text. A ``datasets`` dataset (saved folder or loaded by name) gives its ``field`` column.
"""

from __future__ import annotations

import json
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

BUILTIN_SOURCES = ("builtin", "builtin:pydoc", "builtin:stdlib")
"""Names of the offline built-in sources (``builtin`` is ``builtin:pydoc``)."""


def builtin_source(source: str) -> str | None:
    """The canonical name (``builtin:pydoc`` / ``builtin:stdlib``) of a built-in source; None for any other source;
    ValueError naming the valid ones for an unknown ``builtin...`` name."""
    if source in ("builtin", "builtin:pydoc"):
        return "builtin:pydoc"
    if source == "builtin:stdlib":
        return source
    if source.startswith("builtin"):
        raise ValueError(f"unknown built-in corpus {source!r}; choose one of: {', '.join(BUILTIN_SOURCES)}")
    return None


def builtin_documents(source: str) -> list[str]:
    """The documents of a built-in source (see the module docstring)."""
    name = builtin_source(source)
    if name == "builtin:pydoc":
        import pydoc_data.topics

        return list(pydoc_data.topics.topics.values())
    if name == "builtin:stdlib":
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
    raise ValueError(f"{source!r} is not a built-in corpus; choose one of: {', '.join(BUILTIN_SOURCES)}")


def builtin_description(source: str) -> str:
    """One line saying what a built-in source is, for reports."""
    if builtin_source(source) == "builtin:pydoc":
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        return f"Python {version} language-reference topics (pydoc_data.topics, shipped with CPython; offline default)"
    return "Python standard-library source files (offline)"


def _record_text(record: Any, field: str, where: str, setting: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and field in record:
        return str(record[field])
    keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"{where}: no field {field!r} (found: {keys}); choose one with {setting}")


def file_documents(path: str | Path, field: str = "text", *, setting: str = "field=") -> Iterator[str]:
    """The documents of one file (by suffix, see the module docstring). ``setting`` names the option that chooses
    ``field`` in error messages (``field=`` for the eval functions, ``text_field`` for the recipe)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
                yield _record_text(record, field, f"{path}:{lineno}", setting)
    elif suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(records, dict) and isinstance(records.get("data"), list):
            records = records["data"]
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        for i, record in enumerate(records):
            yield _record_text(record, field, f"{path}: record {i}", setting)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if field not in table.column_names:
            raise ValueError(
                f"{path}: no column {field!r} (columns: {', '.join(table.column_names)}); choose one with {setting}"
            )
        yield from (str(t) for t in table.column(field).to_pylist())
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def dataset_documents(dataset: Any, field: str, origin: str) -> Iterable[str]:
    """The ``field`` column of a ``datasets.Dataset`` (empty rows dropped)."""
    if hasattr(dataset, "keys") and not hasattr(dataset, "column_names"):  # a DatasetDict: one split is needed
        raise ValueError(f"{origin} holds several splits ({', '.join(dataset.keys())}); choose one with split=")
    if field not in dataset.column_names:
        raise ValueError(f"{origin} has no column {field!r}; its columns: {', '.join(dataset.column_names)}")
    return [str(t) for t in dataset[field] if t]


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk``."""
    return any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


__all__ = [
    "BUILTIN_SOURCES",
    "builtin_description",
    "builtin_documents",
    "builtin_source",
    "dataset_documents",
    "file_documents",
    "is_saved_dataset",
]
