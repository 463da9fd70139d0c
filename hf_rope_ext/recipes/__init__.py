"""The fine-tune recipe and its shipped configurations, installed with the package.

    configs/     recipe configurations (YAML): ``hf-rope-ext recipes list``, ``hf-rope-ext recipes cp NAME DEST``
    accelerate/  ``accelerate launch --config_file`` files (DDP, FSDP, DeepSpeed)
    finetune.py  the recipe: ``hf-rope-ext finetune --config NAME_OR_FILE`` or
                 ``accelerate launch -m hf_rope_ext.recipes.finetune --config NAME_OR_FILE``

A config is named by its file name without ``.yaml`` (``smollm2_pose_yarn_smoke``) or by a path to a YAML file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG_DIR = HERE / "configs"
ACCELERATE_DIR = HERE / "accelerate"


def list_configs() -> dict[str, Path]:
    """Shipped configurations: name -> path (recipe configs, then accelerate launch configs as ``accelerate/NAME``)."""
    found = {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}
    found.update({f"accelerate/{p.stem}": p for p in sorted(ACCELERATE_DIR.glob("*.yaml"))})
    return found


def config_path(name: str | Path) -> Path:
    """A shipped config by name, or an existing YAML file by path; anything else is refused with the choices."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = list_configs()
    key = str(name)[:-5] if str(name).endswith(".yaml") else str(name)
    if key in shipped:
        return shipped[key]
    raise FileNotFoundError(
        f"config {str(name)!r} is neither a file nor a shipped config; shipped: {', '.join(shipped)} "
        "(`hf-rope-ext recipes list`)"
    )


def copy_config(name: str, dest: str | Path = ".", *, overwrite: bool = False) -> Path:
    """Copy a shipped config to ``dest`` (a folder, or a file name) so it can be edited; returns the new path.
    An existing file is never replaced unless ``overwrite``."""
    source = config_path(name)
    if not str(source).startswith(str(HERE)):
        raise FileNotFoundError(f"{name!r} is not a shipped config; shipped: {', '.join(list_configs())}")
    dest = Path(dest).expanduser()
    target = dest / source.name if dest.is_dir() or str(dest).endswith(("/", "\\")) else dest
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; choose another destination, or overwrite=True (--overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target
