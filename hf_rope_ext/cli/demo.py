"""``hf-rope-ext demo``: the main job end to end on the offline SmolLM2-135M (calls :mod:`hf_rope_ext.eval`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ._common import parse_lengths, subcommand
from .eval import write_compare_outputs

EXAMPLE = """examples:
  hf-rope-ext demo                                   # CPU: a few minutes on 2 cores
  hf-rope-ext demo --device cuda --methods ntk,yarn,dca --factor 4"""

def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="model to extend (default: the offline SmolLM2-135M, trained at 8192 tokens)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, ...")
    p.add_argument("--methods", default=None, help="comma-separated methods (default depends on the device)")
    p.add_argument("--factor", type=float, default=None, help="extension factor (default: 2 on CPU, 4 on GPU)")
    p.add_argument("--lengths", type=parse_lengths, default=None, help="window lengths (default depends on device)")
    p.add_argument("--passkey-lengths", type=parse_lengths, default=None,
                   help="passkey lengths (default: none on CPU, 4k,8k,16k,32k on GPU); 0 disables")
    p.add_argument("--out-dir", default="hf_rope_ext_demo", help="folder for the table, JSON and PNGs")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def demo_plan(device: str, args: argparse.Namespace | None = None) -> dict[str, Any]:
    """What the demo measures on ``device``: on CPU a budget of a few minutes on 2 cores, on a GPU further."""
    on_gpu = not device.startswith("cpu")
    plan: dict[str, Any] = (
        {"methods": ["extrapolate", "ntk", "yarn"], "factor": 4.0,
         "lengths": [2048, 4096, 8192, 16384, 32768], "passkey_lengths": [4096, 8192, 16384, 32768],
         "passkey_trials": 2, "buckets_per_original": 4}
        if on_gpu else
        {"methods": ["extrapolate", "yarn"], "factor": 2.0, "lengths": [2048, 4096, 8192, 12288],
         "passkey_lengths": None, "passkey_trials": 1, "buckets_per_original": 8}
    )
    if args is not None:
        if args.methods:
            plan["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
        if args.factor:
            plan["factor"] = args.factor
        if args.lengths:
            plan["lengths"] = args.lengths
        if args.passkey_lengths is not None:
            plan["passkey_lengths"] = [n for n in args.passkey_lengths if n > 0] or None
    return plan


@subcommand("demo", "the main job: extend the real SmolLM2-135M past its 8192 tokens, table + plots", _demo_args,
            EXAMPLE)
def _demo(args: argparse.Namespace) -> int:
    import torch

    from ..eval.compare import compare_methods
    from ..eval.text import load_text
    from ..loading import load_model
    from ..plots import rope_geometry

    t0 = time.perf_counter()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = demo_plan(device, args)
    offset = 20000  # the stretch of the offline text used in the project's reference measurements
    print(f"hf-rope-ext demo on {device} ({torch.get_num_threads()} CPU threads); loading {args.model} ...",
          flush=True)
    model, tokenizer = load_model(args.model, dtype="float32", device=device)
    load_seconds = time.perf_counter() - t0
    text = load_text(None)
    original = model.config.max_position_embeddings
    longest = max(plan["lengths"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded in {load_seconds:.0f} s: {type(model).__name__}, {n_params / 1e6:.1f}M "
          f"parameters, trained context {original} tokens")
    print(f"measuring: methods {', '.join(plan['methods'])} (each patched for x{plan['factor']:g} = "
          f"{int(original * plan['factor'])} tokens) at lengths {', '.join(map(str, plan['lengths']))}"
          + (f"; passkey at {', '.join(map(str, plan['passkey_lengths']))}" if plan["passkey_lengths"] else ""),
          flush=True)
    report = compare_methods(
        model, tokenizer, plan["methods"], plan["lengths"], factor=plan["factor"], text=text, offset=offset,
        bucket_size=max(1, original // plan["buckets_per_original"]), passkey_lengths=plan["passkey_lengths"],
        passkey_trials=plan["passkey_trials"], model_name=args.model, progress=not args.no_progress,
    )
    shared = [r.method for r in report.runs if r.perplexity and r.perplexity.results
              and any(x.derived_from_window for x in r.perplexity.results)]
    report.notes = [
        (f"model: {args.model} ({type(model).__name__}, fp32, {device}), trained at {original} tokens, zero-shot "
         "(no fine-tuning)"),
        f"text: {text.description}, tokens {offset}–{offset + longest} (no BOS); the same tokens for every method",
        ("PPL @ N: perplexity of the first N tokens of that stretch read as one N-token window (every token after "
         "the first scored once)"),
    ]
    if shared:
        report.notes.append(
            f"{', '.join(shared)}: one forward at {longest} tokens gives every shorter length (token t's loss does "
            "not depend on later tokens for a causal model with static RoPE)")
    if longest > original:
        report.notes.append(f"last column: tokens at positions {original}–{longest}, i.e. past the trained length")
    if not plan["passkey_lengths"]:
        report.notes.append(f"passkey not run: on a CPU each {longest}-token prompt costs about one more forward "
                            "per method and depth; add --passkey-lengths, or run with a GPU")
    from ..eval.compare import UNPATCHED
    from ..registry import get_method

    # wavelengths describe rotary frequencies; attention-level methods keep the trained ones
    wavelength_methods = [m for m in plan["methods"] if m != UNPATCHED and get_method(m).kind == "rope"]
    geometry = rope_geometry(model)
    report.notes.append(f"measurements took {report.seconds:.0f} s after a {load_seconds:.0f} s model load")
    print()
    write_compare_outputs(report, Path(args.out_dir), wavelengths={"methods": wavelength_methods,
                                                                    "factor": plan["factor"], **geometry}
                           if wavelength_methods else None)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s wall time")
    return 0
