"""Helpers for the evaluation tests: a tiny Llama, an offline byte-level BPE tokenizer, a short training run."""

from __future__ import annotations

import functools

import torch

VOCAB = 384


@functools.lru_cache(maxsize=1)
def _training_text() -> str:
    import pydoc_data.topics

    return "\n\n".join(list(pydoc_data.topics.topics.values())[:40])


def bpe_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE trained on Python's own docs (offline, ~0.3 s) with single-digit tokens and real decoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_training_text()], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=64)


def tiny_llama(max_positions: int = 64, seed: int = 0, vocab_size: int = VOCAB, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    return LlamaForCausalLM(config).eval()


def train_tiny_llama(tokenizer, length: int = 32, steps: int = 60, seed: int = 0):
    """A tiny Llama trained for ``steps`` steps on windows of ``length`` tokens of Python's docs."""
    from hf_rope_ext.eval.text import tokenize

    ids = tokenize(tokenizer, _training_text())
    model = tiny_llama(max_positions=length, seed=seed, vocab_size=len(tokenizer))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - length - 1, (16,), generator=gen)
        batch = torch.stack([ids[s : s + length] for s in starts])  # [16, length]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()
