"""GGUF for llama.cpp / Ollama: rewrite a GGUF's rope metadata for a method, and export a saved folder to GGUF.

Key names are llama.cpp's own (gguf-py ``gguf/constants.py`` ``Keys.Rope`` / ``Keys.LLM``; llama.cpp
``src/llama-arch.cpp`` ``LLM_KV_NAMES``). What llama.cpp does with them was read in the llama.cpp sources bundled
with llama-cpp-python 0.3.36 (``vendor/llama.cpp``):

- ``src/llama-model.cpp::load_hparams`` reads, for every architecture: ``{arch}.context_length`` (required),
  ``{arch}.rope.freq_base`` (default 10000), ``{arch}.rope.scaling.type`` (none | linear | yarn | longrope; default
  linear), ``{arch}.rope.scaling.factor`` (frequencies are multiplied by 1 / factor),
  ``{arch}.rope.scaling.original_context_length`` (yarn's L) and ``{arch}.rope.scaling.attn_factor`` (multiplies
  cos and sin). It does NOT read ``rope.scaling.yarn_beta_fast/slow`` or ``yarn_attn_factor`` for llama: beta is
  32 / 1 (``llama-hparams.h``; llama-cpp-python passes the same defaults).
- ``src/llama-context.cpp``: for yarn, the attention factor is 0.1 ln(s) + 1 (``get_mscale``), times ``attn_factor``.
- ``ggml/src/ggml-cpu/ops.cpp::rope_yarn`` / ``ggml.c::ggml_rope_yarn_corr_dims``: yarn's ramp between
  floor/ceil of the dimensions turning beta_fast / beta_slow times over L -- the YaRN paper's NTK-by-parts with
  transformers' ``truncate=True``.
- ``src/models/llama.cpp``: the llama graph reads a ``rope_freqs.weight`` tensor ([n_rot / 2] float32) and divides
  dimension i's frequency by entry i (``get_rope_factors``) -- llama.cpp's own ``convert_hf_to_gguf.py`` writes it
  for Llama-3.1's ``llama3`` rope (``conversion/llama.py``).

So every STATIC rotary method has an exact GGUF form: extrapolate / ntk as ``freq_base``, linear as llama.cpp's
linear type, yarn (with llama.cpp's beta 32 / 1 and its own temperature) as llama.cpp's yarn type, and any other
fixed per-frequency rescale (ntk_by_parts, llama3, longrope with short_factor == long_factor, yarn with other betas
or attention factor) as ``rope_freqs`` divisors with ``attn_factor``. Refused, with the reason: dynamic methods
(llama.cpp computes frequencies once per context, not per sequence length), longrope with distinct short/long
factors (llama.cpp picks the set by the context size, transformers by the sequence length), log-n attention and
attention-level methods (llama.cpp's attention has no such term), learned position tables.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import registry
from .methods._rope_base import default_inv_freq, yarn_attention_factor

logger = logging.getLogger(__name__)

LLAMA_CPP_VERSION = "llama.cpp bundled with llama-cpp-python 0.3.36"
"""The llama.cpp whose sources the key semantics above were read from and which the slow tests run."""

GGUF_ARCHITECTURES = ("llama",)
"""GGUF ``general.architecture`` values whose graph reads every key and tensor written here (llama.cpp's llama
graph: Llama 1/2/3, Mistral, SmolLM, TinyLlama ... are all stored as ``llama``)."""

EXPORT_ARCHITECTURES = {"LlamaForCausalLM": "llama"}
"""transformers architectures ``export_gguf`` converts (llama.cpp's converter maps them to a GGUF architecture in
``GGUF_ARCHITECTURES``)."""

OUTTYPES = ("f16", "q8_0", "f32")
ROPE_FREQS = "rope_freqs.weight"
RECORD_PREFIX = "hf_rope_ext."
"""Our own GGUF keys (llama.cpp ignores keys it does not know): method, factor, parameters (JSON)."""

_YARN_LLAMA_CPP = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}
"""yarn as llama.cpp computes it for llama (betas not read from the file, truncated ramp)."""


# ------------------------------------------------------------------------------------------- the metadata plan


@dataclass
class GGUFRope:
    """The rope metadata of one GGUF: key -> value, plus the ``rope_freqs`` divisors when there are any."""

    arch: str
    values: dict[str, Any]
    """Full key names (``llama.rope.scaling.type``) -> value."""
    rope_freqs: np.ndarray | None = None
    """[n_rot / 2] float32 divisors of the frequencies (llama.cpp's ``rope_freqs.weight``), or None."""
    how: str = ""
    """How llama.cpp computes the rotary embedding from these keys, in one line."""
    record: dict[str, Any] = field(default_factory=dict)
    """Our own keys (``hf_rope_ext.*``)."""

    def key(self, name: str) -> str:
        return f"{self.arch}.{name}"


def _supported_methods() -> list[str]:
    return [n for n in registry.method_names("rope") if not registry.METHODS[n].dynamic]


def _refuse(method: str, reason: str) -> ValueError:
    return ValueError(
        f"method '{method}' cannot be written to a GGUF for llama.cpp: {reason}. llama.cpp can express the static "
        f"rotary methods: {', '.join(_supported_methods())} (longrope only with short_factor == long_factor, "
        "logn only False)"
    )


def rope_metadata(
    method: str,
    factor: float,
    *,
    n_rot: int,
    freq_base: float,
    original_context_length: int,
    arch: str = "llama",
    **method_params: Any,
) -> GGUFRope:
    """The llama.cpp rope metadata that makes llama.cpp compute exactly what ``method`` computes in transformers.

    ``n_rot`` is the rotary dimension, ``freq_base`` the model's trained base, ``original_context_length`` the
    length it was trained at. Raises ValueError naming the supported methods for what llama.cpp cannot express."""
    spec = registry.get_method(method)
    if spec.kind != "rope":
        reason = {
            "attention": "it changes attention itself (which relative position each query-key pair sees); a GGUF "
            "carries rotary frequencies only and llama.cpp's attention has no such branches",
            "absolute": "it rewrites a learned position table; the GGUF route here is for rotary (Llama-family) "
            "models",
        }[spec.kind]
        raise _refuse(spec.name, reason)
    if spec.dynamic:
        raise _refuse(
            spec.name,
            "its frequencies are recomputed from the current sequence length; llama.cpp computes them once per "
            "context from fixed metadata",
        )
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)} (the llama.cpp "
            "graph whose rope reading was checked)"
        )
    if n_rot < 2 or n_rot % 2:
        raise ValueError(f"rope dimension count must be an even number >= 2, got {n_rot}")
    L = int(original_context_length)
    params = spec.make_params(factor=factor, original_max_position_embeddings=L, **method_params)
    if getattr(params, "logn", False):
        raise _refuse(spec.name, "logn=True scales queries by log(p)/log(L) inside attention; llama.cpp's llama "
                                 "attention has no such term")
    new_len = int(round(L * params.factor))
    inv_freq, attention = spec.compute(params, n_rot, float(freq_base))  # [n_rot/2] float32
    at_long, attention_long = spec.compute(params, n_rot, float(freq_base), seq_len=new_len)
    same = np.array_equal(inv_freq.cpu().numpy(), at_long.cpu().numpy()) and float(attention) == float(attention_long)
    if not same:
        raise _refuse(
            spec.name,
            f"its frequencies change with the sequence length (up to {L} tokens vs past it, e.g. longrope's "
            "short_factor vs long_factor); llama.cpp picks one set per context size, not per sequence",
        )
    attention = float(attention)
    native = spec.native(params, n_rot, float(freq_base)) if spec.native is not None else {"rope_type": None}
    rope_type = native.get("rope_type")
    values: dict[str, Any] = {
        "context_length": new_len,
        "rope.freq_base": float(freq_base),
        "rope.scaling.original_context_length": L,
    }
    rope_freqs = None
    if rope_type == "default":  # extrapolate; ntk (a larger base)
        values["rope.freq_base"] = float(native.get("rope_theta", freq_base))
        values["rope.scaling.type"] = "none"
        how = f"plain RoPE, base {values['rope.freq_base']:g}"
    elif rope_type == "linear":
        values.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(params.factor)})
        how = f"linear: every frequency / {params.factor:g}"
    elif (
        rope_type == "yarn"
        and all(native.get(k, v) == v for k, v in _YARN_LLAMA_CPP.items())
        and math.isclose(attention, yarn_attention_factor(params.factor), rel_tol=1e-6)
    ):
        values.update(
            {
                "rope.scaling.type": "yarn",
                "rope.scaling.factor": float(params.factor),
                "rope.scaling.attn_factor": 1.0,  # llama.cpp applies 0.1 ln(s) + 1 itself
                # not read for llama by llama.cpp 0.3.36 (fixed 32 / 1); written as llama.cpp's converter does
                "rope.scaling.yarn_beta_fast": float(_YARN_LLAMA_CPP["beta_fast"]),
                "rope.scaling.yarn_beta_slow": float(_YARN_LLAMA_CPP["beta_slow"]),
            }
        )
        how = f"llama.cpp yarn x{params.factor:g} from {L}, attention factor 0.1 ln(s) + 1 = {attention:.6g}"
    else:  # any other fixed per-frequency rescale: divisors in rope_freqs, temperature in attn_factor
        theta = default_inv_freq(n_rot, float(freq_base)).double()  # [n_rot/2]
        rope_freqs = (theta / inv_freq.double().cpu()).numpy().astype(np.float32)  # [n_rot/2]
        if not np.all(np.isfinite(rope_freqs)) or not np.all(rope_freqs > 0):
            raise _refuse(spec.name, "its frequency divisors are not finite and positive")
        values.update({"rope.scaling.type": "none", "rope.scaling.attn_factor": attention})
        how = (f"per-dimension divisors in {ROPE_FREQS} (min {rope_freqs.min():.4g}, max {rope_freqs.max():.4g}), "
               f"attention factor {attention:.6g}")
    stored = {k: v for k, v in vars(params).items() if k not in ("factor", "original_max_position_embeddings")}
    record = {
        "method": spec.name,
        "factor": float(params.factor),
        "parameters": json.dumps(stored, sort_keys=True, default=str),
    }
    return GGUFRope(arch, {f"{arch}.{k}": v for k, v in values.items()}, rope_freqs, how, record)


# ------------------------------------------------------------------------------------------- reading a GGUF


def _field_value(reader: Any, name: str) -> Any:
    fld = reader.fields.get(name)
    return None if fld is None else fld.contents()


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """The rope-relevant facts of a GGUF file: architecture, context length, rope keys, whether it has
    ``rope_freqs`` (with its values) and our record."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field_value(reader, gguf.Keys.General.ARCHITECTURE)
    out: dict[str, Any] = {"arch": arch, "rope": {}, "record": {}, "rope_freqs": None}
    for name in reader.fields:
        if arch and (name.startswith(f"{arch}.rope.") or name == f"{arch}.context_length"):
            out["rope"][name] = _field_value(reader, name)
        elif name.startswith(RECORD_PREFIX):
            out["record"][name[len(RECORD_PREFIX):]] = _field_value(reader, name)
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            out["rope_freqs"] = np.array(tensor.data, dtype=np.float32).reshape(-1)
    return out


def _geometry(reader: Any, path: Path) -> tuple[str, int, int, float]:
    """(arch, context length, rope dimension count, freq base) as llama.cpp reads them (``load_hparams``)."""
    import gguf

    arch = _field_value(reader, gguf.Keys.General.ARCHITECTURE)
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported for rope rewriting; supported: "
            f"{', '.join(GGUF_ARCHITECTURES)} (the llama.cpp graph whose rope reading was checked)"
        )
    ctx = _field_value(reader, gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch))
    if ctx is None:
        raise ValueError(
            f"{path}: the GGUF metadata has no {gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch)!r} (the trained "
            "context length); cannot tell the original length. Fix the file (gguf-py's gguf_set_metadata can add "
            "the key) or re-convert it"
        )
    n_rot = _field_value(reader, gguf.Keys.Rope.DIMENSION_COUNT.format(arch=arch))
    if n_rot is None:  # llama.cpp's default: the head size
        n_embd = _field_value(reader, gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch))
        n_head = _field_value(reader, gguf.Keys.Attention.HEAD_COUNT.format(arch=arch))
        if n_embd is None or not n_head:
            raise ValueError(f"{path}: no rope dimension count and no embedding length / head count to derive it")
        n_rot = int(n_embd) // int(n_head)
    base = _field_value(reader, gguf.Keys.Rope.FREQ_BASE.format(arch=arch))
    return arch, int(ctx), int(n_rot), float(10000.0 if base is None else base)


def _existing_scaling(reader: Any, arch: str) -> str | None:
    """A description of rope scaling already in the file, or None when it is plain RoPE."""
    import gguf

    kind = _field_value(reader, gguf.Keys.Rope.SCALING_TYPE.format(arch=arch))
    factor = _field_value(reader, gguf.Keys.Rope.SCALING_FACTOR.format(arch=arch))
    if factor is None:
        factor = _field_value(reader, f"{arch}.rope.scale_linear")
    found = []
    if kind not in (None, "none", "linear") or factor not in (None, 0.0, 1.0):
        found.append(f"rope scaling {kind or 'linear'}" + (f" x{factor:g}" if factor else ""))
    if any(t.name == ROPE_FREQS for t in reader.tensors):
        found.append(f"a {ROPE_FREQS} tensor")
    if any(name.startswith(RECORD_PREFIX) for name in reader.fields):
        found.append(f"an hf-rope-ext record ({_field_value(reader, RECORD_PREFIX + 'method')})")
    return ", ".join(found) or None


# ------------------------------------------------------------------------------------------- writing a GGUF


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    if out.suffix != ".gguf":
        raise ValueError(f"--out {out} must end in .gguf")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the file being read; give another path")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a .gguf file path")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} exists; give a new path, or --overwrite to replace it")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: folder {out.parent} does not exist")


def _rewrite(reader: Any, out: Path, rope: GGUFRope) -> None:
    """Copy ``reader``'s GGUF to ``out`` with ``rope``'s keys set, every other ``{arch}.rope.scaling.*`` key and any
    old ``rope_freqs`` / hf-rope-ext record dropped; every other key and tensor copied as is (tensor bytes
    untouched). Written to a temporary file next to ``out`` and renamed over it at the end."""
    import gguf

    arch = rope.arch
    record = {RECORD_PREFIX + k: v for k, v in rope.record.items()}
    dropped = (f"{arch}.rope.scaling.", RECORD_PREFIX)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
        alignment = _field_value(reader, gguf.Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = int(alignment)
        for name, fld in reader.fields.items():
            if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE:
                continue  # virtual fields, and the one GGUFWriter writes itself
            if name in rope.values or name in record or name.startswith(dropped):
                continue
            kind = fld.types[0]
            sub = fld.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, fld.contents(), kind, sub_type=sub)
        for name, value in {**rope.values, **record}.items():
            writer.add_key_value(name, value, _value_type(name, value))
        tensors = [t for t in reader.tensors if t.name != ROPE_FREQS]
        for t in tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        if rope.rope_freqs is not None:
            freqs = np.ascontiguousarray(rope.rope_freqs, dtype=np.float32)
            writer.add_tensor_info(ROPE_FREQS, freqs.shape, freqs.dtype, freqs.nbytes, gguf.GGMLQuantizationType.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        if rope.rope_freqs is not None:
            writer.write_tensor_data(freqs, tensor_endianess=reader.endianess)
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _same(a: Any, b: Any) -> bool:
    """Equal as stored: numbers compared at float32 precision (GGUF stores these keys as float32)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    return a == b


def _value_type(name: str, value: Any) -> Any:
    import gguf

    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    if name.endswith(("context_length", "original_context_length")):
        return gguf.GGUFValueType.UINT32  # as llama.cpp's converter writes them
    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    return gguf.GGUFValueType.FLOAT32


def patch_gguf(
    source: str | os.PathLike,
    out: str | os.PathLike,
    method: str,
    factor: float | None = None,
    *,
    max_position_embeddings: int | None = None,
    original_context_length: int | None = None,
    overwrite: bool = False,
    **method_params: Any,
) -> dict[str, Any]:
    """Write ``out``: the GGUF ``source`` with its rope metadata (and ``rope_freqs`` where needed) set for ``method``
    at ``factor`` (or the target length ``max_position_embeddings``); every other key and tensor is copied
    unchanged. Everything is checked before anything is written; ``out`` is replaced only with ``overwrite``.
    Returns what was written."""
    import gguf

    from .patching import _resolve_lengths

    src, dst = Path(source).expanduser(), Path(out).expanduser()
    registry.get_method(method)  # an unknown name first
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {src}")
    _check_out(src, dst, overwrite)
    reader = gguf.GGUFReader(str(src))
    arch, ctx, n_rot, base = _geometry(reader, src)
    existing = _existing_scaling(reader, arch)
    if existing:
        raise ValueError(
            f"{src} already has {existing}; patch the original (unextended) GGUF instead, so the method starts from "
            "the trained frequencies"
        )
    original = int(original_context_length or ctx)
    factor, _ = _resolve_lengths(factor, max_position_embeddings, original)
    rope = rope_metadata(method, factor, n_rot=n_rot, freq_base=base, original_context_length=original, arch=arch,
                         **method_params)
    _rewrite(reader, dst, rope)
    logger.info("wrote %s: %s", dst, rope.how)
    return {"out": str(dst), "arch": arch, "keys": rope.values, "rope_freqs": rope.rope_freqs is not None,
            "how": rope.how, "record": rope.record}


# ------------------------------------------------------------------------------------------- export


def find_converter(llama_cpp: str | os.PathLike | None = None) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` in ``llama_cpp`` (or ``$HF_ROPE_EXT_LLAMA_CPP``): a llama.cpp checkout
    or an unpacked llama-cpp-python sdist (its ``vendor/llama.cpp``)."""
    given = llama_cpp or os.environ.get("HF_ROPE_EXT_LLAMA_CPP")
    how = (
        "get llama.cpp's converter with the version this was checked with:\n"
        "  pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llama-sdist\n"
        "  tar -xzf /tmp/llama-sdist/llama_cpp_python-0.3.36.tar.gz -C ~/\n"
        "then pass --llama-cpp ~/llama_cpp_python-0.3.36 (or set HF_ROPE_EXT_LLAMA_CPP); a llama.cpp git "
        "checkout works too"
    )
    if not given:
        raise FileNotFoundError("export needs llama.cpp's convert_hf_to_gguf.py; " + how)
    root = Path(given).expanduser()
    for candidate in (root, root / "vendor" / "llama.cpp"):
        if (candidate / "convert_hf_to_gguf.py").is_file():
            return candidate / "convert_hf_to_gguf.py"
    if root.name == "convert_hf_to_gguf.py" and root.is_file():
        return root
    raise FileNotFoundError(f"no convert_hf_to_gguf.py in {root} or {root / 'vendor' / 'llama.cpp'}; " + how)


def export_plan(folder: str | os.PathLike) -> tuple[dict[str, Any], GGUFRope | None]:
    """(config.json, the rope metadata to write) for a saved folder, refusing what llama.cpp cannot run -- all
    before anything is converted. The plan is None for a folder without an hf-rope-ext record."""
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; expected a model folder saved by hf-rope-ext")
    config = json.loads((path / "config.json").read_text())
    archs = config.get("architectures") or []
    if not archs or archs[0] not in EXPORT_ARCHITECTURES:
        raise ValueError(
            f"{path}: model family {archs[0] if archs else config.get('model_type')!r} is not supported for GGUF "
            f"export; supported: {', '.join(EXPORT_ARCHITECTURES)} (the llama.cpp graph whose rope reading was "
            "checked)"
        )
    record = config.get("hf_rope_ext")
    if not record:
        return config, None
    spec = registry.get_method(record["method"])
    original_rope = record.get("original_rope_parameters") or {}
    if spec.kind == "rope" and not spec.dynamic and original_rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"{path}: the model had rope scaling {original_rope.get('rope_type')!r} before hf-rope-ext extended it; "
            "export supports extensions of plain-RoPE models only"
        )
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    n_rot = int(head_dim * float(original_rope.get("partial_rotary_factor", 1.0)))
    rope = rope_metadata(
        record["method"],
        record["factor"],
        n_rot=n_rot,
        freq_base=float(original_rope.get("rope_theta", 10000.0)),
        original_context_length=int(record["original_max_position_embeddings"]),
        arch=EXPORT_ARCHITECTURES[archs[0]],
        **record.get("parameters", {}),
    )
    return config, rope


def export_gguf(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    outtype: str = "f16",
    overwrite: bool = False,
    llama_cpp: str | os.PathLike | None = None,
    python: str | None = None,
) -> dict[str, Any]:
    """Convert a saved (Llama-family) folder to GGUF with llama.cpp's own ``convert_hf_to_gguf.py`` (tokenizer,
    tensor layout and quantisation as llama.cpp defines them), then set the rope metadata as :func:`patch_gguf`
    does: the converter maps transformers' rope types by name only (it writes yarn's attention factor to
    ``yarn_attn_factor``, which llama.cpp does not read for llama, and has no GGUF form for longrope or NTK-by-parts
    on llama), so its rope keys are replaced where they differ. Returns what the converter wrote and what was kept."""
    import gguf

    if outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}; choose one of: {', '.join(OUTTYPES)}")
    src, dst = Path(folder).expanduser(), Path(out).expanduser()
    _config, rope = export_plan(src)
    _check_out(src, dst, overwrite)
    converter = find_converter(llama_cpp)
    with tempfile.TemporaryDirectory(prefix=".hf_rope_ext_export.", dir=dst.parent) as tmp:
        raw = Path(tmp) / "converted.gguf"
        proc = subprocess.run(
            [python or sys.executable, str(converter), str(src), "--outfile", str(raw), "--outtype", outtype],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not raw.is_file():
            raise RuntimeError(f"llama.cpp's converter failed ({converter}):\n{proc.stderr[-3000:]}")
        converted = describe(raw)
        result: dict[str, Any] = {"out": str(dst), "converter": str(converter), "outtype": outtype,
                                  "converter_rope": converted["rope"],
                                  "converter_rope_freqs": converted["rope_freqs"] is not None}
        if rope is None:
            shutil.move(str(raw), dst)
            result.update(keys=converted["rope"], how="as converted (no hf-rope-ext extension recorded)")
            return result
        if converted["arch"] != rope.arch:
            raise ValueError(f"the converter wrote GGUF architecture {converted['arch']!r}, expected {rope.arch!r}")
        reader = gguf.GGUFReader(str(raw))
        _rewrite(reader, dst, rope)
        del reader
    before = converted["rope"]
    changed = {k: (before.get(k), v) for k, v in rope.values.items() if not _same(before.get(k), v)}
    dropped = sorted(k for k in before if k.startswith(rope.key("rope.scaling.")) and k not in rope.values)
    result.update(keys=rope.values, rope_freqs=rope.rope_freqs is not None, how=rope.how, changed=changed,
                  dropped=dropped)
    return result
