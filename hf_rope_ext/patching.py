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


MAX_POSITIONS = 2**24
"""The longest context ``patch_model`` accepts. Rotary angles are computed from float32 positions (transformers casts
``position_ids`` to float32 before multiplying by ``inv_freq``), and float32 holds every integer exactly only up to
2**24 = 16,777,216: past it neighbouring positions get the same angle. Learned tables that long would not fit in
memory either (16.7M rows x hidden size)."""


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
        raise ValueError(
            f"model must be a loaded transformers model (a torch.nn.Module with a .config), got {type(model).__name__}"
            + (" (None)" if model is None else "")
            + "; load it first, e.g. AutoModelForCausalLM.from_pretrained(path)"
        )


def _where(model: nn.Module) -> str:
    """Where the patch record of ``model`` lives, for error messages: its config.json when loaded from a folder."""
    name = getattr(model.config, "_name_or_path", None)
    if isinstance(name, str) and name and (Path(name).expanduser() / "config.json").is_file():
        return f"{Path(name).expanduser() / 'config.json'}, key '{META_KEY}'"
    return f"model.config.{META_KEY}"


def _record_error(where: str, problem: str) -> ValueError:
    return ValueError(
        f"the patch record ({where}) {problem}. It was edited or damaged after patching: restore the config.json "
        f"written by patch_model / hf-rope-ext patch (or re-patch the original model); nothing was changed"
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_record(model: nn.Module, meta: Any) -> dict[str, Any]:
    """``meta`` (the ``hf_rope_ext`` record of ``model``'s config) checked: its structure, the method and kind it
    names, the lengths and parameters against each other, and against the rope settings the config holds now (a
    record that disagrees with the config was edited: undoing it would silently "restore" the edited value).
    Raises ``ValueError`` saying what is wrong and where (the config.json file and key)."""
    where = _where(model)
    if not isinstance(meta, dict):
        raise _record_error(where, f"is {type(meta).__name__} {meta!r:.60}, not the object hf_rope_ext writes")
    required = ["method", "kind", "factor", "original_max_position_embeddings", "max_position_embeddings",
                "parameters", "original_config"]
    missing = [k for k in required if k not in meta]
    if missing:
        raise _record_error(where, f"has no {', '.join(map(repr, missing))}")
    method, kind = meta["method"], meta["kind"]
    if not isinstance(method, str) or method.lower() not in registry.METHODS:
        raise _record_error(
            where, f"names method {method!r}, which is not registered here (known: "
            f"{', '.join(registry.method_names())}); if it is a custom method, import the module that registers it"
        )
    spec = registry.METHODS[method.lower()]
    if kind != spec.kind:
        raise _record_error(where, f"says kind {kind!r}, but method '{spec.name}' is of kind {spec.kind!r}")
    family_kind = families.find_family(model).kind
    if BACKENDS[kind].family_kind != family_kind:
        raise _record_error(
            where, f"names '{spec.name}', a method for {KIND_NAMES[BACKENDS[kind].family_kind]} models, but "
            f"{families.model_type_of(model)!r} uses {KIND_NAMES[family_kind]} positions"
        )
    original, new, factor = meta["original_max_position_embeddings"], meta["max_position_embeddings"], meta["factor"]
    for key in ("original_max_position_embeddings", "max_position_embeddings"):
        if not _positive_int(meta[key]):
            raise _record_error(where, f"has {key} = {meta[key]!r}, not a positive integer")
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor):
        raise _record_error(where, f"has factor = {factor!r}, not a finite number")
    if new <= original or (new != int(round(original * factor)) and not math.isclose(factor, new / original)):
        raise _record_error(
            where, f"is inconsistent: factor {factor!r} x original_max_position_embeddings {original} != "
            f"max_position_embeddings {new}"
        )
    original_config = meta["original_config"]
    if not isinstance(original_config, dict) or not original_config or not all(
        v is None or _positive_int(v) for v in original_config.values()
    ):
        raise _record_error(where, f"has original_config = {original_config!r:.80}, not an object of lengths")
    if not isinstance(meta["parameters"], dict):
        raise _record_error(where, f"has parameters = {meta['parameters']!r:.80}, not an object")
    try:
        spec.make_params(factor=factor, original_max_position_embeddings=original, **meta["parameters"])
    except ValueError as err:
        raise _record_error(where, f"has parameters that '{spec.name}' refuses: {err}") from None
    if kind == "absolute":
        table = meta.get("table")
        if not isinstance(table, dict) or not all(isinstance(table.get(k), int) for k in ("row_offset",
                                                                                         "original_rows")):
            raise _record_error(where, f"has table = {table!r:.80}, not the object (row_offset, original_rows, ...) "
                                       "a table patch writes")
        return meta
    if "original_rope_parameters" not in meta or not isinstance(meta["original_rope_parameters"], dict):
        raise _record_error(where, "has no original_rope_parameters object")
    if not _positive_int(original_config.get("max_position_embeddings")):
        raise _record_error(where, "has no original_config.max_position_embeddings (a positive integer)")
    if meta.get("original_length_from") == "config" and original_config["max_position_embeddings"] != original:
        raise _record_error(
            where, f"is inconsistent: original_max_position_embeddings {original} was read from the config, "
            f"which said max_position_embeddings {original_config['max_position_embeddings']} (original_config)"
        )
    _check_record_against_config(model, meta, where)
    return meta


def _check_record_against_config(model: nn.Module, meta: dict[str, Any], where: str) -> None:
    """The rope settings in the config now are those the record says were written (rope_type, factor, original
    length); an edit of either side since is refused."""
    written = meta.get("rope_parameters_written")
    current = getattr(model.config, "rope_parameters", None)
    if not isinstance(written, dict) or not isinstance(current, dict):
        return
    for prefix, rope_type in written.items():
        rp = current if prefix == "None" else current.get(prefix)
        location = "rope_parameters" if prefix == "None" else f"rope_parameters[{prefix!r}]"
        if not isinstance(rp, dict):
            raise _record_error(where, f"says {location} was written, but the config has none")
        if rp.get("rope_type", "default") != rope_type:
            raise _record_error(
                where, f"says {location}.rope_type {rope_type!r} was written, but the config now has "
                f"{rp.get('rope_type', 'default')!r}: the rope settings or the record were edited by hand"
            )
        if rope_type == "default":
            continue
        same = isinstance(rp.get("factor"), numbers.Real) and math.isclose(rp["factor"], meta["factor"])
        if "factor" in rp and not same:
            raise _record_error(
                where, f"says factor {meta['factor']!r}, but {location}.factor is {rp['factor']!r}: "
                "one of them was edited by hand"
            )
        orig = rp.get("original_max_position_embeddings")
        if orig is not None and orig != meta["original_max_position_embeddings"]:
            raise _record_error(
                where, f"says original_max_position_embeddings {meta['original_max_position_embeddings']!r}, but "
                f"{location}.original_max_position_embeddings is {orig!r}: one of them was edited by hand"
            )


def patch_info(model: nn.Module) -> dict[str, Any] | None:
    """What was applied to ``model`` (method, parameters, original and new lengths, rope_type written), or None.

    Reads the config, so it also works on a patched model saved and reloaded in another process. A record edited or
    damaged by hand raises ``ValueError`` naming the config.json and what is wrong (see :func:`check_record`)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, META_KEY):
        return None
    meta = getattr(config, META_KEY)
    if meta is None:
        return None
    return copy.deepcopy(check_record(model, meta))


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
    """(factor, new length) from exactly one of them; the new length at most ``MAX_POSITIONS``."""
    factor, new_len = _resolve(factor, max_position_embeddings, original)
    if new_len > MAX_POSITIONS:
        raise ValueError(
            f"a context of {new_len} positions ({original} x {factor:g}) is beyond what the model can address: "
            f"rotary angles come from float32 positions, exact only up to 2**24 = {MAX_POSITIONS} (and a learned "
            f"table that long would not fit in memory); use a factor of at most {MAX_POSITIONS // original}"
        )
    return factor, new_len


def _resolve(factor: Any, max_position_embeddings: Any, original: int) -> tuple[float, int]:
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
    _check_model(model)
    spec = registry.get_method(method)
    _check_call_options(tokenizer, layer_types, attn_implementation, repatch)
    family = families.find_family(model)
    backend = BACKENDS[spec.kind]
    if backend.family_kind != family.kind:
        valid = ", ".join(
            n for n in registry.method_names() if BACKENDS[registry.METHODS[n].kind].family_kind == family.kind
        )
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
        if not _positive_int(original_len):
            raise ValueError(
                f"the model's config gives original length {original_len!r}, not a positive integer; pass "
                "original_max_position_embeddings= (the length it was trained at)"
            )
    elif not _positive_int(original_len):
        raise ValueError(
            "original_max_position_embeddings must be a positive integer (the length the model was trained at), "
            f"got {original_len!r}"
        )
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
        "original_length_from": "config" if original_max_position_embeddings is None else "argument",
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


def _check_call_options(tokenizer: Any, layer_types: Any, attn_implementation: Any, repatch: Any) -> None:
    """The options of ``patch_model`` besides the method's own parameters, checked before anything changes."""
    if tokenizer is not None and not hasattr(tokenizer, "model_max_length"):
        raise ValueError(
            f"tokenizer must be a transformers tokenizer (with model_max_length), got {type(tokenizer).__name__}; "
            "pass the model's tokenizer or leave tokenizer out"
        )
    if layer_types is not None and (
        isinstance(layer_types, str) or not isinstance(layer_types, (list, tuple))
        or not all(isinstance(t, str) for t in layer_types)
    ):
        raise ValueError(f"layer_types must be a list of layer type names, got {layer_types!r}")
    if attn_implementation is not None and not isinstance(attn_implementation, str):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    if not isinstance(repatch, bool):
        raise ValueError(f"repatch must be True or False, got {repatch!r}")


def set_tokenizer_length(tokenizer: Any, length: int) -> None:
    """Set ``model_max_length`` so the tokenizer neither truncates nor warns below the new length, and saves it."""
    tokenizer.model_max_length = int(length)
    if isinstance(getattr(tokenizer, "init_kwargs", None), dict):
        tokenizer.init_kwargs["model_max_length"] = int(length)


def unpatch_model(model: nn.Module, tokenizer: Any = None) -> nn.Module:
    """Undo ``patch_model``: original config, frequencies / table and tokenizer limit. Returns the model.

    A record edited or damaged by hand is refused (``ValueError`` naming the config.json key) before any change."""
    _check_model(model)
    if tokenizer is not None and not hasattr(tokenizer, "model_max_length"):
        raise ValueError(f"tokenizer must be a transformers tokenizer (with model_max_length), got {tokenizer!r:.60}")
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
