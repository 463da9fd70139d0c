"""patch_model / unpatch_model / patch_info: apply a registered method to a loaded model, in place.

Every check runs before the first change, so a refused patch leaves the model untouched. The patching code never
branches on a method's name: it asks the registry for the method and ``families`` for where things live.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from . import families, registry
from .backends import BACKENDS, KIND_NAMES
from .backends.rotary import freeze_rope_length, wrap_generate  # noqa: F401  (freeze_rope_length: public API)

logger = logging.getLogger(__name__)

META_KEY = "hf_rope_ext"
"""Config attribute (and config.json key) recording what was applied."""
_STATE = "_hf_rope_ext_state"  # on the patched model: in-memory extras (tokenizer, generate wrapper)


def _version() -> str:
    from . import __version__

    return __version__


def patch_info(model: nn.Module) -> dict[str, Any] | None:
    """What was applied to ``model`` (method, parameters, original and new lengths, rope_type written), or None.

    Reads the config, so it also works on a patched model saved and reloaded in another process."""
    meta = getattr(getattr(model, "config", None), META_KEY, None)
    return copy.deepcopy(meta) if meta else None


def _base_model_id(model: nn.Module, existing: dict[str, Any] | None) -> str | None:
    """The Hub id of the model being extended, for the card's ``base_model`` (the Hub's model tree): kept from an
    earlier patch, else ``config._name_or_path`` when it is ``owner/name`` and not a folder on this machine."""
    if existing and existing.get("base_model"):
        return existing["base_model"]
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name) or ".." in name:
        return None
    return None if Path(name).expanduser().exists() else name


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _resolve_lengths(factor: Any, max_position_embeddings: Any, original: int) -> tuple[float, int]:
    """(factor, new length) from exactly one of them."""
    if (factor is None) == (max_position_embeddings is None):
        raise ValueError(
            "give exactly one of factor= (new length / original length) or max_position_embeddings= (target length); "
            f"got factor={factor!r}, max_position_embeddings={max_position_embeddings!r}"
        )
    if factor is not None:
        _check_number("factor", factor)
        if not factor > 1:
            raise ValueError(f"factor must be > 1 (new length / original length {original}), got {factor}")
        new_len = int(round(original * factor))
        if new_len <= original:
            raise ValueError(
                f"factor {factor!r} does not lengthen the context: round({original} * factor) = {new_len} positions; "
                f"use a factor of at least {(original + 1) / original:g}"
            )
        return float(factor), new_len
    _check_number("max_position_embeddings", max_position_embeddings)
    if int(max_position_embeddings) != max_position_embeddings or max_position_embeddings <= original:
        raise ValueError(
            f"max_position_embeddings must be an int larger than the original length {original}, "
            f"got {max_position_embeddings!r}"
        )
    return max_position_embeddings / original, int(max_position_embeddings)


def patch_model(
    model: nn.Module,
    method: str,
    factor: float | None = None,
    *,
    max_position_embeddings: int | None = None,
    original_max_position_embeddings: int | None = None,
    tokenizer: Any = None,
    layer_types: list[str] | None = None,
    attn_implementation: str | None = None,
    repatch: bool = False,
    **method_params: Any,
) -> nn.Module:
    """Extend ``model``'s context window in place with a registered method; returns the model.

    Args:
        model: a loaded transformers model (also under peft, accelerate hooks, or loaded from GGUF).
        method: a name from ``list_methods()``, e.g. "linear", "ntk", "yarn".
        factor: new length / original length (> 1). Give this or ``max_position_embeddings``.
        max_position_embeddings: the target length instead of ``factor``.
        original_max_position_embeddings: the length the model was trained at; defaults to what its config says.
        tokenizer: when given, its ``model_max_length`` becomes the new length.
        layer_types: for per-layer-type rope (Gemma-3): which layer types to patch (default: global attention only).
        attn_implementation: for attention-level methods and ``logn=True``: the attention the patched model runs on
            below the method's window and for each branch's softmax, "sdpa" or "eager" (default: the model's own).
        repatch: patch a model that is already patched, starting again from its original state.
        **method_params: the method's own parameters (e.g. ``beta_fast`` for yarn); see ``list_methods()``.
    """
    spec = registry.get_method(method)
    family = families.find_family(model)
    backend = BACKENDS[spec.kind]
    if backend.family_kind != family.kind:
        valid = ", ".join(n for n in registry.method_names() if BACKENDS[registry.METHODS[n].kind].family_kind == family.kind)
        raise ValueError(
            f"method '{spec.name}' is for {KIND_NAMES[backend.family_kind]} models, but "
            f"{families.model_type_of(model)!r} uses {KIND_NAMES[family.kind]} positions; methods for this model: "
            f"{valid}"
        )
    existing = patch_info(model)
    if existing and not repatch:
        raise ValueError(
            f"model is already patched ({existing['method']}, {existing['original_max_position_embeddings']} -> "
            f"{existing['max_position_embeddings']}); call unpatch_model(model) first, or pass repatch=True to "
            "re-patch starting from the original model"
        )
    original_len = original_max_position_embeddings
    if original_len is None:
        original_len = backend.original_length(model, family, existing)
    factor, new_len = _resolve_lengths(factor, max_position_embeddings, int(original_len))
    params = spec.make_params(factor=factor, original_max_position_embeddings=original_len, **method_params)
    plan = backend.plan(
        model,
        family,
        spec,
        params,
        new_len,
        layer_types=layer_types,
        existing=existing,
        attn_implementation=attn_implementation,
    )

    # every check passed: from here on the model changes
    if existing:
        unpatch_model(model)
    plan.apply()
    meta = {
        "method": spec.name,
        "kind": spec.kind,
        "factor": factor,
        "original_max_position_embeddings": params.original_max_position_embeddings,
        "max_position_embeddings": new_len,
        "parameters": {
            k: v for k, v in asdict(params).items() if k not in ("factor", "original_max_position_embeddings")
        },
        "dynamic": spec.dynamic,
        "paper": spec.paper,
        "library_version": _version(),
        "base_model": _base_model_id(model, existing),
        **plan.meta,
    }
    setattr(model.config, META_KEY, meta)
    state: dict[str, Any] = {}
    if tokenizer is not None:
        state["tokenizer"] = (tokenizer, getattr(tokenizer, "model_max_length", None))
        set_tokenizer_length(tokenizer, new_len)
    if plan.needs_generate_wrapper(model):
        wrap_generate(model)
        state["generate_wrapped"] = True
    model.__dict__[_STATE] = state
    logger.info("patched %s with %s: %d -> %d positions", type(model).__name__, spec.name, original_len, new_len)
    return model


def set_tokenizer_length(tokenizer: Any, length: int) -> None:
    """Set ``model_max_length`` so the tokenizer neither truncates nor warns below the new length, and saves it."""
    tokenizer.model_max_length = int(length)
    if isinstance(getattr(tokenizer, "init_kwargs", None), dict):
        tokenizer.init_kwargs["model_max_length"] = int(length)


def unpatch_model(model: nn.Module, tokenizer: Any = None) -> nn.Module:
    """Undo ``patch_model``: original config, frequencies / table and tokenizer limit. Returns the model."""
    meta = patch_info(model)
    if meta is None:
        raise ValueError("model is not patched by hf_rope_ext (its config has no 'hf_rope_ext' entry)")
    BACKENDS[meta["kind"]].undo(model, meta)
    delattr(model.config, META_KEY)
    state = model.__dict__.pop(_STATE, {})
    if state.get("generate_wrapped"):
        model.__dict__.pop("generate", None)
    if "tokenizer" in state:
        tok, old = state["tokenizer"]
        set_tokenizer_length(tok, old)
    if tokenizer is not None and (not state.get("tokenizer") or state["tokenizer"][0] is not tokenizer):
        set_tokenizer_length(tokenizer, meta["original_max_position_embeddings"])
    return model
