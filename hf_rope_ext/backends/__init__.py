"""The backends of ``patch_model``, one per kind of method, registered here and nowhere else.

A backend knows how one kind of method changes a model:

- ``rotary``: new inverse frequencies on the rotary modules (kind "rope");
- ``tables``: a longer learned or sinusoidal position table (kind "absolute");
- ``attention``: an attention function that gives each query-key pair the relative position a method chooses
  (kind "attention"; also the log-n query scaling any rotary method can ask for).

``plan(model, family, spec, params, new_len, *, layer_types, existing, attn_implementation)`` checks everything and
returns an object whose ``apply()`` mutates the model, whose ``meta`` goes into ``config.hf_rope_ext`` and whose
``needs_generate_wrapper(model)`` says whether ``generate`` must be wrapped; ``undo(model, meta)`` reverses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import attention, rotary, tables


@dataclass(frozen=True)
class Backend:
    family_kind: str
    """Kind of model family it patches: "rope" (rotary models) or "absolute" (position tables)."""
    original_length: Callable[..., int]
    """(model, family, existing meta or None) -> the length the model was trained at."""
    plan: Callable[..., Any]
    undo: Callable[[Any, dict[str, Any]], None]


BACKENDS: dict[str, Backend] = {
    "rope": Backend("rope", rotary.original_length, rotary.plan, rotary.undo),
    "absolute": Backend("absolute", tables.original_length, tables.plan, tables.undo),
    "attention": Backend("rope", rotary.original_length, attention.plan, attention.undo),
}
"""Method kind -> backend."""

KIND_NAMES = {"rope": "rotary (RoPE)", "absolute": "learned position-table"}
"""Family kind -> words for error messages."""
