"""Pretrain a tiny testbed model from scratch and cache it (benchmark 2's model).

The testbed is a pipeline and regression check: the default Llama is weaker than a bigram model on its held-out
text and uses about 16 tokens of context (benchmarks/RESULTS.md section 2), so it cannot show long-context learning.

Usage::

    python scripts/train_testbed.py                      # Llama, 256 tokens: ~6 min on 1 CPU thread; prints the folder
    python scripts/train_testbed.py --arch gpt2          # GPT-2 (learned position table), 128 tokens
    python scripts/train_testbed.py --arch bert          # BERT masked LM (learned position table), 128 tokens
    python scripts/train_testbed.py --steps 100 --force  # retrain even when cached

Text: the offline default ``builtin:pydoc`` (Python's own reference pages). Its last 8 % (by characters) is held out
and written to ``heldout.txt`` for evaluation; the rest is ``train.txt`` (also the fine-tune data of the
benchmark). A byte-level BPE vocabulary (``--vocab``, default 2048) is trained on ``train.txt`` with ``tokenizers``.
The model trains on random windows of ``--seq-len`` tokens (seeded, but not bit-reproducible across sessions: a
retrain of the default Llama with the same options read the held-out text at PPL 161.69 against 161.11) and is
saved with ``save_pretrained`` into
``$HF_ROPE_EXT_TESTBED`` or ``~/.cache/hf_rope_ext/testbed/<arch>-<hash of the options>/`` together with
``testbed.json`` (options, loss curve, wall time). A folder that already holds a finished model with the same
options is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULTS = {
    "llama": {"seq_len": 256, "layers": 4, "hidden": 192, "heads": 4, "intermediate": 512, "steps": 240,
              "batch": 12, "lr": 3e-3},
    "gpt2": {"seq_len": 128, "layers": 3, "hidden": 128, "heads": 4, "intermediate": 512, "steps": 250,
             "batch": 16, "lr": 3e-3},
    "bert": {"seq_len": 128, "layers": 3, "hidden": 128, "heads": 4, "intermediate": 512, "steps": 250,
             "batch": 16, "lr": 1e-3},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(DEFAULTS), default="llama")
    p.add_argument("--seq-len", type=int, default=None, help="trained context length (llama 256, gpt2/bert 128)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="model folder (default: the cache folder named above)")
    p.add_argument("--force", action="store_true", help="retrain even when a cached model matches")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.arch].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def options(args: argparse.Namespace) -> dict:
    keys = ["arch", "seq_len", "layers", "hidden", "heads", "intermediate", "vocab", "steps", "batch", "lr", "seed"]
    return {k: getattr(args, k) for k in keys}


def cache_root() -> Path:
    env = os.environ.get("HF_ROPE_EXT_TESTBED")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_rope_ext" / "testbed"


def folder_for(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    digest = hashlib.sha256(json.dumps(options(args), sort_keys=True).encode()).hexdigest()[:10]
    return cache_root() / f"{args.arch}-{digest}"


def split_text() -> tuple[str, str]:
    from hf_rope_ext.eval.text import load_text

    text = load_text("builtin:pydoc").text
    cut = text.rfind("\n\n", 0, int(len(text) * 0.92))
    return text[:cut], text[cut + 2:]


def train_tokenizer(train: str, vocab: int, folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "[PAD]", "[MASK]", "[CLS]", "[SEP]"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    chunks = [train[i:i + 10000] for i in range(0, len(train), 10000)]
    tok.train_from_iterator(chunks, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="[PAD]", mask_token="[MASK]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    fast.save_pretrained(folder)
    return fast


def build_model(args: argparse.Namespace, tok):
    import transformers as tf

    if args.arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads,
                             num_key_value_heads=args.heads, max_position_embeddings=args.seq_len,
                             rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return tf.LlamaForCausalLM(cfg)
    if args.arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=len(tok), n_positions=args.seq_len, n_embd=args.hidden, n_layer=args.layers,
                            n_head=args.heads, n_inner=args.intermediate, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return tf.GPT2LMHeadModel(cfg)
    cfg = tf.BertConfig(vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=args.intermediate,
                        max_position_embeddings=args.seq_len, pad_token_id=tok.pad_token_id, type_vocab_size=1)
    return tf.BertForMaskedLM(cfg)


def mask_tokens(ids, tok, gen, probability: float = 0.15):
    """BERT masking: 15 % of positions are predicted; of those 80 % [MASK], 10 % random, 10 % unchanged."""
    import torch

    labels = ids.clone()
    chosen = torch.rand(ids.shape, generator=gen) < probability
    labels[~chosen] = -100
    inputs = ids.clone()
    roll = torch.rand(ids.shape, generator=gen)
    inputs[chosen & (roll < 0.8)] = tok.mask_token_id
    rand = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[rand] = torch.randint(len(tok), ids.shape, generator=gen)[rand]
    return inputs, labels


def ensure_testbed(args: argparse.Namespace, log=print) -> Path:
    """The cached model folder for ``args``, trained first when missing."""
    import torch

    folder = folder_for(args)
    meta_path = folder / "testbed.json"
    if meta_path.is_file() and not args.force:
        meta = json.loads(meta_path.read_text())
        if meta.get("options") == options(args):
            log(f"testbed cached: {folder}")
            return folder
    if args.threads:
        torch.set_num_threads(args.threads)
    folder.mkdir(parents=True, exist_ok=True)
    train, heldout = split_text()
    (folder / "train.txt").write_text(train)
    (folder / "heldout.txt").write_text(heldout)
    torch.manual_seed(args.seed)
    tok = train_tokenizer(train, args.vocab, folder)
    stream = torch.tensor(tok(train)["input_ids"], dtype=torch.long)
    model = build_model(args, tok)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{args.arch}: {n_params / 1e6:.2f}M parameters, {stream.numel()} training tokens, "
        f"{args.steps} steps x {args.batch} x {args.seq_len}")
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 15)
    curve, t0 = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, stream.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        ids = torch.stack([stream[s:s + args.seq_len] for s in starts.tolist()])
        if args.arch == "bert":
            ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
            inputs, labels = mask_tokens(ids, tok, gen)
            loss = model(input_ids=inputs, labels=labels).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append([step + 1, loss.item()])
        if (step + 1) % 25 == 0 or step == 0:
            log(f"step {step + 1}/{args.steps} loss {curve[-1][1]:.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    model.save_pretrained(folder)
    meta = {"options": options(args), "parameters": n_params, "train_tokens": int(stream.numel()),
            "wall_s": time.perf_counter() - t0, "threads": torch.get_num_threads(), "loss_curve": curve,
            "text": "builtin:pydoc, first 92 % train / last 8 % heldout.txt"}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    log(f"saved {folder} ({meta['wall_s']:.0f} s)")
    return folder


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(ensure_testbed(args, log=lambda s: print(s, flush=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
