"""Text sources: the offline default, text and JSONL files, saved datasets, clear errors."""

from __future__ import annotations

import json

import pytest

from hf_rope_ext.eval.text import load_text, take_tokens, tokenize

from .eval_utils import bpe_tokenizer


def test_offline_default_is_pydoc_topics():
    import pydoc_data.topics

    text = load_text(None)
    assert text.source == "builtin:pydoc" == load_text("builtin").source
    assert text.text == "\n\n".join(pydoc_data.topics.topics.values())
    assert text.documents == len(pydoc_data.topics.topics)
    assert "pydoc_data.topics" in text.description
    assert len(text.text) > 100_000


def test_stdlib_source_is_python_code():
    text = load_text("builtin:stdlib")
    assert text.documents > 100
    assert "def " in text.text and "import " in text.text


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\nsecond line")
    assert load_text(tmp_path / "a.txt").text == "hello world\nsecond line"
    rows = [{"text": "first doc", "id": 1}, {"text": "second doc", "id": 2}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    loaded = load_text(str(tmp_path / "b.jsonl"))
    assert loaded.text == "first doc\n\nsecond doc" and loaded.documents == 2
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    assert load_text(tmp_path / "c.jsonl", field="content").text == "x"
    with pytest.raises(ValueError, match="no field 'text'.*content"):
        load_text(tmp_path / "c.jsonl")


def test_unknown_sources_name_the_valid_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="builtin:pydoc"):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="builtin:stdlib"):
        load_text("builtin:wiki")
    with pytest.raises(ValueError, match="save_to_disk"):
        load_text(tmp_path)


def test_saved_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two"], "n": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    loaded = load_text(tmp_path / "ds")
    assert loaded.text == "one\n\ntwo"


def test_tokenize_and_take_tokens():
    tok = bpe_tokenizer()
    ids = tokenize(tok, load_text(None))
    assert ids.ndim == 1 and ids.numel() > 100_000
    assert take_tokens(ids, 10, 5).tolist() == ids[5:15].tolist()
    with pytest.raises(ValueError, match=f"only {ids.numel()} tokens"):
        take_tokens(ids, 10, ids.numel() - 5, "length 10")
