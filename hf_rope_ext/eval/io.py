"""Writing evaluation reports as JSON, and reading them back as their typed report classes by ``kind``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def save_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write ``data`` as indented JSON to ``path`` (parent folders created); NaN stays NaN. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    return path


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``; a missing file, a file that is not UTF-8 text or not JSON raises an error naming
    the file (and the line and column of a syntax error)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text (UTF-8) file, so not JSON") from None


def load_result(data: Any) -> Any:
    """A report dataclass from itself, its ``to_dict()``, or a JSON file written by ``save()`` / the CLI (errors name
    the file)."""
    from .compare import CompareReport
    from .perplexity import PerplexityReport
    from .retrieval import RetrievalReport

    where = ""
    if isinstance(data, (str, Path)):
        where = f"{Path(data).expanduser()}: "
        data = read_json(data)
    if not isinstance(data, Mapping):
        if where:
            raise ValueError(f"{where}holds a JSON {type(data).__name__}, not a report object")
        return data
    kinds = {"compare": CompareReport, "perplexity": PerplexityReport, "retrieval": RetrievalReport}
    kind = data.get("kind")
    if kind not in kinds:
        raise ValueError(
            f"{where}not a result this library wrote (kind {kind!r}); expected one of: {', '.join(kinds)}"
        )
    try:
        return kinds[kind].from_dict(dict(data))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        what = f"missing {err}" if isinstance(err, KeyError) else " ".join(str(err).split())
        raise ValueError(f"{where}not a valid {kind} report ({what})") from None
