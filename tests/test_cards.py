"""Model cards: Hub metadata validated by huggingface_hub's own ModelCard tools; text checked against the saved
config.json and the results (numbers formatted independently here). Results are the typed reports hf_rope_ext
writes, a TrainingSummary, and the one row format; anything else is refused before a file is written."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_rope_ext.cards import (
    fingerprint,
    load_results,
    read_marker,
    read_model_id,
    render_card,
    retarget_card,
    template_text,
    write_card,
)
from hf_rope_ext.cli import main
from hf_rope_ext.eval.compare import CompareReport, MethodRun
from hf_rope_ext.eval.perplexity import PerplexityReport, PerplexityResult
from hf_rope_ext.eval.retrieval import RetrievalReport
from hf_rope_ext.training.summary import TrainingSummary

from .model_folders import NEW, ORIGINAL, PNG, save_extended_bert, save_patched_llama


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cards")
    return {
        "yarn": save_patched_llama(root / "yarn", "yarn", beta_fast=24.0),
        "dynamic": save_patched_llama(root / "dynamic", "dynamic_yarn"),
        "bert": save_extended_bert(root / "bert"),
    }


@pytest.fixture
def yarn_dir(saved, tmp_path) -> Path:
    folder = tmp_path / "tiny-yarn"
    shutil.copytree(saved["yarn"], folder)
    return folder


YARN = {"method": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "max_position_embeddings": NEW}


def _retrieval(task: str, patch: dict | None, lengths: list[int], depths: list[float], accuracy: list[list[float]],
               trials: int = 1) -> RetrievalReport:
    return RetrievalReport(task=task, model="out/tiny", patch=patch, lengths=lengths, depths=depths,
                           trials_per_cell=trials, seed=0, accuracy=accuracy)


def _perplexity(patch: dict | None, values: dict[int, float], text: str = "builtin:pydoc") -> PerplexityReport:
    return PerplexityReport(model="out/tiny", patch=patch, text=text, text_description="", offset=0, results=[
        PerplexityResult(window=n, stride=n, tokens=4 * n, scored_tokens=4 * n - 4, windows=4, nll=math.log(v),
                         perplexity=v, bucket_size=n) for n, v in values.items()])


def _summary(**fields) -> TrainingSummary:
    defaults = dict(
        method="yarn", factor=4.0, steps=400, tokens=13107200, seq_len=256, learning_rate=2e-5,
        lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
              "modules_to_save": ["embed_tokens", "norm"]},
        hardware="1 x NVIDIA H100 80GB", wall_time_s=3723.0, tokens_per_s=3520.4, peak_memory_bytes=21 * 2**30,
        peak_memory_kind="cuda_max_allocated", data=["emozilla/pg19"],
        loss_curve=[[1, 3.25], [200, 2.5], [400, 2.125]],
        eval_before={"perplexity": 15.2, "nll": math.log(15.2), "tokens": 2040, "chunks": 8, "length": 256,
                     "objective": "causal"},
        eval_after={"perplexity": 9.875, "nll": math.log(9.875), "tokens": 2040, "chunks": 8, "length": 256,
                    "objective": "causal"},
        options={"lr": 2e-5, "max_steps": 400},
    )
    return TrainingSummary(**{**defaults, **fields})


@pytest.fixture
def results(tmp_path) -> dict[str, Path]:
    """One results file of each accepted kind, as JSON files."""
    src = tmp_path / "eval"
    src.mkdir()
    for name in ("ppl_by_length.png", "needle_grid.png", "loss.png"):
        (src / name).write_bytes(PNG)
    files = {
        "perplexity": {"kind": "rows", "plots": [{"path": "ppl_by_length.png", "task": "perplexity"}], "rows": [
            {"task": "perplexity", "method": "yarn", "length": 64, "value": 12.3456, "dataset": "pg19"},
            {"task": "perplexity", "method": "yarn", "length": 256, "value": 14.0123, "dataset": "pg19"},
            {"task": "perplexity", "method": "none", "length": 64, "value": 12.31, "dataset": "pg19"},
            {"task": "perplexity", "method": "none", "length": 256, "value": 812.75, "dataset": "pg19"},
        ]},
        "passkey": _retrieval("passkey", YARN, [128, 256], [0.0, 0.5], [[1.0, 1.0], [0.0, 1.0]]).to_dict(),
        "needle": {"kind": "rows", "plots": [{"path": "needle_grid.png", "title": "Needle grid", "task": "needle"}],
                   "rows": [{"task": "needle", "method": "yarn", "length": length, "depth": depth, "value": value}
                            for depth, row in ((0.25, (0.9, 0.6)), (0.75, (0.8, 0.4)))
                            for length, value in zip((128, 256), row, strict=True)]},
        "training": _summary(plots=[{"path": "loss.png", "title": "Training loss"}]).to_dict(),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = src / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    return paths


def _config_meta(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["hf_rope_ext"]


def _body(text: str) -> str:
    return text.split("\n---\n", 1)[1]


def _section(text: str, title: str) -> str:
    start = text.index(title)
    nxt = re.search(r"\n#{2,3} ", text[start + len(title):])
    return text[start: start + len(title) + (nxt.start() if nxt else len(text))]


# --------------------------------------------------------------------------------------------------------------------


def test_templates_ship_inside_the_package(tmp_path):
    import hf_rope_ext

    package = Path(hf_rope_ext.__file__).parent
    folder = package / "cards" / "templates"
    for name in ("causal_lm", "encoder"):
        assert template_text(name) == (folder / f"{name}.md").read_text()
        assert "${marker}" in template_text(name)
    repo_link = package.parent / "model_cards"  # the documented path of a source checkout still works
    assert repo_link.resolve() == folder.resolve()

    # the package alone, as a wheel installs it (no model_cards/ next to it), finds its templates
    site = tmp_path / "site"
    shutil.copytree(package, site / "hf_rope_ext", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import hf_rope_ext.cards as c, sys; assert c.__file__.startswith(sys.argv[1]), c.__file__; "
            "print(c.template_text('causal_lm'), end='')")
    proc = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (folder / "causal_lm.md").read_text()


def test_card_metadata_parses_and_validates(yarn_dir, results, tmp_path):
    from huggingface_hub import EvalResult, ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    base_card = tmp_path / "base_README.md"
    base_card.write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n---\n# The base model\n")
    path = write_card(yarn_dir, results=list(results.values()), base_model="HuggingFaceTB/SmolLM2-135M",
                      base_card=base_card, repo_id="tester/tiny-yarn")
    assert path == yarn_dir / "README.md"

    card = ModelCard.load(path, ignore_metadata_errors=False)  # strict: raises on an invalid model-index
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"  # carried over from the base model's card
    assert data.language == ["en"]
    assert {"context-extension", "yarn"} <= set(data.tags)
    assert data.datasets == ["emozilla/pg19"]

    # model-index: this model's rows only (method "yarn" or unlabelled), one metric per length
    assert data.model_name == "tiny-yarn"
    assert all(isinstance(r, EvalResult) for r in data.eval_results)
    got = {(r.dataset_name, r.metric_type, r.metric_name, r.metric_value) for r in data.eval_results}
    assert ("pg19", "perplexity", "Perplexity @ 64 tokens", 12.3456) in got
    assert ("pg19", "perplexity", "Perplexity @ 256 tokens", 14.0123) in got
    assert ("held-out text", "perplexity", "Perplexity @ 256 tokens", 9.875) in got  # after training
    assert ("Passkey retrieval (synthetic)", "accuracy", "Passkey accuracy @ 128 tokens", 0.5) in got
    assert ("Passkey retrieval (synthetic)", "accuracy", "Passkey accuracy @ 256 tokens", 1.0) in got
    assert ("Needle in a haystack (synthetic)", "accuracy", "Needle accuracy @ 128 tokens", 0.85) in got  # mean
    assert len(got) == 7
    assert not any(r.metric_value in (812.75, 15.2) for r in data.eval_results)  # unpatched, before training
    assert {r.task_type for r in data.eval_results} == {"text-generation"}

    # the YAML re-parses through the model-index parser and round-trips through ModelCard unchanged
    import yaml

    front = yaml.safe_load(path.read_text().split("---")[1])
    name, parsed = model_index_to_eval_results(front["model-index"])
    assert name == "tiny-yarn" and len(parsed) == len(data.eval_results)
    assert ModelCard(str(card)).data.to_dict() == data.to_dict()


def test_model_index_keeps_each_local_text_under_its_own_name(yarn_dir, tmp_path):
    """Two texts that are not Hub datasets: after the card is written and read back, each figure is listed under its
    own text (huggingface_hub merges entries of one dataset type under the first one's name)."""
    from huggingface_hub import ModelCard

    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps({"kind": "rows", "rows": [
        {"task": "perplexity", "length": 256, "value": 9.5, "dataset": "Python docs (builtin:pydoc)"},
        {"task": "perplexity", "length": 256, "value": 6.25, "dataset": "Python stdlib source"},
        {"task": "perplexity", "length": 256, "value": 7.0, "dataset": "emozilla/pg19"},
    ]}))
    path = write_card(yarn_dir, results=[rows], repo_id="tester/tiny-yarn")
    got = {r.metric_value: (r.dataset_name, r.dataset_type) for r in ModelCard.load(path).data.eval_results}
    assert got[9.5][0] == "Python docs (builtin:pydoc)" and got[6.25][0] == "Python stdlib source"
    assert got[7.0] == ("emozilla/pg19", "emozilla/pg19")
    assert len({t for _, t in got.values()}) == 3


def test_card_text_states_method_parameters_and_lengths_from_config(yarn_dir):
    text = render_card(yarn_dir)
    meta = _config_meta(yarn_dir)
    config = json.loads((yarn_dir / "config.json").read_text())
    body = _body(text)

    assert f"from {meta['original_max_position_embeddings']} to {meta['max_position_embeddings']} tokens" in body
    assert f"| original context | {ORIGINAL} tokens |" in body
    assert f"| extended context | {NEW} tokens |" in body
    assert "| factor | 4× |" in body
    assert "`yarn`" in body
    params = _section(body, "### Method parameters")
    assert meta["parameters"]["beta_fast"] == 24.0
    for name, value in meta["parameters"].items():
        shown = "None (method default)" if value is None else (
            f"{value:g}" if isinstance(value, float) else str(value))
        assert re.search(rf"\| `{name}` \| {re.escape(shown)} \|", params), (name, shown)
    # the meaning column carries the parameter's docstring (YarnParams.attention_factor's, in its words)
    assert re.search(r"\| `attention_factor` \| [^|]+ \| Multiplier of cos and sin", params)
    # the exact rope_parameters written to config.json, including the resolved attention factor
    saved_block = json.loads(re.search(r"```json\n(.*?)\n```", body, re.S).group(1))
    assert saved_block["rope_parameters"] == config["rope_parameters"]
    assert saved_block["rope_parameters"]["attention_factor"] == pytest.approx(0.1 * math.log(4) + 1)
    # paper link and citation
    assert "https://arxiv.org/abs/2309.00071" in body and "@article{peng2023yarn" in body
    # native: plain transformers, no plugin import in the code
    code = _section(body, "## How to load")
    assert "import hf_rope_ext" not in code and "AutoModelForCausalLM.from_pretrained(" in code
    assert "load `rope_type: yarn` as the same model" in _section(body, "## Limitations")  # verified claims only
    # the card records what it was rendered for (push compares this with config.json) and the id it loads
    assert read_marker(text) == fingerprint(meta)
    assert read_model_id(text) == "tiny-yarn" and 'from_pretrained("tiny-yarn"' in code


def test_card_tables_carry_the_numbers_from_the_results_files(yarn_dir, results):
    body = _body(render_card(yarn_dir, results=[results["perplexity"], results["passkey"], results["needle"]],
                             training=results["training"]))

    ppl = _section(body, "### Perplexity by context length")
    assert "On pg19:" in ppl
    assert "| tokens | × original | yarn (this model) | none (not extended) |" in ppl
    assert f"| 64 | {64 / ORIGINAL:g} | 12.35 | 12.31 |" in ppl
    assert f"| 256 | {256 / ORIGINAL:g} | 14.01 | 812.75 |" in ppl
    # the training summary's held-out perplexity: after training is this model, before training is compared
    assert "On held-out text:" in ppl
    assert "| tokens | × original | this model | before fine-tuning |" in ppl
    assert f"| 256 | {256 / ORIGINAL:g} | 9.88 | 15.20 |" in ppl

    passkey = _section(body, "### Passkey retrieval accuracy")  # depths 0 and 0.5, one trial each
    assert "| 128 | 2 | 50% (1/2) |" in passkey and "| 256 | 4 | 100% (2/2) |" in passkey
    needle = body[body.index("### Needle-in-a-haystack accuracy"):]
    assert "| 25% | 90% | 60% |" in needle and "| 75% | 80% | 40% |" in needle

    training = _section(body, "## Fine-tuning")
    assert "| field | value | meaning |" in training
    help = TrainingSummary.field_help()  # the meaning column is the dataclass's own help
    for name, shown in (("steps", "400"), ("tokens", "13,107,200 (≈13.1M)"), ("seq_len", "256"),
                        ("learning_rate", "2e-05"), ("hardware", "1 x NVIDIA H100 80GB"),
                        ("wall_time_s", "1h 02m 03s"), ("tokens_per_s", "3,520 tokens/s"),
                        ("peak_memory_bytes", "21 GiB"), ("data", "emozilla/pg19"), ("factor", "4"),
                        ("loss_curve", "3.25 (step 1) → 2.125 (step 400), 3 points"),
                        ("lora", "r=8; lora_alpha=16; lora_dropout=0.05; target_modules=q_proj, v_proj; "
                                 "modules_to_save=embed_tokens, norm"),
                        ("eval_before", "perplexity 15.20 at 256 tokens (8 chunks, 2,040 tokens scored, causal "
                                        "objective)")):
        assert f"| `{name}` | {shown} | {help[name]} |" in training, name
    assert "`seed`" not in training  # not recorded: not shown
    assert '"max_steps": 400' in training  # the options, folded
    assert "and the fine-tuning described above" in body


def test_training_data_shows_local_files_by_name_only(yarn_dir, tmp_path):
    """A card is published: the trainer's absolute paths are not, Hub ids and relative names are shown as given."""
    local = tmp_path / "private" / "corpus" / "train.txt"
    text = render_card(yarn_dir, training=_summary(data=[str(local), "emozilla/pg19", "notes.txt"]))
    row = next(line for line in text.splitlines() if line.startswith("| `data` |"))
    assert "| train.txt (local file), emozilla/pg19, notes.txt |" in row
    assert str(tmp_path) not in text and "private" not in text


def test_training_summary_object_folder_and_default(yarn_dir):
    """training= takes the object, the file, the folder; without it the folder's own training_summary.json is
    used; the card renders the before / after perplexity from the summary alone (no results=)."""
    summary = _summary()
    from_object = render_card(yarn_dir, training=summary)
    assert "| 256 | 4 | 9.88 | 15.20 |" in from_object
    path = summary.save(yarn_dir)
    assert path == yarn_dir / "training_summary.json"
    assert render_card(yarn_dir, training=path) == from_object
    assert render_card(yarn_dir, training=yarn_dir) == from_object
    assert render_card(yarn_dir) == from_object  # found in the folder
    assert render_card(yarn_dir, results=[path]) == from_object  # also accepted as a results file (kind tag)
    path.unlink()
    assert "No training summary was supplied" in render_card(yarn_dir)


def test_plots_are_copied_into_the_folder_and_linked(yarn_dir, results, tmp_path, caplog):
    extra = tmp_path / "attention.png"
    extra.write_bytes(PNG)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"kind": "rows", "plots": ["missing.png"], "rows": [
        {"task": "perplexity", "length": 64, "value": 10.0}]}))
    with caplog.at_level(logging.WARNING, logger="hf_rope_ext.cards"):
        text = write_card(yarn_dir, results=[results["perplexity"], results["needle"], broken],
                          training=results["training"], plots=[extra]).read_text()
    for name in ("ppl_by_length.png", "needle_grid.png", "loss.png", "attention.png"):
        assert (yarn_dir / "plots" / name).read_bytes() == PNG
        assert f"](plots/{name})" in text
    assert "](plots/ppl_by_length.png)" in _section(text, "### Perplexity by context length")
    assert "![Needle grid](plots/needle_grid.png)" in _section(text, "### Needle-in-a-haystack accuracy")
    assert "![Training loss](plots/loss.png)" in _section(text, "## Fine-tuning")
    assert "](plots/attention.png)" in _section(text, "### Plots")
    assert "missing.png" not in text and any("missing.png" in r.message for r in caplog.records)
    with pytest.raises(FileNotFoundError, match="plots: .*nope.png not found"):
        render_card(yarn_dir, plots=[tmp_path / "nope.png"])


def test_training_plots_are_relative_to_the_model_folder(yarn_dir):
    (yarn_dir / "loss.png").write_bytes(PNG)
    text = write_card(yarn_dir, training=_summary(plots=[{"path": "loss.png", "title": "Loss"}])).read_text()
    assert "![Loss](loss.png)" in _section(text, "## Fine-tuning")  # already in the folder: linked, not copied
    assert not (yarn_dir / "plots").exists()


def test_plugin_only_method_says_import_first_and_warns_about_kv_cache(saved):
    body = _body(render_card(saved["dynamic"]))
    meta = _config_meta(saved["dynamic"])
    assert meta["requires_plugin"] and meta["dynamic"]
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    assert code.index("import hf_rope_ext") < code.index("from transformers import")
    assert "pip install transformers hf_rope_ext" in body
    limits = _section(body, "## Limitations")
    assert "KV cache" in limits and "freeze_rope_length" in limits
    assert "do not know this rope type" in limits
    assert f"{NEW} tokens" in body and "frequencies depend on input length | yes (dynamic)" in body


def test_encoder_template(saved):
    from huggingface_hub import ModelCard

    text = render_card(saved["bert"], repo_id="tester/tiny-bert-1k")
    card = ModelCard(text)
    assert card.data.pipeline_tag == "feature-extraction"
    assert "context-extension" in card.data.tags and "interpolate" in card.data.tags
    body = _body(text)
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    assert "AutoModel.from_pretrained(\"tester/tiny-bert-1k\")" in code
    assert f"max_length={NEW}" in code and "generate" not in code
    assert "learned position table" in body
    assert "position table itself was resized" in _section(body, "## Limitations")
    assert "KV cache" not in body
    assert "https://arxiv.org/abs/2306.15595" in body and "@article{chen2023extending" in body


def test_card_without_results_says_so_and_has_no_model_index(yarn_dir):
    from huggingface_hub import ModelCard

    text = render_card(yarn_dir)
    assert "model-index" not in text and ModelCard(text).data.eval_results is None
    assert "No evaluation results were supplied" in text
    assert "No training summary was supplied" in text


# --------------------------------------------------------------------------------------------------------------------
# the reader


def test_rows_format(tmp_path):
    """The documented row format, read row by row (values, labels, depth, trials, dataset kept as given)."""
    (tmp_path / "a.png").write_bytes(PNG)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"kind": "rows", "plots": ["a.png", {"path": "b.png", "title": "B", "task": "needle"}],
                                "rows": [
        {"task": "perplexity", "length": 8192, "value": 7.1, "method": "yarn", "dataset": "pg19"},
        {"task": "perplexity", "length": 8192, "value": 95.5, "method": "none", "dataset": "pg19"},
        {"task": "passkey", "length": 4096, "value": 0.75, "trials": 4},
        {"task": "needle", "length": 4096, "value": 1.0, "depth": 0.5, "method": None},
        {"task": "perplexity", "length": 16384, "value": float("inf")},
    ]}))
    res = load_results([path])
    assert [(r.task, r.length, r.value, r.method, r.depth, r.trials, r.dataset) for r in res.rows] == [
        ("perplexity", 8192, 7.1, "yarn", None, None, "pg19"),
        ("perplexity", 8192, 95.5, "none", None, None, "pg19"),
        ("passkey", 4096, 0.75, None, None, 4, None),
        ("needle", 4096, 1.0, None, 0.5, None, None),
        ("perplexity", 16384, float("inf"), None, None, None, None),
    ]
    assert [(p.path, p.title, p.task) for p in res.plots] == [
        (tmp_path / "a.png", "A", None), (tmp_path / "b.png", "B", "needle")]
    assert res.training is None and res.sources == [str(path)]


def test_load_results_reads_hf_rope_ext_eval_reports(tmp_path):
    """The reports `hf-rope-ext eval ... --out` writes (perplexity, retrieval, compare), as objects and as JSON."""
    perplexity = _perplexity(YARN, {256: 8.17})
    passkey = _retrieval("passkey", None, [64, 128], [0.0, 0.5], [[1.0, 0.5], [0.5, 0.0]], trials=2)
    compare = CompareReport(model="m", original_length=64, patch_arguments={"factor": 4}, lengths=[256],
                            text="builtin:stdlib", text_description="", offset=0, runs=[
                                MethodRun("none", None, _perplexity(None, {256: 95.5}), None),
                                MethodRun("yarn", YARN, perplexity,
                                          _retrieval("passkey", YARN, [64], [0.5], [[0.5]], trials=2)),
                                MethodRun("linear", None, None, None, error="refused")])
    files = []
    for name, report in (("ppl", perplexity), ("passkey", passkey), ("compare", compare)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(report.to_dict()))
    for res in (load_results([perplexity, passkey, compare]), load_results(files)):
        ppl = [(r.method, r.length, r.value, r.dataset) for r in res.of("perplexity")]
        assert ppl == [("yarn", 256, 8.17, "builtin:pydoc"), ("none", 256, 95.5, "builtin:stdlib"),
                       ("yarn", 256, 8.17, "builtin:stdlib")]  # compare: the run's method, the compare's text
        cells = {(r.method, r.length, r.depth): (r.value, r.trials) for r in res.of("passkey")}
        assert cells == {("none", 64, 0.0): (1.0, 2), ("none", 128, 0.0): (0.5, 2),
                         ("none", 64, 0.5): (0.5, 2), ("none", 128, 0.5): (0.0, 2),
                         ("yarn", 64, 0.5): (0.5, 2)}


_ACCEPTED = "perplexity, retrieval, compare, training_summary, rows"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"task": "perplexity", "results": [{"length": 64, "perplexity": 3.0}]}, f"no \"kind\".*one of {_ACCEPTED}"),
        ({"kind": "ppl", "rows": []}, f"unknown kind 'ppl'.*one of {_ACCEPTED}"),
        ([{"length": 64, "perplexity": 3.0}], f"got list.*one of {_ACCEPTED}"),
        ({"kind": "rows", "rows": [{"task": "ppl", "length": 64, "value": 3.0}]},
         r"rows\[0\]: task must be one of perplexity, passkey, needle; got 'ppl'"),
        ({"kind": "rows", "rows": [{"task": "perplexity", "length": 64, "perplexity": 3.0}]},
         r"unknown key\(s\) 'perplexity'; a row has: task, length, value, method, depth, trials, dataset"),
        ({"kind": "rows", "rows": [{"task": "passkey", "length": 64, "value": 75}]}, r"fraction in \[0, 1\]"),
        ({"kind": "rows", "rows": [{"task": "perplexity", "length": 64.5, "value": 3.0}]}, "positive integer"),
        ({"kind": "rows", "rows": [{"task": "perplexity", "length": 64}]}, "missing 'value'"),
        ({"kind": "rows", "rows": [{"task": "perplexity", "length": 64, "value": 3.0, "method": "unpatched"}]},
         "the model without extension is 'none'"),
        ({"kind": "rows", "rows": [{"task": "perplexity", "length": 64, "value": 3.0, "depth": 0.5}]},
         "depth applies to passkey / needle rows only"),
        ({"kind": "rows", "rows": [], "dataset": "pg19"}, r"unknown key\(s\) 'dataset' in a rows file"),
        ({"kind": "training_summary", "lr": 1e-4}, r"unknown fields \['lr'\]"),
        ({"kind": "retrieval", "task": "passkey"}, "not a valid retrieval report"),
    ],
)
def test_unreadable_results_are_refused_before_anything_is_written(yarn_dir, data, message):
    (yarn_dir / "loss.png").unlink(missing_ok=True)
    extra = yarn_dir.parent / "extra.png"
    extra.write_bytes(PNG)
    with pytest.raises(ValueError, match=message):
        load_results([data])
    with pytest.raises(ValueError, match=message):
        write_card(yarn_dir, results=[data], plots=[extra])
    assert not (yarn_dir / "README.md").exists() and not (yarn_dir / "plots").exists()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(training={"kind": "training_summary", "stepz": 3}), ValueError,
         r"training: .*unknown fields \['stepz'\]"),
        (dict(training=3), ValueError, "training must be a TrainingSummary, a path to training_summary.json"),
        (dict(training="nowhere/"), FileNotFoundError, "training: .*not found"),
        (dict(results="ppl.json"), ValueError, "results must be a list"),
        (dict(repo_id="not a repo"), ValueError, "repo_id must be a Hub id"),
        (dict(base_model="no such thing!"), ValueError, "base_model 'no such thing!' is neither a Hub id"),
        (dict(template="chatbot"), ValueError, "template: unknown template 'chatbot'; use one of causal_lm, encoder"),
        (dict(results=[{"kind": "rows", "rows": []}], training=_summary(),
              plots=["does-not-exist.png"]), FileNotFoundError, "plots: "),
    ],
)
def test_bad_arguments_name_the_parameter_and_write_nothing(yarn_dir, kwargs, error, message):
    with pytest.raises(error, match=message):
        write_card(yarn_dir, **kwargs)
    assert not (yarn_dir / "README.md").exists() and not (yarn_dir / "plots").exists()


def test_unknown_template_placeholder_is_refused_before_plots_are_copied(yarn_dir, tmp_path):
    template = tmp_path / "mine.md"
    template.write_text("${marker}\n# ${title}\n${evaluaton}\n")
    plot = tmp_path / "p.png"
    plot.write_bytes(PNG)
    with pytest.raises(ValueError, match=r"placeholder\(s\) \$evaluaton not known; available: \$marker"):
        write_card(yarn_dir, template=template, plots=[plot])
    assert not (yarn_dir / "plots").exists()
    template.write_text("${marker}\n# ${title}\nfrom_pretrained(\"${model_id}\")\n")
    text = write_card(yarn_dir, template=template, plots=[plot]).read_text()
    assert _body(text).strip().endswith('# tiny-yarn\nfrom_pretrained("tiny-yarn")')


# --------------------------------------------------------------------------------------------------------------------
# base_model recorded at patch time; the repo id in the loading code


def test_base_model_is_recorded_at_patch_time_and_used_by_the_card(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_rope_ext import patch_info, patch_model

    def tiny(name_or_path: str) -> LlamaForCausalLM:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=ORIGINAL))
        model.config._name_or_path = name_or_path
        return model

    model = patch_model(tiny("someorg/tiny-base"), "linear", 4)
    assert patch_info(model)["base_model"] == "someorg/tiny-base"
    model.config._name_or_path = str(tmp_path / "reloaded")  # as after save + reload from a folder
    patch_model(model, "yarn", 2, repatch=True)
    assert patch_info(model)["base_model"] == "someorg/tiny-base"  # kept on repatch
    model.save_pretrained(tmp_path / "out")
    assert ModelCard(render_card(tmp_path / "out")).data.base_model == "someorg/tiny-base"
    assert ModelCard(render_card(tmp_path / "out", base_model="other/base")).data.base_model == "other/base"

    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "model").mkdir(parents=True)
    for name in ("local/model", "", "gpt2", "../x/y"):  # a folder here, nothing, a bare name, a path: not a Hub id
        assert patch_info(patch_model(tiny(name), "linear", 4))["base_model"] is None, name


def test_retarget_card_points_the_loading_code_at_the_repo_id(yarn_dir, results):
    from huggingface_hub import ModelCard

    text = render_card(yarn_dir, results=[results["perplexity"]])
    wanted = render_card(yarn_dir, results=[results["perplexity"]], repo_id="tester/long-yarn")
    new, old = retarget_card(text, "tester/long-yarn")
    assert old == "tiny-yarn"
    assert new == wanted  # the same card as one rendered for the repo id
    assert 'from_pretrained("tester/long-yarn"' in new and '"tiny-yarn"' not in new
    assert ModelCard(new).data.model_name == "long-yarn" and "\n# long-yarn\n" in new
    assert retarget_card(new, "tester/long-yarn") == (new, None)  # already there: unchanged

    # a card written before the model id comment existed: the folder name is what it named
    legacy = "\n".join(line for line in text.splitlines() if "hf-rope-ext model id" not in line) + "\n"
    new, old = retarget_card(legacy, "tester/long-yarn", "tiny-yarn")
    assert old == "tiny-yarn" and new == wanted
    with pytest.raises(ValueError, match="not written by hf-rope-ext"):
        retarget_card("---\nlicense: mit\n---\n# mine\n", "tester/x")


# --------------------------------------------------------------------------------------------------------------------


def test_cli_card(yarn_dir, results, saved, tmp_path, capsys):
    assert main(["card", str(yarn_dir), "--results", str(results["perplexity"]), "--training",
                 str(results["training"]), "--license", "mit", "--repo-id", "tester/tiny-yarn"]) == 0
    assert f"wrote {yarn_dir / 'README.md'}" in capsys.readouterr().out
    text = (yarn_dir / "README.md").read_text()
    assert "license: mit" in text and 'from_pretrained("tester/tiny-yarn"' in text
    assert main(["card", str(yarn_dir), "--base-model", "HuggingFaceTB/SmolLM2-135M"]) == 0  # a re-render keeps
    text = (yarn_dir / "README.md").read_text()  # the license it was given before
    assert "license: mit" in text and "base_model: HuggingFaceTB/SmolLM2-135M" in text
    capsys.readouterr()

    unpatched = tmp_path / "plain"
    unpatched.mkdir()
    config = json.loads((saved["yarn"] / "config.json").read_text())
    del config["hf_rope_ext"]
    (unpatched / "config.json").write_text(json.dumps(config))
    assert main(["card", str(unpatched)]) == 2
    assert "has no 'hf_rope_ext' entry" in capsys.readouterr().err
    assert main(["card", str(yarn_dir), "--template", "chatbot"]) == 2
    assert "causal_lm, encoder" in capsys.readouterr().err
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"task": "perplexity", "results": [{"length": 64, "perplexity": 3.0}]}))
    assert main(["card", str(yarn_dir), "--results", str(old)]) == 2
    assert f"one of {_ACCEPTED}" in capsys.readouterr().err
