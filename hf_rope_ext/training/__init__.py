"""Helpers for fine-tuning an extended model at its new length (used by ``recipes/finetune.py``).

- ``data``: documents from files / ``datasets`` / built-in offline corpora, cached tokenisation, packing into chunks,
  deterministic sharded batches, masked-LM masking.
- ``pose``: PoSE position ids (short windows whose positions cover the target length), https://arxiv.org/abs/2309.10400
- ``s2attn``: LongLoRA's shifted sparse attention for training, https://arxiv.org/abs/2309.12307
- ``adapters``: which modules LoRA targets by default and which LongLoRA trains fully (embeddings, norms).
- ``heldout``: perplexity on held-out chunks at a given length.
- ``io``: atomic directory writes and checkpoint discovery.
- ``distributed``: the engine a launch really trains with (FSDP2 on CPU processes, refusals) and context
  parallelism's batches (global position ids, labels shifted before sharding).
"""
