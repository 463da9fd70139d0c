"""Benchmark 5: attention-level methods on the real SmolLM2-135M (trained at 8192 tokens) at 16k tokens (factor 2).

Usage::

    python benchmarks/bench_attention.py                                  # CPU plan (see --configs), resumable
    python benchmarks/bench_attention.py --device cuda --length 32768 --decode none,dca --passkey dca   # GPU plan
    python benchmarks/bench_attention.py --configs dca,self_extend:group_size=4 --passkey dca --passkey-depths 0.5
    python benchmarks/bench_attention.py --report-only                    # tables from the JSON already written

Stages, each resumable (every finished measurement is written to ``--out`` at once; what is there is skipped):

1. The control a user would otherwise run: the *unpatched* model reading positions 8k-16k of the window with its own
   8k window sliding by 2k (each 2k bucket scored as the last 2048 tokens of the 8192-token window ending with it,
   so every scored token sees 6144-8191 tokens of context, all inside the trained length).
2. Each config (``method`` or ``method:param=value:param=value``): one forward over the 16k window of
   ``builtin:pydoc`` from token ``--offset`` 20000 (the window of benchmarks/RESULTS.md section 1), perplexity over
   the whole window, over positions 8k-16k and by 2k bucket; wall seconds of that forward and the peak extra
   resident memory while it ran (psutil sampler) against the unpatched sdpa model's forward (config ``none``).
3. Decoding cost for the ``--decode`` configs: prefill the 16k window with a KV cache, then time
   ``--decode-steps`` single-token steps (seconds per generated token, against config ``none``).
4. Passkey at 16k for the ``--passkey`` configs: keys at ``--passkey-depths``, ``--passkey-trials`` keys each.
   ``--passkey-window-control``: the same prompts (same keys) read by the *unpatched* model through its own 8k
   window, i.e. only their last 8192 tokens (instructions and early keys fall out of view), greedy, 8 new tokens.

Writes ``benchmarks/results/attention_16k_<device>.json`` and prints markdown tables generated from it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
ORIGINAL = 8192
LENGTH = 16384
DEFAULT_CONFIGS = "none,yarn,yarn:logn=true,dca,self_extend,rerope,leaky_rerope,dca:logn=true"


def parse_config(text: str) -> tuple[str, dict]:
    """'self_extend:group_size=4:window=1024' -> ('self_extend', {'group_size': 4, 'window': 1024})."""
    from hf_rope_ext.registry import parse_param_value as parse_value

    name, *items = text.split(":")
    params = {}
    for item in items:
        key, _, value = item.partition("=")
        params[key] = parse_value(value)
    return name, params


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cpu")
    p.add_argument("--length", type=int, default=16384, help="window length (factor = length / 8192); default 16384")
    p.add_argument("--dtype", default=None, help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma list (default {DEFAULT_CONFIGS}); 'none' = unpatched")
    p.add_argument("--text", default="builtin:pydoc")
    p.add_argument("--offset", type=int, default=20000)
    p.add_argument("--passkey", default="", help="comma list of configs given passkey at 16k")
    p.add_argument("--passkey-depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--passkey-trials", type=int, default=2)
    p.add_argument("--passkey-window-control", action="store_true",
                   help="also the baseline a user would run: the unpatched model reading only the last 8192 tokens "
                        "of each same passkey prompt (the key is in view only when it lies in them)")
    p.add_argument("--decode", default="", help="comma list of configs timed for decoding with a 16k cache")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--no-control", action="store_true", help="skip the 8k sliding-window control")
    p.add_argument("--redo", default="", help="comma list of configs to measure again (e.g. a timing taken while "
                   "the machine was shared)")
    p.add_argument("--out", default=None)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    tag = "cuda" if args.device.startswith("cuda") else args.device
    args.out = Path(args.out or RESULTS / f"attention_{args.length // 1024}k_{tag}.json")
    return args


class PeakRSS:
    """Peak resident memory of this process above its level at entry, sampled every 20 ms (MiB)."""

    def __enter__(self):
        import psutil

        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.extra_mib = (self.peak - self.base) / 2**20


@contextlib.contextmanager
def patched(model, config: str):
    """The model patched with ``config`` ('none': as it is) for the duration of the block."""
    from hf_rope_ext import patch_model, unpatch_model

    name, params = parse_config(config)
    if name != "none":
        patch_model(model, name, factor=LENGTH / ORIGINAL, **params)
    try:
        yield
    finally:
        if name != "none":
            unpatch_model(model)


def ppl(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count) if count else float("nan")


def summarize(buckets: list[dict]) -> dict:
    """Whole-window and 8k-16k perplexity from 2k buckets (token-weighted)."""
    def over(bs):
        return ppl(sum(math.log(b["perplexity"]) * b["tokens"] for b in bs), sum(b["tokens"] for b in bs))

    return {"ppl_16k": over(buckets), "ppl_8k_16k": over([b for b in buckets if b["start"] >= ORIGINAL]),
            "buckets": [{"start": b["start"], "tokens": b["tokens"], "perplexity": b["perplexity"]} for b in buckets]}


def fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def report(state: dict) -> str:
    lines = []
    control = state.get("control")
    base = state["configs"].get("none")
    if control:
        lines += [f"Control (unpatched, 8k sliding window over positions 8k–{LENGTH // 1024}k): **{fmt(control['ppl_8k_16k'])}** "
                  f"(buckets {', '.join(fmt(b['perplexity']) for b in control['buckets'])})", ""]
    k = LENGTH // 1024
    if state["configs"]:
        lines += [f"| config | PPL 0–{k}k | PPL 8k–{k}k | vs control | "
                  + " | ".join(f"{b // 1024}k" for b in range(0, LENGTH, 2048))
                  + " | prefill s | × none | peak extra MiB |",
                  "|---|---|---|---|" + "---|" * (LENGTH // 2048) + "---|---|---|"]
    for name, r in state["configs"].items():
        vs = (f"{r['ppl_8k_16k'] - control['ppl_8k_16k']:+.2f}" if control else "–")
        ratio = f"{r['seconds'] / base['seconds']:.2f}" if base else "–"
        lines.append(f"| {name} | {fmt(r['ppl_16k'])} | {fmt(r['ppl_8k_16k'])} | {vs} | "
                     + " | ".join(fmt(b["perplexity"]) for b in r["buckets"])
                     + f" | {r['seconds']:.0f} | {ratio} | {r['peak_extra_mib']:.0f} |")
    decode = state.get("decode") or {}
    if decode:
        base_tok = decode.get("none", {}).get("seconds_per_token")
        lines += ["", f"| config | s / generated token ({LENGTH // 1024}k cache) | × none |", "|---|---|---|"]
        for name, r in decode.items():
            ratio = f"{r['seconds_per_token'] / base_tok:.2f}" if base_tok else "–"
            lines.append(f"| {name} | {r['seconds_per_token']:.3f} | {ratio} |")
    if state.get("passkey"):
        lines += ["", "| config | depth | keys correct | answers (expected->generated) |", "|---|---|---|---|"]
        for key, r in state["passkey"].items():
            name, depth = key.rsplit("|", 1)
            lines.append(f"| {name} | {depth} | {r['correct']}/{r['total']} | {', '.join(r['outputs'])} |")
        totals = {}
        for key, r in state["passkey"].items():
            name = key.rsplit("|", 1)[0]
            c, t = totals.get(name, (0, 0))
            totals[name] = (c + r["correct"], t + r["total"])
        lines += [""] + [f"Passkey at {LENGTH // 1024}k, {name}: {c}/{t} keys over all depths" for name, (c, t) in totals.items()]
    if state.get("passkey_window_control"):
        lines += ["" if lines else None, f"| unpatched, last {ORIGINAL} tokens of the same prompts: depth | key in view | keys correct | "
                      "answers (expected->generated) |", "|---|---|---|---|"]
        for depth, r in state["passkey_window_control"].items():
            view = "/".join("yes" if v else "no" for v in r["key_in_view"])
            lines.append(f"| {depth} | {view} | {r['correct']}/{r['total']} | {', '.join(r['outputs'])} |")
    return "\n".join(x for x in lines if x is not None)


def main(argv: list[str] | None = None) -> int:
    global LENGTH
    args = parse_args(argv)
    LENGTH = args.length
    state = json.loads(args.out.read_text()) if args.out.exists() else {"configs": {}, "passkey": {}}
    if args.report_only:
        print(report(state))
        return 0
    for config in [c for c in args.redo.split(",") if c]:
        state["configs"].pop(config, None)

    import torch

    from hf_rope_ext.eval import passkey_accuracy, perplexity_at_lengths
    from hf_rope_ext.eval.perplexity import token_nll
    from hf_rope_ext.eval.text import load_text, tokenize
    from hf_rope_ext.loading import load_model

    def save():
        state["meta"] = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)", "length": LENGTH,
                         "factor": LENGTH / ORIGINAL,
                         "text": args.text, "offset": args.offset, "dtype": args.dtype, "device": args.device,
                         "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
                         "updated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(state, indent=1))

    model, tok = load_model("smollm2", dtype=args.dtype, device=args.device)
    model.eval()
    ids = tokenize(tok, load_text(args.text))
    window = ids[args.offset : args.offset + LENGTH]

    if not args.no_control and "control" not in state:
        buckets = []
        t0 = time.perf_counter()
        for start in range(ORIGINAL, LENGTH, 2048):
            # the 8192 tokens ending with this bucket: each scored token sees 6144-8191 tokens, all inside training
            piece = window[start + 2048 - ORIGINAL : start + 2048][None]
            with torch.inference_mode():
                nll = token_nll(model, piece, first_scored=ORIGINAL - 2048)[0, ORIGINAL - 2048 :]
            buckets.append({"start": start, "tokens": int(nll.numel()), "perplexity": math.exp(float(nll.mean()))})
            print(f"[control] bucket {start}: {buckets[-1]['perplexity']:.2f}", flush=True)
        state["control"] = {**summarize(buckets), "seconds": time.perf_counter() - t0}
        save()

    for config in [c for c in args.configs.split(",") if c]:
        if config in state["configs"]:
            continue
        params = parse_config(config)[1]
        with patched(model, config), PeakRSS() as mem, torch.inference_mode():
            t0 = time.perf_counter()
            rep = perplexity_at_lengths(model, tok, [LENGTH], ids, offset=args.offset, bucket_size=2048,
                                        share_forward=True, model_name="smollm2", progress=False)
            seconds = time.perf_counter() - t0
        result = rep.to_dict()["results"][0]
        state["configs"][config] = {**summarize(result["buckets"]), "seconds": seconds,
                                    "peak_extra_mib": mem.extra_mib, "params": params}
        save()
        r = state["configs"][config]
        print(f"[ppl] {config}: 16k {r['ppl_16k']:.2f}, 8k-16k {r['ppl_8k_16k']:.2f} ({seconds:.0f} s, "
              f"+{mem.extra_mib:.0f} MiB)", flush=True)

    state.setdefault("decode", {})
    for config in [c for c in args.decode.split(",") if c]:
        if config in state["decode"]:
            continue
        with patched(model, config), torch.inference_mode():
            out = model(window[None], use_cache=True, logits_to_keep=1)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(args.decode_steps):
                out = model(token, cache=cache, use_cache=True)
                cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            per_token = (time.perf_counter() - t0) / args.decode_steps
        state["decode"][config] = {"seconds_per_token": per_token, "cache_tokens": LENGTH, "steps": args.decode_steps}
        save()
        print(f"[decode] {config}: {per_token:.3f} s/token with a {LENGTH}-token cache", flush=True)

    depths = [float(d) for d in args.passkey_depths.split(",")]
    for config in [c for c in args.passkey.split(",") if c]:
        for depth in depths:
            key = f"{config}|{depth}"
            if key in state["passkey"]:
                continue
            with patched(model, config), torch.inference_mode():
                rep = passkey_accuracy(model, tok, [LENGTH], [depth], trials=args.passkey_trials,
                                       max_new_tokens=8, model_name="smollm2", progress=False)
            trials = rep.to_dict()["trials"]
            state["passkey"][key] = {"correct": sum(t["correct"] for t in trials), "total": len(trials),
                                     "outputs": [f"{t['answer']}->{t['output'].strip()!r}" for t in trials],
                                     "seconds": rep.seconds}
            save()
            print(f"[passkey] {key}: {state['passkey'][key]['correct']}/{len(trials)} {state['passkey'][key]['outputs']}",
                  flush=True)
    if args.passkey_window_control:
        passkey_window_control(model, tok, depths, args.passkey_trials, state, save)
    print(report(state))
    return 0


def passkey_window_control(model, tok, depths, trials: int, state: dict, save) -> None:
    """Unpatched model, last ``ORIGINAL`` tokens of each 16k passkey prompt (the keys of ``passkey_accuracy``'s
    cells: seed 0, trial 0..trials-1), greedy; scored like the passkey stage (first number == key)."""
    import torch

    from hf_rope_ext.eval.passkey import build_passkey_prompt, random_key
    from hf_rope_ext.eval.retrieval import cell_rng, score_answer

    control = state.setdefault("passkey_window_control", {})
    for depth in depths:
        key = f"{depth}"
        if key in control:
            continue
        t0, correct, outputs, in_view = time.perf_counter(), 0, [], []
        for trial in range(trials):
            answer = random_key(cell_rng(0, "passkey", LENGTH, depth, trial), 5)
            prompt = build_passkey_prompt(tok, LENGTH, depth, answer)
            ids = torch.tensor(prompt.input_ids[-ORIGINAL:])[None]
            in_view.append(prompt.needle_start >= len(prompt.input_ids) - ORIGINAL)
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            ok = score_answer(text, answer)[1]
            correct += ok
            outputs.append(f"{answer}->{text.strip()!r}")
        control[key] = {"correct": correct, "total": trials, "outputs": outputs, "key_in_view": in_view,
                        "seconds": time.perf_counter() - t0}
        save()
        print(f"[passkey window control] depth {depth}: {correct}/{trials} (key in the last {ORIGINAL}: {in_view}) "
              f"{outputs}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
