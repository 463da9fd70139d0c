"""Model cards: Hub metadata validated by huggingface_hub's own ModelCard tools; text checked against the saved
config.json and the results files (numbers formatted independently here)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from hf_rope_ext.cards import fingerprint, load_results, read_marker, render_card, write_card
from hf_rope_ext.cli import main

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


@pytest.fixture
def results(tmp_path) -> dict[str, Path]:
    """One results file of each kind, in different accepted shapes."""
    src = tmp_path / "eval"
    src.mkdir()
    (src / "ppl_by_length.png").write_bytes(PNG)
    (src / "passkey_grid.png").write_bytes(PNG)
    (src / "loss.png").write_bytes(PNG)
    files = {
        "perplexity": {"task": "perplexity", "dataset": "pg19", "plots": ["ppl_by_length.png"], "results": [
            {"method": "yarn", "length": 64, "perplexity": 12.3456, "stride": 32, "unknown": "ignored"},
            {"method": "yarn", "length": 256, "perplexity": 14.0123},
            {"method": "base", "length": 64, "perplexity": 12.31},
            {"method": "base", "length": 256, "perplexity": 812.75},
        ]},
        "passkey": [  # a plain list of rows; accuracy in percent
            {"length": 128, "depth": 0.0, "accuracy": 100},
            {"length": 128, "depth": 0.5, "accuracy": 0},
            {"length": 256, "depth": 0.0, "accuracy": 100},
            {"length": 256, "depth": 0.5, "accuracy": 100},
        ],
        "needle": {"task": "needle", "method": "yarn", "lengths": [128, 256], "depths": [0.25, 0.75],
                   "accuracy": [[0.9, 0.6], [0.8, 0.4]], "plot": {"path": "passkey_grid.png", "title": "Needle grid"}},
        "training": {"steps": 400, "train_tokens": 13107200, "seq_len": 256, "learning_rate": 2e-5,
                     "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
                              "modules_to_save": ["embed_tokens", "norm"]},
                     "hardware": "1x NVIDIA H100 80GB", "wall_time_s": 3723, "tokens_per_s": 3520.4,
                     "peak_memory_gb": 21.4, "data": {"name": "emozilla/pg19", "split": "train"},
                     "loss_curve": [{"step": 1, "loss": 3.25}, {"step": 400, "loss": 2.125}], "plots": ["loss.png"],
                     "some_future_key": {"x": 1}},
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
    got = {(r.metric_type, r.metric_name, r.metric_value) for r in data.eval_results}
    assert ("perplexity", "Perplexity @ 64 tokens", 12.3456) in got
    assert ("perplexity", "Perplexity @ 256 tokens", 14.0123) in got
    assert ("accuracy", "Passkey accuracy @ 128 tokens", 0.5) in got
    assert ("accuracy", "Passkey accuracy @ 256 tokens", 1.0) in got
    assert ("accuracy", "Needle accuracy @ 128 tokens", 0.85) in got  # mean over depths 0.9, 0.8
    assert not any(r.metric_value == 812.75 for r in data.eval_results)  # the base model's row is not ours
    assert {r.task_type for r in data.eval_results} == {"text-generation"}

    # the YAML re-parses through the model-index parser and round-trips through ModelCard unchanged
    import yaml

    front = yaml.safe_load(path.read_text().split("---")[1])
    name, parsed = model_index_to_eval_results(front["model-index"])
    assert name == "tiny-yarn" and len(parsed) == len(data.eval_results)
    assert ModelCard(str(card)).data.to_dict() == data.to_dict()


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
    # the exact rope_parameters written to config.json, including the resolved attention factor
    saved_block = json.loads(re.search(r"```json\n(.*?)\n```", body, re.S).group(1))
    assert saved_block["rope_parameters"] == config["rope_parameters"]
    assert saved_block["rope_parameters"]["attention_factor"] == pytest.approx(0.1 * __import__("math").log(4) + 1)
    # paper link and citation
    assert "https://arxiv.org/abs/2309.00071" in body and "@article{peng2023yarn" in body
    # native: plain transformers, no plugin import in the code
    code = _section(body, "## How to load")
    assert "import hf_rope_ext" not in code and "AutoModelForCausalLM.from_pretrained(" in code
    assert "`rope_type: yarn` is implemented by" in _section(body, "## Limitations")
    # the card records what it was rendered for (push compares this with config.json)
    assert read_marker(text) == fingerprint(meta)


def test_card_tables_carry_the_numbers_from_the_results_files(yarn_dir, results):
    body = _body(render_card(yarn_dir, results=[results["perplexity"], results["passkey"], results["needle"]],
                             training=results["training"]))

    ppl = _section(body, "### Perplexity by context length")
    assert "On pg19:" in ppl
    assert "| tokens | × original | yarn (this model) | base |" in ppl
    rows = json.loads(results["perplexity"].read_text())["results"]
    for length in (64, 256):
        cells = [f"{r['perplexity']:.2f}" for r in rows if r["length"] == length]
        assert f"| {length} | {length / ORIGINAL:g} | {cells[0]} | {cells[1]} |" in ppl

    passkey = _section(body, "### Passkey retrieval accuracy")
    assert "| 128 | 2 | 50% (1/2) |" in passkey and "| 256 | 4 | 100% (2/2) |" in passkey
    needle = body[body.index("### Needle-in-a-haystack accuracy"):]
    assert "| 25% | 90% | 60% |" in needle and "| 75% | 80% | 40% |" in needle

    training = _section(body, "## Fine-tuning")
    for expected in ("| optimizer steps | 400 |", "| training tokens | 13,107,200 (≈13.1M) |",
                     "| sequence length | 256 |", "| learning rate | 2e-05 |", "| LoRA r | 8 |", "| LoRA alpha | 16 |",
                     "| LoRA dropout | 0.05 |", "| LoRA target modules | q_proj, v_proj |",
                     "| LoRA trained in full | embed_tokens, norm |", "| hardware | 1x NVIDIA H100 80GB |",
                     "| wall time | 1h 02m 03s |", "| throughput | 3,520 tokens/s |",
                     "| peak accelerator memory | 21.4 GB |", "| data | emozilla/pg19 (split=train) |",
                     "| loss curve | 3.25 (step 1) → 2.125 (step 400), 2 points |"):
        assert expected in training, expected
    assert "some_future_key" not in body
    assert "and the fine-tuning described above" in body


def test_plots_are_copied_into_the_folder_and_linked(yarn_dir, results, tmp_path, caplog):
    extra = tmp_path / "attention.png"
    extra.write_bytes(PNG)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"task": "perplexity", "plots": ["missing.png"], "results": [
        {"length": 64, "perplexity": 10.0}]}))
    with caplog.at_level(logging.WARNING, logger="hf_rope_ext.cards"):
        text = write_card(yarn_dir, results=[results["perplexity"], results["needle"], broken],
                          training=results["training"], plots=[extra]).read_text()
    for name in ("ppl_by_length.png", "passkey_grid.png", "loss.png", "attention.png"):
        assert (yarn_dir / "plots" / name).read_bytes() == PNG
        assert f"](plots/{name})" in text
    assert "![Needle grid](plots/passkey_grid.png)" in _section(text, "### Needle-in-a-haystack accuracy")
    assert "](plots/loss.png)" in _section(text, "## Fine-tuning")
    assert "missing.png" not in text and any("missing.png" in r.message for r in caplog.records)
    with pytest.raises(FileNotFoundError, match="plot not found"):
        render_card(yarn_dir, plots=[tmp_path / "nope.png"])


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


def test_load_results_accepts_documented_shapes(tmp_path):
    bundle = tmp_path / "all.json"
    bundle.write_text(json.dumps({
        "perplexity": {"lengths": [64, 128], "perplexities": [9.5, 10.25], "method": "yarn"},
        "passkey": {"results": {"yarn": [{"seq_len": 128, "correct": 3, "total": 4}], "base": [
            {"context_length": 128, "acc": 0.25, "trials": 4}]}},
        "training": {"max_steps": 10, "lr": 1e-4, "train_runtime": 61.5},
        "notes": "ignored",
    }))
    keyed = {"task": "perplexity", "results": {"64": 7.5, "256": 8.0}}
    res = load_results([bundle, keyed, [{"length": 512, "ppl": 3.0}]])
    ppl = {(r.method, r.length): r.value for r in res.of("perplexity")}
    assert ppl == {("yarn", 64): 9.5, ("yarn", 128): 10.25, (None, 64): 7.5, (None, 256): 8.0, (None, 512): 3.0}
    passkey = {(r.method, r.length): (r.value, r.trials) for r in res.of("passkey")}
    assert passkey == {("yarn", 128): (0.75, 4), ("base", 128): (0.25, 4)}
    assert res.training == {"steps": 10, "learning_rate": 1e-4, "wall_time_s": 61.5}

    needle_file = tmp_path / "needle_results.json"  # the file name tells needle from passkey
    needle_file.write_text(json.dumps([{"length": 64, "accuracy": 0.5}]))
    assert load_results([needle_file]).of("needle")[0].value == 0.5
    after = tmp_path / "ppl_after_training.json"  # ... but never turns results into a training summary
    after.write_text(json.dumps({"data": "pg19", "lengths": [64], "perplexities": [4.5]}))
    res = load_results([after])
    assert res.training is None and [(r.length, r.value) for r in res.of("perplexity")] == [(64, 4.5)]


def test_load_results_reads_hf_rope_ext_eval_reports():
    """The JSON written by `hf-rope-ext eval ... --out` (perplexity, passkey/needle, compare), as literals."""
    yarn = {"method": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "max_position_embeddings": 256}
    perplexity = {"kind": "perplexity", "model": "out/tiny", "patch": yarn, "text": "builtin:pydoc",
                  "text_description": "pydoc topics", "offset": 0, "seconds": 1.0, "results": [
                      {"window": 256, "stride": 256, "tokens": 4096, "scored_tokens": 4080, "windows": 16, "nll": 2.1,
                       "perplexity": 8.17, "bucket_size": 64, "buckets": [], "seconds": 0.5,
                       "derived_from_window": None}]}
    passkey = {"kind": "retrieval", "task": "passkey", "model": "out/tiny", "patch": None, "lengths": [64, 128],
               "depths": [0.0, 0.5], "trials_per_cell": 2, "seed": 0, "accuracy": [[1.0, 0.5], [0.5, 0.0]],
               "trials": [{"length": 64, "depth": 0.0, "correct": True}], "settings": {}, "overall_accuracy": 0.5}
    compare = {"kind": "compare", "model": "m", "original_length": 64, "patch_arguments": {"factor": 4},
               "lengths": [256], "text": "builtin:pydoc", "text_description": "", "offset": 0, "notes": [], "runs": [
                   {"method": "none", "patch": None, "perplexity": {**perplexity, "patch": None, "results": [
                       {**perplexity["results"][0], "perplexity": 95.5}]}, "passkey": None},
                   {"method": "yarn", "patch": yarn, "perplexity": perplexity, "passkey": {**passkey, "patch": yarn}},
                   {"method": "linear", "patch": None, "perplexity": None, "passkey": None, "error": "refused"}]}
    res = load_results([perplexity, passkey, compare])
    ppl = [(r.method, r.length, r.value, r.dataset) for r in res.of("perplexity")]
    assert ppl == [("yarn", 256, 8.17, "builtin:pydoc"), ("unpatched", 256, 95.5, "builtin:pydoc"),
                   ("yarn", 256, 8.17, "builtin:pydoc")]
    cells = {(r.method, r.length, r.depth): (r.value, r.trials) for r in res.of("passkey")}
    assert cells[("unpatched", 128, 0.0)] == (0.5, 2) and cells[("yarn", 64, 0.5)] == (0.5, 2)
    assert len(cells) == 8


def test_training_details_from_nested_options_and_from_the_saved_finetune_record(yarn_dir):
    summary = {"steps": 30, "tokens": 7680, "loss_last": 2.5, "peak_memory_bytes": 2.5e9,
               "peak_memory_kind": "cpu_peak_rss", "options": {"data": "builtin:stdlib", "lr": 3e-4, "lora_r": 4,
                                                               "lora_alpha": 8, "train_mode": "lora"}}
    training = load_results([{**summary, "task": "training"}]).training
    assert training["learning_rate"] == 3e-4 and training["lora"] == {"r": 4, "alpha": 8}
    body = _body(render_card(yarn_dir, training=summary))
    for expected in ("| final training loss | 2.5 |", "| peak process memory (RSS) | 2.5 GB |", "| LoRA r | 4 |",
                     "| data | builtin:stdlib |", "| training mode | lora |"):
        assert expected in body, expected

    config = json.loads((yarn_dir / "config.json").read_text())  # recipes/finetune.py records its run here
    config["hf_rope_ext"]["finetune"] = {"train_mode": "full", "steps": 12, "tokens": 3072, "seq_len": 256,
                                         "data": "builtin:pydoc", "lr": 1e-4}
    (yarn_dir / "config.json").write_text(json.dumps(config))
    training = _section(_body(render_card(yarn_dir)), "## Fine-tuning")
    assert "| optimizer steps | 12 |" in training and "| training mode | full |" in training


@pytest.mark.parametrize(
    "data, message",
    [
        ([{"perplexity": 3.0}], "has no length"),
        ({"task": "passkey", "results": [{"length": 64, "accuracy": 250}]}, "fraction"),
        ({"task": "perplexity", "results": [{"length": 64.5, "perplexity": 3.0}]}, "positive integer"),
        ({"hello": 1}, "no results found"),
        ([{"length": 64, "foo": 1}], "cannot tell what"),
    ],
)
def test_load_results_rejects_unreadable_input_clearly(data, message):
    with pytest.raises(ValueError, match=message):
        load_results([data])


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
