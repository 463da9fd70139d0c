"""Issue 14, "fails badly today": each hostile input is refused with an error naming what is wrong, before anything
changes (or, for faults, recovered from and said so). One test per item of the issue, named after it."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hf_rope_ext import patch_info, patch_model, unpatch_model
from hf_rope_ext.cli import main

from .conftest import ORIGINAL_LEN, tiny_config, tiny_model
from .model_folders import tiny_tokenizer
from .utils import assert_unchanged as _assert_unchanged
from .utils import snapshot


def assert_unchanged(model, snap):
    """Exactly as before, and no patch record."""
    _assert_unchanged(model, snap)
    assert patch_info(model) is None


def _saved_llama(folder):
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer(ORIGINAL_LEN).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------- 1. non-finite numbers


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_1_non_finite_attention_factor_is_refused(value):
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"method 'yarn': parameter attention_factor must be a finite number"):
        patch_model(model, "yarn", 4, attention_factor=value)
    assert_unchanged(model, snap)
    # the same class of value for any float field, the factor itself included
    for kwargs in (dict(beta_fast=value), dict(beta_slow=value)):
        with pytest.raises(ValueError, match=f"parameter {next(iter(kwargs))} must be a finite number"):
            patch_model(model, "yarn", 4, **kwargs)
    with pytest.raises(ValueError, match="factor must be a finite number"):
        patch_model(model, "yarn", value)
    assert_unchanged(model, snap)
    # a finite attention factor still goes through, and reaches the rotary module as given
    patch_model(model, "yarn", 4, attention_factor=1.25)
    assert model.model.rotary_emb.attention_scaling == 1.25


def test_1_cli_param_infinity_exits_nonzero_and_saves_nothing(tmp_path, capsys):
    base, out = _saved_llama(tmp_path / "base"), tmp_path / "out"
    code = main(["patch", str(base), "--method", "yarn", "--factor", "4", "--param", "attention_factor=Infinity",
                 "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "attention_factor" in err and "finite number" in err and "inf" in err
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------ 2. custom method returning non-finite values


def test_2_custom_method_with_non_finite_attention_factor_or_frequencies_is_refused():
    from hf_rope_ext import register_method
    from hf_rope_ext.methods import RopeParams, default_inv_freq
    from hf_rope_ext.registry import METHODS

    returns = {
        "test_nan_attention": lambda dim, base: (default_inv_freq(dim, base), float("nan")),
        "test_inf_attention": lambda dim, base: (default_inv_freq(dim, base), torch.tensor(float("inf"))),
        "test_zero_attention": lambda dim, base: (default_inv_freq(dim, base), 0.0),
        "test_nan_frequencies": lambda dim, base: (default_inv_freq(dim, base) * float("nan"), 1.0),
        "test_short_frequencies": lambda dim, base: (default_inv_freq(dim, base)[:-1], 1.0),
        "test_list_frequencies": lambda dim, base: (default_inv_freq(dim, base).tolist(), 1.0),
    }
    expected = {
        "test_nan_attention": "attention factor nan",
        "test_inf_attention": r"attention factor tensor\(inf\)",
        "test_zero_attention": "attention factor 0.0",
        "test_nan_frequencies": "not all finite",
        "test_short_frequencies": r"shape \(7,\)",
        "test_list_frequencies": "a list",
    }
    model = tiny_model("llama")
    snap = snapshot(model)
    try:
        for name, fn in returns.items():
            register_method(name, kind="rope", params=RopeParams, description="test")(
                lambda params, dim, base, device=None, seq_len=None, fn=fn: fn(dim, base)
            )
            with pytest.raises(ValueError, match=f"method '{name}' returned .*{expected[name]}"):
                patch_model(model, name, 2)
            assert_unchanged(model, snap)
        # a dynamic method that breaks only at longer lengths is caught at the new length
        register_method("test_dynamic_nan", kind="rope", params=RopeParams, description="test", dynamic=True)(
            lambda params, dim, base, device=None, seq_len=None: (
                default_inv_freq(dim, base), 1.0 if seq_len is None or seq_len <= 64 else math.nan
            )
        )
        match = r"method 'test_dynamic_nan' returned attention factor nan at seq_len=128"
        with pytest.raises(ValueError, match=match):
            patch_model(model, "test_dynamic_nan", 2)
        assert_unchanged(model, snap)
    finally:
        for name in [*returns, "test_dynamic_nan"]:
            METHODS.pop(name, None)


# ----------------------------------------------------------------------------------------- 3. parameters of wrong type


@pytest.mark.parametrize(
    "method,kwargs,match",
    [
        ("yarn", dict(truncate="no"), r"parameter truncate must be True or False .*got 'no'"),
        ("yarn", dict(truncate=0), r"parameter truncate must be True or False"),
        ("yarn", dict(logn="false"), r"parameter logn must be True or False"),
        ("yarn", dict(beta_fast="32"), r"parameter beta_fast must be a finite number, got '32'"),
        ("yarn", dict(attention_factor="1.2"), r"parameter attention_factor must be a finite number or None"),
        ("llama3", dict(low_freq_factor=True), r"parameter low_freq_factor must be a finite number, got True"),
        ("rerope", dict(window="16"), r"parameter window must be an integer or None, got '16'"),
    ],
)
def test_3_parameters_are_checked_against_their_declared_type(method, kwargs, match):
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=f"method '{method}': {match}"):
        patch_model(model, method, 4, **kwargs)
    assert_unchanged(model, snap)


def test_3_truncate_false_reaches_config_and_record_alike(tmp_path, capsys):
    """The record and the config agree on the bool actually used, and the frequencies are transformers' own yarn
    with truncate=False (the independent reference)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    base, out = _saved_llama(tmp_path / "base"), tmp_path / "out"
    assert main(["patch", str(base), "--method", "yarn", "--factor", "4", "--param", "truncate=no",
                 "--out", str(out)]) == 2
    assert "truncate must be True or False" in capsys.readouterr().err
    assert main(["patch", str(base), "--method", "yarn", "--factor", "4", "--param", "truncate=false",
                 "--out", str(out)]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.rope_parameters["truncate"] is False
    assert patch_info(model)["parameters"]["truncate"] is False
    reference = copy.deepcopy(tiny_config("llama"))
    reference.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "truncate": False,
                                 "original_max_position_embeddings": ORIGINAL_LEN}
    reference.max_position_embeddings = 4 * ORIGINAL_LEN
    inv_freq, _ = ROPE_INIT_FUNCTIONS["yarn"](reference, "cpu")
    truncated, _ = ROPE_INIT_FUNCTIONS["yarn"](_with(reference, truncate=True), "cpu")
    assert not torch.allclose(inv_freq, truncated)  # the setting matters here
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, inv_freq)


def _with(config, **rope):
    config = copy.deepcopy(config)
    config.rope_parameters = {**config.rope_parameters, **rope}
    return config


# ------------------------------------------------------------------------------------------ 4. sequences of numbers


@pytest.mark.parametrize(
    "short_factor,match",
    [
        ("12345678", r"parameter short_factor must be a list of finite numbers or None, got '12345678'"),
        (3.0, r"parameter short_factor must be a list of finite numbers or None, got 3.0"),
        ([1.0, 1.0, "a", 1.0, 1.0, 1.0, 1.0, 1.0], r"parameter short_factor must be a list of finite numbers; "
                                                   r"short_factor\[2\] is 'a'"),
        ([1.0] * 7 + [float("inf")], r"short_factor\[7\] is inf"),
        ([1.0] * 7 + [True], r"short_factor\[7\] is True"),
        ([1.0] * 7 + [-1.0], r"finite numbers > 0; short_factor\[7\] is -1.0"),
        ([1.0] * 3, r"short_factor needs 8 entries \(rotary dim 16 / 2\), got 3"),
    ],
)
def test_4_sequence_parameters_are_lists_of_finite_numbers_of_the_right_length(short_factor, match):
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        patch_model(model, "longrope", 4, short_factor=short_factor, long_factor=[2.0] * 8)
    assert_unchanged(model, snap)
    # a tuple of ints is a fine sequence of numbers: frequencies theta_i / f_i
    factors = (1, 2, 3, 4, 5, 6, 7, 8)
    patch_model(model, "longrope", 4, short_factor=factors, long_factor=[2.0] * 8)
    theta = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(), theta / torch.tensor(factors).double())
    assert patch_info(model)["parameters"]["short_factor"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]


# --------------------------------------------------------------------------------------------- 5. meta-device model


@pytest.mark.parametrize("method", ["yarn", "linear", "rerope"])
def test_5_meta_device_model_is_refused_before_any_change(method):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    config = copy.deepcopy(model.config.to_dict())
    buffers = {n: (b.device.type, b.shape, b.dtype) for n, b in model.named_buffers()}
    rotary = model.model.rotary_emb
    attrs = {k: copy.copy(getattr(rotary, k)) for k in ("rope_type", "attention_scaling", "max_seq_len_cached")}
    with pytest.raises(ValueError, match=r"inv_freq is on the meta device .* load the model with its weights first"):
        patch_model(model, method, 4)
    assert model.config.to_dict() == config
    assert patch_info(model) is None
    assert {n: (b.device.type, b.shape, b.dtype) for n, b in model.named_buffers()} == buffers
    assert {k: getattr(rotary, k) for k in attrs} == attrs
    assert not any(k.startswith("_hf_rope_ext") for k in vars(rotary))
    with pytest.raises(ValueError, match="not patched"):
        unpatch_model(model)
    # materialised, the same model patches normally
    model.to_empty(device="cpu")
    theta = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    rotary.register_buffer("inv_freq", theta, persistent=False)
    rotary.register_buffer("original_inv_freq", theta.clone(), persistent=False)
    patch_model(model, method, 4)
    assert patch_info(model)["method"] == method


def test_5_meta_device_table_model_is_refused_before_any_change():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=ORIGINAL_LEN,
                                           bos_token_id=1, eos_token_id=2))
    config = copy.deepcopy(model.config.to_dict())
    shapes = {n: (t.device.type, t.shape) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    with pytest.raises(ValueError, match=r"position table transformer\.wpe is on the meta device"):
        patch_model(model, "copy", 2)
    assert model.config.to_dict() == config and patch_info(model) is None
    assert {n: (t.device.type, t.shape) for n, t in [*model.named_parameters(), *model.named_buffers()]} == shapes


# ----------------------------------------------------------------------- 6. --overwrite replaces the folder atomically


def _folder_of_another_model(folder):
    """What a user's folder may hold: another model's sharded weights index, shard, README, config."""
    folder.mkdir(parents=True)
    files = {
        "README.md": "# another model\nDescribes a different checkpoint.\n",
        "model.safetensors.index.json": '{"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors"}}',
        "model-00001-of-00002.safetensors": "not really a shard",
        "config.json": '{"model_type": "gpt2"}',
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    return files


def test_6_overwrite_replaces_the_output_folder_atomically(tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    base, out = _saved_llama(tmp_path / "base"), tmp_path / "out"
    files = _folder_of_another_model(out)
    argv = ["patch", str(base), "--method", "yarn", "--factor", "4", "--out", str(out), "--overwrite"]

    # a failure while writing leaves the old folder exactly as it was, and no temporary folder behind
    original_save = PreTrainedModel.save_pretrained

    def save_then_fail(self, folder, *args, **kwargs):
        original_save(self, folder, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fail)
    capsys.readouterr()
    assert main(argv) == 1  # a failure while running: exit 1, one line naming it
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # (progress bars aside)
    assert len(errors) == 1 and "OSError: [Errno 28] No space left on device" in errors[0] and "Traceback" not in err
    assert {p.name: p.read_text() for p in out.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", original_save)

    # a successful --overwrite: the new model only, none of the old files
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert not names & {"README.md", "model.safetensors.index.json", "model-00001-of-00002.safetensors"}
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.model_type == "llama" and patch_info(reloaded)["method"] == "yarn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]


def test_6_replace_directory_recovers_a_swap_killed_between_its_renames(tmp_path):
    """A kill after ``final`` was moved aside but before the new folder took its place leaves ``.final.old`` as the
    only complete copy: the next swap must not delete it before the new folder is in place."""
    from hf_rope_ext.training.io import atomic_directory

    final = tmp_path / "final"
    (tmp_path / ".final.old").mkdir()
    (tmp_path / ".final.old" / "weights").write_text("old complete model")
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed while writing")
    with atomic_directory(final) as tmp:  # the earlier copy is back in place before this one swaps
        assert (final / "weights").read_text() == "old complete model"
        (tmp / "weights").write_text("new model")
    assert (final / "weights").read_text() == "new model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


# ------------------------------------------------------------------ 9. the architecture the folder declares is loaded


def test_9_patch_keeps_the_declared_bert_model_and_its_pooler(tmp_path):
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=ORIGINAL_LEN))
    with torch.no_grad():  # a "trained" pooler: far from any initialisation
        bert.pooler.dense.weight.normal_(0, 1)
        bert.pooler.dense.bias.uniform_(-1, 1)
    base, out = tmp_path / "bert", tmp_path / "bert-copy"
    bert.save_pretrained(base)
    tiny_tokenizer(ORIGINAL_LEN).save_pretrained(base)
    assert main(["patch", str(base), "--method", "copy", "--factor", "2", "--out", str(out)]) == 0

    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(after) == set(before)  # no LM head added, nothing (pooler) dropped
    for name, tensor in before.items():
        if "position_embeddings" in name:
            assert after[name].shape == (2 * ORIGINAL_LEN, 64)
            torch.testing.assert_close(after[name], torch.cat([tensor, tensor]), rtol=0, atol=0)  # copy = tile
        else:
            torch.testing.assert_close(after[name], tensor, rtol=0, atol=0)
    reloaded = BertModel.from_pretrained(out)
    assert reloaded.config.architectures == ["BertModel"]
    torch.testing.assert_close(reloaded.pooler.dense.weight, bert.pooler.dense.weight, rtol=0, atol=0)
    torch.testing.assert_close(reloaded.pooler.dense.bias, bert.pooler.dense.bias, rtol=0, atol=0)
    # and back: unpatch also keeps the declared class
    back = tmp_path / "bert-back"
    assert main(["unpatch", str(out), "--out", str(back)]) == 0
    restored = load_file(back / "model.safetensors")
    assert set(restored) == set(before)
    for name, tensor in before.items():
        torch.testing.assert_close(restored[name], tensor, rtol=0, atol=0)


# ------------------------------------------------------------------------ 10. a broken checkpoint on --resume true


@pytest.fixture
def _accelerate_state():
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
    torch.set_num_threads(threads)


def test_10_truncated_checkpoint_falls_back_to_the_previous_complete_one(
    tmp_path, caplog, monkeypatch, _accelerate_state
):
    import logging

    from transformers import LlamaForCausalLM

    from hf_rope_ext.recipes import finetune as ft
    from hf_rope_ext.training import io

    from . import test_recipes as recipes

    torch.manual_seed(0)
    tokenizer = recipes.make_tokenizer()
    model = recipes.save_tiny(tmp_path / "llama", LlamaForCausalLM(recipes.llama_config(len(tokenizer))), tokenizer)
    texts = {"train": tmp_path / "train.txt", "eval": tmp_path / "eval.txt"}
    texts["train"].write_text("\n".join(recipes.periodic_docs(1, 40, 512)))
    texts["eval"].write_text("\n".join(recipes.periodic_docs(2, 4, 512)))
    common = {"method": "yarn", "max_steps": 4, "save_every": 2, "keep_checkpoints": 0, "seed": 3, "eval_chunks": 0}

    def opts(out, **kw):
        return recipes.options(ft, model, out, texts, tmp_path, **{**common, **kw})

    full = ft.run(opts(tmp_path / "a"))  # the reference: the same run, never interrupted
    assert not full.stopped and full.step == 4
    assert ft.run(opts(tmp_path / "b", stop_after=3)).stopped
    root = tmp_path / "b" / "checkpoints"
    assert [p.name for _, p in io.list_checkpoints(root)] == ["step-00000002", "step-00000003"]

    # the cheap file checks see truncation of either file, naming it
    good = root / "step-00000002"
    for name in ("optimizer.bin", "model.safetensors"):
        copy_ = tmp_path / f"copy-{name}"
        data = (good / name).read_bytes()
        copy_.write_bytes(data[: len(data) * 2 // 3])
        assert "truncated" in io.file_problem(copy_), name
        assert io.file_problem(good / name) is None
    assert io.checkpoint_problems(good) == []

    broken = root / "step-00000003" / "optimizer.bin"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # killed while writing it, after the marker was already there

    # an explicitly named broken checkpoint is refused, naming the file
    with pytest.raises(ValueError, match=r"cannot resume from .*step-00000003: .*optimizer\.bin: truncated"):
        ft.run(opts(tmp_path / "b", resume=str(root / "step-00000003")))

    caplog.set_level(logging.WARNING, logger="hf_rope_ext.recipes.finetune")
    batches = []  # micro-batches computed by the resumed run: steps 3 and 4 only (not 1-2 again, not 4 alone)
    make_batch = ft.make_batch
    monkeypatch.setattr(ft, "make_batch", lambda *a, **k: batches.append(1) or make_batch(*a, **k))
    resumed = ft.run(opts(tmp_path / "b", resume=True))
    assert len(batches) == 2
    log = caplog.text
    assert "step-00000003 is broken" in log and "optimizer.bin: truncated" in log
    assert "falling back to" in log and "step-00000002" in log
    assert not resumed.stopped and resumed.step == 4
    # resumed from step 2: the same weights as the uninterrupted run (resume is exact), and a loss curve of 4 steps
    a, b = recipes.saved_weights(tmp_path / "a" / "model"), recipes.saved_weights(tmp_path / "b" / "model")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(b[name], a[name]), name
    # the broken checkpoint is kept for inspection, out of the way of pruning and of the next resume
    assert (root / "step-00000003.broken" / "optimizer.bin").read_bytes() == data[: len(data) // 2]
    assert all(not io.checkpoint_problems(p) for _, p in io.list_checkpoints(root))
