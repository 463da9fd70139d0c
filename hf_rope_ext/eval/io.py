"""Writing evaluation reports as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write ``data`` as indented JSON to ``path`` (parent folders created); NaN stays NaN. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    return path
