"""The saved model a card describes: what is read from its folder, and the marker that ties a card to its config.

``SavedModel.read`` loads only JSON files (config.json with its ``hf_rope_ext`` entry, tokenizer_config.json, an
existing README.md), never weights, so the card states exactly what will be uploaded. Every card hf-rope-ext writes
starts with two comment lines: the *fingerprint* of the extension it was rendered for (method, factor, lengths,
parameters; ``push`` refuses a card whose fingerprint differs from config.json) and the model id its loading code
names (``push`` retargets the card to the repo id it uploads to).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..eval.io import read_json
from ..patching import META_KEY
from .format import fmt_factor

CARD_FILE = "README.md"
MARKER_PREFIX = "<!-- hf-rope-ext card:"
"""First line of a card's body; carries the fingerprint of the config it was rendered from (checked by push)."""
MODEL_ID_PREFIX = "<!-- hf-rope-ext model id:"
"""Second line of a card's body; the model id its loading code names (push retargets it to the repo id)."""

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
"""A Hub repo id, ``owner/name`` or a bare ``name``."""


def is_hub_id(value: str) -> bool:
    """``owner/name`` that is not a path on this machine."""
    return bool(HUB_ID.match(value)) and "/" in value and not Path(value).expanduser().exists()


@dataclass
class SavedModel:
    """What the card needs from a saved folder, read from its files (no weights loaded)."""

    folder: Path
    config: dict[str, Any]
    meta: dict[str, Any]
    """The ``hf_rope_ext`` entry of config.json."""
    tokenizer_config: dict[str, Any]
    existing_card: str | None
    """README.md text if present and not written by hf-rope-ext (e.g. the base model's card)."""
    previous_card: str | None = None
    """README.md text if an earlier `hf-rope-ext card` wrote it (its license / language / base_model persist)."""

    @classmethod
    def read(cls, folder: str | Path) -> SavedModel:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder not found: {folder}")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} has no config.json; save the patched model with save_pretrained first")
        config = read_json(config_path)
        meta = config.get(META_KEY) if isinstance(config, dict) else None
        if not isinstance(meta, dict) or "method" not in meta:
            raise ValueError(
                f"{config_path} has no '{META_KEY}' entry: the folder was not saved from a model patched by "
                "hf_rope_ext (patch_model + save_pretrained, or `hf-rope-ext patch`)"
            )
        for key in ("original_max_position_embeddings", "max_position_embeddings"):
            if not isinstance(meta.get(key), int):
                raise ValueError(f"{config_path}: '{META_KEY}.{key}' must be an integer, got {meta.get(key)!r}")
        tok_path = folder / "tokenizer_config.json"
        tokenizer_config = read_json(tok_path) if tok_path.is_file() else {}
        card_path = folder / CARD_FILE
        existing = card_path.read_text(encoding="utf-8") if card_path.is_file() else None
        if existing is not None and MARKER_PREFIX in existing:
            return cls(folder, config, meta, tokenizer_config, None, existing)
        return cls(folder, config, meta, tokenizer_config, existing)

    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    @property
    def is_causal(self) -> bool:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in self.architectures)


def fingerprint(meta: Mapping[str, Any]) -> str:
    """Short text identifying an extension (method, factor, lengths, parameters): card and config must agree."""
    params = json.dumps(meta.get("parameters") or {}, sort_keys=True, default=str, separators=(",", ":"))
    return (
        f"method={meta.get('method')} factor={fmt_factor(meta.get('factor'))} "
        f"original={meta.get('original_max_position_embeddings')} extended={meta.get('max_position_embeddings')} "
        f"parameters={params}"
    )


def card_marker(meta: Mapping[str, Any], model_id: str) -> str:
    """The two comment lines that open a card's body."""
    return f"{MARKER_PREFIX} {fingerprint(meta)} -->\n{MODEL_ID_PREFIX} {model_id} -->"


def _comment(card_text: str, prefix: str) -> str | None:
    for line in card_text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix):].removesuffix("-->").strip()
    return None


def read_marker(card_text: str) -> str | None:
    """The fingerprint a card was rendered for, or None when the card was not written by hf-rope-ext."""
    return _comment(card_text, MARKER_PREFIX)


def read_model_id(card_text: str) -> str | None:
    """The model id a card's loading code names, or None when the card does not record it."""
    return _comment(card_text, MODEL_ID_PREFIX)
