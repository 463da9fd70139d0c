"""YaRN (Peng et al. 2023, https://arxiv.org/abs/2309.00071): NTK-by-parts frequencies plus an attention
temperature sqrt(1/t) = 0.1 * ln(s) + 1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..registry import param, register_method
from ._rope_base import yarn_attention_factor
from .rope_ntk_by_parts import ByPartsParams, by_parts_native


@dataclass
class YarnParams(ByPartsParams):
    attention_factor: float | None = param(
        None,
        help="Multiplier of cos and sin (logits scale by its square); None = 0.1 * ln(factor) + 1 as in the paper.",
    )

    def validate(self) -> None:
        super().validate()
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(f"attention_factor must be > 0 or None, got {self.attention_factor!r}")

    def resolved_attention_factor(self) -> float:
        return (
            float(self.attention_factor) if self.attention_factor is not None else yarn_attention_factor(self.factor)
        )


def _native(params: YarnParams, dim: int, base: float) -> dict[str, Any]:
    return by_parts_native(params, params.resolved_attention_factor())


@register_method(
    "yarn",
    kind="rope",
    params=YarnParams,
    description="NTK-by-parts + attention temperature 0.1*ln(s)+1 (YaRN), beta_fast=32, beta_slow=1",
    native=_native,
    paper="https://arxiv.org/abs/2309.00071",
)
def yarn(params: YarnParams, dim: int, base: float, device: Any = None, seq_len: Any = None):
    return params.inv_freq(dim, base, device), params.resolved_attention_factor()
