"""The method registry: every extension method, built-in or user-defined, registers itself here by name.

A method is a pure function plus a parameter dataclass. Rotary ("rope") methods compute inverse frequencies;
learned-table ("absolute") methods compute a new position-embedding table; attention-level ("attention") methods
describe which position each query and key takes in each part of the attention map (ReRoPE, Self-Extend, DCA). The
patching code looks methods up here and never branches on a method's name.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["rope", "absolute", "attention"]
KINDS: tuple[str, ...] = ("rope", "absolute", "attention")


@dataclass(frozen=True)
class MethodSpec:
    """Everything the library knows about one extension method."""

    name: str
    """Lowercase unique name used in ``patch_model(model, method=name)``."""
    kind: Kind
    """``"rope"`` for rotary frequencies, ``"absolute"`` for learned position tables, ``"attention"`` for methods that
    change which relative position each query-key pair sees (rotary models, original frequencies)."""
    params_cls: type
    """Dataclass of the method's parameters (rope: subclass of ``RopeParams``; absolute: ``TableParams``;
    attention: ``AttentionParams``)."""
    compute: Callable[..., Any]
    """rope: ``(params, dim, base, device=None, seq_len=None) -> (inv_freq [dim/2] float32, attention_factor)``;
    absolute: ``(old_weight [n, h], new_len, params) -> new_weight [new_len, h]``;
    attention: ``(params) -> AttentionLayout`` (branches of the attention map, see ``methods._attention_base``)."""
    description: str
    """One line for ``list_methods()`` and ``hf-rope-ext methods``."""
    native: Callable[..., dict[str, Any]] | None = None
    """rope only: ``(params, dim, base) -> rope_parameters dict`` that stock transformers understands, or None when
    the method has no native rope type of its own (static methods are then saved as ``longrope``)."""
    dynamic: bool = False
    """rope only: frequencies depend on the current sequence length (recomputed in forward)."""
    paper: str = ""
    """Link to the paper or post that introduced the method."""

    def make_params(self, **kwargs: Any) -> Any:
        """Build the parameter dataclass, rejecting unknown names with the list of valid ones."""
        valid = [f.name for f in dataclasses.fields(self.params_cls)]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(map(repr, unknown))} for method '{self.name}'; "
                f"valid: {', '.join(valid)}"
            )
        params = self.params_cls(**check_param_types(self.name, self.params_cls, kwargs))
        validate = getattr(params, "validate", None)
        if validate is not None:
            validate()
        return params


METHODS: dict[str, MethodSpec] = {}
ON_REGISTER: list[Callable[[MethodSpec], None]] = []
"""Callbacks run for every newly registered method (the plugin rope types hook in here)."""


def register_method(
    name: str,
    *,
    kind: Kind,
    params: type,
    description: str,
    native: Callable[..., dict[str, Any]] | None = None,
    dynamic: bool = False,
    paper: str = "",
    overwrite: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn`` as extension method ``name``.

    Example::

        @register_method("my_ntk", kind="rope", params=RopeParams, description="NTK with base x 4")
        def my_ntk(params, dim, base, device=None, seq_len=None):
            return default_inv_freq(dim, base * 4, device), 1.0
    """
    if not isinstance(name, str) or not name or name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"method names are lowercase letters, digits and '_'; got {name!r}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"params for method '{name}' must be a dataclass type, got {params!r}")
    if kind != "rope" and (native is not None or dynamic):
        raise ValueError("'native' and 'dynamic' apply to rope methods only")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in METHODS and not overwrite:
            raise ValueError(f"method '{name}' is already registered; pass overwrite=True to replace it")
        METHODS[name] = MethodSpec(
            name=name,
            kind=kind,
            params_cls=params,
            compute=fn,
            description=description,
            native=native,
            dynamic=dynamic,
            paper=paper,
        )
        for callback in ON_REGISTER:
            callback(METHODS[name])
        return fn

    return decorator


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; an unknown name raises ``ValueError`` listing the known ones."""
    if not isinstance(name, str) or name.lower() not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name.lower()]


def method_names(kind: Kind | None = None) -> list[str]:
    return sorted(n for n, s in METHODS.items() if kind is None or s.kind == kind)


def list_methods(kind: Kind | None = None) -> list[dict[str, Any]]:
    """Every registered method: name, kind, one-line description, parameters (default, type, meaning), paper link."""
    rows = []
    for name in method_names(kind):
        spec = METHODS[name]
        params = {}
        hints = typing.get_type_hints(spec.params_cls)
        for f in dataclasses.fields(spec.params_cls):
            if f.name in ("factor", "original_max_position_embeddings"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            params[f.name] = {"default": default, "type": str(hints.get(f.name, f.type)),
                              "help": f.metadata.get("help", "")}
        rows.append(
            {
                "name": name,
                "kind": spec.kind,
                "description": spec.description,
                "dynamic": spec.dynamic,
                "parameters": params,
                "paper": spec.paper,
            }
        )
    return rows


__all__ = [
    "METHODS",
    "MethodSpec",
    "register_method",
    "get_method",
    "list_methods",
    "method_names",
    "field",
    "check_param_types",
]


class _Mismatch(Exception):
    """A value does not fit a declared type; ``expected`` says, in words, what would."""

    def __init__(self, expected: str, where: str = "", got: Any = None) -> None:
        super().__init__(expected)
        self.expected, self.where, self.got = expected, where, got


_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence)


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` checked against the declared type ``tp`` and normalised (int -> float for a float field, a tuple ->
    list for a list field); raises ``_Mismatch`` saying what was expected. Types it does not know pass unchecked."""
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        wanted = []
        for option in options:
            try:
                return _coerce(value, option)
            except _Mismatch as mismatch:
                if mismatch.where:  # right kind of value, wrong entry: that is the error to report
                    raise
                wanted.append(mismatch.expected)
        raise _Mismatch(" or ".join(wanted + (["None"] if len(options) < len(args) else [])))
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise _Mismatch("one of " + ", ".join(map(repr, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch("True or False (a bool; true/false on the command line)")
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
        raise _Mismatch("an integer")
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)):
            return float(value)
        raise _Mismatch("a finite number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch("a string")
    if origin in _SEQUENCES or tp in _SEQUENCES:
        item_type = args[0] if args and (len(args) == 1 or args[1] is Ellipsis) else Any
        what = f"a list of {_describe(item_type)}"
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise _Mismatch(what)
        items = []
        for i, item in enumerate(value):
            try:
                items.append(_coerce(item, item_type))
            except _Mismatch as mismatch:
                raise _Mismatch(what, f"[{i}]{mismatch.where}", item) from None
        return tuple(items) if origin is tuple or tp is tuple else items
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _Mismatch(f"a {tp.__name__}")
    return value


def _describe(tp: Any) -> str:
    return {float: "finite numbers", int: "integers", bool: "bools", str: "strings"}.get(tp, str(tp))


def check_param_types(method: str, params_cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` checked against the declared field types of ``params_cls`` (a dataclass), normalised.

    The one type check of every method parameter, before any method sees it: a bool field takes only a bool (not the
    string "no"), a float field only a finite number (not "1.2", inf or nan), an int field an integer, a list field a
    list of entries of its declared type (not the string "1234"). A ValueError names the method, the parameter (and
    the entry) and what is expected."""
    try:
        hints = typing.get_type_hints(params_cls)
    except Exception:  # a forward reference the module cannot resolve: check the fields whose type is concrete
        hints = {f.name: f.type for f in dataclasses.fields(params_cls) if not isinstance(f.type, str)}
    checked = dict(kwargs)
    for name, value in kwargs.items():
        if name not in hints:
            continue
        try:
            checked[name] = _coerce(value, hints[name])
        except _Mismatch as mismatch:
            if mismatch.where:
                raise ValueError(
                    f"method '{method}': parameter {name} must be {mismatch.expected}; "
                    f"{name}{mismatch.where} is {mismatch.got!r}"
                ) from None
            raise ValueError(
                f"method '{method}': parameter {name} must be {mismatch.expected}, got {value!r}"
            ) from None
    return checked


def parse_param_value(text: str) -> Any:
    """One ``key=value`` value from a command line: JSON when it parses (numbers, true/false, null, lists, objects),
    else the string itself. The one rule for ``--param`` everywhere (``hf-rope-ext`` and the fine-tune recipe)."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_param_items(items: Iterable[str] | None, option: str = "--param") -> dict[str, Any]:
    """``["beta_fast=16", "logn=true"]`` -> ``{"beta_fast": 16, "logn": True}`` (values by :func:`parse_param_value`).
    An item without ``=`` is refused naming ``option``."""
    params: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{option} expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        params[key.strip()] = parse_param_value(value)
    return params


def param(default: Any = dataclasses.MISSING, *, help: str) -> Any:
    """A method-parameter dataclass field with its meaning in ``metadata["help"]`` (read by ``list_methods``,
    ``hf-rope-ext methods`` and the model card). ``param(help=...)`` alone: a required field."""
    metadata = {"help": " ".join(help.split())}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
