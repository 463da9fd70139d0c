"""Built-in methods; importing this package registers them all."""

from . import (  # noqa: F401
    absolute_copy,
    absolute_hierarchical,
    absolute_interpolate,
    absolute_sinusoidal,
    attention_dca,
    attention_leaky_rerope,
    attention_rerope,
    attention_self_extend,
    rope_dynamic_ntk,
    rope_dynamic_yarn,
    rope_extrapolate,
    rope_linear,
    rope_llama3,
    rope_longrope,
    rope_ntk,
    rope_ntk_by_parts,
    rope_yarn,
)
from ._attention_base import AttentionLayout, AttentionParams, Branch
from ._rope_base import RopeParams, default_inv_freq
from ._table_base import TableParams

__all__ = ["AttentionLayout", "AttentionParams", "Branch", "RopeParams", "TableParams", "default_inv_freq"]
