"""Test helpers: reload a saved model in a fresh Python process that never imports hf_rope_ext."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

_RELOAD = textwrap.dedent(
    """
    import sys, torch
    {imports}
    from transformers import {auto_class}
    assert ("hf_rope_ext" in sys.modules) == {expect_plugin}, "plugin import state is not what the test expects"
    ids = torch.load({ids_path!r})
    results = {{}}
    for path in {paths!r}:
        model = {auto_class}.from_pretrained(path).eval()
        with torch.no_grad():
            out = model(ids, **{forward_kwargs})
        logits = getattr(out, "logits", None)
        results[path] = logits if logits is not None else out.last_hidden_state
    torch.save(results, {out_path!r})
    """
)


def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (offline: no Hub access)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def reload_logits_many(
    paths: list[str],
    input_ids: torch.Tensor,
    workdir: str | Path,
    *,
    auto_class: str = "AutoModelForCausalLM",
    import_plugin: bool = False,
    forward_kwargs: str = "{}",
) -> dict[str, torch.Tensor]:
    """Logits (or last hidden state) of each model saved at ``paths`` on ``input_ids``, computed in ONE fresh process
    that does (``import_plugin=True``) or does not import hf_rope_ext."""
    workdir = Path(workdir)
    ids_path, out_path = workdir / "_ids.pt", workdir / "_out.pt"
    torch.save(input_ids, ids_path)
    code = _RELOAD.format(
        imports="import hf_rope_ext" if import_plugin else "",
        auto_class=auto_class,
        expect_plugin=import_plugin,
        ids_path=str(ids_path),
        out_path=str(out_path),
        paths=[str(p) for p in paths],
        forward_kwargs=forward_kwargs,
    )
    proc = run_python(code, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"reload failed:\n{proc.stderr[-3000:]}")
    results = torch.load(out_path)
    ids_path.unlink()
    out_path.unlink()
    return results


def reload_outputs(path: str | Path, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """``reload_logits_many`` for one saved model (its files stay as they were)."""
    return reload_logits_many([str(path)], input_ids, path, **kwargs)[str(path)]


def snapshot(model: torch.nn.Module) -> tuple:
    """Config dict, state dict and buffers of ``model``, copied: compare with :func:`assert_unchanged`."""
    import copy

    return (
        copy.deepcopy(model.config.to_dict()),
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: b.clone() for n, b in model.named_buffers()},
    )


def assert_unchanged(model: torch.nn.Module, snap: tuple) -> None:
    """``model`` exactly as when ``snap = snapshot(model)`` was taken: config, every tensor, every buffer."""
    config, state, buffers = snap
    assert model.config.to_dict() == config
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {n for n, _ in model.named_buffers()} == set(buffers)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
