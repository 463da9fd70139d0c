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


def load_result(data: Any) -> Any:
    """A report dataclass from itself, its ``to_dict()``, or a JSON file written by ``save()`` / the CLI."""
    from .compare import CompareReport
    from .perplexity import PerplexityReport
    from .retrieval import RetrievalReport

    if isinstance(data, (str, Path)):
        data = json.loads(Path(data).read_text())
    if not isinstance(data, Mapping):
        return data
    kinds = {"compare": CompareReport, "perplexity": PerplexityReport, "retrieval": RetrievalReport}
    kind = data.get("kind")
    if kind not in kinds:
        raise ValueError(f"not a result this library wrote (kind {kind!r}); expected one of: {', '.join(kinds)}")
    return kinds[kind].from_dict(dict(data))
