"""Crash-safe files: write into a temporary sibling, then move into place; find the latest checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import zipfile
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
    recover_directory(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, final)


def recover_directory(final: Path) -> Path:
    """Put back ``final`` from its moved-aside copy when a swap died between its two renames (``final`` missing,
    ``.final.old`` complete: the only copy). Returns the moved-aside path."""
    old = final.with_name(f".{final.name}.old")
    if old.is_dir() and not final.exists():
        os.replace(old, final)
    return old


def replace_directory(src: Path, final: Path) -> None:
    """Move ``src`` to ``final``; an existing ``final`` is moved aside first and deleted after the swap."""
    old = recover_directory(final)
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


def file_problem(path: Path) -> str | None:
    """Why a checkpoint file cannot be read back, or None: an empty file, a truncated ``.safetensors`` (its header
    promises more bytes than the file has), a truncated ``torch.save`` zip archive (no central directory, or an entry
    past the end). Reads headers only, never the tensors."""
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    with open(path, "rb") as f:
        head = f.read(8)
        if path.suffix == ".safetensors":
            if len(head) < 8:
                return f"truncated: {size} bytes, shorter than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                return f"truncated: {size} bytes, its header alone needs {8 + n}"
            try:
                header = json.loads(f.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError) as err:
                return f"unreadable safetensors header ({err})"
            if 8 + n + end > size:
                return f"truncated: {size} bytes, its header says {8 + n + end}"
            return None
    if head[:4] == b"PK\x03\x04":  # torch.save's zip format
        try:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if info.header_offset + info.compress_size > size:
                        return f"truncated: entry {info.filename} runs past the end ({size} bytes)"
        except (zipfile.BadZipFile, OSError) as err:
            return f"truncated or corrupt torch file ({err})"
    return None


_TRAINER_STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "step": (int,),
    "tokens": (int,),
    "loss_curve": (list,),
    "elapsed_s": (int, float),
    "options": (dict,),
}
"""What a resumed run reads from ``trainer_state.json``, with the JSON types each must have."""


def read_trainer_state(folder: str | os.PathLike) -> dict:
    """``trainer_state.json`` of a checkpoint folder; ValueError naming the file when it is unreadable, not JSON,
    or lacks a field a resumed run needs (or has it with the wrong type)."""
    path = Path(folder) / COMPLETE_MARKER
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(state).__name__}")
    wrong = [
        f"{key} ({'missing' if key not in state else type(state[key]).__name__})"
        for key, types in _TRAINER_STATE_FIELDS.items()
        if not isinstance(state.get(key), types) or isinstance(state.get(key), bool)
    ]
    if wrong:
        raise ValueError(f"{path}: fields missing or of the wrong type: {', '.join(wrong)}")
    return state


def checkpoint_problems(folder: str | os.PathLike) -> list[str]:
    """``"path: what is wrong"`` for each unreadable file of a checkpoint folder (truncated weights or optimizer
    state, an unparsable ``trainer_state.json``); empty when it looks complete."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: not a folder"]
    problems = []
    marker = folder / COMPLETE_MARKER
    try:
        read_trainer_state(folder)
    except ValueError as err:
        problems.append(str(err))
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path != marker:
            problem = file_problem(path)
            if problem:
                problems.append(f"{path}: {problem}")
    return problems
