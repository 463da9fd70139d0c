"""The package as a user gets it: a wheel built from this tree, installed non-editable into a fresh venv.

The fresh venv holds nothing but the wheel; its dependencies (torch, transformers, ...) are made importable from the
test's own environment by a path entry (a plain directory on ``sys.path``: its ``.pth`` files, among them the
editable install of this tree, are not run), so every ``hf_rope_ext`` file the commands use comes from the wheel.
Each command runs in a scratch folder outside the source tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from .model_folders import save_patched_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", "runs", "benchmarks", "tests"}


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    shown = " ".join(map(str, cmd))
    assert proc.returncode == 0, f"{shown}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """Build the wheel from a copy of the tree; install it into a fresh venv; return the paths."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True,
                    ignore=lambda d, names: [n for n in names if n in SKIP or n.endswith(".egg-info")])
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
         cwd=tmp)
    wheel = next(dist.glob("hf_rope_ext-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)], cwd=tmp)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp)
                .stdout.strip())
    (site / "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return {"tmp": tmp, "wheel": wheel, "venv": venv, "python": python, "cli": venv / "bin" / "hf-rope-ext"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def test_wheel_ships_templates_recipe_and_configs(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    shipped_templates = {p.name for p in (ROOT / "hf_rope_ext" / "cards" / "templates").glob("*.md")}
    shipped_configs = {p.name for p in (ROOT / "hf_rope_ext" / "recipes" / "configs").glob("*.yaml")}
    assert shipped_templates >= {"causal_lm.md", "encoder.md"}
    assert {f"hf_rope_ext/cards/templates/{n}" for n in shipped_templates} <= names
    assert {f"hf_rope_ext/recipes/configs/{n}" for n in shipped_configs} <= names
    assert "hf_rope_ext/recipes/finetune.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)


def test_installed_package_is_the_wheel_not_the_tree(installed):
    proc = _run([str(installed["python"]), "-c", "import hf_rope_ext; print(hf_rope_ext.__file__)"],
                cwd=installed["tmp"], env=_env())
    assert Path(proc.stdout.strip()).is_relative_to(installed["venv"]), proc.stdout
    version = _run([str(installed["cli"]), "--version"], cwd=installed["tmp"], env=_env()).stdout
    from importlib.metadata import version as dist_version

    assert version.strip() == f"hf-rope-ext {dist_version('hf_rope_ext')}"


def test_card_from_the_wheel(installed):
    folder = save_patched_llama(installed["tmp"] / "patched", "yarn")
    _run([str(installed["cli"]), "card", str(folder), "--repo-id", "me/tiny-yarn"], cwd=installed["tmp"],
         env=_env())
    card = (folder / "README.md").read_text()
    assert "yarn" in card and "me/tiny-yarn" in card
    template = (ROOT / "hf_rope_ext" / "cards" / "templates" / "causal_lm.md").read_text()
    # a line of the template's own prose reaches the card (the template came from the wheel, not a fallback)
    prose = next(line for line in template.splitlines() if len(line) > 40 and "$" not in line and "{" not in line)
    assert prose.strip() in card


def test_recipes_cp_and_finetune_help_from_the_wheel(installed):
    work = installed["tmp"] / "cp"
    work.mkdir()
    _run([str(installed["cli"]), "recipes", "cp", "smollm2_pose_yarn_smoke", "mine.yaml"], cwd=work, env=_env())
    shipped = ROOT / "hf_rope_ext" / "recipes" / "configs" / "smollm2_pose_yarn_smoke.yaml"
    assert (work / "mine.yaml").read_bytes() == shipped.read_bytes()
    again = subprocess.run([str(installed["cli"]), "recipes", "cp", "smollm2_pose_yarn_smoke", "mine.yaml"],
                           cwd=work, env=_env(), capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwritten unasked
    help_text = _run([str(installed["cli"]), "finetune", "--help"], cwd=work, env=_env()).stdout
    assert "--config" in help_text and "--max_steps" in help_text and "example" in help_text.lower()


def test_tiny_finetune_from_the_wheel(installed):
    """A two-step LoRA run of a tiny Llama through `hf-rope-ext finetune`: the model folder, its summary and the
    reloaded extended length."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    work = installed["tmp"] / "ft"
    work.mkdir()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model.save_pretrained(work / "base")
    tiny_tokenizer(64).save_pretrained(work / "base")
    (work / "train.txt").write_text(" ".join(f"w{(i * 7) % 120}" for i in range(4000)))
    config = {"model": str(work / "base"), "method": "yarn", "factor": 4, "train_mode": "lora",
              "data": [str(work / "train.txt")], "eval_chunks": 0, "max_steps": 2, "batch_size": 1, "grad_accum": 1,
              "lr": 1e-3, "warmup_steps": 0, "save_every": 0, "log_every": 1, "output_dir": str(work / "run")}
    (work / "tiny.yaml").write_text(yaml.safe_dump(config))
    _run([str(installed["cli"]), "finetune", "--config", "tiny.yaml"], cwd=work, env=_env())
    saved = work / "run" / "model"
    meta = json.loads((saved / "config.json").read_text())
    assert meta["max_position_embeddings"] == 256 and meta["hf_rope_ext"]["method"] == "yarn"
    summary = json.loads((saved / "training_summary.json").read_text())
    assert summary["kind"] == "training_summary" and summary["steps"] == 2
