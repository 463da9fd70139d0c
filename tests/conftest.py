"""Shared fixtures: tiny random models for every supported rotary family, built from configs in code."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_MARKEXPR = "not slow"
"""pyproject's ``addopts = "-m 'not slow'"``: slow tests are left out unless asked for."""


def run_slow() -> bool:
    """``RUN_SLOW=1`` (or true/yes) in the environment: run the slow tests too."""
    return os.environ.get("RUN_SLOW", "").strip().lower() in ("1", "true", "yes")


def pytest_configure(config):
    """``RUN_SLOW=1 pytest`` runs every test, the slow ones included: the default ``-m 'not slow'`` from pyproject is
    dropped. An explicit ``-m`` on the command line (anything else) is left as given."""
    if run_slow() and config.option.markexpr == DEFAULT_MARKEXPR:
        config.option.markexpr = ""

ORIGINAL_LEN = 64
VOCAB = 128
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=ORIGINAL_LEN,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# model_type -> extra config kwargs (everything else from _COMMON)
ROPE_FAMILY_CONFIGS: dict[str, dict] = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2, sliding_window=None),
    "mixtral": dict(num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1),
    "qwen2": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=16),
    "gemma": dict(num_key_value_heads=2, head_dim=16),
    "gemma2": dict(num_key_value_heads=2, head_dim=16, sliding_window=32),
    "gemma3_text": dict(
        num_key_value_heads=2, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"]
    ),
    "phi": dict(partial_rotary_factor=0.5),
    "phi3": dict(num_key_value_heads=4, original_max_position_embeddings=ORIGINAL_LEN),
    "gpt_neox": dict(partial_rotary_factor=0.25),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2),
    "olmo": dict(num_key_value_heads=2),
    "olmo2": dict(num_key_value_heads=2),
    "starcoder2": dict(num_key_value_heads=2),
    "stablelm": dict(num_key_value_heads=2, partial_rotary_factor=0.25),
    "deepseek_v3": dict(
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
    ),
}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kwargs = {**_COMMON, **ROPE_FAMILY_CONFIGS[model_type], **overrides}
    if model_type == "falcon":
        kwargs.pop("intermediate_size")
        kwargs["ffn_hidden_size"] = 128
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()


def tiny_tokenizer():
    """An offline word-level tokenizer over VOCAB ids (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=ORIGINAL_LEN
    )


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()
