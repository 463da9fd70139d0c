"""The card's front matter: Hub metadata built with huggingface_hub's own ``ModelCardData`` / ``EvalResult``.

What goes in: ``base_model`` (given, else what ``patch_model`` recorded in config.json, else config's
``_name_or_path`` when it is a Hub id, else an earlier card's), ``license`` / ``language`` (given, else the base
model's card, else an earlier card's), ``pipeline_tag`` from the architecture, tags, ``datasets`` (the training
data that are Hub ids) and ``model-index``: one metric per task and length for this model's own rows. Built by
huggingface_hub, the block is valid Hub metadata by construction.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..training.summary import TrainingSummary
from .format import group, mean
from .results import Results, is_this_model
from .saved import CARD_FILE, HUB_ID, SavedModel, is_hub_id

logger = logging.getLogger(__name__)


def front_matter(text: str | None) -> dict[str, Any]:
    """The metadata block of a card as a dict ({} when there is none or it does not parse)."""
    if not text:
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except Exception as err:  # noqa: BLE001 - an unreadable base card only costs us its license
        logger.warning("could not read a model card's metadata: %s", err)
        return {}


def base_card_text(path: str | Path | None, base_model: str | None, saved: SavedModel) -> str | None:
    """The base model's card: ``path`` (file or folder), a local base model folder's, or a README.md in the folder
    that hf-rope-ext did not write."""
    candidates = []
    if path is not None:
        p = Path(path).expanduser()
        candidates.append(p / CARD_FILE if p.is_dir() else p)
        if not candidates[-1].is_file():
            raise FileNotFoundError(f"base_card: {candidates[-1]} not found")
    if base_model and Path(base_model).expanduser().is_dir():
        candidates.append(Path(base_model).expanduser() / CARD_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    return saved.existing_card


def resolve_base_model(base_model: str | None, saved: SavedModel) -> str | None:
    """The Hub id for ``base_model:``: given explicitly, recorded at patch time, or named by the saved config."""
    if base_model:
        local = Path(base_model).expanduser()
        if local.is_dir():  # a local copy of the base: use the Hub id its config names, if any
            cfg = json.loads((local / "config.json").read_text()) if (local / "config.json").is_file() else {}
            named = cfg.get("_name_or_path")
            return named if isinstance(named, str) and is_hub_id(named) else None
        if not HUB_ID.match(base_model):
            raise ValueError(f"base_model {base_model!r} is neither a Hub id (owner/name) nor a local folder")
        return base_model
    for candidate in (saved.meta.get("base_model"), saved.config.get("_name_or_path")):
        if isinstance(candidate, str) and is_hub_id(candidate):
            return candidate
    return None


def training_datasets(training: TrainingSummary | None) -> list[str]:
    """Hub dataset ids among the training data (``owner/name`` or ``dataset:owner/name[:config]``)."""
    if training is None or not training.data:
        return []
    ids = []
    for item in training.data if isinstance(training.data, list) else [training.data]:
        name = str(item).removeprefix("dataset:").split(":")[0]
        if is_hub_id(name) and name not in ids:
            ids.append(name)
    return ids


_DEFAULT_DATASET = {
    "perplexity": ("text", "held-out text"),
    "passkey": ("synthetic-passkey", "Passkey retrieval (synthetic)"),
    "needle": ("synthetic-needle", "Needle in a haystack (synthetic)"),
}


def _dataset_type(dataset: str | None, default_type: str) -> str:
    """model-index ``dataset.type``: the Hub id when the dataset is one, else a slug of its name. huggingface_hub
    groups metrics into one model-index entry by (task, dataset type, config, split, revision) and keeps the first
    entry's dataset *name* (``EvalResult.unique_identifier``), so two local texts sharing one type would have the
    second's figures listed under the first's name."""
    if not dataset:
        return default_type
    if HUB_ID.match(dataset):
        return dataset
    return re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-") or default_type


def eval_results(results: Results, meta: Mapping[str, Any], task_type: str) -> list[Any]:
    """model-index entries (this model's own rows only) as huggingface_hub EvalResult objects."""
    from huggingface_hub import EvalResult

    out = []
    rows = [r for r in results.rows if is_this_model(r.method, meta["method"])]
    for (task, dataset), rows_of in group(rows, lambda r: (r.task, r.dataset)).items():
        by_length = group(rows_of, lambda r: r.length)
        for length in sorted(by_length):
            value = round(mean([r.value for r in by_length[length]]), 4)
            if not math.isfinite(value):  # a diverged measurement stays in the table, not in Hub metadata
                continue
            metric, name = ("perplexity", "Perplexity") if task == "perplexity" else (
                "accuracy", f"{task.capitalize()} accuracy")
            default_type, default_name = _DEFAULT_DATASET[task]
            out.append(EvalResult(
                task_type=task_type,
                dataset_type=_dataset_type(dataset, default_type),
                dataset_name=dataset or default_name,
                metric_type=metric,
                metric_value=value,
                metric_name=f"{name} @ {length} tokens",
                metric_config=f"{length}_tokens",
            ))
    return out


def card_data(
    saved: SavedModel,
    results: Results,
    *,
    base_model: str | None,
    license: str | None,
    language: str | list[str] | None,
    base_meta: Mapping[str, Any],
    pipeline_tag: str,
    model_name: str,
) -> Any:
    """The ``ModelCardData`` of the card."""
    from huggingface_hub import ModelCardData

    meta = saved.meta
    task_type = pipeline_tag if pipeline_tag != "sentence-similarity" else "feature-extraction"
    evals = eval_results(results, meta, task_type)
    tags = ["context-extension", meta["method"], "hf-rope-ext"]
    tags.append("rope-scaling" if meta.get("kind", "rope") == "rope" else "position-embeddings")
    return ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=license,
        license_name=base_meta.get("license_name") if license == "other" else None,
        license_link=base_meta.get("license_link") if license == "other" else None,
        language=language,
        datasets=training_datasets(results.training) or None,
        tags=tags,
        model_name=model_name if evals else None,
        eval_results=evals or None,
    )
