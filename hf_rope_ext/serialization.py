"""Native-first config writing, and the plugin rope types for what transformers cannot express.

Order of preference for the ``rope_parameters`` written into a patched config:

1. the method's own native type (linear, dynamic, yarn, llama3, longrope, or default with a larger ``rope_theta``),
   when the model's config class accepts it;
2. for any static method: ``longrope`` with ``short_factor == long_factor`` = the per-frequency divisors, and an
   explicit ``attention_factor`` -- every fixed per-frequency rescale reloads in stock transformers that way;
3. dynamic methods without a native type: a plugin type registered in ``ROPE_INIT_FUNCTIONS`` when ``hf_rope_ext`` is
   imported. Its name says so, so loading without the plugin fails with a message naming the fix.

Every reader: transformers 5 reads ``rope_parameters`` (theta inside); transformers 4.4x-4.57, TGI and serving engines
running transformers 4 read ``rope_scaling`` and a top-level ``rope_theta`` and, given only ``rope_parameters``, build
plain RoPE with theta 10000 without a word. So the config.json of a patched model also carries that legacy mirror
whenever it expresses the same model (``legacy_mirror``), written by ``register_all``'s hook on
``PreTrainedConfig.to_json_string``; for a plugin rope type it carries a ``rope_scaling`` naming that type instead
(``legacy_guard``), so transformers 4 refuses the checkpoint rather than loading a different model. The mirror
follows the serving engines' rule for the served length (see ``legacy_mirror``), so vLLM and SGLang advertise the
patched length.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any

import torch
from transformers import modeling_rope_utils
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RotaryEmbeddingConfigMixin

from . import families, registry
from .methods._rope_base import default_inv_freq

PLUGIN_SUFFIX = " (requires: import hf_rope_ext)"
METHOD_KEY = "hf_rope_ext_method"


def plugin_rope_type(method_name: str) -> str:
    """rope_type string for a plugin-only method; contains "dynamic" so transformers recomputes it per length."""
    stem = method_name if "dynamic" in method_name else f"{method_name}_dynamic"
    return stem + PLUGIN_SUFFIX


def is_plugin_rope_type(rope_type: str) -> bool:
    return isinstance(rope_type, str) and rope_type.endswith(PLUGIN_SUFFIX)


def rope_parameters_for(
    spec: registry.MethodSpec,
    params: Any,
    dim: int,
    base: float,
    inv_freq: torch.Tensor,
    attention_factor: float,
    native_rope_types: frozenset[str] | None,
    model_type: str,
) -> tuple[dict[str, Any], bool]:
    """The rope_parameters entries describing ``spec`` with ``params`` (without rope_theta unless it changes), and
    whether reloading needs the plugin."""
    accepted = (lambda t: True) if native_rope_types is None else (lambda t: t in native_rope_types)
    if spec.native is not None:
        native = spec.native(params, dim, base)
        if accepted(native["rope_type"]):
            return native, False
    if not spec.dynamic:
        if not accepted("longrope"):
            raise ValueError(
                f"method '{spec.name}' cannot be saved for {model_type!r}: its config accepts only "
                f"{sorted(native_rope_types or ())}"
            )
        divisors = (default_inv_freq(dim, base) / inv_freq.detach().float().cpu()).tolist()  # [d/2]
        return {
            "rope_type": "longrope",
            "short_factor": divisors,
            "long_factor": divisors,
            "factor": float(params.factor),
            "original_max_position_embeddings": int(params.original_max_position_embeddings),
            "attention_factor": float(attention_factor),
        }, False
    plugin_type = plugin_rope_type(spec.name)
    if not accepted(plugin_type):
        raise ValueError(
            f"method '{spec.name}' is dynamic and cannot be written for {model_type!r}: its configs accept only "
            f"{sorted(native_rope_types or ())}. Use a static method (e.g. yarn, ntk, longrope) for this model."
        )
    stored = {k: v for k, v in dataclasses.asdict(params).items()}
    return {"rope_type": plugin_type, METHOD_KEY: spec.name, **stored}, True


def _plugin_init_fn(config: Any, device: Any = None, seq_len: Any = None, layer_type: str | None = None):
    """ROPE_INIT_FUNCTIONS entry shared by all plugin types: rebuild the method's parameters from the config."""
    rope_parameters = config.rope_parameters[layer_type] if layer_type is not None else config.rope_parameters
    if METHOD_KEY not in rope_parameters:
        raise ValueError(
            f"rope_parameters with rope_type {rope_parameters.get('rope_type')!r} has no {METHOD_KEY!r} naming the "
            "hf_rope_ext method (config.json was edited by hand?)"
        )
    spec = registry.get_method(rope_parameters[METHOD_KEY])
    names = {f.name for f in dataclasses.fields(spec.params_cls)}
    params = spec.make_params(**{k: v for k, v in rope_parameters.items() if k in names})
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * rope_parameters.get("partial_rotary_factor", 1.0))
    return spec.compute(params, dim, float(rope_parameters["rope_theta"]), device=device, seq_len=seq_len)


def _validate_plugin(self: Any, rope_parameters: dict[str, Any], ignore_keys: Any = None) -> None:
    registry.get_method(rope_parameters.get(METHOD_KEY, "?"))  # a clear error for an unknown method name


def register_plugin_type(spec: registry.MethodSpec) -> None:
    """Make a dynamic method without native type loadable by ``from_pretrained`` (called on registration)."""
    if spec.kind != "rope" or spec.native is not None or not spec.dynamic:
        return
    rope_type = plugin_rope_type(spec.name)
    ROPE_INIT_FUNCTIONS[rope_type] = _plugin_init_fn
    # config validation looks up `_validate_{rope_type}_rope_parameters`; without one it only logs a warning
    setattr(RotaryEmbeddingConfigMixin, f"_validate_{rope_type}_rope_parameters", _validate_plugin)


ATTENTION_ROPE_TYPE = "hf_rope_ext_attention" + PLUGIN_SUFFIX
"""rope_type written for the layers an attention-level method acts on: the trained RoPE, unchanged, under a name that
only exists with the plugin. Loading re-attaches the attention implementation (transformers does not keep
``attn_implementation`` through a load and a save), and readers without the plugin fail instead of silently running
the original model."""


def _attention_init_fn(config: Any, device: Any = None, seq_len: Any = None, layer_type: str | None = None):
    """ROPE_INIT_FUNCTIONS entry of ``ATTENTION_ROPE_TYPE``: the default RoPE frequencies, as the models' own
    ``compute_default_rope_parameters``; and the model switched to the attention implementation its record names."""
    dim, base = families.rotary_geometry(config, layer_type)
    record = getattr(config, "hf_rope_ext", None)
    attention = record.get("attention") if isinstance(record, Mapping) else None  # a damaged record: patch_info says
    name = attention.get("implementation") if isinstance(attention, Mapping) else None
    if name and getattr(config, "_attn_implementation", None) != name:
        config._attn_implementation = name
        config.attn_implementation = name  # written again by the next save_pretrained
    return default_inv_freq(dim, base, device), 1.0


# ------------------------------------------------------------------------------------------- the legacy mirror

LEGACY_ROPE_TYPES = frozenset({"default", "linear", "dynamic", "yarn", "llama3", "longrope"})
"""rope types that transformers 4.4x-4.57 builds from ``rope_scaling`` (its ``ROPE_INIT_FUNCTIONS``)."""

META_KEY_CONFIG = "hf_rope_ext"
"""config.json key of the patch record (``patching.META_KEY``; repeated here: patching imports this module)."""


LEGACY_READER = "transformers 4.4x-4.57 (and engines reading config.json through it)"


def legacy_mirror(config: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The top-level keys transformers 4.x reads for the rotary embedding that ``config`` (a transformers 5 config
    dict of a patched model) describes, and None; or None and the reason it cannot be expressed for 4.x.

    Keys written: ``rope_theta`` (and ``partial_rotary_factor``) at top level; ``rope_scaling`` = ``rope_parameters``
    without those two, with ``type`` beside ``rope_type`` (transformers < 4.45 reads ``type``); omitted for plain
    RoPE. transformers 5 gives ``rope_scaling`` precedence over ``rope_parameters`` when both are present
    (``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict``), so the mirror always carries every field.

    The served length follows the engines' rule (read from the sources, vLLM 0.33.0 and SGLang 0.5.23):

    - vLLM ``vllm/config/model.py::_get_and_verify_max_len``: ``max_position_embeddings`` (capped by the tokenizer's
      ``model_max_length``) times ``factor`` for every rope type except yarn, llama3, longrope (and su,
      deepseek_yarn), whose ``max_position_embeddings`` is taken as already extended. For longrope its default
      ``max_model_len`` is a top-level ``original_max_position_embeddings`` when there is one (its Phi-3 rule), the
      derived length still being the allowed maximum.
    - SGLang ``sglang/srt/utils/hf_transformers/common.py::get_context_length``: ``max_position_embeddings`` times
      ``rope_scaling["factor"]``, unless ``rope_scaling`` has ``original_max_position_embeddings`` or is llama3.

    So ``linear`` (no ``original_max_position_embeddings`` in its fields) is written with ``max_position_embeddings``
    = the ORIGINAL length, as ``dynamic`` already is and as released linear checkpoints do (e.g. Vicuna-16k: 4096 and
    factor 4); both engines then serve original x factor. yarn/llama3/longrope keep the extended length. A longrope
    with ``short_factor != long_factor`` also gets a top-level ``original_max_position_embeddings``: transformers 4.x
    reads the switch length only from there (Phi-3's field) and otherwise switches at ``max_position_embeddings``.
    """
    rope = config.get("rope_parameters")
    if not isinstance(rope, Mapping) or not rope:
        return None, "config.json has no rope_parameters"
    if "rope_type" not in rope:  # nested per layer type (Gemma-3): transformers 4 keeps another layout per model
        return None, (
            "rope parameters per layer type (" + ", ".join(map(str, rope)) + "); transformers 4 stores these in a "
            "model-specific layout"
        )
    rope_type = rope["rope_type"]
    if rope_type not in LEGACY_ROPE_TYPES:
        return None, f"rope_type {rope_type!r} does not exist in transformers 4 (it knows {sorted(LEGACY_ROPE_TYPES)})"
    if "rope_theta" not in rope:
        return None, "rope_parameters has no rope_theta"
    mirror: dict[str, Any] = {"rope_theta": rope["rope_theta"]}
    if "partial_rotary_factor" in rope:
        mirror["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if rope_type != "default":
        fields = {k: copy.deepcopy(v) for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        mirror["rope_scaling"] = {"rope_type": rope_type, "type": rope_type, **fields}
    meta = config.get(META_KEY_CONFIG) or {}
    if rope_type == "linear" and meta.get("original_max_position_embeddings"):
        mirror["max_position_embeddings"] = int(meta["original_max_position_embeddings"])
    if rope_type == "longrope" and rope.get("short_factor") != rope.get("long_factor"):
        mirror["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    return mirror, None


def legacy_guard(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """For a plugin rope type (which no transformers 4 release has): the keys that make transformers 4 *refuse*
    config.json instead of building plain RoPE from it without a word, or None for any other config.

    Given only ``rope_parameters``, transformers 4.4x-4.57 reads neither the rope type nor the theta (it builds the
    trained RoPE with theta 10000). With ``rope_scaling`` naming the plugin type, its rotary embedding looks the type
    up in ``ROPE_INIT_FUNCTIONS`` (``modeling_rope_utils``) and stops with a KeyError whose text is the type, which
    ends in "(requires: import hf_rope_ext)"; serving engines reading ``rope_scaling`` refuse the unknown type too.
    transformers 5 gives ``rope_scaling`` precedence (``convert_rope_params_to_dict``), so it carries every field and
    transformers 5 builds the same model from it as from ``rope_parameters``."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, Mapping) or not is_plugin_rope_type(rope.get("rope_type")) or "rope_theta" not in rope:
        return None
    guard: dict[str, Any] = {"rope_theta": rope["rope_theta"]}
    if "partial_rotary_factor" in rope:
        guard["partial_rotary_factor"] = rope["partial_rotary_factor"]
    fields = {k: copy.deepcopy(v) for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    guard["rope_scaling"] = {**fields, "type": rope["rope_type"]}
    return guard


def transformers4_support(config: Mapping[str, Any]) -> dict[str, Any]:
    """For ``patch_info``: whether config.json also carries the legacy mirror, and why not when it does not."""
    mirror, reason = legacy_mirror(config)
    if mirror is not None:
        return {"expressed": True, "reader": LEGACY_READER, "keys": sorted(mirror)}
    if legacy_guard(config) is not None:
        return {
            "expressed": False,
            "reader": LEGACY_READER,
            "refused": True,
            "reason": f"{reason}: config.json names it in rope_scaling too, so transformers 4 refuses to build the "
            "model (KeyError naming the rope type) instead of building plain RoPE; load it with transformers 5 and "
            "`import hf_rope_ext`",
        }
    return {
        "expressed": False,
        "reader": LEGACY_READER,
        "refused": False,
        "reason": f"{reason}: transformers 4 would build plain RoPE from this config.json; load it with "
        "transformers 5 (and `import hf_rope_ext` where the rope type names it)",
    }


def _with_legacy_mirror(to_json_string: Any) -> Any:
    @functools.wraps(to_json_string)
    def wrapper(self: Any, use_diff: bool = True) -> str:
        text = to_json_string(self, use_diff=use_diff)
        if not isinstance(getattr(self, META_KEY_CONFIG, None), Mapping):
            return text
        config = json.loads(text)
        mirror, _ = legacy_mirror(config)
        if mirror is None:
            mirror = legacy_guard(config)
        if mirror is None:
            return text
        config.update(mirror)
        return json.dumps(config, indent=2, sort_keys=True) + "\n"  # as transformers' own to_json_string

    wrapper._hf_rope_ext_legacy = True
    return wrapper


def register_legacy_mirror() -> None:
    """Write the legacy mirror into the config.json of every patched model (configs without the patch record are
    serialized exactly as before). Idempotent."""
    if not getattr(PreTrainedConfig.to_json_string, "_hf_rope_ext_legacy", False):
        PreTrainedConfig.to_json_string = _with_legacy_mirror(PreTrainedConfig.to_json_string)


STRICT_ROPE_CONFIGS = (
    ("transformers.models.phi3.configuration_phi3", "Phi3Config"),
    ("transformers.models.phimoe.configuration_phimoe", "PhimoeConfig"),
)
"""Config classes whose own ``validate_rope`` accepts only rope types ``default`` / ``longrope`` (transformers 5.x),
so a model patched with an attention-level method could be neither saved nor loaded."""


def _accepting_attention_type(validate: Any) -> Any:
    """``validate_rope`` of a strict config class, made to check ``ATTENTION_ROPE_TYPE`` as what it is: the trained
    RoPE (``default``) under the plugin's name. Without the plugin the class still refuses it (no silent load)."""

    @functools.wraps(validate)
    def validate_rope(self: Any, *args: Any, **kwargs: Any) -> Any:
        rp = getattr(self, "rope_parameters", None)
        if isinstance(rp, dict) and rp.get("rope_type") == ATTENTION_ROPE_TYPE:
            rp["rope_type"] = "default"
            try:
                return validate(self, *args, **kwargs)
            finally:
                rp["rope_type"] = ATTENTION_ROPE_TYPE
        return validate(self, *args, **kwargs)

    validate_rope._hf_rope_ext = True
    return validate_rope


def register_strict_configs() -> None:
    """Wrap the ``validate_rope`` of :data:`STRICT_ROPE_CONFIGS` (those present in this transformers). Idempotent."""
    import importlib

    for module_name, class_name in STRICT_ROPE_CONFIGS:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        own = cls.__dict__.get("validate_rope")
        if own is None or getattr(own, "_hf_rope_ext", False):
            continue
        wrapped = _accepting_attention_type(own)
        cls.validate_rope = wrapped
        # huggingface_hub's @strict dataclasses run the validators listed when the class was made
        validators = cls.__dict__.get("__class_validators__")
        if isinstance(validators, list):
            validators[:] = [wrapped if v is own else v for v in validators]


def register_all() -> None:
    for spec in registry.METHODS.values():
        register_plugin_type(spec)
    registry.ON_REGISTER.append(register_plugin_type)
    ROPE_INIT_FUNCTIONS[ATTENTION_ROPE_TYPE] = _attention_init_fn
    setattr(RotaryEmbeddingConfigMixin, f"_validate_{ATTENTION_ROPE_TYPE}_rope_parameters", lambda *a, **k: None)
    register_strict_configs()
    register_legacy_mirror()


assert modeling_rope_utils.ROPE_INIT_FUNCTIONS is ROPE_INIT_FUNCTIONS
