"""Benchmark 6 (issue 12): a brief fine-tune of the real SmolLM2-135M-Instruct at 16k, before vs after, same tokens.

Usage::

    python benchmarks/bench_finetune_smollm2.py                         # the CPU plan, every stage, resumable
    python benchmarks/bench_finetune_smollm2.py --stages before,train   # some stages only
    python benchmarks/bench_finetune_smollm2.py --report-only           # the markdown table from the JSON
    python benchmarks/bench_finetune_smollm2.py --report-only --compare A.json B.json   # methods side by side
    python benchmarks/bench_finetune_smollm2.py --device cuda --length 32768 --max-steps 200   # GPU plan (not run)

Stages (each finished measurement is written to ``--out`` at once and skipped when the script runs again):

``data``    Training text: ``builtin:pydoc`` without the evaluation window (tokens ``--offset`` .. ``--offset`` +
            length, plus ``--margin`` tokens either side), decoded back to two text files under the run folder. The
            held-out text (``builtin:stdlib``, Python source code) is a different corpus the training never reads.
``before``  The stock model (GGUF Q4_1, dequantised, fp32) patched with ``--method`` x (length / 8192), and the
            unpatched model for the references:
            - PPL over the 16k window of pydoc (from token ``--offset``, RESULTS.md section 1's window) and of
              positions 8k-16k, by 2k bucket (one forward);
            - ``ppl_8k``: PPL of the window's first 8192 tokens (read off the same forward: causal attention and static
              frequencies make the prefix exact), next to the *unpatched* model's on the same tokens
              (``original_ppl_8k``) — the short-context regression check;
            - the control: the *unpatched* model reading positions 8k-16k through its own 8k window sliding by 2k
              (benchmark 5's control, computed here again);
            - the same PPL figures and control on the held-out window (``builtin:stdlib`` from ``--heldout-offset``);
            - passkey at 16k, depths 0.1/0.3/0.5/0.7/0.9, ``--passkey-trials`` keys each (``passkey_accuracy``,
              seed 0; the prompts of benchmark 5).
            The unpatched figures do not depend on ``--method``: ``--controls-from`` copies them from another run's
            JSON of the same windows (checked) instead of measuring them again — how the method comparison ran.
``train``   ``hf-rope-ext finetune --config smollm2_16k_pose_yarn`` (PoSE windows of 2048 tokens spanning 16k, LoRA
            + embeddings + norms = ``longlora``), in a subprocess, on the training files; ``--resume`` continues a
            killed run. Steps, tokens and wall minutes come from its ``training_summary.json``.
``after``   The merged, saved model (it loads extended on its own) measured like ``before``, plus its own 8k sliding
            window over the same positions (``self_window_8k_16k``): with the training text from the same corpus as
            the pydoc window, the fine-tuned model may read pydoc better at every length; whether the *extra* context
            helps is its 16k figure against its own 8k window, not against the stock control.

Writes ``benchmarks/results/smollm2_finetune_16k.json`` and a ``{"kind": "rows"}`` file for the model card next to
the saved model (``RUN/card_rows.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ORIGINAL = 8192
BUCKET = 2048
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
STAGES = ("data", "before", "train", "after")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--method", default="yarn", help="rotary method patched before training (yarn, linear, ...)")
    p.add_argument("--config", default="smollm2_16k_pose_yarn", help="recipe config (shipped name or YAML file)")
    p.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    p.add_argument("--offset", type=int, default=20000, help="first token of the pydoc evaluation window")
    p.add_argument("--heldout", default="builtin:stdlib", help="held-out text never trained on")
    p.add_argument("--heldout-offset", type=int, default=100000)
    p.add_argument("--margin", type=int, default=2048, help="tokens dropped either side of the evaluation window")
    p.add_argument("--passkey-trials", type=int, default=2)
    p.add_argument("--skip-passkey", action="store_true",
                   help="perplexity figures only in the before/after stages (run again without it to add passkey)")
    p.add_argument("--controls-from", default=None, metavar="JSON",
                   help="take the unpatched model's figures (8k-window controls, original PPL 0-8k, 8k passkey "
                        "ceiling) from another run's results JSON of the same windows instead of measuring them again "
                        "(they do not depend on --method)")
    p.add_argument("--run", default=str(ROOT / "runs" / "smollm2-16k-finetune"), help="run folder of the fine-tune")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/smollm2_finetune_16k.json)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                   help="with --report-only: one row per results JSON (e.g. one per --method), the same budget side "
                        "by side")
    args = p.parse_args(argv)
    unknown = sorted(set(args.stages.split(",")) - set(STAGES))
    if unknown:
        p.error(f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if args.compare and not args.report_only:
        p.error("--compare goes with --report-only (it reads results JSONs; it measures nothing)")
    if args.length <= ORIGINAL or args.length % BUCKET:
        p.error(f"--length must exceed {ORIGINAL} and be a multiple of {BUCKET}")
    args.out = Path(args.out or RESULTS / f"smollm2_finetune_{args.length // 1024}k.json")
    args.run = Path(args.run)
    return args


# ---------------------------------------------------------------------------------------------------------------------
# measurements


def ppl(values) -> float:
    values = list(values)
    return math.exp(sum(values) / len(values)) if values else float("nan")


def window_figures(model, window, length: int) -> dict:
    """One forward over ``window`` [length]: PPL of the whole window, of positions 8k-length, of the first 8192
    tokens, and per 2k bucket (token NLLs of positions 1.. ; position 0 has no prediction)."""
    import torch

    from hf_rope_ext.eval.perplexity import token_nll

    t0 = time.perf_counter()
    with torch.inference_mode():
        nll = token_nll(model, window[None], first_scored=1)[0]
    nll = nll.tolist()
    buckets = [{"start": a, "perplexity": ppl(nll[max(a, 1) : a + BUCKET])} for a in range(0, length, BUCKET)]
    return {"ppl_16k": ppl(nll[1:]), "ppl_8k_16k": ppl(nll[ORIGINAL:]), "ppl_8k": ppl(nll[1:ORIGINAL]),
            "buckets": buckets, "seconds": time.perf_counter() - t0}


def sliding_control(model, window, length: int) -> dict:
    """Positions 8k-length read through an 8k window sliding by 2k: each 2k bucket scored as the last 2048 tokens of
    the 8192-token window ending with it (every scored token sees 6144-8191 tokens of context)."""
    import torch

    from hf_rope_ext.eval.perplexity import token_nll

    t0, nll_all, buckets = time.perf_counter(), [], []
    for start in range(ORIGINAL, length, BUCKET):
        piece = window[start + BUCKET - ORIGINAL : start + BUCKET][None]
        with torch.inference_mode():
            nll = token_nll(model, piece, first_scored=ORIGINAL - BUCKET)[0, ORIGINAL - BUCKET :].tolist()
        nll_all += nll
        buckets.append({"start": start, "perplexity": ppl(nll)})
        print(f"  window control bucket {start}: {buckets[-1]['perplexity']:.2f}", flush=True)
    return {"ppl_8k_16k": ppl(nll_all), "buckets": buckets, "seconds": time.perf_counter() - t0}


def first_8k(model, window) -> float:
    import torch

    from hf_rope_ext.eval.perplexity import token_nll

    with torch.inference_mode():
        return ppl(token_nll(model, window[None, :ORIGINAL], first_scored=1)[0, 1:].tolist())


def passkey(model, tok, length: int, depth: float, trials: int) -> dict:
    import torch

    from hf_rope_ext.eval import passkey_accuracy

    with torch.inference_mode():
        rep = passkey_accuracy(model, tok, [length], [depth], trials=trials, max_new_tokens=8,
                               model_name="smollm2", progress=False)
    cells = rep.to_dict()["trials"]
    return {"correct": sum(t["correct"] for t in cells), "total": len(cells), "seconds": rep.seconds,
            "outputs": [f"{t['answer']}->{t['output'].strip()!r}" for t in cells]}


# ---------------------------------------------------------------------------------------------------------------------
# stages


def window_settings(args: argparse.Namespace) -> dict:
    """What the evaluation reads (texts, windows, passkey cells): the meta fields two runs must share for their
    unpatched figures to be the same."""
    return {"length": args.length, "eval_text": "builtin:pydoc", "eval_offset": args.offset,
            "heldout_text": args.heldout, "heldout_offset": args.heldout_offset, "passkey_depths": list(DEPTHS),
            "passkey_trials": args.passkey_trials}


class State:
    """The results JSON. Stages may run in separate processes at once (e.g. ``before`` beside ``train``): each
    process writes back only the top-level sections it touched, over a fresh read of the file."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data = json.loads(args.out.read_text()) if args.out.exists() else {}
        self.touched: set[str] = set()

    def section(self, name: str) -> dict:
        self.touched.add(name)
        return self.data.setdefault(name, {})

    def set(self, name: str, value) -> None:
        self.touched.add(name)
        self.data[name] = value

    def save(self) -> None:
        import torch

        a = self.args
        self.data["meta"] = {
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32)", **window_settings(a),
            "factor": a.length / ORIGINAL, "method": a.method, "config": a.config, "device": a.device,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "margin": a.margin,
            "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
            "updated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }
        self.touched.add("meta")
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        import fcntl

        with open(self.args.out.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one read-merge-write at a time
            current = json.loads(self.args.out.read_text()) if self.args.out.exists() else {}
            current.update({k: self.data[k] for k in self.touched if k in self.data})
            for k, v in current.items():  # what other processes wrote meanwhile
                if k not in self.touched:
                    self.data[k] = v
            tmp = self.args.out.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(current, indent=1))
            os.replace(tmp, self.args.out)


def windows(tok, args: argparse.Namespace):
    from hf_rope_ext.eval.text import load_text, take_tokens, tokenize

    pydoc = tokenize(tok, load_text("builtin:pydoc"))
    held = tokenize(tok, load_text(args.heldout))
    return (take_tokens(pydoc, args.length, args.offset, "the pydoc window"),
            take_tokens(held, args.length, args.heldout_offset, "the held-out window"), pydoc)


def stage_data(args: argparse.Namespace, state: State) -> list[Path]:
    """Training files: pydoc without the evaluation window (and a margin), decoded back to text."""
    from hf_rope_ext.loading import load_model

    folder = args.run / "data"
    files = [folder / "pydoc_before_window.txt", folder / "pydoc_after_window.txt"]
    if all(f.exists() for f in files) and "data" in state.data:
        return files
    _, tok = load_model("smollm2", dtype="float32")  # the tokenizer of the GGUF
    _, _, pydoc = windows(tok, args)
    lo, hi = max(0, args.offset - args.margin), args.offset + args.length + args.margin
    folder.mkdir(parents=True, exist_ok=True)
    parts = [pydoc[:lo], pydoc[hi:]]
    for path, part in zip(files, parts, strict=True):
        path.write_text(tok.decode(part.tolist()), encoding="utf-8")
    state.set("data", {"files": [str(f.relative_to(args.run)) for f in files],
                          "tokens": [int(p.numel()) for p in parts], "excluded": [lo, hi],
                          "corpus_tokens": int(pydoc.numel())})
    state.save()
    return files


def measure(label: str, model, tok, args: argparse.Namespace, state: State, *, unpatched=None) -> None:
    """Every figure of ``label`` (before / after) not yet in the JSON; ``unpatched`` (before only) gives the
    original-model references."""
    sec = state.section(label)
    pydoc_w, held_w, _ = windows(tok, args)
    for name, window in (("pydoc", pydoc_w), ("heldout", held_w)):
        if name not in sec:
            print(f"[{label}] {name}: one {args.length}-token forward", flush=True)
            sec[name] = window_figures(model, window, args.length)
            state.save()
            print(f"[{label}] {name}: 16k {sec[name]['ppl_16k']:.3f}, 8k-16k {sec[name]['ppl_8k_16k']:.3f}, "
                  f"<8k {sec[name]['ppl_8k']:.3f}", flush=True)
        ref = unpatched if unpatched is not None else model  # before: the stock model; after: its own 8k window
        key = f"{name}_window_control"
        if key not in sec:
            print(f"[{label}] {name}: 8k sliding-window control ({'unpatched' if unpatched else 'this model'})")
            sec[key] = sliding_control(ref, window, args.length)
            state.save()
        if unpatched is not None and f"{name}_original_ppl_8k" not in sec:
            sec[f"{name}_original_ppl_8k"] = first_8k(unpatched, window)
            state.save()
    if args.skip_passkey:
        return
    pk = sec.setdefault("passkey", {})
    for depth in DEPTHS:
        if str(depth) in pk:
            continue
        pk[str(depth)] = passkey(model, tok, args.length, depth, args.passkey_trials)
        state.save()
        print(f"[{label}] passkey depth {depth}: {pk[str(depth)]['correct']}/{pk[str(depth)]['total']} "
              f"{pk[str(depth)]['outputs']}", flush=True)
    if unpatched is None:
        return
    # the ceiling: the unpatched model on passkey prompts of its own trained length (what no extension can exceed)
    pk8 = sec.setdefault("original_passkey_8k", {})
    for depth in DEPTHS:
        if str(depth) not in pk8:
            pk8[str(depth)] = passkey(unpatched, tok, ORIGINAL, depth, args.passkey_trials)
            state.save()
            print(f"[{label}] unpatched passkey at {ORIGINAL}, depth {depth}: {pk8[str(depth)]['correct']}/"
                  f"{pk8[str(depth)]['total']}", flush=True)


# the before-section keys measured on the unpatched model alone (no --method in them)
UNPATCHED_KEYS = ("pydoc_window_control", "heldout_window_control", "pydoc_original_ppl_8k",
                  "heldout_original_ppl_8k", "original_passkey_8k")


def copy_controls(args: argparse.Namespace, state: State) -> list[str]:
    """The unpatched figures of ``--controls-from`` copied into this run's ``before`` (missing ones only), after
    checking that run measured the same windows; returns the keys copied."""
    path = Path(args.controls_from)
    if not path.is_file():
        raise SystemExit(f"--controls-from: no results JSON at {path}")
    other = json.loads(path.read_text())
    ours, theirs = window_settings(args), other.get("meta", {})
    differ = [f"{k} {theirs.get(k)!r} there, {v!r} here" for k, v in ours.items() if theirs.get(k) != v]
    if differ:
        raise SystemExit(f"--controls-from {path}: measured other windows ({'; '.join(differ)})")
    sec, copied = state.section("before"), []
    for key in UNPATCHED_KEYS:
        if key in other.get("before", {}) and key not in sec:
            sec[key] = other["before"][key]
            copied.append(key)
    if copied:
        state.section("controls_from")["path"] = str(path)
        state.data["controls_from"]["keys"] = sorted(set(state.data["controls_from"].get("keys", [])) | set(copied))
        state.save()
    return copied


def stage_before(args: argparse.Namespace, state: State) -> None:
    import copy

    from hf_rope_ext import patch_model
    from hf_rope_ext.loading import load_model

    if args.controls_from:
        print(f"[before] from {args.controls_from}: {', '.join(copy_controls(args, state)) or 'nothing missing'}")
    stock, tok = load_model("smollm2", dtype="float32", device=args.device)
    stock.eval()
    model = copy.deepcopy(stock)
    patch_model(model, args.method, factor=args.length / ORIGINAL)
    measure("before", model, tok, args, state, unpatched=stock)


def stage_train(args: argparse.Namespace, state: State, files: list[Path]) -> None:
    model_dir = args.run / "model"
    summary_path = model_dir / "training_summary.json"
    if not summary_path.exists():
        cmd = [sys.executable, "-m", "hf_rope_ext.cli", "finetune", "--config", args.config,
               "--output_dir", str(args.run), "--data", *map(str, files),
               "--method", args.method, "--factor", str(args.length / ORIGINAL)]
        if args.max_steps:
            cmd += ["--max_steps", str(args.max_steps)]
        if (args.run / "checkpoints").exists():
            cmd += ["--resume", "true"]
        print("[train]", " ".join(cmd), flush=True)
        import resource

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, check=True, cwd=ROOT)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        runs = state.section("train_processes")  # one entry per invocation (a resumed run has several)
        runs[str(len(runs))] = {"cpu_seconds": cpu, "max_steps": args.max_steps}
        state.save()
    summary = json.loads(summary_path.read_text())
    state.set("train", {k: summary.get(k) for k in (
        "method", "factor", "train_mode", "steps", "tokens", "seq_len", "batch_size", "learning_rate",
        "wall_time_s", "tokens_per_s", "peak_memory_bytes", "loss_first", "final_loss", "loss_curve", "eval_before",
        "eval_after")})
    state.data["train"]["minutes"] = (summary.get("wall_time_s") or 0) / 60
    # CPU seconds of the whole training process(es) (load, data, loop, merge, save) over 2 cores: the wall minutes an
    # idle 2-core machine would need, whatever else shared the machine while it ran
    state.data["train"]["process_cpu_minutes"] = cpu_minutes(state.data)
    state.save()


def stage_after(args: argparse.Namespace, state: State) -> None:
    from hf_rope_ext.loading import load_model

    model, tok = load_model(str(args.run / "model"), dtype="float32", device=args.device)
    model.eval()
    measure("after", model, tok, args, state)


# ---------------------------------------------------------------------------------------------------------------------
# report


def cpu_minutes(data: dict) -> float | None:
    """Process CPU-minutes of the training subprocess(es) of a results JSON (None before training ran)."""
    processes = (data.get("train_processes") or {}).values()
    return sum(r["cpu_seconds"] for r in processes) / 60 if processes else None


def _flat(sec: dict) -> dict:
    """The issue's fields of one model state."""
    pk = sec.get("passkey", {})
    out = {}
    if "pydoc" in sec:
        out.update({k: sec["pydoc"][k] for k in ("ppl_16k", "ppl_8k_16k", "ppl_8k")})
    if pk:
        out["passkey_16k_correct"] = sum(v["correct"] for v in pk.values())
        out["passkey_16k_total"] = sum(v["total"] for v in pk.values())
    return out


def summary_fields(data: dict) -> dict:
    """The fields issue 12 asks the JSON to hold (derived; also written into it)."""
    out = {"before": _flat(data.get("before", {})), "after": _flat(data.get("after", {}))}
    control = data.get("before", {}).get("pydoc_window_control")
    out["control_8k_window"] = control["ppl_8k_16k"] if control else None
    train = data.get("train", {})
    out.update(steps=train.get("steps"), tokens=train.get("tokens"), minutes=train.get("minutes"),
               method=data.get("meta", {}).get("method"))
    return out


def fmt(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def report(data: dict) -> str:
    rows = []
    for label in ("before", "after"):
        sec = data.get(label, {})
        pk = sec.get("passkey", {})
        for name, text in (("pydoc", "pydoc (16k window)"), ("heldout", "held-out: stdlib code")):
            if name not in sec:
                continue
            w, c = sec[name], sec.get(f"{name}_window_control", {})
            passkey_cell = ""
            if name == "pydoc" and pk:
                passkey_cell = (f"{sum(v['correct'] for v in pk.values())}/{sum(v['total'] for v in pk.values())} ("
                                + ", ".join(f"{d}: {v['correct']}/{v['total']}" for d, v in pk.items()) + ")")
            # the unpatched model on the same tokens: measured once (before), the same reference for after
            original = sec.get(f"{name}_original_ppl_8k", data.get("before", {}).get(f"{name}_original_ppl_8k"))
            rows.append(f"| {label} | {text} | {fmt(w['ppl_16k'])} | {fmt(w['ppl_8k_16k'])} | "
                        f"{fmt(c.get('ppl_8k_16k'))} | {fmt(w['ppl_8k'])} | {fmt(original)} | {passkey_cell} |")
    pk8 = data.get("before", {}).get("original_passkey_8k", {})
    if pk8:
        rows.append(f"| unpatched, prompts of {ORIGINAL} tokens (the ceiling) | passkey | | | | | | "
                    f"{sum(v['correct'] for v in pk8.values())}/{sum(v['total'] for v in pk8.values())} ("
                    + ", ".join(f"{d}: {v['correct']}/{v['total']}" for d, v in pk8.items()) + ") |")
    head = ("| model | text | PPL 0–16k | PPL 8k–16k | same positions, 8k sliding window | PPL 0–8k | "
            "unpatched PPL 0–8k | passkey 16k |\n|---|---|---:|---:|---:|---:|---:|---|")
    train = data.get("train", {})
    cpu = cpu_minutes(data)
    cpu_note = f", {cpu:.1f} process CPU-min" if cpu is not None else ""
    lines = [head, *rows]
    if train:
        lines.append("")
        lines.append(f"Training: {train.get('steps')} steps, {train.get('tokens')} tokens, "
                     f"{fmt(train.get('minutes'), 1)} min wall{cpu_note} ({train.get('train_mode')}, "
                     f"seq_len {train.get('seq_len')}, "
                     f"lr {train.get('learning_rate')}); loss {fmt(train.get('loss_first'), 3)} → "
                     f"{fmt(train.get('final_loss'), 3)}.")
    return "\n".join(lines)


def get(sec: dict, text: str, key: str):
    """``sec[text][key]``, None where either is missing."""
    return sec.get(text, {}).get(key)


def _arrow(before, after) -> str:
    return f"{fmt(before)} → {fmt(after)}"


def compare(runs: list[tuple[str, dict]]) -> str:
    """One row per run (results JSON of one ``--method``), the same texts and budget: how far each method's fine-tune
    got. The controls (the unpatched model) do not depend on the method; each run holds them (measured, or copied with
    ``--controls-from``), and the line under the table gives the first run's (and names any run whose differ)."""
    head = ("| method | steps | process CPU-min | training loss first → last | pydoc 8k–16k before → after | "
            "held-out 8k–16k before → after | held-out 8k–16k, own 8k window (after) | held-out 0–8k before → after "
            "| passkey 16k after |\n|---|---:|---:|---|---|---|---:|---|---|")
    rows, controls = [], []
    for name, data in runs:
        b, a, t = data.get("before", {}), data.get("after", {}), data.get("train", {})
        method = data.get("meta", {}).get("method", "?")
        flat = _flat(a)
        passkey_cell = (f"{flat['passkey_16k_correct']}/{flat['passkey_16k_total']}" if "passkey_16k_total" in flat
                        else "not run")
        rows.append(
            f"| {method} | {t.get('steps', '–')} | {fmt(cpu_minutes(data), 1)} | "
            f"{fmt(t.get('loss_first'), 3)} → {fmt(t.get('final_loss'), 3)} | "
            f"{_arrow(_flat(b).get('ppl_8k_16k'), flat.get('ppl_8k_16k'))} | "
            f"{_arrow(get(b, 'heldout', 'ppl_8k_16k'), get(a, 'heldout', 'ppl_8k_16k'))} | "
            f"{fmt(get(a, 'heldout_window_control', 'ppl_8k_16k'))} | "
            f"{_arrow(get(b, 'heldout', 'ppl_8k'), get(a, 'heldout', 'ppl_8k'))} | {passkey_cell} |")
        controls.append((name, tuple(fmt(get(b, key, "ppl_8k_16k")) for key in
                                     ("pydoc_window_control", "heldout_window_control"))
                         + (fmt(b.get("heldout_original_ppl_8k")),)))
    first = controls[0][1] if controls else ("–",) * 3
    note = (f"Unpatched model (the controls): positions 8k–16k through its 8k sliding window {first[0]} (pydoc), "
            f"{first[1]} (held-out); held-out 0–8k {first[2]}.")
    differing = [name for name, c in controls if c != first]
    if differing:
        note += " Different in " + ", ".join(differing) + "."
    return "\n".join([head, *rows, "", note])


def card_rows(data: dict, length: int) -> dict:
    """The after-model's figures as the model card's ``rows`` format."""
    rows = []
    for label, method in (("before", "before fine-tuning"), ("after", None)):
        sec = data.get(label, {})
        for name, dataset in (("pydoc", "Python docs (builtin:pydoc)"), ("heldout", "Python stdlib source")):
            if name in sec:
                rows.append({"task": "perplexity", "length": length, "value": sec[name]["ppl_16k"], "method": method,
                             "dataset": dataset})
        for depth, v in sec.get("passkey", {}).items():
            rows.append({"task": "passkey", "length": length, "value": v["correct"] / v["total"], "method": method,
                         "depth": float(depth), "trials": v["total"]})
    return {"kind": "rows", "rows": rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    state = State(args)
    if args.report_only and args.compare:
        runs = []
        for name in args.compare:
            path = Path(name) if Path(name).is_absolute() else ROOT / name
            if not path.is_file():
                raise SystemExit(f"--compare: no results JSON at {name}")
            runs.append((name, json.loads(path.read_text())))
        print(compare(runs))
        return 0
    if args.report_only:
        print(report(state.data))
        return 0
    stages = args.stages.split(",")
    files = stage_data(args, state) if ("data" in stages or "train" in stages) else []
    if "before" in stages:
        stage_before(args, state)
    if "train" in stages:
        stage_train(args, state, files)
    if "after" in stages:
        stage_after(args, state)
        rows_path = args.run / "card_rows.json"
        rows_path.write_text(json.dumps(card_rows(state.data, args.length), indent=1))
    state.set("summary", summary_fields(state.data))
    state.save()
    print(report(state.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
