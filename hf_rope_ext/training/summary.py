"""The training summary: one typed record the fine-tune recipe writes and the model card reads.

``TrainingSummary.save(folder)`` writes ``folder/training_summary.json`` with ``"kind": "training_summary"`` (the same
tagging as the evaluation reports); ``TrainingSummary.load`` / ``from_dict`` read it back. Every field carries its
meaning in ``metadata["help"]``, which the card uses as the explanation of its training table.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

KIND = "training_summary"
FILE_NAME = "training_summary.json"


def _f(help: str, default: Any = None, **kwargs: Any) -> Any:
    if "default_factory" in kwargs:
        return field(metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help})


@dataclass
class TrainingSummary:
    """What a fine-tuning run did, measured as it ran. ``None`` = not recorded."""

    method: str | None = _f("extension method the model was patched with before training")
    factor: float | None = _f("target length / original length")
    original_length: int | None = _f("context length the base model was trained at")
    target_length: int | None = _f("context length after extension")
    recipe: str | None = _f("what trained the model (recipe and its mode)")
    train_mode: str | None = _f("full, lora or lora_plus (LongLoRA: LoRA + embeddings and norms trained)")
    data: list[str] | str | None = _f("training text sources")
    eval_data: list[str] | str | None = _f("held-out text of eval_before / eval_after (never trained on)")
    steps: int | None = _f("optimizer steps done")
    tokens: int | None = _f("training tokens seen (all processes)")
    seq_len: int | None = _f("tokens per training sequence")
    batch_size: int | None = _f("sequences per optimizer step (per-device batch x accumulation x processes)")
    gradient_accumulation_steps: int | None = _f("micro-batches accumulated per optimizer step")
    learning_rate: float | None = _f("peak learning rate")
    warmup_steps: int | None = _f("linear warm-up steps")
    optimizer: str | None = _f("optimizer")
    scheduler: str | None = _f("learning-rate schedule after warm-up")
    precision: str | None = _f("weights dtype, or the mixed-precision mode")
    lora: dict[str, Any] | None = _f("LoRA settings (rank r, lora_alpha, lora_dropout, target and saved modules)")
    seed: int | None = _f("random seed")
    hardware: str | None = _f("processes x device")
    num_processes: int | None = _f("training processes")
    distributed_type: str | None = _f("accelerate's distributed type (NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED)")
    wall_time_s: float | None = _f("wall-clock seconds of training (evaluation excluded)")
    tokens_per_s: float | None = _f("training tokens per wall-clock second")
    peak_memory_bytes: int | None = _f("peak memory of the main process")
    peak_rss_bytes: int | None = _f("peak resident memory of the main process")
    peak_memory_kind: str | None = _f(
        "how peak memory was measured (cuda_max_allocated, or cpu_peak_rss: the process's peak resident set)"
    )
    loss_first: float | None = _f("mean training loss over the first logged steps")
    final_loss: float | None = _f("mean training loss over the last logged steps")
    loss_curve: list[list[float]] = _f("[step, loss] pairs as logged", default_factory=list)
    eval_before: dict[str, Any] | None = _f("held-out perplexity at the target length before training")
    eval_after: dict[str, Any] | None = _f("held-out perplexity at the target length after training")
    extension: dict[str, Any] | None = _f("patch_info of the saved model")
    options: dict[str, Any] | None = _f("the full recipe configuration of the run")
    plots: list[dict[str, str]] = _f("pictures of the run: {path, title}", default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingSummary:
        """From ``to_dict()`` output. Unknown keys are refused by name (a typo would otherwise vanish)."""
        if data.get("kind", KIND) != KIND:
            raise ValueError(f"not a training summary (kind {data.get('kind')!r}, expected {KIND!r})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"kind"})
        if unknown:
            raise ValueError(f"training summary has unknown fields {unknown}; known fields: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k != "kind"})

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILE_NAME
        path.write_text(json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> TrainingSummary:
        """From a ``training_summary.json`` file or the folder holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> its meaning (from the dataclass metadata)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}
