"""Crash-safe files: write into a temporary sibling, then move into place; find the latest checkpoint."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

CHECKPOINT_PREFIX = "step-"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
COMPLETE_MARKER = "trainer_state.json"
"""A checkpoint folder counts only once this file is in it (it is written last)."""


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, enabled: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to ``final``; on success it replaces ``final`` in one rename.

    If the block raises, the temporary folder is deleted and ``final`` (new or old) is untouched, so a crash never
    leaves a half-written ``final``. ``enabled=False`` (non-main processes) yields the temporary path and does nothing.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.partial")
    if not enabled:
        yield tmp
        return
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, final)


def replace_directory(src: Path, final: Path) -> None:
    """Move ``src`` to ``final``; an existing ``final`` is moved aside first and deleted after the swap."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(src, final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``folder`` as ``(step, path)``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(folder)
    return checkpoints[-1][1] if checkpoints else None


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (``keep <= 0`` keeps all)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
