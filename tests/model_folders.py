"""Saved model folders for card and push tests: tiny patched models with a tokenizer, built offline in code."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ORIGINAL = 64
FACTOR = 4
NEW = ORIGINAL * FACTOR
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360000002"
                    "0000050001e226059b0000000049454e44ae426082")  # a valid 1x1 PNG


def tiny_tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(124)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=max_length)


def save_patched_llama(folder: Path, method: str, **params) -> Path:
    """A tiny Llama patched with ``method`` x4 and saved with its tokenizer, as `hf-rope-ext patch` would."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_rope_ext import patch_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ORIGINAL)
    model = LlamaForCausalLM(config)
    tokenizer = tiny_tokenizer(ORIGINAL)
    patch_model(model, method, FACTOR, tokenizer=tokenizer, **params)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_extended_bert(folder: Path) -> Path:
    """A tiny BERT whose config carries a hand-written learned-table extension record (what the absolute-table
    backend writes: kind "absolute", method "interpolate"); the card reads config.json only."""
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=ORIGINAL))
    model.save_pretrained(folder)
    tiny_tokenizer(NEW).save_pretrained(folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["max_position_embeddings"] = NEW
    config["hf_rope_ext"] = {
        "method": "interpolate", "kind": "absolute", "factor": float(FACTOR),
        "original_max_position_embeddings": ORIGINAL, "max_position_embeddings": NEW, "parameters": {},
        "dynamic": False, "paper": "https://arxiv.org/abs/2306.15595", "library_version": "0.1.0",
        "original_config": {"max_position_embeddings": ORIGINAL},
    }
    path.write_text(json.dumps(config, indent=2))
    return folder
