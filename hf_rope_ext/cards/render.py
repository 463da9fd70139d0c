"""Model cards for extended checkpoints: ``README.md`` with Hub metadata, what was done, how to load it, results.

Everything the card states about the extension is read from the saved folder's ``config.json`` (its ``hf_rope_ext``
entry, written by ``patch_model``), never from a live model, so the card describes exactly what will be uploaded.
Evaluation results and training summaries are read from JSON files whose accepted shapes are documented in
``docs/cards.md`` (and in :func:`load_results`). The body comes from a ``model_cards/`` template filled with
``string.Template``; the front matter is built with huggingface_hub's own ``ModelCardData``/``EvalResult`` so it is
valid Hub metadata by construction.

    from hf_rope_ext.cards import write_card
    write_card("out/smollm2-yarn-16k", results=["ppl.json", "passkey.json"], training="train_summary.json",
               base_model="HuggingFaceTB/SmolLM2-135M-Instruct", repo_id="me/smollm2-yarn-16k")
"""

from __future__ import annotations

import ast
import dataclasses
import filecmp
import inspect
import json
import logging
import math
import re
import shutil
import string
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

META_KEY = "hf_rope_ext"
CARD_FILE = "README.md"
PLOTS_DIR = "plots"
MARKER_PREFIX = "<!-- hf-rope-ext card:"
"""First line of a card's body; carries the fingerprint of the config it was rendered from (checked by push)."""

TEMPLATE_DIRS: tuple[Path, ...] = (Path(__file__).resolve().parent / "templates",)  # shipped inside the package
TEMPLATE_NAMES: tuple[str, ...] = ("causal_lm", "encoder")
PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".gif", ".webp")

Task = Literal["perplexity", "passkey", "needle", "training"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# --------------------------------------------------------------------------------------------------------------------
# papers and citations (keyed by the ``paper`` link a method registers)

@dataclass(frozen=True)
class Paper:
    title: str
    bibtex: str


PAPERS: dict[str, Paper] = {
    "https://arxiv.org/abs/2309.00071": Paper(
        "YaRN: Efficient Context Window Extension of Large Language Models (Peng et al., 2023)",
        """@article{peng2023yarn,
  title   = {YaRN: Efficient Context Window Extension of Large Language Models},
  author  = {Peng, Bowen and Quesnelle, Jeffrey and Fan, Honglu and Shippole, Enrico},
  journal = {arXiv preprint arXiv:2309.00071},
  year    = {2023}
}""",
    ),
    "https://arxiv.org/abs/2306.15595": Paper(
        "Extending Context Window of Large Language Models via Positional Interpolation (Chen et al., 2023)",
        """@article{chen2023extending,
  title   = {Extending Context Window of Large Language Models via Positional Interpolation},
  author  = {Chen, Shouyuan and Wong, Sherman and Chen, Liangjian and Tian, Yuandong},
  journal = {arXiv preprint arXiv:2306.15595},
  year    = {2023}
}""",
    ),
    "https://arxiv.org/abs/2104.09864": Paper(
        "RoFormer: Enhanced Transformer with Rotary Position Embedding (Su et al., 2021)",
        """@article{su2021roformer,
  title   = {RoFormer: Enhanced Transformer with Rotary Position Embedding},
  author  = {Su, Jianlin and Lu, Yu and Pan, Shengfeng and Murtadha, Ahmed and Wen, Bo and Liu, Yunfeng},
  journal = {arXiv preprint arXiv:2104.09864},
  year    = {2021}
}""",
    ),
    "https://arxiv.org/abs/2407.21783": Paper(
        "The Llama 3 Herd of Models (Llama Team, AI @ Meta, 2024)",
        """@article{llama3herd2024,
  title   = {The Llama 3 Herd of Models},
  author  = {{Llama Team, AI @ Meta}},
  journal = {arXiv preprint arXiv:2407.21783},
  year    = {2024}
}""",
    ),
    "https://arxiv.org/abs/2402.13753": Paper(
        "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens (Ding et al., 2024)",
        """@article{ding2024longrope,
  title   = {LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens},
  author  = {Ding, Yiran and Zhang, Li Lyna and Zhang, Chengruidong and Xu, Yuanyuan and Shang, Ning and
             Xu, Jiahang and Yang, Fan and Yang, Mao},
  journal = {arXiv preprint arXiv:2402.13753},
  year    = {2024}
}""",
    ),
    "https://arxiv.org/abs/2004.05150": Paper(
        "Longformer: The Long-Document Transformer (Beltagy et al., 2020)",
        """@article{beltagy2020longformer,
  title   = {Longformer: The Long-Document Transformer},
  author  = {Beltagy, Iz and Peters, Matthew E. and Cohan, Arman},
  journal = {arXiv preprint arXiv:2004.05150},
  year    = {2020}
}""",
    ),
    "https://arxiv.org/abs/1706.03762": Paper(
        "Attention Is All You Need (Vaswani et al., 2017)",
        """@inproceedings{vaswani2017attention,
  title     = {Attention Is All You Need},
  author    = {Vaswani, Ashish and Shazeer, Noam and Parmar, Niki and Uszkoreit, Jakob and Jones, Llion and
               Gomez, Aidan N. and Kaiser, Lukasz and Polosukhin, Illia},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2017}
}""",
    ),
    "https://kexue.fm/archives/7947": Paper(
        "Hierarchical decomposition of position embeddings for long inputs to BERT (Su Jianlin, kexue.fm, 2020)",
        """@misc{su2020hierarchical,
  title        = {{层次分解位置编码，让BERT可以处理超长文本 (hierarchically decomposed position encoding)}},
  author       = {Su, Jianlin},
  year         = {2020},
  howpublished = {\\url{https://kexue.fm/archives/7947}}
}""",
    ),
    "https://www.reddit.com/r/LocalLLaMA/comments/14lz7j5/": Paper(
        "NTK-Aware Scaled RoPE (bloc97, r/LocalLLaMA, 2023)",
        """@misc{bloc97ntk2023,
  title        = {{NTK-Aware Scaled RoPE allows LLaMA models to have extended (8k+) context size without any
                  fine-tuning and minimal perplexity degradation}},
  author       = {bloc97},
  year         = {2023},
  howpublished = {\\url{https://www.reddit.com/r/LocalLLaMA/comments/14lz7j5/}}
}""",
    ),
    "https://www.reddit.com/r/LocalLLaMA/comments/14mrgpr/": Paper(
        "Dynamically Scaled RoPE (emozilla, r/LocalLLaMA, 2023)",
        """@misc{emozilla2023dynamic,
  title        = {{Dynamically Scaled RoPE further increases performance of long context LLaMA with zero fine-tuning}},
  author       = {emozilla},
  year         = {2023},
  howpublished = {\\url{https://www.reddit.com/r/LocalLLaMA/comments/14mrgpr/}}
}""",
    ),
}

ENGINE_SUPPORT: dict[str, str] = {
    "default": "only `rope_theta` changed, so every engine that reads `rope_theta` from config.json (transformers, "
    "vLLM, SGLang, TGI, llama.cpp's GGUF conversion) runs it as saved",
    "linear": "`rope_type: linear` is implemented by transformers, vLLM, SGLang, TGI and llama.cpp (GGUF conversion)",
    "dynamic": "`rope_type: dynamic` (dynamic NTK) is implemented by transformers, vLLM and TGI; llama.cpp has no "
    "dynamic scaling",
    "yarn": "`rope_type: yarn` is implemented by transformers, vLLM, SGLang, TGI and llama.cpp (GGUF conversion); "
    "the serving engines apply it at every length, as transformers does",
    "llama3": "`rope_type: llama3` is implemented by transformers, vLLM, SGLang, TGI and llama.cpp (GGUF conversion)",
    "longrope": "`rope_type: longrope` is implemented by transformers and by engines that support Phi-3's LongRoPE "
    "(vLLM, TGI); llama.cpp reads LongRoPE factors for Phi-3 models only",
}
"""rope_type written to config.json -> which serving engines understand it (as of 2025; check the version you run)."""


# --------------------------------------------------------------------------------------------------------------------
# results files

@dataclass
class ScoreRow:
    """One measurement: perplexity, or retrieval accuracy (passkey / needle), at one context length."""

    task: Literal["perplexity", "passkey", "needle"]
    length: int
    """Context length in tokens."""
    value: float
    """Perplexity, or accuracy as a fraction in [0, 1]."""
    method: str | None = None
    """Label of the model or method measured ("yarn", "base", ...); None = this model."""
    depth: float | None = None
    """Needle / passkey position as a fraction of the context (0 = start, 1 = end)."""
    trials: int | None = None
    """Samples behind an accuracy."""
    dataset: str | None = None
    """Text or task the measurement used."""


@dataclass
class Plot:
    path: Path
    """The image file (source location)."""
    title: str
    task: str | None = None
    """Section the plot belongs to (perplexity, passkey, needle, training) or None."""


@dataclass
class Results:
    """Everything read from results files, ready for the card."""

    rows: list[ScoreRow] = field(default_factory=list)
    training: dict[str, Any] | None = None
    """Normalised training summary (see ``TRAINING_KEYS``)."""
    plots: list[Plot] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def of(self, task: str) -> list[ScoreRow]:
        return [r for r in self.rows if r.task == task]


_LENGTH_KEYS = ("length", "window", "seq_len", "context_length", "sequence_length", "prompt_length", "context")
_PPL_KEYS = ("perplexity", "ppl")
_ACC_KEYS = ("accuracy", "acc", "success_rate", "score")
_DEPTH_KEYS = ("depth", "depth_fraction", "depth_percent", "needle_depth", "position")
_METHOD_KEYS = ("method", "label", "variant")
_TRIAL_KEYS = ("trials", "trials_per_cell", "n_trials", "num_samples", "samples", "n")
UNPATCHED_LABEL = "unpatched"
"""Label of rows measured on the model without any extension (``"patch": null``, or hf_rope_ext.eval's "none")."""
_TASK_ALIASES = {
    "perplexity": "perplexity", "ppl": "perplexity",
    "passkey": "passkey", "pass_key": "passkey", "passkey_retrieval": "passkey",
    "needle": "needle", "niah": "needle", "needle_in_a_haystack": "needle", "needle-in-a-haystack": "needle",
    "training": "training", "train": "training", "finetune": "training", "fine-tune": "training",
    "fine_tune": "training", "fine-tuning": "training", "finetuning": "training", "training_summary": "training",
}
TRAINING_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("data", "dataset", "datasets", "train_data", "training_data"),
    "train_mode": ("train_mode", "training_mode"),
    "steps": ("steps", "max_steps", "global_step", "num_steps", "train_steps", "total_steps"),
    "epochs": ("epochs", "num_epochs", "num_train_epochs"),
    "tokens": ("tokens", "train_tokens", "total_tokens", "tokens_seen", "num_tokens"),
    "seq_len": ("seq_len", "sequence_length", "train_length", "max_length", "context_length", "block_size"),
    "batch_size": ("batch_size", "global_batch_size", "effective_batch_size", "total_batch_size"),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", "grad_accum"),
    "learning_rate": ("learning_rate", "lr"),
    "warmup_steps": ("warmup_steps",),
    "optimizer": ("optimizer", "optim"),
    "scheduler": ("scheduler", "lr_scheduler", "lr_scheduler_type"),
    "precision": ("precision", "mixed_precision", "dtype"),
    "lora": ("lora", "lora_config", "peft", "peft_config"),
    "hardware": ("hardware", "device", "devices", "gpu", "gpus", "accelerator"),
    "wall_time_s": ("wall_time_s", "wall_time", "train_runtime", "runtime_s", "time_s", "duration_s", "elapsed_s"),
    "tokens_per_s": ("tokens_per_s", "tokens_per_second", "throughput_tokens_per_s", "train_tokens_per_second"),
    "peak_memory_gb": ("peak_memory_gb", "peak_mem_gb", "peak_memory_gib", "max_memory_gb"),
    "peak_memory_bytes": ("peak_memory_bytes", "peak_mem_bytes", "max_memory_allocated"),
    "peak_memory_mb": ("peak_memory_mb", "peak_mem_mb"),
    "peak_memory_kind": ("peak_memory_kind",),
    "final_loss": ("final_loss", "train_loss", "loss_last", "loss"),
    "loss_curve": ("loss_curve", "losses", "loss_history", "log_history"),
    "seed": ("seed",),
    "method": ("method",),
    "factor": ("factor",),
    "recipe": ("recipe", "config", "recipe_config"),
}
"""Canonical training-summary field -> the JSON keys accepted for it (first match wins)."""
_TRAINING_MARKERS = {k for k in TRAINING_KEYS if k not in ("method", "factor", "seed", "data", "recipe")}


def _first(d: Mapping[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        if key in d and d[key] is not None:
            return d[key]
    return None


def _number(value: Any, what: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{source}: {what} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{source}: {what} must be a number, got {value!r}") from None
    if not math.isfinite(number) and what != "perplexity":
        raise ValueError(f"{source}: {what} must be finite, got {value!r}")
    return number


def _fraction(value: Any, what: str, source: str) -> float:
    """Accuracy / depth as a fraction: values above 1 are read as percentages."""
    number = _number(value, what, source)
    if number > 1:
        number /= 100
    if not 0 <= number <= 1:
        raise ValueError(f"{source}: {what} must be a fraction in [0, 1] or a percentage, got {value!r}")
    return number


def _canonical_task(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return _TASK_ALIASES.get(value.strip().lower())


def _section_task(section: Mapping[str, Any]) -> str | None:
    for key in ("task", "kind", "type", "eval", "benchmark"):
        task = _canonical_task(section.get(key))
        if task:
            return task
    return None


def _guess_task(row: Mapping[str, Any], hint: str | None) -> str | None:
    if _first(row, _PPL_KEYS) is not None:
        return "perplexity"
    if _first(row, _ACC_KEYS) is not None or ("correct" in row and "total" in row):
        if hint in ("passkey", "needle"):
            return hint
        return "needle" if _first(row, _DEPTH_KEYS) is not None else "passkey"
    return None


def _row(
    raw: Mapping[str, Any], task: str | None, defaults: Mapping[str, Any], source: str, hint: str | None = None
) -> ScoreRow:
    """One ScoreRow; ``task`` is authoritative when given, ``hint`` (from a file name) only tells passkey from
    needle for accuracy rows."""
    merged = {**defaults, **raw}
    task = _canonical_task(merged.get("task")) or task or _guess_task(merged, hint)
    if task not in ("perplexity", "passkey", "needle"):
        raise ValueError(f"{source}: cannot tell what {dict(raw)!r} measures; give perplexity= or accuracy=")
    length = _first(merged, _LENGTH_KEYS)
    if length is None:
        raise ValueError(f"{source}: result {dict(raw)!r} has no length (accepted keys: {', '.join(_LENGTH_KEYS)})")
    length_f = _number(length, "length", source)
    if length_f != int(length_f) or length_f < 1:
        raise ValueError(f"{source}: length must be a positive integer, got {length!r}")
    if task == "perplexity":
        value = _first(merged, _PPL_KEYS)
        if value is None:
            raise ValueError(f"{source}: perplexity result {dict(raw)!r} has no perplexity")
        number = _number(value, "perplexity", source)
    else:
        value = _first(merged, _ACC_KEYS)
        if value is None and "correct" in merged and "total" in merged:
            total = _number(merged["total"], "total", source)
            value = _number(merged["correct"], "correct", source) / total if total else 0.0
            merged.setdefault("trials", int(total))
        if value is None:
            raise ValueError(f"{source}: {task} result {dict(raw)!r} has no accuracy (keys: {', '.join(_ACC_KEYS)})")
        number = _fraction(value, "accuracy", source)
    depth = _first(merged, _DEPTH_KEYS)
    trials = _first(merged, _TRIAL_KEYS)
    method = _first(merged, _METHOD_KEYS)
    dataset = merged.get("dataset")
    if isinstance(dataset, Mapping):
        dataset = dataset.get("name") or dataset.get("path")
    return ScoreRow(
        task=task,
        length=int(length_f),
        value=number,
        method=_label(method),
        depth=_fraction(depth, "depth", source) if depth is not None else None,
        trials=int(_number(trials, "trials", source)) if trials is not None else None,
        dataset=str(dataset) if dataset is not None else None,
    )


def _is_columnar(section: Mapping[str, Any]) -> bool:
    lengths = _first(section, ("lengths", "length", "seq_lens", "context_lengths"))
    return isinstance(lengths, list) and bool(lengths) and not isinstance(lengths[0], Mapping)


def _columnar_rows(
    section: Mapping[str, Any], task: str | None, defaults: dict, source: str, hint: str | None = None
) -> list[ScoreRow]:
    """Columns: {"lengths": [...], "perplexities": [...]}, or a needle grid
    {"lengths": [...], "depths": [...], "accuracy": [[per length] per depth]}."""
    lengths = _first(section, ("lengths", "length", "seq_lens", "context_lengths"))
    ppl = _first(section, ("perplexities", *_PPL_KEYS))
    acc = _first(section, ("accuracies", *_ACC_KEYS))
    depths = _first(section, ("depths", "depth", "depth_fractions"))
    rows = []
    if ppl is not None:
        if not isinstance(ppl, list) or len(ppl) != len(lengths):
            raise ValueError(f"{source}: 'lengths' and perplexities must be lists of the same size")
        for length, value in zip(lengths, ppl, strict=True):
            rows.append(_row({"length": length, "perplexity": value}, "perplexity", defaults, source))
        return rows
    if acc is None:
        raise ValueError(f"{source}: columnar results need perplexities or accuracies next to 'lengths'")
    if task not in ("passkey", "needle"):
        task = hint if hint in ("passkey", "needle") else ("needle" if depths is not None else "passkey")
    if acc and isinstance(acc[0], list):  # grid [depth][length]
        if not isinstance(depths, list) or len(depths) != len(acc) or any(len(r) != len(lengths) for r in acc):
            raise ValueError(f"{source}: an accuracy grid needs 'depths' (one per row) and one column per length")
        for depth, row in zip(depths, acc, strict=True):
            for length, value in zip(lengths, row, strict=True):
                rows.append(_row({"length": length, "accuracy": value, "depth": depth}, task, defaults, source))
        return rows
    if not isinstance(acc, list) or len(acc) != len(lengths):
        raise ValueError(f"{source}: 'lengths' and accuracies must be lists of the same size")
    for length, value in zip(lengths, acc, strict=True):
        rows.append(_row({"length": length, "accuracy": value}, task, defaults, source))
    return rows


def _label(method: Any) -> str | None:
    if method is None:
        return None
    return UNPATCHED_LABEL if str(method).strip().lower() in ("none", "unpatched") else str(method)


def _section_defaults(section: Mapping[str, Any], inherited: Mapping[str, Any] = ()) -> dict[str, Any]:
    """Section-level method / dataset / trials, applied to rows that do not set their own.

    hf_rope_ext.eval reports name the model evaluated by ``"patch"`` (its ``patch_info``, null when unpatched) and
    the text by ``"text"``; both are understood. A label given by the enclosing structure (a compare run, a
    ``{label: rows}`` mapping) wins over ``"patch"``."""
    defaults = {}
    for key in (*_METHOD_KEYS, *_TRIAL_KEYS):
        if key in section and isinstance(section[key], (str, int, float)) and not isinstance(section[key], bool):
            defaults[key] = section[key]
    if not any(k in defaults or k in inherited for k in _METHOD_KEYS) and "patch" in section:
        patch = section["patch"]
        defaults["method"] = patch.get("method") if isinstance(patch, Mapping) else UNPATCHED_LABEL
    for key in ("dataset", "text"):
        if isinstance(section.get(key), (str, Mapping)):
            defaults["dataset"] = section[key]
            break
    return defaults


def _plots_named(section: Mapping[str, Any], base: Path, task: str | None) -> list[Plot]:
    plots = []
    raw = section.get("plots", section.get("plot"))
    if raw is None:
        return plots
    if isinstance(raw, list):
        items = raw
    elif isinstance(raw, Mapping) and not ("path" in raw or "file" in raw):  # {"title": "path", ...}
        items = list(raw.items())
    else:
        items = [raw]
    for item in items:
        title = None
        if isinstance(item, tuple):  # {"title": "path"} mapping
            title, item = item
        if isinstance(item, Mapping):
            title = item.get("title") or item.get("caption")
            item = item.get("path") or item.get("file")
        if not isinstance(item, str):
            raise ValueError(f"plots must be paths (strings), got {item!r}")
        path = Path(item).expanduser()
        path = path if path.is_absolute() else base / path
        plots.append(Plot(path, str(title) if title else _title_from_name(path), task))
    return plots


def _title_from_name(path: Path) -> str:
    return re.sub(r"[_\-]+", " ", path.stem).strip().capitalize() or path.name


def _normalise_training(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical training fields; keys missing at the top level are looked up in a nested ``options`` object, and
    flat ``lora_r`` / ``lora_alpha`` / ``lora_dropout`` / ``lora_target_modules`` become a ``lora`` object."""
    options = raw.get("options") if isinstance(raw.get("options"), Mapping) else {}
    merged = {**options, **raw}
    summary = {}
    for canonical, keys in TRAINING_KEYS.items():
        value = _first(merged, keys)
        if value is not None:
            summary[canonical] = value
    if "lora" not in summary and merged.get("train_mode", "lora") != "full":
        flat = {k: merged[f"lora_{k}"] for k in ("r", "alpha", "dropout", "target_modules") if f"lora_{k}" in merged}
        if "r" in flat or "rank" in merged:
            summary["lora"] = flat
    return summary


def _looks_like_training(section: Mapping[str, Any]) -> bool:
    return any(_first(section, TRAINING_KEYS[k]) is not None for k in _TRAINING_MARKERS) and not any(
        k in section for k in ("results", "rows", *_PPL_KEYS, *_ACC_KEYS, "perplexities", "accuracies")
    )


def _read_section(
    section: Any,
    task: str | None,
    base: Path,
    source: str,
    results: Results,
    defaults: Mapping[str, Any] = (),
    hint: str | None = None,
) -> None:
    """Add one section (list of rows, dict with rows / columns / a training summary) to ``results``."""
    defaults = dict(defaults)
    if isinstance(section, list):
        for item in section:
            if not isinstance(item, Mapping):
                raise ValueError(f"{source}: expected a list of result objects, got an item {item!r}")
            results.rows.append(_row(item, task, defaults, source, hint))
        return
    if not isinstance(section, Mapping):
        raise ValueError(f"{source}: expected a JSON object or list, got {type(section).__name__}")
    task = _section_task(section) or task
    if task is None and section.get("kind") == "compare" and isinstance(section.get("runs"), list):
        _read_compare(section, base, source, results, hint)
        return
    if task == "training" or (task is None and _looks_like_training(section)):
        summary = _normalise_training(section)
        if not summary:
            raise ValueError(f"{source}: the training summary has none of the known keys ({', '.join(TRAINING_KEYS)})")
        results.training = {**(results.training or {}), **summary}
        results.plots.extend(_plots_named(section, base, "training"))
        return
    defaults.update(_section_defaults(section, defaults))
    results.plots.extend(_plots_named(section, base, task))
    body = next(
        (section[k] for k in ("results", "rows", "measurements") if isinstance(section.get(k), (list, Mapping))), None
    )
    if body is None:
        if _is_columnar(section):
            results.rows.extend(_columnar_rows(section, task, defaults, source, hint))
            return
        if _first(section, _LENGTH_KEYS) is not None:  # a single row
            results.rows.append(_row(section, task, defaults, source, hint))
            return
        raise ValueError(
            f"{source}: no results found; expected a list of rows, {{\"results\": [...]}}, columns "
            "{\"lengths\": [...], \"perplexities\": [...]}, or a training summary (see docs/cards.md)"
        )
    if isinstance(body, Mapping) and body and all(_is_int_like(k) for k in body):  # {"2048": 5.1, ...}
        key = "perplexity" if task == "perplexity" else "accuracy"
        if task is None:
            raise ValueError(f"{source}: results keyed by length need \"task\": perplexity, passkey or needle")
        for length, value in body.items():
            results.rows.append(_row({"length": length, key: value}, task, defaults, source))
    elif isinstance(body, Mapping):  # {"yarn": rows, "base": rows}
        for label, rows in body.items():
            _read_section(rows, task, base, source, results, {**defaults, "method": label}, hint)
    else:
        _read_section(body, task, base, source, results, defaults, hint)


def _read_compare(report: Mapping[str, Any], base: Path, source: str, results: Results, hint: str | None) -> None:
    """hf_rope_ext.eval's compare report: {"kind": "compare", "text": ..., "runs": [{"method": ..., "perplexity":
    report, "passkey": report}, ...]}; runs that failed (``error``) have no numbers."""
    text = _section_defaults({k: v for k, v in report.items() if k in ("dataset", "text")})  # perplexity's text
    for run in report["runs"]:
        if not isinstance(run, Mapping):
            continue
        for key in ("perplexity", "passkey", "needle"):
            if isinstance(run.get(key), (list, Mapping)):
                run_defaults = {**(text if key == "perplexity" else {}), "method": run.get("method")}
                _read_section(run[key], key, base, source, results, run_defaults, hint)


def _is_bundle(data: Any) -> bool:
    """{"perplexity": section, "passkey": section, ...}: task names as keys, sections (lists / objects) as values."""
    if not isinstance(data, Mapping) or _section_task(data) or _looks_like_training(data) or _is_columnar(data):
        return False
    if any(k in data for k in ("results", "rows", *_LENGTH_KEYS)):
        return False
    return any(_canonical_task(k) and isinstance(v, (list, Mapping)) for k, v in data.items())


def _is_int_like(key: Any) -> bool:
    return isinstance(key, str) and key.strip().isdigit()


def load_results(items: Sequence[str | Path | Mapping[str, Any] | list], results: Results | None = None) -> Results:
    """Read evaluation results and training summaries (JSON files, or already-parsed JSON values).

    Accepted shapes (unknown keys are ignored; details in docs/cards.md):

    - a list of rows ``[{"length": 8192, "perplexity": 7.1, "method": "yarn"}, ...]``; a row with ``accuracy``
      (fraction, or percent if > 1) is a passkey row, or a needle row when it has ``depth``;
    - ``{"task": "perplexity"|"passkey"|"needle", "results": rows | {label: rows} | {"8192": value}, "dataset": ...,
      "method": ..., "plots": [...]}``;
    - columns ``{"lengths": [...], "perplexities": [...]}`` or ``{"lengths": [...], "depths": [...],
      "accuracy": [[per depth, per length]]}``;
    - a training summary ``{"steps": ..., "tokens": ..., "lora": {...}, ...}`` (keys in ``TRAINING_KEYS``);
    - a bundle ``{"perplexity": section, "passkey": section, "needle": section, "training": section}``.
    """
    results = results or Results()
    for item in items:
        if isinstance(item, (str, Path)):
            path = Path(item).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"results file not found: {path}")
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from None
            source, base = str(path), path.parent
            stem = path.stem.lower()  # only tells passkey from needle for accuracy rows; never forces a task
            hint = "needle" if "needle" in stem or "niah" in stem else "passkey" if "passkey" in stem else None
        else:
            data, source, base, hint = item, "results", Path.cwd(), None
        results.sources.append(source)
        if _is_bundle(data):
            for key, section in data.items():
                task = _canonical_task(key)
                if task is not None:
                    _read_section(section, task, base, source, results)
                elif key in ("plots", "plot"):
                    results.plots.extend(_plots_named(data, base, None))
        else:
            _read_section(data, None, base, source, results, hint=hint)
    return results


# --------------------------------------------------------------------------------------------------------------------
# the saved folder

@dataclass
class SavedModel:
    """What the card needs from a saved folder, read from its files (no weights loaded)."""

    folder: Path
    config: dict[str, Any]
    meta: dict[str, Any]
    """The ``hf_rope_ext`` entry of config.json."""
    tokenizer_config: dict[str, Any]
    existing_card: str | None
    """README.md text if present and not written by this module (e.g. the base model's card)."""
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
        config = json.loads(config_path.read_text(encoding="utf-8"))
        meta = config.get(META_KEY)
        if not isinstance(meta, dict) or "method" not in meta:
            raise ValueError(
                f"{config_path} has no '{META_KEY}' entry: the folder was not saved from a model patched by "
                "hf_rope_ext (patch_model + save_pretrained, or `hf-rope-ext patch`)"
            )
        for key in ("original_max_position_embeddings", "max_position_embeddings"):
            if not isinstance(meta.get(key), int):
                raise ValueError(f"{config_path}: '{META_KEY}.{key}' must be an integer, got {meta.get(key)!r}")
        tok_path = folder / "tokenizer_config.json"
        tokenizer_config = json.loads(tok_path.read_text(encoding="utf-8")) if tok_path.is_file() else {}
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
        f"method={meta.get('method')} factor={_fmt_factor(meta.get('factor'))} "
        f"original={meta.get('original_max_position_embeddings')} extended={meta.get('max_position_embeddings')} "
        f"parameters={params}"
    )


def card_marker(meta: Mapping[str, Any]) -> str:
    return f"{MARKER_PREFIX} {fingerprint(meta)} -->"


def read_marker(card_text: str) -> str | None:
    """The fingerprint a card was rendered for, or None when the card was not written by hf-rope-ext."""
    for line in card_text.splitlines():
        if line.startswith(MARKER_PREFIX):
            return line[len(MARKER_PREFIX):].removesuffix("-->").strip()
    return None


# --------------------------------------------------------------------------------------------------------------------
# formatting helpers

def _fmt_factor(factor: Any) -> str:
    if not isinstance(factor, (int, float)) or isinstance(factor, bool):
        return str(factor)
    return f"{factor:g}"


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}" if abs(value) < 1e6 else f"{value:.6g}"
    if isinstance(value, (list, dict)):
        text = json.dumps(value)
        return text if len(text) <= 120 else text[:117] + "..."
    return str(value)


def _fmt_ppl(value: float) -> str:
    if not math.isfinite(value):
        return "inf" if value > 0 else "nan"
    return f"{value:.2f}" if value < 1000 else f"{value:,.0f}"


def _fmt_acc(value: float, trials: int | None = None) -> str:
    text = f"{100 * value:.0f}%"
    if trials:
        text += f" ({round(value * trials)}/{trials})"
    return text


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _fmt_count(n: float) -> str:
    n = float(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{int(n):,} (≈{n / size:.3g}{unit})"
    return f"{int(n):,}" if n == int(n) else f"{n:g}"


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} bytes"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass and its bases (the string literal under each field), best effort."""
    docs: dict[str, str] = {}
    for klass in reversed(getattr(cls, "__mro__", ())):
        if klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _method_spec(name: str) -> Any:
    from .. import registry

    return registry.METHODS.get(name)


# --------------------------------------------------------------------------------------------------------------------
# sections

def _task_and_pipeline(saved: SavedModel) -> tuple[str, str, str]:
    """(template name, pipeline tag, Auto class) from the saved architectures."""
    archs = saved.architectures
    suffixes = [
        (("ForCausalLM", "LMHeadModel"), "text-generation", "AutoModelForCausalLM"),
        (("ForMaskedLM",), "fill-mask", "AutoModelForMaskedLM"),
        (("ForSequenceClassification",), "text-classification", "AutoModelForSequenceClassification"),
        (("ForTokenClassification",), "token-classification", "AutoModelForTokenClassification"),
        (("ForQuestionAnswering",), "question-answering", "AutoModelForQuestionAnswering"),
    ]
    for ends, tag, auto in suffixes:
        if any(a.endswith(ends) for a in archs):
            return ("causal_lm" if tag == "text-generation" else "encoder"), tag, auto
    if (saved.folder / "modules.json").is_file() or (saved.folder / "sentence_bert_config.json").is_file():
        return "encoder", "sentence-similarity", "AutoModel"
    return "encoder", "feature-extraction", "AutoModel"


def _extension_table(saved: SavedModel, base_model: str | None, spec: Any) -> str:
    meta = saved.meta
    method = meta["method"]
    paper = meta.get("paper") or getattr(spec, "paper", "")
    rows = []
    if base_model:
        link = f"[{base_model}](https://huggingface.co/{base_model})" if _HUB_ID.match(base_model) else base_model
        rows.append(("base model", link))
    method_text = f"`{method}`" + (f" — {spec.description}" if spec is not None else "")
    rows.append(("method", method_text))
    if paper:
        rows.append(("paper", f"[{PAPERS[paper].title if paper in PAPERS else paper}]({paper})"))
    rows.append(("original context", f"{meta['original_max_position_embeddings']} tokens"))
    rows.append(("extended context", f"{meta['max_position_embeddings']} tokens"))
    rows.append(("factor", f"{_fmt_factor(meta.get('factor'))}×"))
    kind = meta.get("kind", "rope")
    rows.append((
        "position encoding",
        {
            "rope": "rotary (RoPE)",
            "absolute": "learned position table",
            "attention": "rotary (RoPE), original frequencies; relative positions changed in attention",
        }.get(kind, kind),
    ))
    if meta.get("attention"):
        rows.append(("attention implementation", f"`{meta['attention']['implementation']}` (hf_rope_ext)"
                     + (", with log-n query scaling" if (meta.get("parameters") or {}).get("logn") else "")))
    written = meta.get("rope_parameters_written")
    if written:
        text = ", ".join(
            f"`{t}`" if k in ("None", None) else f"{k}: `{t}`" for k, t in written.items()
        )
        rows.append(("rope_type in config.json", text))
    if meta.get("layer_types"):
        rows.append(("layer types rescaled", ", ".join(map(str, meta["layer_types"]))))
    rows.append(("frequencies depend on input length", "yes (dynamic)" if meta.get("dynamic") else "no (static)"))
    rows.append((
        "loads in stock transformers",
        "no — `import hf_rope_ext` first" if meta.get("requires_plugin") else "yes (native config)",
    ))
    if meta.get("library_version"):
        rows.append(("hf_rope_ext version", meta["library_version"]))
    return _table(["", ""], rows)


def _parameters_table(saved: SavedModel, spec: Any) -> str:
    meta = saved.meta
    docs = _field_docs(spec.params_cls) if spec is not None else {}
    rows = [
        ("factor", _fmt_factor(meta.get("factor")),
         docs.get("factor", "new context length / original context length")),
        ("original_max_position_embeddings", meta["original_max_position_embeddings"],
         docs.get("original_max_position_embeddings", "context length the model was pre-trained at")),
    ]
    for name, value in (meta.get("parameters") or {}).items():
        rows.append((name, "None (method default)" if value is None else _fmt_value(value), docs.get(name, "")))
    return _table(["parameter", "value", "meaning"], [(f"`{n}`", v, d) for n, v, d in rows])


_POSITION_CONFIG_KEYS = (
    "rope_parameters", "rope_scaling", "rope_theta", "max_position_embeddings", "original_max_position_embeddings",
    "n_positions", "n_ctx", "max_seq_len", "seq_length",
)


def _position_config(saved: SavedModel) -> str:
    fields = {k: saved.config[k] for k in _POSITION_CONFIG_KEYS if k in saved.config}
    return json.dumps(fields, indent=2, sort_keys=False, default=str)


def _ordered_methods(rows: list[ScoreRow], this_method: str) -> list[str | None]:
    labels: list[str | None] = []
    for r in rows:
        if r.method not in labels:
            labels.append(r.method)
    return sorted(labels, key=lambda m: (not _is_this_model(m, this_method), labels.index(m)))


def _is_this_model(label: str | None, this_method: str) -> bool:
    return label is None or label.strip().lower() == this_method.lower()


def _column_name(label: str | None, this_method: str) -> str:
    if label is None:
        return "this model"
    return f"{label} (this model)" if _is_this_model(label, this_method) else label


def _group(rows: list[ScoreRow], key: Any) -> dict[Any, list[ScoreRow]]:
    groups: dict[Any, list[ScoreRow]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _perplexity_section(rows: list[ScoreRow], meta: Mapping[str, Any]) -> str:
    original = meta["original_max_position_embeddings"]
    parts = []
    for dataset, drows in _group(rows, lambda r: r.dataset).items():
        methods = _ordered_methods(drows, meta["method"])
        lengths = sorted({r.length for r in drows})
        cells = {(r.method, r.length): r.value for r in drows}
        table = _table(
            ["tokens", "× original", *[_column_name(m, meta["method"]) for m in methods]],
            [
                [length, f"{length / original:g}", *[_fmt_ppl(cells[(m, length)]) if (m, length) in cells else "–"
                                                     for m in methods]]
                for length in lengths
            ],
            ["--:", "--:", *["--:"] * len(methods)],
        )
        parts.append((f"On {dataset}:\n\n" if dataset else "") + table)
    return "\n\n".join(parts)


def _accuracy_section(rows: list[ScoreRow], meta: Mapping[str, Any]) -> str:
    """Accuracy by length (mean over depths) per method, then a depth x length grid per method where depths vary."""
    original = meta["original_max_position_embeddings"]
    methods = _ordered_methods(rows, meta["method"])
    lengths = sorted({r.length for r in rows})
    by_cell = _group(rows, lambda r: (r.method, r.length))

    def summary(m: str | None, length: int) -> str:
        cell = by_cell.get((m, length))
        if not cell:
            return "–"
        if all(r.trials for r in cell):  # weighted by trials; counts are exact
            trials = sum(r.trials for r in cell)
            return _fmt_acc(sum(r.value * r.trials for r in cell) / trials, trials)
        if len(cell) > 1 and all(r.value in (0.0, 1.0) for r in cell):  # one trial per row (e.g. per depth)
            return _fmt_acc(_mean([r.value for r in cell]), len(cell))
        return _fmt_acc(_mean([r.value for r in cell]))

    parts = [_table(
        ["tokens", "× original", *[_column_name(m, meta["method"]) for m in methods]],
        [[length, f"{length / original:g}", *[summary(m, length) for m in methods]] for length in lengths],
        ["--:", "--:", *["--:"] * len(methods)],
    )]
    for m in methods:
        mrows = [r for r in rows if r.method == m and r.depth is not None]
        depths = sorted({r.depth for r in mrows})
        if len(depths) < 2:
            continue
        cells = _group(mrows, lambda r: (r.depth, r.length))
        mlengths = sorted({r.length for r in mrows})
        grid = _table(
            ["depth", *[str(length) for length in mlengths]],
            [
                [f"{100 * d:.0f}%", *[
                    _fmt_acc(_mean([r.value for r in cells[(d, length)]])) if (d, length) in cells else "–"
                    for length in mlengths
                ]]
                for d in depths
            ],
            ["--:", *["--:"] * len(mlengths)],
        )
        parts.append(f"Accuracy by depth (rows) and context length (columns), {_column_name(m, meta['method'])}:\n\n"
                     + grid)
    return "\n\n".join(parts)


def _plot_links(plots: list[Plot]) -> str:
    return "\n\n".join(f"![{p.title}]({p.path.as_posix()})" for p in plots)


def _evaluation_section(results: Results, meta: Mapping[str, Any], plots: list[Plot]) -> str:
    parts = []
    titles = {
        "perplexity": ("Perplexity by context length", "lower is better"),
        "passkey": ("Passkey retrieval accuracy", "fraction of trials where the model repeated the hidden key"),
        "needle": ("Needle-in-a-haystack accuracy", "fraction of trials where the needle was retrieved"),
    }
    for task, (title, note) in titles.items():
        rows = results.of(task)
        task_plots = [p for p in plots if p.task == task]
        if not rows and not task_plots:
            continue
        body = _perplexity_section(rows, meta) if task == "perplexity" and rows else (
            _accuracy_section(rows, meta) if rows else "")
        parts.append("\n\n".join(x for x in (f"### {title}", f"*{note}*" if rows else "", body,
                                             _plot_links(task_plots)) if x))
    other = [p for p in plots if p.task not in titles and p.task != "training"]
    if other:
        parts.append("### Plots\n\n" + _plot_links(other))
    if not parts:
        return (
            "## Evaluation\n\nNo evaluation results were supplied when this card was written. Measure perplexity and "
            f"retrieval at the lengths you need (up to {meta['max_position_embeddings']} tokens) before relying on "
            "them."
        )
    return "## Evaluation\n\n" + "\n\n".join(parts)


def _describe_data(data: Any) -> str:
    if isinstance(data, Mapping):
        name = data.get("name") or data.get("path") or data.get("id")
        extras = [f"{k}={_fmt_value(v)}" for k, v in data.items() if k not in ("name", "path", "id") and v is not None]
        return f"{name}" + (f" ({', '.join(extras)})" if extras else "") if name else _fmt_value(dict(data))
    if isinstance(data, list):
        return ", ".join(_describe_data(d) for d in data)
    return str(data)


def _loss_curve_text(curve: Any) -> str | None:
    points: list[tuple[Any, float]] = []
    if isinstance(curve, Mapping):  # {"step": [...], "loss": [...]} or {"10": 2.3, ...}
        if isinstance(curve.get("loss"), list):
            steps = curve.get("step") or curve.get("steps") or list(range(1, len(curve["loss"]) + 1))
            points = list(zip(steps, curve["loss"], strict=False))
        else:
            points = [(k, v) for k, v in curve.items() if isinstance(v, (int, float))]
    elif isinstance(curve, list):
        for i, item in enumerate(curve, 1):
            if isinstance(item, Mapping) and isinstance(item.get("loss"), (int, float)):
                points.append((item.get("step", i), item["loss"]))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                points.append((item[0], item[1]))
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                points.append((i, item))
    points = [(s, float(v)) for s, v in points if isinstance(v, (int, float))]
    if not points:
        return None
    (s0, l0), (s1, l1) = points[0], points[-1]
    return f"{l0:.4g} (step {s0}) → {l1:.4g} (step {s1}), {len(points)} points"


def _training_rows(training: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    t = training
    if "data" in t:
        rows.append(("data", _describe_data(t["data"])))
    if "method" in t or "factor" in t:
        rows.append(("extension during training", " ".join(
            x for x in (str(t.get("method", "")), f"×{_fmt_factor(t['factor'])}" if "factor" in t else "") if x)))
    for key, label in (("train_mode", "training mode"), ("steps", "optimizer steps"), ("epochs", "epochs")):
        if key in t:
            rows.append((label, _fmt_value(t[key])))
    if "tokens" in t:
        rows.append(("training tokens", _fmt_count(t["tokens"]) if isinstance(t["tokens"], (int, float)) else
                     str(t["tokens"])))
    for key, label in (
        ("seq_len", "sequence length"), ("batch_size", "batch size (sequences per step)"),
        ("gradient_accumulation_steps", "gradient accumulation"), ("learning_rate", "learning rate"),
        ("warmup_steps", "warmup steps"), ("optimizer", "optimizer"), ("scheduler", "schedule"),
        ("precision", "precision"), ("seed", "seed"),
    ):
        if key in t:
            rows.append((label, _fmt_value(t[key])))
    lora = t.get("lora")
    if isinstance(lora, Mapping):
        names = {"r": ("r", "rank"), "alpha": ("lora_alpha", "alpha"), "dropout": ("lora_dropout", "dropout"),
                 "target modules": ("target_modules",), "trained in full": ("modules_to_save",)}
        for label, keys in names.items():
            value = _first(lora, keys)
            if value is not None:
                rows.append((f"LoRA {label}", ", ".join(map(str, value)) if isinstance(value, list) else str(value)))
    elif lora is not None:
        rows.append(("LoRA", _fmt_value(lora)))
    if "hardware" in t:
        hw = t["hardware"]
        rows.append(("hardware", ", ".join(map(str, hw)) if isinstance(hw, list) else _fmt_value(hw)))
    if isinstance(t.get("wall_time_s"), (int, float)):
        rows.append(("wall time", _fmt_duration(t["wall_time_s"])))
    if isinstance(t.get("tokens_per_s"), (int, float)):
        rows.append(("throughput", f"{t['tokens_per_s']:,.0f} tokens/s"))
    peak = t.get("peak_memory_gb")
    if peak is None and isinstance(t.get("peak_memory_bytes"), (int, float)):
        peak = t["peak_memory_bytes"] / 1e9
    if peak is None and isinstance(t.get("peak_memory_mb"), (int, float)):
        peak = t["peak_memory_mb"] / 1e3
    if isinstance(peak, (int, float)):
        kind = str(t.get("peak_memory_kind", ""))
        label = "peak process memory (RSS)" if "rss" in kind or "cpu" in kind else "peak accelerator memory"
        rows.append((label, f"{peak:.3g} GB"))
    if isinstance(t.get("final_loss"), (int, float)):
        rows.append(("final training loss", f"{t['final_loss']:.4g}"))
    curve = _loss_curve_text(t.get("loss_curve")) if "loss_curve" in t else None
    if curve:
        rows.append(("loss curve", curve))
    if "recipe" in t:
        rows.append(("recipe", _fmt_value(t["recipe"])))
    return rows


def _training_section(results: Results, plots: list[Plot]) -> str:
    training_plots = [p for p in plots if p.task == "training"]
    if not results.training and not training_plots:
        return ("## Fine-tuning\n\nNo training summary was supplied with this card. If the checkpoint was not "
                "fine-tuned after patching, its quality beyond the original context rests on the method alone.")
    parts = ["## Fine-tuning"]
    if results.training:
        parts.append(_table(["", ""], _training_rows(results.training)))
    if training_plots:
        parts.append(_plot_links(training_plots))
    return "\n\n".join(parts)


def _kv_cache_bytes_per_token(config: Mapping[str, Any]) -> int | None:
    """Keys + values per token across layers in 16-bit: 2 * layers * kv_heads * head_dim * 2 bytes."""
    if "kv_lora_rank" in config:  # MLA caches a compressed latent: the formula does not apply
        return None
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    heads = config.get("num_attention_heads") or config.get("n_head")
    kv_heads = config.get("num_key_value_heads") or config.get("num_kv_heads") or heads
    hidden = config.get("hidden_size") or config.get("n_embd")
    head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    if not all(isinstance(x, int) and x > 0 for x in (layers, kv_heads, head_dim)):
        return None
    return 2 * layers * kv_heads * head_dim * 2


def _limitations(saved: SavedModel, template: str, results: Results) -> list[str]:
    meta, config = saved.meta, saved.config
    original, new = meta["original_max_position_embeddings"], meta["max_position_embeddings"]
    items = [
        f"The model was pre-trained on sequences of at most {original} tokens. Beyond that, quality comes from the "
        f"`{meta['method']}` extension" + (" and the fine-tuning described above." if results.training else
                                           "; no fine-tuning summary accompanies this card.")
    ]
    measured = [r.length for r in results.rows]
    if measured and max(measured) < new:
        items.append(f"Evaluations above reach {max(measured)} tokens; lengths from {max(measured)} to {new} tokens "
                     "were not measured.")
    elif not measured:
        items.append("No evaluation results are included with this card.")
    if meta.get("dynamic"):
        items.append(
            "Dynamic scaling: the frequencies are recomputed from the current sequence length once it exceeds "
            f"{original} "
            "tokens, so up to that length the model behaves exactly like the base model, and padding a batch to a "
            "longer length changes the outputs of its shorter sequences. config.json keeps `max_position_embeddings` "
            f"at {saved.config.get('max_position_embeddings')} because transformers' dynamic types read it as the "
            "original length."
        )
        if template == "causal_lm":
            items.append(
                "Dynamic scaling and the KV cache: while generating, keys cached at shorter lengths stay rotated with "
                "the earlier frequencies as the frequencies change. For outputs identical to a forward pass over the "
                "final text, hold the frequencies fixed for the whole generation: `from hf_rope_ext import "
                "freeze_rope_length` and `with freeze_rope_length(model, prompt_len + max_new_tokens): "
                "model.generate(...)`. Serving engines each handle this their own way."
            )
    written = {str(t) for t in (meta.get("rope_parameters_written") or {}).values()}
    attention = meta.get("attention")
    if attention:
        name = attention["implementation"]
        items.append(
            f"Attention: config.json sets `attn_implementation: {name}`, the attention function hf_rope_ext "
            "registers. `import hf_rope_ext` before `from_pretrained` gives the extended model; without the plugin "
            "transformers refuses to load it (unknown attention implementation / rope type) rather than load "
            "something else. `hf_rope_ext.unpatch_model(model)` after loading gives the original model."
        )
        if meta.get("kind") == "attention":
            items.append(
                "Serving engines (vLLM, SGLang, TGI, llama.cpp) do not know the rope type "
                "`hf_rope_ext_attention` and refuse this config; the extension runs only in transformers with the "
                f"plugin. Below {attention.get('exact_below', '?')} tokens the model is exactly the base model, so "
                "engines can serve the base checkpoint for short inputs."
            )
        else:
            items.append("Serving engines ignore `attn_implementation`: they run the rope scaling below without the "
                         "log-n query scaling.")
    if meta.get("requires_plugin") and not attention:
        types = ", ".join(f"`{t}`" for t in sorted(written)) or "its rope type"
        items.append(
            f"config.json names {types}, which only exists once `import hf_rope_ext` has run (hf_rope_ext "
            f"{meta.get('library_version', '')}+). Without it transformers cannot build the model, and serving "
            "engines (vLLM, SGLang, TGI, llama.cpp) do not know this rope type: serve it through transformers with "
            "the plugin imported, or re-patch with a method that saves natively."
        )
    else:
        for rope_type in sorted(written):
            if rope_type in ENGINE_SUPPORT:
                items.append(f"Serving: {ENGINE_SUPPORT[rope_type]}. Check the engine version you deploy.")
        if meta.get("kind") == "absolute":
            items.append("Serving: the position table itself was resized, so every engine that loads the weights "
                         "runs the extended model as saved.")
    rope = config.get("rope_parameters") or {}
    if isinstance(rope, Mapping) and rope.get("rope_type") == "longrope" and rope.get("short_factor") == rope.get(
            "long_factor") and rope.get("short_factor") is not None:
        items.append("The rescale is stored as `longrope` with `short_factor == long_factor`, so the same frequencies "
                     "apply at every length.")
    if meta.get("layer_types"):
        items.append(f"Only the layer types {', '.join(map(str, meta['layer_types']))} were rescaled; the other "
                     "layers keep their original positions (e.g. local sliding-window attention).")
    tok_max = saved.tokenizer_config.get("model_max_length")
    if isinstance(tok_max, int) and tok_max < new:
        items.append(f"tokenizer_config.json sets `model_max_length` to {tok_max} (< {new}): the tokenizer truncates "
                     "or warns below the new length unless you pass `max_length`.")
    st_path = saved.folder / "sentence_bert_config.json"
    if st_path.is_file():
        st_max = json.loads(st_path.read_text(encoding="utf-8")).get("max_seq_length")
        if isinstance(st_max, int) and st_max < new:
            items.append(f"sentence_bert_config.json sets `max_seq_length` to {st_max}: sentence-transformers "
                         f"truncates inputs there; raise it to use up to {new} tokens.")
    per_token = _kv_cache_bytes_per_token(config) if template == "causal_lm" else None
    if per_token:
        items.append(f"Memory: the KV cache takes {_fmt_bytes(per_token)} per token in 16-bit precision, "
                     f"{_fmt_bytes(per_token * new)} for one {new}-token sequence; attention cost grows with length.")
    elif template == "encoder":
        items.append(f"Memory and time of self-attention grow quadratically with input length; at {new} tokens a "
                     f"forward pass costs about {(new / original) ** 2:g}× the attention compute of a "
                     f"{original}-token input.")
    return items


def _citation(meta: Mapping[str, Any], spec: Any) -> str:
    paper = meta.get("paper") or getattr(spec, "paper", "")
    parts = []
    if paper in PAPERS:
        parts.append(f"The `{meta['method']}` method: {PAPERS[paper].title}, {paper}\n\n```bibtex\n"
                     f"{PAPERS[paper].bibtex}\n```")
    elif paper:
        parts.append(f"The `{meta['method']}` method: {paper}")
    else:
        parts.append(f"The `{meta['method']}` method registers no paper link.")
    parts.append(f"Extended with hf_rope_ext {meta.get('library_version', '')}".rstrip() + ".")
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# base model, license

def _is_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value)) and not Path(value).expanduser().exists() and "/" in value


def _front_matter(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except Exception as err:  # noqa: BLE001 - an unreadable base card only costs us its license
        logger.warning("could not read the base model card's metadata: %s", err)
        return {}


def _base_card_text(path: str | Path | None, base_model: str | None, saved: SavedModel) -> str | None:
    candidates = []
    if path is not None:
        p = Path(path).expanduser()
        candidates.append(p / CARD_FILE if p.is_dir() else p)
        if not candidates[-1].is_file():
            raise FileNotFoundError(f"base model card not found: {candidates[-1]}")
    if base_model and Path(base_model).expanduser().is_dir():
        candidates.append(Path(base_model).expanduser() / CARD_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    return saved.existing_card


def _resolve_base_model(base_model: str | None, saved: SavedModel) -> str | None:
    """The Hub id for ``base_model:``: given explicitly, or named by the saved config; None when unknown."""
    if base_model:
        local = Path(base_model).expanduser()
        if local.is_dir():  # a local copy of the base: use the Hub id its config names, if any
            cfg = json.loads((local / "config.json").read_text()) if (local / "config.json").is_file() else {}
            named = cfg.get("_name_or_path")
            return named if isinstance(named, str) and _is_hub_id(named) else None
        if not _HUB_ID.match(base_model):
            raise ValueError(f"base model {base_model!r} is neither a Hub id (owner/name) nor a local folder")
        return base_model
    for candidate in (saved.meta.get("base_model"), saved.config.get("_name_or_path")):
        if isinstance(candidate, str) and _is_hub_id(candidate):
            return candidate
    return None


# --------------------------------------------------------------------------------------------------------------------
# rendering

def _load_template(template: str | Path | None, default: str) -> tuple[str, str]:
    """(template text, template name)."""
    name = str(template) if template is not None else default
    if name in TEMPLATE_NAMES:
        for directory in TEMPLATE_DIRS:
            path = directory / f"{name}.md"
            if path.is_file():
                return path.read_text(encoding="utf-8"), name
        raise FileNotFoundError(f"template '{name}' not found in {', '.join(map(str, TEMPLATE_DIRS))}")
    path = Path(name).expanduser()
    if not path.is_file():
        raise ValueError(f"unknown template {name!r}; use one of {', '.join(TEMPLATE_NAMES)} or a path to a .md file")
    return path.read_text(encoding="utf-8"), default


def _copy_plots(plots: list[Plot], folder: Path) -> list[Plot]:
    """Copy plot images into ``folder/plots`` (unless already inside ``folder``); returns plots with card-relative
    paths."""
    copied = []
    folder_resolved = folder.resolve()
    for plot in plots:
        src = plot.path
        if not src.is_file():
            logger.warning("plot %s named in the results does not exist; left out of the card", src)
            continue
        if src.suffix.lower() not in PLOT_SUFFIXES:
            logger.warning("plot %s is not an image (%s); left out of the card", src, ", ".join(PLOT_SUFFIXES))
            continue
        resolved = src.resolve()
        if resolved.is_relative_to(folder_resolved):
            copied.append(dataclasses.replace(plot, path=resolved.relative_to(folder_resolved)))
            continue
        target_dir = folder / PLOTS_DIR
        target_dir.mkdir(exist_ok=True)
        target = target_dir / src.name
        n = 1
        while target.exists() and not filecmp.cmp(target, src, shallow=False):
            n += 1
            target = target_dir / f"{src.stem}-{n}{src.suffix}"
        if not target.exists():
            shutil.copy2(src, target)
        copied.append(dataclasses.replace(plot, path=target.relative_to(folder)))
    return copied


def _eval_results_metadata(results: Results, meta: Mapping[str, Any], task_type: str) -> list[Any]:
    """model-index entries (this model's own rows only) as huggingface_hub EvalResult objects."""
    from huggingface_hub import EvalResult

    out = []
    rows = [r for r in results.rows if _is_this_model(r.method, meta["method"])]
    for (task, dataset), group in _group(rows, lambda r: (r.task, r.dataset)).items():
        by_length = _group(group, lambda r: r.length)
        for length in sorted(by_length):
            cell = by_length[length]
            value = round(_mean([r.value for r in cell]), 4)
            if not math.isfinite(value):  # a diverged measurement stays in the table, not in Hub metadata
                continue
            metric, name = ("perplexity", "Perplexity") if task == "perplexity" else (
                "accuracy", f"{task.capitalize()} accuracy")
            default_ds = {"perplexity": "text", "passkey": "synthetic-passkey", "needle": "synthetic-needle"}[task]
            out.append(EvalResult(
                task_type=task_type,
                dataset_type=dataset if dataset and _HUB_ID.match(dataset) else default_ds,
                dataset_name=dataset or {"perplexity": "held-out text", "passkey": "Passkey retrieval (synthetic)",
                                         "needle": "Needle in a haystack (synthetic)"}[task],
                metric_type=metric,
                metric_value=value,
                metric_name=f"{name} @ {length} tokens",
                metric_config=f"{length}_tokens",
            ))
    return out


def render_card(
    folder: str | Path,
    *,
    results: Sequence[str | Path | Mapping[str, Any] | list] = (),
    training: str | Path | Mapping[str, Any] | None = None,
    plots: Sequence[str | Path] = (),
    base_model: str | None = None,
    base_card: str | Path | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    repo_id: str | None = None,
    template: str | Path | None = None,
    copy_plots: bool = True,
) -> str:
    """The card text (front matter + body) for the saved model in ``folder``; copies plots into ``folder/plots``.

    Args:
        folder: a folder written by ``save_pretrained`` from a patched model (config.json has ``hf_rope_ext``).
        results: evaluation / training JSON files or parsed JSON values (shapes: :func:`load_results`).
        training: a training summary (file or dict); the same as passing it in ``results``.
        plots: extra images to copy into the folder and show under "Evaluation".
        base_model: Hub id of the model that was extended (or a local copy of it); default: what config.json names.
        base_card: the base model's README.md (or its folder), to carry the license and language over.
        license: Hub license id; overrides the base card's.
        language: language code(s) for the metadata; default: the base card's.
        repo_id: the Hub id the model will have; used in the loading code (default: the folder name).
        template: "causal_lm", "encoder" or a path to a template file; default by the saved architecture.
        copy_plots: copy plot images into the folder (False: link them where they are; for previews).
    """
    saved = SavedModel.read(folder)
    meta = saved.meta
    spec = _method_spec(meta["method"])
    if spec is None:
        logger.warning("method '%s' is not registered in this process; the card uses config.json alone",
                       meta["method"])
    items = list(results)
    if training is not None:
        items.append(training if not isinstance(training, Mapping) else {**training, "task": "training"})
    parsed = load_results(items)
    if parsed.training is None and isinstance(meta.get("finetune"), Mapping):  # recorded by recipes/finetune.py
        parsed.training = _normalise_training(meta["finetune"]) or None
    for extra in plots:
        path = Path(extra).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"plot not found: {path}")
        parsed.plots.append(Plot(path, _title_from_name(path)))

    default_template, pipeline_tag, auto_class = _task_and_pipeline(saved)
    template_text, template_name = _load_template(template, default_template)
    base_text = _base_card_text(base_card, base_model, saved)
    base_meta = _front_matter(base_text)
    previous = _front_matter(saved.previous_card)  # a re-render keeps what an earlier one was told
    base_id = _resolve_base_model(base_model, saved) or previous.get("base_model")
    license = license or base_meta.get("license") or previous.get("license")
    language = language or base_meta.get("language") or previous.get("language")
    card_plots = _copy_plots(parsed.plots, saved.folder) if copy_plots else parsed.plots

    model_id = repo_id or saved.folder.resolve().name
    model_name = model_id.split("/")[-1]
    task_type = pipeline_tag if pipeline_tag != "sentence-similarity" else "feature-extraction"
    eval_results = _eval_results_metadata(parsed, meta, task_type)
    datasets = _training_datasets(parsed.training)
    from huggingface_hub import ModelCardData

    tags = ["context-extension", meta["method"], "hf-rope-ext"]
    tags.append("rope-scaling" if meta.get("kind", "rope") == "rope" else "position-embeddings")
    data = ModelCardData(
        base_model=base_id,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=license,
        license_name=base_meta.get("license_name") if license == "other" else None,
        license_link=base_meta.get("license_link") if license == "other" else None,
        language=language,
        datasets=datasets or None,
        tags=tags,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )

    plugin_import = "import hf_rope_ext  # registers the rope type this config names\n" if meta.get(
        "requires_plugin") else ""
    install = "pip install transformers" + (" hf_rope_ext" if meta.get("requires_plugin") else "")
    factor = _fmt_factor(meta.get("factor"))
    trained = parsed.training is not None
    summary = (
        f"{'[' + base_id + '](https://huggingface.co/' + base_id + ')' if base_id else 'A model'} with its context "
        f"window extended from {meta['original_max_position_embeddings']} to {meta['max_position_embeddings']} tokens "
        f"(×{factor}) by `{meta['method']}`"
        + (f" ({spec.description})" if spec is not None else "")
        + (", then fine-tuned as described under *Fine-tuning*." if trained else ".")
    )
    load_note = (
        "This config uses a rope type that stock transformers does not have: **import `hf_rope_ext` before loading**."
        if meta.get("requires_plugin") else
        "The extension is stored in config.json in a form stock transformers reads: no extra package is needed."
    )
    values = {
        "marker": card_marker(meta),
        "title": model_name,
        "summary": summary,
        "method": meta["method"],
        "factor": factor,
        "original_length": meta["original_max_position_embeddings"],
        "new_length": meta["max_position_embeddings"],
        "extension_table": _extension_table(saved, base_id, spec),
        "parameters_table": _parameters_table(saved, spec),
        "position_config": _position_config(saved),
        "load_note": load_note,
        "install": install,
        "plugin_import": plugin_import,
        "model_id": model_id,
        "auto_class": auto_class,
        "evaluation": _evaluation_section(parsed, meta, card_plots),
        "training": _training_section(parsed, card_plots),
        "limitations": "\n".join(f"- {item}" for item in _limitations(saved, template_name, parsed)),
        "citation": _citation(meta, spec),
    }
    try:
        body = string.Template(template_text).substitute(values)
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"template placeholder {err} is not known; available: {', '.join('$' + k for k in sorted(values))}"
        ) from None
    body = re.sub(r"\n{3,}", "\n\n", body).strip() + "\n"
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _training_datasets(training: Mapping[str, Any] | None) -> list[str]:
    """Hub dataset ids ("owner/name") among the training data; other descriptions stay in the text only."""
    if not training or "data" not in training:
        return []
    data = training["data"]
    items = data if isinstance(data, list) else [data]
    ids = []
    for item in items:
        name = item.get("name") or item.get("path") or item.get("id") if isinstance(item, Mapping) else item
        if isinstance(name, str) and _is_hub_id(name):
            ids.append(name)
    return ids


def write_card(folder: str | Path, **kwargs: Any) -> Path:
    """Render the card (see :func:`render_card` for the arguments) and write ``folder/README.md``; returns its path.

    A README.md not written by hf-rope-ext (e.g. the base model's card copied into the folder) is read for its
    license and language, then replaced."""
    folder = Path(folder).expanduser()
    text = render_card(folder, **kwargs)
    path = folder / CARD_FILE
    if path.is_file() and MARKER_PREFIX not in path.read_text(encoding="utf-8"):
        logger.warning("replacing %s (not written by hf-rope-ext; its license/language were carried over)", path)
    path.write_text(text, encoding="utf-8")
    logger.info("wrote %s", path)
    return path


__all__ = ["render_card", "write_card", "load_results", "Results", "ScoreRow", "Plot", "SavedModel", "fingerprint",
           "read_marker", "PAPERS", "ENGINE_SUPPORT", "TRAINING_KEYS"]
