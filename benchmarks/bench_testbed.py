"""Benchmark 2: the cheap testbed — tiny models pretrained from scratch at a short context (scripts/train_testbed.py).

Usage::

    python benchmarks/bench_testbed.py                          # all parts, ~15 min on 2 CPU cores
    python benchmarks/bench_testbed.py --parts zero_shot        # zero_shot, recovery, tables (comma list)
    python benchmarks/bench_testbed.py --recover-methods linear,yarn --recover-factors 4,8 \
        --recover-steps 25,50,100,200
    python benchmarks/bench_testbed.py --parts baselines                # bigram baseline, loss by position, step 0
    python benchmarks/bench_testbed.py --report-only [--block recovery] # tables from the JSON (--plots: PNGs)

Parts (each resumable: results are written to ``--out`` after every measurement and skipped when already there):

* ``zero_shot`` — the tiny Llama (trained at 256 tokens): every rotary method of the registry patched with factor s
  and read at s x 256 tokens, s = 2, 4, 8, 16, plus the unpatched model at every length (``none``). Non-overlapping
  windows over the same first ``--eval-tokens`` tokens of the held-out text (``sliding_window_perplexity``), so every
  column scores the same tokens. ``longrope`` is given yarn's per-dimension divisors as long factors (see
  bench_zero_shot.py): NTK-by-parts with LongRoPE's attention factor.
* ``recovery`` — the fine-tune recipe (``hf_rope_ext.recipes.finetune``, full fine-tuning, constant learning rate) at
  s x 256 tokens for each method in ``--recover-methods`` and factor in ``--recover-factors``; one run per
  (method, factor), stopped at each of ``--recover-steps`` with ``stop_after`` and resumed, the checkpoint's weights
  evaluated with the same held-out perplexity as ``zero_shot``.
* ``baselines`` — what the Llama testbed can and cannot show: a bigram model (interpolated with the unigram
  distribution, weight fitted on the last 10 % of ``train.txt``, then counted on all of it) scored on the same
  held-out tokens; the testbed's loss by position inside its 256-token windows (does it use its context?); and every
  recovery run's *step 0* (the patched, not yet fine-tuned model) read at the new and at the trained length, the
  same weights both times, so the "length cost" at step 0 compares like with like. These use the cached testbed,
  which is retrained when missing (its training is not bit-reproducible across machines and library versions).
* ``tables`` — tiny GPT-2 (causal, learned table) and BERT (masked LM) trained at 128 tokens: every learned-table
  method of the registry at 2x and 4x zero-shot (BERT: masked-LM perplexity, 15 % of positions, fixed masks), then
  the recipe at 2x for the recovery steps.

Writes ``benchmarks/results/testbed.json`` and ``testbed_zero_shot.png``, ``testbed_recovery.png``; prints tables.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BLOCKS = ("zero_shot", "baselines", "recovery", "tables")
POSITION_BUCKETS = [(1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 128), (128, 192), (192, 256)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="zero_shot,recovery,tables")
    p.add_argument("--factors", default="2,4,8,16", help="zero-shot factors for the Llama testbed")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored at every length")
    p.add_argument("--recover-methods", default="extrapolate,linear,ntk,yarn")
    p.add_argument("--recover-factors", default="4")
    p.add_argument("--recover-steps", default="25,50,100")
    p.add_argument("--recover-lr", type=float, default=5e-4)
    p.add_argument("--recover-batch", type=int, default=2)
    p.add_argument("--table-factors", default="2,4")
    p.add_argument("--table-recover-steps", default="25,50,100")
    p.add_argument("--table-lr", type=float, default=1e-4, help="recipe learning rate for GPT-2 / BERT")
    p.add_argument("--table-archs", default="gpt2,bert")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=str(RESULTS / "testbed.json"))
    p.add_argument("--report-only", action="store_true", help="print the tables from --out; no model, no measurement")
    p.add_argument("--block", choices=BLOCKS, default=None,
                   help="with --report-only: print only this block (as committed in benchmarks/RESULTS.md)")
    p.add_argument("--plots", action="store_true", help="with --report-only: also redraw the PNGs")
    return p.parse_args(argv)


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def testbed(arch: str) -> Path:
    tb = load_module(ROOT / "scripts" / "train_testbed.py", "train_testbed")
    return tb.ensure_testbed(tb.parse_args(["--arch", arch]), log=lambda s: print(s, flush=True))


def save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(path)


def heldout_ids(folder: Path, tok, n: int):
    import torch

    ids = torch.tensor(tok((folder / "heldout.txt").read_text())["input_ids"], dtype=torch.long)
    if ids.numel() < n:
        raise ValueError(f"held-out text has {ids.numel()} tokens, fewer than --eval-tokens {n}")
    return ids[:n]


def load(folder: Path, arch: str):
    import transformers as tf

    cls = {"llama": tf.AutoModelForCausalLM, "gpt2": tf.AutoModelForCausalLM, "bert": tf.AutoModelForMaskedLM}[arch]
    model = cls.from_pretrained(folder)
    model.eval()
    return model, tf.AutoTokenizer.from_pretrained(folder)


def longrope_params(model, factor: float) -> dict:
    from hf_rope_ext.methods._rope_base import default_inv_freq
    from hf_rope_ext.plots import rope_geometry
    from hf_rope_ext.registry import get_method

    geo = rope_geometry(model)
    dim, base = int(geo["head_dim"]), float(geo["base"])
    spec = get_method("yarn")
    inv, _ = spec.compute(spec.make_params(factor=factor, original_max_position_embeddings=geo["original_length"]),
                          dim, base)
    d = (default_inv_freq(dim, base) / inv).tolist()
    return {"long_factor": d, "short_factor": [1.0] * len(d)}


def causal_ppl(model, ids, window: int) -> float:
    import torch

    from hf_rope_ext.eval import sliding_window_perplexity

    with torch.inference_mode():
        return sliding_window_perplexity(model, ids, window, progress=False).perplexity


def masked_ppl(model, tok, ids, window: int, seed: int = 0) -> float:
    """exp(mean masked-LM loss) over windows [CLS] x(window-2) [SEP], 15 % of inner positions masked (fixed seed)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    inner = window - 2
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.numel() - inner + 1, inner):
            x = torch.cat([torch.tensor([tok.cls_token_id]), ids[start:start + inner],
                           torch.tensor([tok.sep_token_id])])
            chosen = torch.rand(window, generator=gen) < 0.15
            chosen[0] = chosen[-1] = False
            inputs = x.clone()
            inputs[chosen] = tok.mask_token_id
            logits = model(input_ids=inputs[None]).logits[0]
            nll = torch.nn.functional.cross_entropy(logits[chosen], x[chosen], reduction="sum")
            total, count = total + float(nll), count + int(chosen.sum())
    return math.exp(total / count)


def ppl(model, tok, ids, window: int, arch: str) -> float:
    return masked_ppl(model, tok, ids, window) if arch == "bert" else causal_ppl(model, ids, window)


# ---------------------------------------------------------------- zero-shot
def part_zero_shot(args, state, out: Path) -> None:
    from hf_rope_ext import patch_model, unpatch_model
    from hf_rope_ext.registry import METHODS

    folder = testbed("llama")
    model, tok = load(folder, "llama")
    L = model.config.max_position_embeddings
    ids = heldout_ids(folder, tok, args.eval_tokens)
    zs = state.setdefault("zero_shot", {"trained_length": L, "eval_tokens": args.eval_tokens, "rows": {}})
    factors = [int(f) for f in args.factors.split(",")]
    rows = zs["rows"]
    row = rows.setdefault("none", {})
    for s in [1] + factors:
        if str(s) not in row:
            row[str(s)] = causal_ppl(model, ids, s * L)
    save(out, state)
    methods = [n for n, spec in METHODS.items() if spec.kind == "rope"]
    for name in methods:
        row = rows.setdefault(name, {})
        for s in factors:
            if str(s) in row:
                continue
            params = longrope_params(model, s) if name == "longrope" else {}
            patch_model(model, name, factor=s, **params)
            try:
                row[str(s)] = causal_ppl(model, ids, s * L)
            finally:
                unpatch_model(model)
        save(out, state)
        print(f"[zero-shot] {name}: " + ", ".join(f"{k}x {v:.2f}" for k, v in row.items()), flush=True)


# ---------------------------------------------------------------- recovery with the recipe
def recipe_module():
    from hf_rope_ext.recipes import finetune

    return finetune


def checkpoint_model(folder: Path, arch: str, method: str, factor: float, ckpt: Path, params: dict):
    """A fresh patched model with the checkpoint's trained weights."""
    from safetensors.torch import load_file

    from hf_rope_ext import patch_model

    model, _ = load(folder, arch)
    patch_model(model, method, factor=factor, **params)
    files = sorted(ckpt.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model weights in checkpoint {ckpt}: {sorted(p.name for p in ckpt.iterdir())}")
    weights = {}
    for f in files:
        weights.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith(("lm_head.weight", "decoder.weight", "decoder.bias"))]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.eval()
    return model


def recover(args, arch: str, folder: Path, method: str, factor: int, steps: list[int], lr: float, workdir: Path,
            ids, window: int) -> dict:
    """One recipe run for (method, factor), stopped at every step count; perplexity after each."""
    import torch

    recipe = recipe_module()
    model0, _ = load(folder, arch)
    params = longrope_params(model0, factor) if method == "longrope" else {}
    del model0
    run_dir = workdir / f"{arch}-{method}-x{factor}"
    base = {
        "model": str(folder), "method": method, "factor": factor, "method_params": params, "train_mode": "full",
        "data": [str(folder / "train.txt")], "eval_chunks": 0, "eval_before_after": False,
        "max_steps": max(steps), "batch_size": args.recover_batch, "grad_accum": 1, "lr": lr,
        "lr_scheduler": "constant", "warmup_steps": 5, "save_every": 0, "keep_checkpoints": 0, "log_every": 1000,
        "output_dir": str(run_dir), "cache_dir": str(workdir / "tokens"), "model_card": False, "overwrite": True,
        "save_dtype": "float32",
    }
    result: dict = {"steps": {}, "loss_curve": None}
    done = 0
    t0 = time.perf_counter()
    for n in steps:
        values = dict(base, stop_after=n - done)
        if done:
            values.update(resume=True, overwrite=False)
        with contextlib.redirect_stderr(io.StringIO()):
            res = recipe.run(recipe.options_from_dict(values))
        if res.stopped:
            model = checkpoint_model(folder, arch, method, factor, res.checkpoint, params)
        else:
            model = res.model
            model.eval()
            result["loss_curve"] = res.summary.loss_curve
            result["tokens_per_s"] = res.summary.tokens_per_s
        tok = __import__("transformers").AutoTokenizer.from_pretrained(folder)
        result["steps"][str(n)] = ppl(model, tok, ids, window, arch)
        # the same weights read at the trained length: separates long-context recovery from plain extra training
        result.setdefault("short", {})[str(n)] = ppl(model, tok, ids, window // factor, arch)
        print(f"[recovery] {arch} {method} x{factor} after {n} steps: {result['steps'][str(n)]:.2f} "
              f"(at the trained length {window // factor}: {result['short'][str(n)]:.2f})", flush=True)
        del model
        torch.manual_seed(0)
        done = n
    result["seconds"] = time.perf_counter() - t0
    return result


def part_recovery(args, state, out: Path, workdir: Path) -> None:
    folder = testbed("llama")
    model, tok = load(folder, "llama")
    L = model.config.max_position_embeddings
    ids = heldout_ids(folder, tok, args.eval_tokens)
    rec = state.setdefault("recovery", {"trained_length": L, "lr": args.recover_lr, "batch": args.recover_batch,
                                        "runs": {}})
    steps = [int(x) for x in args.recover_steps.split(",")]
    for factor in [int(f) for f in args.recover_factors.split(",")]:
        for method in args.recover_methods.split(","):
            key = f"{method}|{factor}"
            if key in rec["runs"] and all(str(n) in rec["runs"][key]["steps"] for n in steps):
                continue
            r = recover(args, "llama", folder, method, factor, steps, args.recover_lr, workdir, ids, factor * L)
            zs = state.get("zero_shot", {}).get("rows", {}).get(method, {}).get(str(factor))
            r["step0"] = zs
            rec["runs"][key] = r
            save(out, state)


# ---------------------------------------------------------------- baselines: what the testbed can show
def bigram_ppl(train: list[int], heldout: list[int], vocab: int) -> dict:
    """Perplexity of add-one unigram and interpolated bigram models, P(b|a) = lam c(a,b)/c(a) + (1-lam) P_uni(b).

    ``lam`` is chosen on a grid by the likelihood of the last 10 % of ``train`` under counts from its first 90 %
    (Jelinek & Mercer 1980, "deleted interpolation"); the final counts use all of ``train``. ``heldout`` is scored
    token by token, each token given the one before it (the first token given nothing, by the unigram).
    """
    from collections import Counter
    from itertools import pairwise

    def fit(tokens):
        uni, bi, before = Counter(tokens), Counter(pairwise(tokens)), Counter(tokens[:-1])
        total = len(tokens)
        return (lambda b: (uni[b] + 1) / (total + vocab)), bi, before

    def nll(tokens, model, lam):
        p_uni, bi, before = model  # before[a]: how often a is followed by something
        out = -math.log(p_uni(tokens[0]))
        for a, b in pairwise(tokens):
            p_bi = bi[(a, b)] / before[a] if before[a] else 0.0
            out -= math.log(lam * p_bi + (1 - lam) * p_uni(b))
        return out / len(tokens)

    cut = int(len(train) * 0.9)
    dev_model = fit(train[:cut])
    grid = [i / 20 for i in range(20)]
    lam = min(grid, key=lambda x: nll(train[cut:], dev_model, x))
    model = fit(train)
    return {"lambda": lam, "bigram": math.exp(nll(heldout, model, lam)), "unigram": math.exp(nll(heldout, model, 0.0)),
            "train_tokens": len(train), "heldout_tokens": len(heldout), "vocab": vocab}


def loss_by_position(model, ids, window: int) -> list[float]:
    """Mean next-token loss (nats) at each position 1..window-1 over non-overlapping windows of ``ids``: position p
    is predicted from the p tokens before it in its window."""
    import torch

    sums, count = torch.zeros(window - 1, dtype=torch.float64), 0
    with torch.inference_mode():
        for start in range(0, ids.numel() - window + 1, window):
            x = ids[start:start + window][None]
            logits = model(input_ids=x).logits[0, :-1].float()  # [window-1, vocab]
            sums += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none").double()
            count += 1
    return (sums / count).tolist()


def part_baselines(args, state, out: Path) -> None:
    from hf_rope_ext import patch_model, unpatch_model

    folder = testbed("llama")
    model, tok = load(folder, "llama")
    L = model.config.max_position_embeddings
    ids = heldout_ids(folder, tok, args.eval_tokens)
    b = state.setdefault("baselines", {})
    if "bigram" not in b:
        train = tok((folder / "train.txt").read_text())["input_ids"]
        b["bigram"] = bigram_ppl(train, ids.tolist(), len(tok))
        save(out, state)
    if "loss_by_position" not in b:
        b["loss_by_position"] = {"window": L, "windows": ids.numel() // L, "nll": loss_by_position(model, ids, L)}
        save(out, state)
    # step 0, like with like: the patched, not yet fine-tuned model read at the new length AND at the trained length
    # (the same weights both times), for every (method, factor) of the recovery runs
    if "ppl_1x" not in b:
        b["ppl_1x"] = causal_ppl(model, ids, L)
    step0 = b.setdefault("step0", {})
    for key in state.get("recovery", {}).get("runs", {}):
        if key in step0:
            continue
        method, factor = key.split("|")[0], int(key.split("|")[1])
        params = longrope_params(model, factor) if method == "longrope" else {}
        patch_model(model, method, factor=factor, **params)
        try:
            step0[key] = {"new": causal_ppl(model, ids, factor * L), "trained": causal_ppl(model, ids, L)}
        finally:
            unpatch_model(model)
        save(out, state)
        print(f"[baselines] {key} step 0: {step0[key]['new']:.2f} at {factor * L} tokens, "
              f"{step0[key]['trained']:.2f} at {L}", flush=True)


# ---------------------------------------------------------------- learned tables
def part_tables(args, state, out: Path, workdir: Path) -> None:
    from hf_rope_ext import patch_model, unpatch_model
    from hf_rope_ext.registry import METHODS

    tables = state.setdefault("tables", {})
    methods = [n for n, spec in METHODS.items() if spec.kind == "absolute"]
    for arch in args.table_archs.split(","):
        folder = testbed(arch)
        model, tok = load(folder, arch)
        L = model.config.max_position_embeddings if arch == "bert" else model.config.n_positions
        factors = [int(f) for f in args.table_factors.split(",")]
        n_tokens = max(factors) * L * 8
        ids = heldout_ids(folder, tok, n_tokens)
        t = tables.setdefault(arch, {"trained_length": L, "eval_tokens": n_tokens, "zero_shot": {}, "recovery": {}})
        row = t["zero_shot"].setdefault("none", {})
        if "1" not in row:
            row["1"] = ppl(model, tok, ids, L, arch)
        for name in methods:
            row = t["zero_shot"].setdefault(name, {})
            for s in factors:
                if str(s) in row:
                    continue
                try:
                    patch_model(model, name, factor=s)
                except (ValueError, TypeError) as err:
                    row[str(s)] = f"refused: {str(err)[:160]}"
                    continue
                try:
                    row[str(s)] = ppl(model, tok, ids, s * L, arch)
                finally:
                    unpatch_model(model)
            save(out, state)
            print(f"[tables] {arch} {name}: {row}", flush=True)
        steps = [int(x) for x in args.table_recover_steps.split(",")]
        for name in methods:
            if not isinstance(t["zero_shot"][name].get(str(factors[0])), float):
                continue
            key = f"{name}|{factors[0]}"
            if key in t["recovery"] and all(str(n) in t["recovery"][key]["steps"] for n in steps):
                continue
            try:
                r = recover(args, arch, folder, name, factors[0], steps, args.table_lr, workdir, ids,
                            factors[0] * L)
            except Exception as err:  # record, keep going
                r = {"error": f"{type(err).__name__}: {str(err)[:300]}", "steps": {}}
                print(f"[tables] recovery {arch} {name} failed: {r['error']}", flush=True)
            r["step0"] = t["zero_shot"][name][str(factors[0])]
            t["recovery"][key] = r
            save(out, state)


# ---------------------------------------------------------------- report
def fmt(x) -> str:
    if isinstance(x, str):
        return x.split(":")[0]
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else (f"{x:.2f}" if x < 1000 else f"{x:.3g}")


def _gap(a, b) -> str:
    return "–" if a is None or b is None else f"{a - b:+.1f}"


def report_blocks(state: dict) -> dict[str, str]:
    """The markdown blocks of benchmarks/RESULTS.md section 2, by name (``BLOCKS``), from the JSON alone."""
    blocks = {}
    zs = state.get("zero_shot")
    if zs:
        L = zs["trained_length"]
        cols = sorted({int(k) for r in zs["rows"].values() for k in r})
        lines = [f"Tiny Llama trained at {L} tokens; PPL on the first {zs['eval_tokens']} held-out tokens, "
                 f"method patched with factor s and read at s x {L} (none: unpatched).", "",
                 "| method | " + " | ".join(f"{s}x ({s * L})" for s in cols) + " |", "|---|" + "---:|" * len(cols)]
        for name, r in zs["rows"].items():
            lines.append(f"| {name} | " + " | ".join(fmt(r.get(str(s))) for s in cols) + " |")
        blocks["zero_shot"] = "\n".join(lines)
    base = state.get("baselines", {})
    if base.get("bigram") and base.get("loss_by_position"):
        bg, lp = base["bigram"], base["loss_by_position"]
        W, nll = lp["window"], lp["nll"]  # nll[p - 1]: loss of the token at position p
        ppl_1x = base.get("ppl_1x")
        model_ppl = state.get("zero_shot", {}).get("rows", {}).get("none", {}).get("1")
        lines = [f"Held-out text, the same {bg['heldout_tokens']} tokens: tiny Llama (windows of {W}) PPL "
                 f"{fmt(model_ppl)} (the testbed retrained for this block: {fmt(ppl_1x)}); bigram "
                 f"{fmt(bg['bigram'])} (interpolated with the unigram, weight {bg['lambda']:g} fitted on the last "
                 f"10 % of the {bg['train_tokens']} training tokens); unigram {fmt(bg['unigram'])}.", "",
                 f"Tiny Llama's loss by position inside its {W}-token windows ({lp['windows']} windows; position p "
                 "is predicted from the p tokens before it):", "",
                 "| positions | " + " | ".join(f"{a}–{b - 1}" if b - a > 1 else f"{a}" for a, b in POSITION_BUCKETS)
                 + " |", "|---|" + "---:|" * len(POSITION_BUCKETS)]
        means = [sum(nll[a - 1:b - 1]) / (b - a) for a, b in POSITION_BUCKETS]
        lines += ["| loss (nats) | " + " | ".join(f"{m:.3f}" for m in means) + " |",
                  "| PPL | " + " | ".join(fmt(math.exp(m)) for m in means) + " |"]
        if base.get("step0"):
            ref = state.get("zero_shot", {}).get("rows", {}).get("none", {}).get("1")
            lines += ["", "Length cost at step 0, like with like: the patched, not yet fine-tuned model read at the "
                          f"new length and at {W} tokens (the same weights). This testbed reads the held-out tokens "
                          f"at {fmt(base.get('ppl_1x'))} unpatched (the model of the other tables: {fmt(ref)}).", "",
                      f"| method | factor | PPL at factor × {W} | PPL at {W} | gap |", "|---|---:|---:|---:|---:|"]
            for key, r in base["step0"].items():
                m, f = key.split("|")
                lines.append(f"| {m} | {f} | {fmt(r['new'])} | {fmt(r['trained'])} | {_gap(r['new'], r['trained'])} |")
        blocks["baselines"] = "\n".join(lines)
    rec = state.get("recovery")
    if rec and rec["runs"]:
        L = rec["trained_length"]
        steps = sorted({int(k) for r in rec["runs"].values() for k in r["steps"]})
        lines = [f"Recovery with the recipe (full fine-tune, lr {rec['lr']} constant, batch {rec['batch']}), "
                 "held-out PPL at the new length:", "",
                 "| method | factor | step 0 | " + " | ".join(f"step {n}" for n in steps) + " | tokens/s |",
                 "|---|---:|---:|" + "---:|" * (len(steps) + 1)]
        for key, r in rec["runs"].items():
            m, f = key.split("|")
            lines.append(f"| {m} | {f} | {fmt(r.get('step0'))} | "
                         + " | ".join(fmt(r["steps"].get(str(n))) for n in steps)
                         + f" | {r.get('tokens_per_s') or 0:.0f} |")
        if any(r.get("short") for r in rec["runs"].values()):
            lines += ["", f"The same checkpoints read at the trained length {L}:", "",
                      "| method | factor | " + " | ".join(f"step {n}" for n in steps) + " |",
                      "|---|---:|" + "---:|" * len(steps)]
            for key, r in rec["runs"].items():
                m, f = key.split("|")
                lines.append(f"| {m} | {f} | " + " | ".join(fmt(r.get("short", {}).get(str(n))) for n in steps) + " |")
            lines += ["", f"Gap: PPL at the new length minus PPL at {L} tokens, same weights:", "",
                      "| method | factor | " + " | ".join(f"step {n}" for n in steps) + " |",
                      "|---|---:|" + "---:|" * len(steps)]
            for key, r in rec["runs"].items():
                m, f = key.split("|")
                short = r.get("short", {})
                lines.append(f"| {m} | {f} | "
                             + " | ".join(_gap(r["steps"].get(str(n)), short.get(str(n))) for n in steps) + " |")
        blocks["recovery"] = "\n".join(lines)
    lines = []
    for arch, t in state.get("tables", {}).items():
        cols = sorted({int(k) for r in t["zero_shot"].values() for k in r})
        what = "masked-LM PPL (15 % masked)" if arch == "bert" else "PPL"
        lines += ["" if lines else None,
                  f"Tiny {arch} trained at {t['trained_length']} tokens, {what}, zero-shot (none: unpatched at 1x):",
                  "", "| method | " + " | ".join(f"{s}x" for s in cols) + " |", "|---|" + "---:|" * len(cols)]
        for name, r in t["zero_shot"].items():
            lines.append(f"| {name} | " + " | ".join(fmt(r.get(str(s))) for s in cols) + " |")
        if t["recovery"]:
            steps = sorted({int(k) for r in t["recovery"].values() for k in r["steps"]})
            lr = state.get("meta", {}).get("table_lr")
            lines += ["", f"{arch} recovery with the recipe (full fine-tune incl. the table, lr {lr} constant), "
                          "PPL at the new length (in brackets: the same weights at the trained length):", "",
                      "| method | factor | step 0 | " + " | ".join(f"step {n}" for n in steps) + " |",
                      "|---|---:|---:|" + "---:|" * len(steps)]
            for key, r in t["recovery"].items():
                m, f = key.split("|")
                short = r.get("short") or {}
                cells = ([fmt(r["steps"].get(str(n))) + (f" ({fmt(short[str(n)])} at 1x)" if short else "")
                          for n in steps] if r["steps"] else [r.get("error", "")[:80]])
                lines.append(f"| {m} | {f} | {fmt(r.get('step0'))} | " + " | ".join(cells) + " |")
    if lines:
        blocks["tables"] = "\n".join(x for x in lines if x is not None)
    return blocks


def report(state: dict, block: str | None = None) -> str:
    """Every block (or only ``block``), as printed by --report-only."""
    blocks = report_blocks(state)
    if block is not None:
        if block not in blocks:
            raise SystemExit(f"--block {block}: the JSON has no data for it (has: {', '.join(blocks) or 'nothing'})")
        return blocks[block]
    return "\n\n".join(blocks.values())


def draw(state: dict, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    zs = state.get("zero_shot")
    if zs:
        fig = Figure(figsize=(8, 5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for name, r in zs["rows"].items():
            xs = sorted(int(k) for k in r)
            ax.plot(xs, [r[str(x)] for x in xs], marker="o", label=name, linestyle="--" if name == "none" else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"length / trained length ({zs['trained_length']})")
        ax.set_ylabel("held-out perplexity")
        ax.set_title("tiny Llama testbed, zero-shot")
        ax.legend(fontsize=8)
        fig.savefig(out.with_name(out.stem + "_zero_shot.png"), dpi=110, bbox_inches="tight")
    rec = state.get("recovery")
    if rec and rec["runs"]:
        fig = Figure(figsize=(8, 5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for key, r in rec["runs"].items():
            xs = [0] + sorted(int(k) for k in r["steps"])
            ys = [r.get("step0")] + [r["steps"][str(x)] for x in xs[1:]]
            ax.plot(xs, ys, marker="o", label=key.replace("|", " x"))
        ax.set_yscale("log")
        ax.set_xlabel("fine-tune steps (recipe)")
        ax.set_ylabel("held-out perplexity at the new length")
        ax.set_title("tiny Llama testbed, recovery")
        ax.legend(fontsize=8)
        fig.savefig(out.with_name(out.stem + "_recovery.png"), dpi=110, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    state = json.loads(out.read_text()) if out.is_file() else {}
    if not args.report_only:
        import platform

        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        logging.basicConfig(level=logging.WARNING)
        state["meta"] = {"command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
                         "updated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                         "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                         "torch": torch.__version__, "table_lr": args.table_lr}
        parts = args.parts.split(",")
        with tempfile.TemporaryDirectory(prefix="bench_testbed_") as tmp:
            workdir = Path(tmp)
            if "zero_shot" in parts:
                part_zero_shot(args, state, out)
            if "recovery" in parts:
                part_recovery(args, state, out, workdir)
            if "baselines" in parts:
                part_baselines(args, state, out)
            if "tables" in parts:
                part_tables(args, state, out, workdir)
        save(out, state)
    print(report(state, args.block if args.report_only else None))
    if not args.report_only or args.plots:
        try:
            draw(state, out)
        except Exception as err:  # a picture must not lose the numbers
            print(f"(plot failed: {err})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
