"""Test helpers: reload a saved model in a fresh Python process that never imports hf_rope_ext."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

_RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    {imports}
    from transformers import {auto_class}
    assert ("hf_rope_ext" in sys.modules) == {expect_plugin}, "plugin import state is not what the test expects"
    model = {auto_class}.from_pretrained({path!r}).eval()
    ids = torch.load({ids_path!r})
    with torch.no_grad():
        out = model(ids, **{forward_kwargs})
    tensor = out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
    torch.save(tensor, {out_path!r})
    print(json.dumps({{"config_max": getattr(model.config, "max_position_embeddings", None)}}))
    """
)


def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (offline: no Hub access)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def reload_outputs(
    path: str | Path,
    input_ids: torch.Tensor,
    *,
    auto_class: str = "AutoModelForCausalLM",
    import_plugin: bool = False,
    forward_kwargs: str = "{}",
) -> torch.Tensor:
    """Logits (or last hidden state) of the model saved at ``path`` on ``input_ids``, computed in a subprocess that
    does (``import_plugin=True``) or does not import hf_rope_ext."""
    path = Path(path)
    ids_path, out_path = path / "_ids.pt", path / "_out.pt"
    torch.save(input_ids, ids_path)
    code = _RELOAD.format(
        imports="import hf_rope_ext" if import_plugin else "",
        auto_class=auto_class,
        expect_plugin=import_plugin,
        path=str(path),
        ids_path=str(ids_path),
        out_path=str(out_path),
        forward_kwargs=forward_kwargs,
    )
    proc = run_python(code)
    if proc.returncode != 0:
        raise RuntimeError(f"reload failed:\n{proc.stderr[-3000:]}")
    json.loads(proc.stdout.strip().splitlines()[-1])
    result = torch.load(out_path)
    ids_path.unlink()
    out_path.unlink()
    return result


_RELOAD_MANY = textwrap.dedent(
    """
    import sys, torch
    {imports}
    from transformers import {auto_class}
    assert ("hf_rope_ext" in sys.modules) == {expect_plugin}
    ids = torch.load({ids_path!r})
    results = {{}}
    for path in {paths!r}:
        model = {auto_class}.from_pretrained(path).eval()
        with torch.no_grad():
            results[path] = model(ids).logits
    torch.save(results, {out_path!r})
    """
)


def reload_logits_many(
    paths: list[str],
    input_ids: torch.Tensor,
    workdir: str | Path,
    *,
    auto_class: str = "AutoModelForCausalLM",
    import_plugin: bool = False,
) -> dict[str, torch.Tensor]:
    """Like ``reload_outputs`` for several saved models in ONE fresh process (saves interpreter start-ups)."""
    workdir = Path(workdir)
    ids_path, out_path = workdir / "_ids.pt", workdir / "_out.pt"
    torch.save(input_ids, ids_path)
    code = _RELOAD_MANY.format(
        imports="import hf_rope_ext" if import_plugin else "",
        auto_class=auto_class,
        expect_plugin=import_plugin,
        ids_path=str(ids_path),
        out_path=str(out_path),
        paths=[str(p) for p in paths],
    )
    proc = run_python(code, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"reload failed:\n{proc.stderr[-3000:]}")
    return torch.load(out_path)
