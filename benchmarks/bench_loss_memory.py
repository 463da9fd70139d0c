"""Benchmark 7 (issue 12): peak memory of one long training step, the recipe's chunked loss against the model's own.

Usage::

    python benchmarks/bench_loss_memory.py                          # SmolLM2, first 4 layers, 16k tokens, CPU
    python benchmarks/bench_loss_memory.py --layers 30 --seq-len 32768 --device cuda   # GPU plan (not run)
    python benchmarks/bench_loss_memory.py --report-only

One forward + backward of a causal LM at ``--seq-len`` tokens with LoRA-free full gradients, in a fresh subprocess
per configuration (so the peak is that configuration's own):

* ``plain`` — what a plain transformers loop does: ``model(input_ids, labels=input_ids).loss.backward()`` (the model
  builds ``[tokens, vocab]`` fp32 logits, and their gradient);
* ``recipe`` — the recipe's loss, ``hf_rope_ext.training.loss.chunked_causal_lm_loss`` (``--chunk`` positions of
  logits at a time, recomputed in backward);
* ``plain+gc`` / ``recipe+gc`` — the same with gradient checkpointing of the decoder layers.

The model is the real SmolLM2-135M-Instruct (vocabulary 49152, width 576, YaRN x2 patched) cut to its first
``--layers`` decoder layers to keep a CPU run short: the logits' memory does not depend on depth, the layers'
activations grow with it (the table says how many layers were kept). Peak memory: on CPU the process's resident set
sampled every 10 ms, minus its level just before the step (model and inputs loaded); on GPU ``max_memory_allocated``
minus the allocated level before the step. Also checked: the two losses agree (printed).

Writes ``benchmarks/results/loss_memory_<device>.json`` and prints a table generated from it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ("plain", "recipe", "plain+gc", "recipe+gc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--layers", type=int, default=4, help="decoder layers kept (SmolLM2 has 30)")
    p.add_argument("--chunk", type=int, default=2048, help="the recipe's loss_chunk")
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default=None)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = Path(args.out or RESULTS / f"loss_memory_{'cuda' if args.device.startswith('cuda') else 'cpu'}.json")
    return args


class Peak:
    """Peak resident memory above the level at entry (CPU), or CUDA allocated memory above it (GPU); MiB."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> Peak:
        import psutil
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.extra_mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.extra_mib = (self.peak - self.base) / 2**20


def worker(args: argparse.Namespace) -> dict:

    from hf_rope_ext import patch_model
    from hf_rope_ext.eval.text import load_text, take_tokens, tokenize
    from hf_rope_ext.loading import load_model
    from hf_rope_ext.training.loss import chunked_causal_lm_loss

    name = args.worker
    model, tok = load_model("smollm2", dtype="float32", device=args.device)
    inner = model.model
    inner.layers = inner.layers[: args.layers]
    model.config.num_hidden_layers = args.layers
    patch_model(model, "yarn", factor=2)
    if name.endswith("+gc"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = take_tokens(tokenize(tok, load_text("builtin:pydoc")), args.seq_len, 20000)[None].to(args.device)
    t0 = time.perf_counter()
    with Peak(args.device) as peak:
        if name.startswith("recipe"):
            loss = chunked_causal_lm_loss(model, ids, chunk=args.chunk, input_ids=ids)
        else:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    return {"config": name, "peak_extra_mib": peak.extra_mib, "seconds": time.perf_counter() - t0,
            "loss": float(loss.detach()), "layers": args.layers, "seq_len": args.seq_len}


def fmt_table(state: dict) -> str:
    meta = state.get("meta", {})
    lines = [f"SmolLM2-135M-Instruct cut to {meta.get('layers')} of 30 layers, {meta.get('seq_len')} tokens, one "
             f"forward + backward, {meta.get('device')}",
             "",
             "| configuration | peak extra MiB | vs plain | seconds | loss |",
             "|---|---:|---:|---:|---:|"]
    runs = state.get("runs", {})
    for name in CONFIGS:
        if name not in runs:
            continue
        r = runs[name]
        base = runs.get("plain+gc" if name.endswith("+gc") else "plain")
        ratio = f"{r['peak_extra_mib'] / base['peak_extra_mib']:.2f}" if base else "–"
        lines.append(f"| {name} | {r['peak_extra_mib']:.0f} | {ratio} | {r['seconds']:.0f} | {r['loss']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    state = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    if args.report_only:
        print(fmt_table(state))
        return 0
    state["runs"] = {}
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"--configs: unknown {name!r}; choose from {', '.join(CONFIGS)}")
        cmd = [sys.executable, __file__, "--worker", name, "--seq-len", str(args.seq_len), "--layers",
               str(args.layers), "--chunk", str(args.chunk), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if out.returncode or line is None:
            raise SystemExit(f"{name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        state["runs"][name] = json.loads(line[len("RESULT "):])
        print(f"{name}: {state['runs'][name]}", flush=True)
    import torch

    state["meta"] = {"layers": args.layers, "seq_len": args.seq_len, "chunk": args.chunk, "device": args.device,
                     "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
                     "updated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(state, indent=1))
    print(fmt_table(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
