"""Rendering and writing a card: a template from ``templates/`` filled with the sections, under the front matter.

``render_card`` checks every argument and reads every input (the saved folder, results, training summary, plots,
template, base model card) before it writes anything; then it copies the plots into ``FOLDER/plots`` and returns the
text. ``write_card`` writes it to ``FOLDER/README.md``. The templates ship inside the package (``causal_lm.md``,
``encoder.md``, read with ``importlib.resources``) and are filled with ``string.Template``; a path to your own
template works too. ``retarget_card`` points an hf-rope-ext card's loading code at another repo id (``push`` uses it).
"""

from __future__ import annotations

import dataclasses
import filecmp
import logging
import re
import shutil
import string
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ..training.summary import FILE_NAME as TRAINING_FILE
from ..training.summary import TrainingSummary
from . import metadata, sections
from .format import fmt_factor
from .results import Plot, add_training, load_results, read_training, title_from_name
from .saved import (
    CARD_FILE,
    HUB_ID,
    MARKER_PREFIX,
    MODEL_ID_PREFIX,
    SavedModel,
    card_marker,
    read_marker,
    read_model_id,
)

logger = logging.getLogger(__name__)

PLOTS_DIR = "plots"
PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".gif", ".webp")
TEMPLATE_NAMES: tuple[str, ...] = ("causal_lm", "encoder")
"""Templates shipped in ``hf_rope_ext/cards/templates/<name>.md``."""


def template_text(name: str) -> str:
    """The text of a shipped template."""
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"unknown template {name!r}; shipped: {', '.join(TEMPLATE_NAMES)}")
    return resources.files(__package__).joinpath("templates", f"{name}.md").read_text(encoding="utf-8")


def _load_template(template: str | Path | None, default: str) -> tuple[str, str]:
    """(template text, template name: the shipped one it is, or the default for the architecture)."""
    name = str(template) if template is not None else default
    if name in TEMPLATE_NAMES:
        return template_text(name), name
    path = Path(name).expanduser()
    if not path.is_file():
        raise ValueError(f"template: unknown template {name!r}; use one of {', '.join(TEMPLATE_NAMES)} or a path to a "
                         ".md file")
    return path.read_text(encoding="utf-8"), default


def _copy_plots(plots: list[Plot], folder: Path) -> list[Plot]:
    """Copy plot images into ``folder/plots`` (unless already inside ``folder``); returns plots with card-relative
    paths."""
    copied = []
    folder_resolved = folder.resolve()
    for plot in plots:
        src = plot.path
        if not src.is_file():
            logger.warning("plot %s named in the results does not exist; left out of the card", src)
            continue
        if src.suffix.lower() not in PLOT_SUFFIXES:
            logger.warning("plot %s is not an image (%s); left out of the card", src, ", ".join(PLOT_SUFFIXES))
            continue
        resolved = src.resolve()
        if resolved.is_relative_to(folder_resolved):
            copied.append(dataclasses.replace(plot, path=resolved.relative_to(folder_resolved)))
            continue
        target_dir = folder / PLOTS_DIR
        target_dir.mkdir(exist_ok=True)
        target = target_dir / src.name
        n = 1
        while target.exists() and not filecmp.cmp(target, src, shallow=False):
            n += 1
            target = target_dir / f"{src.stem}-{n}{src.suffix}"
        if not target.exists():
            shutil.copy2(src, target)
        copied.append(dataclasses.replace(plot, path=target.relative_to(folder)))
    return copied


def render_card(
    folder: str | Path,
    *,
    results: Sequence[Any] = (),
    training: TrainingSummary | str | Path | None = None,
    plots: Sequence[str | Path] = (),
    base_model: str | None = None,
    base_card: str | Path | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    repo_id: str | None = None,
    template: str | Path | None = None,
    copy_plots: bool = True,
) -> str:
    """The card text (front matter + body) for the saved model in ``folder``; copies plots into ``folder/plots``.

    Args:
        folder: a folder written by ``save_pretrained`` from a patched model (config.json has ``hf_rope_ext``).
        results: reports (JSON files, parsed JSON, or the report objects) of kind perplexity, retrieval, compare,
            training_summary or rows (see :mod:`hf_rope_ext.cards.results` and docs/cards.md).
        training: a ``TrainingSummary``, a path to ``training_summary.json`` or the folder holding it; default: the
            folder's own ``training_summary.json`` when there is one. Its held-out perplexity before / after
            training goes into the perplexity table; its plot paths are relative to the summary's folder.
        plots: extra images to copy into the folder and show under "Evaluation".
        base_model: Hub id of the model that was extended (or a local copy of it); default: what ``patch_model``
            recorded in config.json.
        base_card: the base model's README.md (or its folder), to carry the license and language over.
        license: Hub license id; overrides the base card's.
        language: language code(s) for the metadata; default: the base card's.
        repo_id: the Hub id the model will have; used in the loading code (default: the folder name).
        template: "causal_lm", "encoder" or a path to a template file; default by the saved architecture.
        copy_plots: copy plot images into the folder (False: link them where they are; for previews).
    """
    # read and check everything first: nothing is written before this block has passed
    saved = SavedModel.read(folder)
    meta = saved.meta
    if repo_id is not None and not (isinstance(repo_id, str) and HUB_ID.match(repo_id)):
        raise ValueError(f"repo_id must be a Hub id, owner/name; got {repo_id!r}")
    spec = sections.method_spec(meta["method"])
    if spec is None:
        logger.warning("method '%s' is not registered in this process; the card uses config.json alone",
                       meta["method"])
    parsed = load_results(results, base_dir=saved.folder)
    if training is None and parsed.training is None and (saved.folder / TRAINING_FILE).is_file():
        training = saved.folder / TRAINING_FILE  # the summary the recipe saved next to the model
    if training is not None:
        summary, base, where = read_training(training, saved.folder)
        add_training(parsed, summary, base, where)
    for extra in plots:
        path = Path(extra).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"plots: {path} not found")
        parsed.plots.append(Plot(path, title_from_name(path)))
    default_template, pipeline_tag, auto_class = sections.task_and_pipeline(saved)
    text, template_name = _load_template(template, default_template)
    body_template = string.Template(text)
    unknown = sorted(set(body_template.get_identifiers()) - set(PLACEHOLDERS))
    if unknown or not body_template.is_valid():
        raise ValueError(f"template: placeholder(s) {', '.join('$' + k for k in unknown) or 'with invalid syntax'} "
                         f"not known; available: {', '.join('$' + k for k in PLACEHOLDERS)}")
    base_meta = metadata.front_matter(metadata.base_card_text(base_card, base_model, saved))
    previous = metadata.front_matter(saved.previous_card)  # a re-render keeps what an earlier one was told
    base_id = metadata.resolve_base_model(base_model, saved) or previous.get("base_model")
    license = license or base_meta.get("license") or previous.get("license")
    language = language or base_meta.get("language") or previous.get("language")

    card_plots = _copy_plots(parsed.plots, saved.folder) if copy_plots else parsed.plots
    model_id = repo_id or saved.folder.resolve().name
    model_name = model_id.split("/")[-1]
    data = metadata.card_data(saved, parsed, base_model=base_id, license=license, language=language,
                              base_meta=base_meta, pipeline_tag=pipeline_tag, model_name=model_name)
    plugin = bool(meta.get("requires_plugin"))
    factor = fmt_factor(meta.get("factor"))
    summary = (
        f"{'[' + base_id + '](https://huggingface.co/' + base_id + ')' if base_id else 'A model'} with its context "
        f"window extended from {meta['original_max_position_embeddings']} to {meta['max_position_embeddings']} tokens "
        f"(×{factor}) by `{meta['method']}`"
        + (f" ({spec.description})" if spec is not None else "")
        + (", then fine-tuned as described under *Fine-tuning*." if parsed.training is not None else ".")
    )
    values = {
        "marker": card_marker(meta, model_id),
        "title": model_name,
        "summary": summary,
        "method": meta["method"],
        "factor": factor,
        "original_length": meta["original_max_position_embeddings"],
        "new_length": meta["max_position_embeddings"],
        "extension_table": sections.extension_table(saved, base_id, spec),
        "parameters_table": sections.parameters_table(saved, spec),
        "position_config": sections.position_config(saved),
        "load_note": (
            "This config uses a rope type that stock transformers does not have: **import `hf_rope_ext` before "
            "loading**." if plugin else
            "The extension is stored in config.json in a form stock transformers reads: no extra package is needed."
        ),
        "install": "pip install transformers" + (" hf_rope_ext" if plugin else ""),
        "plugin_import": "import hf_rope_ext  # registers the rope type this config names\n" if plugin else "",
        "model_id": model_id,
        "auto_class": auto_class,
        "evaluation": sections.evaluation_section(parsed, meta, card_plots),
        "training": sections.training_section(parsed, card_plots),
        "limitations": "\n".join(f"- {item}" for item in sections.limitations(saved, template_name, parsed)),
        "citation": sections.citation(meta, spec),
    }
    assert set(values) == set(PLACEHOLDERS)
    body = re.sub(r"\n{3,}", "\n\n", body_template.substitute(values)).strip() + "\n"
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


PLACEHOLDERS: tuple[str, ...] = (
    "marker", "title", "summary", "method", "factor", "original_length", "new_length", "extension_table",
    "parameters_table", "position_config", "load_note", "install", "plugin_import", "model_id", "auto_class",
    "evaluation", "training", "limitations", "citation",
)
"""``$name`` placeholders a template may use."""


BACKUP_SUFFIX = ".bak"


def _hand_written(path: Path) -> bool:
    """A README.md that hf-rope-ext did not write (its marker missing, or not readable as text)."""
    try:
        return MARKER_PREFIX not in path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return True


def write_card(folder: str | Path, *, overwrite: bool = False, **kwargs: Any) -> Path:
    """Render the card (see :func:`render_card` for the arguments) and write ``folder/README.md``; returns its path.

    A card hf-rope-ext wrote before is replaced. A README.md it did not write (a hand-written card, the base model's
    card copied into the folder) is refused unless ``overwrite=True``; then it is kept as ``README.md.bak`` (its
    license and language are carried over) and replaced. The check runs before anything is written."""
    folder = Path(folder).expanduser()
    path = folder / CARD_FILE
    hand_written = path.is_file() and _hand_written(path)
    if hand_written and not overwrite:
        raise FileExistsError(
            f"{path} was not written by hf-rope-ext (a hand-written card?); pass --overwrite (overwrite=True) to "
            f"replace it, keeping it as {path.name}{BACKUP_SUFFIX}, or --stdout to print the card instead"
        )
    text = render_card(folder, **kwargs)
    if hand_written:
        backup = path.with_name(path.name + BACKUP_SUFFIX)
        backup.write_bytes(path.read_bytes())
        logger.warning("replacing %s (not written by hf-rope-ext); the old file is kept as %s", path, backup)
    path.write_text(text, encoding="utf-8")
    logger.info("wrote %s", path)
    return path


_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.S)


def retarget_card(text: str, repo_id: str, default_model_id: str | None = None) -> tuple[str, str | None]:
    """Point a card hf-rope-ext wrote at ``repo_id``: ``(new text, model id it named before)``, or ``(text, None)``
    when it already names ``repo_id``.

    Changed: the quoted model id (``from_pretrained("...")`` in the loading code), the title line, the model-index
    name and the model id comment. ``default_model_id`` is what a card without the model id comment (written by an
    older version) named: the name of the folder it was rendered in."""
    if read_marker(text) is None:
        raise ValueError("the card was not written by hf-rope-ext; it is left as it is")
    if not HUB_ID.match(repo_id):
        raise ValueError(f"repo_id must be a Hub id, owner/name; got {repo_id!r}")
    old = read_model_id(text) or default_model_id
    if old is None or old == repo_id:
        return text, None
    old_name, new_name = old.split("/")[-1], repo_id.split("/")[-1]
    match = _FRONT_MATTER.match(text)
    front, body = (match.group(1), text[match.end():]) if match else (None, text)
    body = body.replace(f'"{old}"', f'"{repo_id}"')
    body = re.sub(rf"(?m)^# {re.escape(old_name)}$", lambda _: f"# {new_name}", body, count=1)
    id_line = f"{MODEL_ID_PREFIX} {repo_id} -->"
    if read_model_id(body) is not None:
        body = re.sub(rf"(?m)^{re.escape(MODEL_ID_PREFIX)}.*$", lambda _: id_line, body, count=1)
    else:
        body = re.sub(rf"(?m)^({re.escape(MARKER_PREFIX)}.*)$", lambda m: f"{m.group(1)}\n{id_line}", body, count=1)
    if front is not None:
        from huggingface_hub import ModelCard

        data = ModelCard(text, ignore_metadata_errors=True).data
        if getattr(data, "model_name", None) == old_name:
            data.model_name = new_name
            front = data.to_yaml()
        return f"---\n{front}\n---\n{body}", old
    return body, old
