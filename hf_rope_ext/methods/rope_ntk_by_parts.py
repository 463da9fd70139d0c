"""NTK-by-parts (bloc97, 2023; YaRN paper section 3.2, https://arxiv.org/abs/2309.00071): per dimension, by how many
rotations it makes over the original length: > beta_fast keep, < beta_slow interpolate by s, a linear ramp between.
No attention temperature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..registry import param, register_method
from ._rope_base import RopeParams, by_parts_inv_freq


@dataclass
class ByPartsParams(RopeParams):
    beta_fast: float = param(
        32.0,
        help="Dimensions turning more than this many times over the original length are left unchanged.",
    )
    beta_slow: float = param(
        1.0,
        help="Dimensions turning fewer than this many times are fully interpolated (divided by the factor).",
    )
    truncate: bool = param(
        True,
        help="Round the ramp's ends to whole dimensions (as the YaRN reference code and transformers do).",
    )

    def validate(self) -> None:
        super().validate()
        if not self.beta_fast > self.beta_slow > 0:
            raise ValueError(
                f"need beta_fast > beta_slow > 0, got beta_fast={self.beta_fast}, beta_slow={self.beta_slow}"
            )

    def inv_freq(self, dim: int, base: float, device: Any = None, factor: Any = None):
        """The by-parts frequencies at ``factor`` (default: the configured factor). Shape [dim // 2], float32."""
        return by_parts_inv_freq(
            dim,
            base,
            self.factor if factor is None else factor,
            self.original_max_position_embeddings,
            self.beta_fast,
            self.beta_slow,
            self.truncate,
            device,
        )


def by_parts_native(params: ByPartsParams, attention_factor: float) -> dict[str, Any]:
    """transformers' ``yarn`` type with an explicit attention factor expresses the whole by-parts family."""
    return {
        "rope_type": "yarn",
        "factor": params.factor,
        "original_max_position_embeddings": params.original_max_position_embeddings,
        "beta_fast": float(params.beta_fast),
        "beta_slow": float(params.beta_slow),
        "truncate": bool(params.truncate),
        "attention_factor": float(attention_factor),
    }


def _native(params: ByPartsParams, dim: int, base: float) -> dict[str, Any]:
    return by_parts_native(params, 1.0)


@register_method(
    "ntk_by_parts",
    kind="rope",
    params=ByPartsParams,
    description="per-dimension blend by wavelength vs original length (bloc97), no attention temperature",
    native=_native,
    paper="https://arxiv.org/abs/2309.00071",
)
def ntk_by_parts(params: ByPartsParams, dim: int, base: float, device: Any = None, seq_len: Any = None):
    """inv_i = (1 - g_i) * theta_i / s + g_i * theta_i, g_i a ramp from 1 (fast dims) to 0 (slow dims)."""
    return params.inv_freq(dim, base, device), 1.0
