"""The fine-tune recipe (hf_rope_ext.recipes.finetune; recipes/finetune.py runs it from a clone) on tiny models (CPU):
training works, saved models reload, resume is exact, bad configs fail.

The "perplexity goes down" test needs a model that depends on positions: a 2-layer Llama is pretrained for ~140 steps
at 64 tokens on periodic text (a random 16-letter unit repeated), which it can only predict by attending 16 tokens
back. Extended 4x with yarn it loses that skill zero-shot (perplexity ~150+ at 256 tokens); 30 LoRA steps at 256
tokens recover much of it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from hf_rope_ext import registry
from hf_rope_ext.training import data
from hf_rope_ext.training.heldout import heldout_perplexity

from .utils import reload_outputs

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "finetune.py"  # the shim that runs hf_rope_ext.recipes.finetune from a clone
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": str(ROOT),
}
PERIOD = 16
LETTERS = "abcdefghijklmnopqrstuvwxyz"


# --------------------------------------------------------------------------------------------------------------------
# fixtures: the recipe module, a character tokenizer, tiny models


@pytest.fixture(scope="module")
def ft():
    from hf_rope_ext.recipes import finetune

    return finetune


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate keeps process-wide singletons."""
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two contended ones
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
    torch.set_num_threads(threads)


def periodic_docs(seed: int, n_docs: int, length: int) -> list[str]:
    """Documents of ``length`` letters: a random unit of PERIOD letters repeated."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        unit = "".join(rng.choice(LETTERS) for _ in range(PERIOD))
        docs.append((unit * (length // PERIOD + 1))[:length])
    return docs


def make_tokenizer(max_len: int = 64):
    """Byte-level tokenizer without merges (one token per character) and BERT/GPT special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1,
        special_tokens=["<s>", "</s>", "<pad>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["x"], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
        model_max_length=max_len,
    )


def llama_config(vocab: int, **kw):
    from transformers import LlamaConfig

    base = {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
    }
    return LlamaConfig(**{**base, **kw})


def save_tiny(folder: Path, model, tokenizer) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("texts")
    paths = {"train": folder / "train.txt", "eval": folder / "eval.txt"}
    paths["train"].write_text("\n".join(periodic_docs(1, 120, 512)))
    paths["eval"].write_text("\n".join(periodic_docs(2, 12, 512)))
    return paths


@pytest.fixture(scope="module")
def pretrained_llama(tmp_path_factory) -> Path:
    """Tiny Llama (64 positions) pretrained on periodic text until it copies from 16 tokens back."""
    from transformers import LlamaForCausalLM

    tokenizer = make_tokenizer()
    ids = torch.tensor([tokenizer(d)["input_ids"] for d in periodic_docs(0, 2000, 64)])  # [2000, 64]
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(len(tokenizer)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for _ in range(140):
        batch = ids[torch.randint(len(ids), (16,), generator=g)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.set_num_threads(threads)
    return save_tiny(tmp_path_factory.mktemp("llama_pretrained"), model, tokenizer)


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory) -> Path:
    """Untrained tiny Llama with tied embeddings (for runs that only need to work)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    model = LlamaForCausalLM(llama_config(len(tokenizer), tie_word_embeddings=True))
    return save_tiny(tmp_path_factory.mktemp("llama_random"), model, tokenizer)


def options(ft, model: Path, out: Path, texts: dict[str, Path], tmp_path: Path, **kw):
    base = {
        "model": str(model),
        "output_dir": str(out),
        "factor": 4,
        "data": [str(texts["train"])],
        "eval_data": [str(texts["eval"])],
        "eval_chunks": 2,
        "cache_dir": str(tmp_path / "cache"),
        "max_steps": 3,
        "batch_size": 2,
        "grad_accum": 1,
        "lr": 1e-2,
        "warmup_steps": 1,
        "save_every": 0,
        "log_every": 1,
        "model_card": False,
    }
    return ft.options_from_dict({**base, **kw})


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# --------------------------------------------------------------------------------------------------------------------
# the main path: yarn + LoRA at 4x


def test_yarn_lora_finetune_recovers_and_reloads_natively(ft, pretrained_llama, texts, tmp_path):
    out = tmp_path / "run"
    o = options(
        ft,
        pretrained_llama,
        out,
        texts,
        tmp_path,
        method="yarn",
        max_steps=30,
        eval_chunks=4,
        warmup_steps=3,
        model_card=True,
    )
    result = ft.run(o)
    assert not result.stopped and result.step == 30
    summary = result.summary
    losses = [loss for _, loss in summary.loss_curve]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses  # training loss goes down

    # held-out perplexity at the target length (256) on text never trained on: far lower than zero-shot yarn
    before, after = summary.eval_before, summary.eval_after
    assert before["length"] == after["length"] == 256 and before["chunks"] == 4
    assert after["perplexity"] < 0.5 * before["perplexity"], (before, after)

    # independent check of the same numbers: the saved model and the patched-but-untrained model on eval.txt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_rope_ext

    folder = out / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.model_max_length == 256
    ids = torch.tensor(tokenizer(texts["eval"].read_text())["input_ids"])
    chunks = data.pack(ids, 256)[:4]
    untrained = AutoModelForCausalLM.from_pretrained(pretrained_llama).eval()
    hf_rope_ext.patch_model(untrained, "yarn", factor=4)
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert heldout_perplexity(reloaded, chunks).perplexity < 0.5 * heldout_perplexity(untrained, chunks).perplexity

    # the saved config is native yarn with the extension metadata; a fresh process without the plugin: same logits
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["max_position_embeddings"] == 256
    assert config["hf_rope_ext"]["method"] == "yarn" and config["hf_rope_ext"]["finetune"]["steps"] == 30
    probe = chunks[:1]
    with torch.no_grad():
        in_memory = result.model(probe).logits
    fresh = reload_outputs(folder, probe)
    torch.testing.assert_close(fresh, in_memory, rtol=1e-5, atol=1e-5)

    # summary + plot + card
    saved_summary = json.loads((folder / "training_summary.json").read_text())
    for key in ("steps", "tokens", "loss_curve", "wall_time_s", "tokens_per_s", "peak_memory_bytes"):
        assert saved_summary[key] is not None, key
    assert saved_summary["tokens"] == 30 * 2 * 256
    assert (folder / "loss.png").stat().st_size > 1000
    if importlib.util.find_spec("hf_rope_ext.cards") is not None:
        assert "yarn" in (folder / "README.md").read_text()
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary folders left behind


# --------------------------------------------------------------------------------------------------------------------
# PoSE


def test_pose_training_uses_short_windows_spanning_target(ft, random_llama, texts, tmp_path, monkeypatch):
    seen = []
    original = ft.make_batch

    def spy(*args, **kwargs):
        batch = original(*args, **kwargs)
        seen.append(batch)
        return batch

    monkeypatch.setattr(ft, "make_batch", spy)
    o = options(ft, random_llama, tmp_path / "run", texts, tmp_path, method="linear", pose=True, max_steps=6)
    result = ft.run(o)
    assert result.summary.seq_len == 64 and result.summary.target_length == 256
    assert len(seen) == 6
    for batch in seen:
        assert batch["input_ids"].shape == (2, 64)  # windows stay at the original length
        assert batch["position_ids"].shape == (2, 64) and batch["attention_mask"].all()
        assert batch["position_ids"].max() < 256
    assert max(int(b["position_ids"].max()) for b in seen) >= 128  # ... while positions reach far beyond 64
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.summary.loss_curve)
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    # linear is saved the way serving engines read it (issue 13): original length x rope_scaling factor = the target
    assert config["max_position_embeddings"] * config["rope_scaling"]["factor"] == 256
    assert config["hf_rope_ext"]["max_position_embeddings"] == 256


# --------------------------------------------------------------------------------------------------------------------
# checkpoints, resume, interruption, crash safety


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(ft, random_llama, texts, tmp_path, monkeypatch):
    """Stopped at step 4 and resumed: the same weights as an uninterrupted run, and the resumed run computes only
    steps 5-6 (training is deterministic, so a "resume" that retrained from step 0 would also end equal)."""
    common = {
        "method": "yarn",
        "max_steps": 6,
        "grad_accum": 2,
        "lora_dropout": 0.1,
        "pose": True,
        "seed": 3,
        "eval_chunks": 0,
    }
    full = ft.run(options(ft, random_llama, tmp_path / "a", texts, tmp_path, **common))
    assert not full.stopped

    stopped = ft.run(options(ft, random_llama, tmp_path / "b", texts, tmp_path, stop_after=4, **common))
    assert stopped.stopped and stopped.step == 4 and stopped.checkpoint.name == "step-00000004"
    assert not (tmp_path / "b" / "model").exists()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        ft.run(options(ft, random_llama, tmp_path / "b", texts, tmp_path, **common))
    with pytest.raises(ValueError, match="options changed.*seed"):
        ft.run(options(ft, random_llama, tmp_path / "b", texts, tmp_path, resume=True, **{**common, "seed": 4}))
    trained_steps = []
    batches = ft.data.micro_batch_indices

    def recording(*args, step, **kwargs):
        trained_steps.append(step)
        return batches(*args, step=step, **kwargs)

    monkeypatch.setattr(ft.data, "micro_batch_indices", recording)
    resumed = ft.run(options(ft, random_llama, tmp_path / "b", texts, tmp_path, resume=True, **common))
    monkeypatch.undo()
    assert not resumed.stopped and resumed.step == 6
    assert trained_steps == [4, 4, 5, 5]  # 0-based steps x grad_accum: steps 1-4 came from the checkpoint

    a, b = saved_weights(tmp_path / "a" / "model"), saved_weights(tmp_path / "b" / "model")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(b[name], a[name]), name  # bit-identical
    curve_a = json.loads((tmp_path / "a" / "model" / "training_summary.json").read_text())["loss_curve"]
    curve_b = json.loads((tmp_path / "b" / "model" / "training_summary.json").read_text())["loss_curve"]
    assert [s for s, _ in curve_b] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor(curve_b), torch.tensor(curve_a), rtol=0, atol=1e-5)


def test_sharded_engines_final_model_is_rebuilt_from_the_gathered_state(ft, random_llama, texts, tmp_path):
    """FSDP / DeepSpeed end: the gathered state dict is loaded into a fresh CPU copy and merged (engine-free check)."""
    from hf_rope_ext.loading import load_model

    o = options(ft, random_llama, tmp_path / "run", texts, tmp_path, train_mode="longlora")
    model, tokenizer = load_model(o.model)
    ft.patch_model(model, o.method, factor=o.factor)
    plan = ft.make_plan(model, tokenizer, o)
    skeleton = ft.meta_copy(model)  # taken before training, as the recipe does on the main process
    assert all(p.is_meta for p in skeleton.parameters())  # no weight memory until the end
    trained = ft.make_trainable(model, o, plan).eval()  # eval: no LoRA dropout
    with torch.no_grad():  # pretend training moved every trainable weight
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    probe = torch.randint(3, 200, (1, 64))
    with torch.no_grad():
        expected = trained(probe).logits
        rebuilt = ft.rebuild_on_cpu(skeleton, o, plan, state)
        torch.testing.assert_close(rebuilt(probe).logits, expected, rtol=1e-4, atol=1e-4)  # merging rounds
    assert not hasattr(rebuilt, "peft_config")  # merged


def test_sigint_saves_a_checkpoint_and_exits_cleanly(random_llama, texts, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(RECIPE),
        "--model",
        str(random_llama),
        "--output_dir",
        str(out),
        "--factor",
        "4",
        "--data",
        str(texts["train"]),
        "--eval_chunks",
        "0",
        "--cache_dir",
        str(tmp_path / "cache"),
        "--max_steps",
        "100000",
        "--batch_size",
        "1",
        "--grad_accum",
        "1",
        "--save_every",
        "0",
        "--log_every",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
    lines = []
    deadline = time.time() + 240
    for line in proc.stdout:
        lines.append(line)
        if "step 3/" in line:
            proc.send_signal(signal.SIGINT)
            break
        assert time.time() < deadline, "".join(lines[-20:])
    rest, _ = proc.communicate(timeout=120)
    text = "".join(lines) + rest
    assert proc.returncode == 0, text[-3000:]
    assert "SIGINT received" in text and "--resume true" in text and "Traceback" not in text
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and checkpoints[0].name.startswith("step-")
    assert (checkpoints[0] / "trainer_state.json").is_file()
    assert not (out / "model").exists()


def test_a_crash_while_saving_leaves_no_half_written_model(ft, random_llama, texts, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def broken_plot(*args, **kwargs):  # runs after the weights are written into the temporary folder
        raise RuntimeError("disk full")

    monkeypatch.setattr(ft, "plot_loss", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        ft.run(options(ft, random_llama, out, texts, tmp_path, eval_chunks=0))
    assert sorted(p.name for p in out.iterdir()) == ["run_config.yaml"]

    monkeypatch.undo()
    ft.run(options(ft, random_llama, out, texts, tmp_path, eval_chunks=0))  # an old model is replaced in one move
    first = saved_weights(out / "model")
    ft.run(options(ft, random_llama, out, texts, tmp_path, eval_chunks=0, seed=5))
    assert sorted(p.name for p in out.iterdir()) == ["model", "run_config.yaml"]
    assert any(not torch.equal(first[k], v) for k, v in saved_weights(out / "model").items())


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not an Exception, so no handler cleans up)."""


def test_a_kill_between_the_two_renames_of_the_final_save_keeps_a_complete_model(ft, random_llama, texts, tmp_path,
                                                                                  monkeypatch):
    """The final save moves model/ aside, then the new folder into place. Killed in between, the run has no model/;
    the next run must put the moved-aside (complete) model back as it starts, not delete it."""
    out = tmp_path / "run"
    ft.run(options(ft, random_llama, out, texts, tmp_path, eval_chunks=0))
    first = saved_weights(out / "model")
    real_replace = os.replace

    def killed_after_moving_aside(src, dst):
        if Path(src).name == ".model.partial":  # the second rename: the old model is already aside
            raise _Killed()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_moving_aside)
    with pytest.raises(_Killed):
        ft.run(options(ft, random_llama, out, texts, tmp_path, eval_chunks=0, seed=5))
    monkeypatch.undo()
    assert not (out / "model").exists() and (out / ".model.old" / "model.safetensors").is_file()

    stopped = ft.run(options(ft, random_llama, out, texts, tmp_path, eval_chunks=0, stop_after=1))
    assert stopped.stopped  # never reached its own save: the model is back because the run started
    restored = saved_weights(out / "model")
    assert all(torch.equal(restored[k], v) for k, v in first.items())
    assert not (out / ".model.old").exists()


def test_a_broken_trainer_state_is_named(ft, random_llama, texts, tmp_path):
    out = tmp_path / "run"
    ft.run(options(ft, random_llama, out, texts, tmp_path, eval_chunks=0, stop_after=1))
    state = out / "checkpoints" / "step-00000001" / "trainer_state.json"
    for text, why in (('{"step": "one"', "unreadable"), ('{"step": "one"}', "step \\(str\\).*options \\(missing\\)")):
        state.write_text(text)
        with pytest.raises(ValueError, match=f"{re.escape(str(state))}: .*{why}"):
            ft.run(options(ft, random_llama, out, texts, tmp_path, eval_chunks=0, resume=True))
        with pytest.raises(ValueError, match=f"cannot resume from .*{re.escape(str(state))}: .*{why}"):
            ft.run(options(ft, random_llama, out, texts, tmp_path, eval_chunks=0, resume=str(state.parent)))


def test_data_prefix_mistakes_absurd_lr_and_broken_yaml_are_explained(ft, tmp_path):
    o = ft.Options(model="m", factor=2, output_dir="o", data=["dataset:wikitext"])
    with pytest.raises(ValueError, match="entry 'dataset:wikitext': 'dataset:' is not a prefix.*data: \\[wikitext\\]"):
        ft.check_options(o)
    config = tmp_path / "c.yaml"
    config.write_text("model: m\noutput_dir: o\nfactor: 4\ndata: [dataset: wikitext]\n")
    with pytest.raises(ValueError, match="data: entry \\{'dataset': 'wikitext'\\} is a mapping.*data: \\[wikitext\\]"):
        ft.parse_options(["--config", str(config)])
    for lr in (2.0, 1e3, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="option lr"):
            ft.check_options(ft.Options(model="m", factor=2, output_dir="o", lr=lr), check_data=False)
    ft.check_options(ft.Options(model="m", factor=2, output_dir="o", lr=1.0), check_data=False)  # the boundary
    config.write_text("model: m\nfactor: 4\nlr: 1e-4\n  data: x\n")  # line 4 is indented under lr
    with pytest.raises(ValueError, match=f"^{re.escape(str(config))}:4:7: not valid YAML: mapping values"):
        ft.parse_options(["--config", str(config)])
    config.write_bytes(b"model: m\nfactor: \xff\n")
    with pytest.raises(ValueError, match=f"^{re.escape(str(config))}: not a UTF-8 text file"):
        ft.parse_options(["--config", str(config)])


# --------------------------------------------------------------------------------------------------------------------
# bad configurations fail before training, with a message naming the fix


def test_unknown_and_mistyped_options_are_refused(ft, tmp_path):
    with pytest.raises(ValueError, match="unknown option.*'lora_rank' \\(did you mean 'lora_r'\\?\\)"):
        ft.options_from_dict({"lora_rank": 4})
    with pytest.raises(ValueError, match="train_mode: 'qlora' is not one of 'lora', 'longlora', 'full'"):
        ft.options_from_dict({"train_mode": "qlora"})
    with pytest.raises(ValueError, match="option max_steps: expected int"):
        ft.parse_options(["--max_steps", "many"])
    config = tmp_path / "c.yaml"
    config.write_text("model: m\noutput_dir: o\nfactor: 4\nlr: 2e-4\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        ft.parse_options(["--config", str(config)])
    config.write_text("model: m\noutput_dir: o\nfactor: 4\nlr: 2e-4\n")
    o = ft.parse_options(["--config", str(config), "--lr=1e-3", "--data", "[a.txt, b.txt]", "--resume", "true"])
    assert o.lr == 1e-3 and o.data == ["a.txt", "b.txt"] and o.resume is True and o.factor == 4.0


BAD_CONFIGS = [
    ({"factor": 1.0}, ValueError, "factor must be > 1"),
    ({"factor": None, "target_length": 64}, ValueError, "larger than the original length 64"),
    ({"data": ["/nonexistent/train.txt"]}, FileNotFoundError, "data file not found: /nonexistent/train.txt"),
    ({"data": ["builtin:wiki"]}, ValueError, "unknown built-in corpus.*builtin:pydoc"),
    ({"method": "ntkk"}, ValueError, "unknown method 'ntkk'; known: .*yarn"),
    ({"method_params": {"beta_fats": 2}}, ValueError, "unknown method_params \\['beta_fats'\\].*beta_fast"),
    ({"lora_targets": ["q_projj"]}, ValueError, "lora_targets \\['q_projj'\\] match no linear layer.*q_proj"),
    ({"modules_to_save": ["lm_headd"]}, ValueError, "modules_to_save \\['lm_headd'\\] match no module"),
    ({"pose": True, "seq_len": 256}, ValueError, "pose trains short windows"),
    ({"s2attn": True, "seq_len": 250}, ValueError, "s2attn needs the training length to be a multiple"),
    ({"resume": True, "overwrite": True}, ValueError, "resume and overwrite exclude each other"),
    ({"objective": "masked"}, ValueError, "could not load .* as a masked model"),
]


@pytest.mark.parametrize(
    "changes, error, message", BAD_CONFIGS, ids=[m.split()[0] + str(i) for i, (_, _, m) in enumerate(BAD_CONFIGS)]
)
def test_bad_configs_fail_before_training(ft, random_llama, texts, tmp_path, monkeypatch, changes, error, message):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(ft.torch.optim, "AdamW", no_training)
    with pytest.raises(error, match=message):
        ft.run(options(ft, random_llama, tmp_path / "run", texts, tmp_path, **changes))
    assert not (tmp_path / "run" / "model").exists()


def test_s2attn_on_an_unsupported_family_fails_early(ft, texts, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = make_tokenizer()
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    folder = save_tiny(tmp_path / "neox", GPTNeoXForCausalLM(config), tokenizer)
    with pytest.raises(ValueError, match="s2attn\\) supports model types llama, .*got 'gpt_neox'"):
        ft.run(options(ft, folder, tmp_path / "run", texts, tmp_path, s2attn=True))


def test_cli_reports_bad_configs_without_a_traceback(ft, tmp_path, caplog):
    assert ft.main(["--model", "m", "--output_dir", str(tmp_path), "--factor", "4", "--batch_sz", "2"]) == 2
    assert "unknown option" in caplog.text and "batch_size" in caplog.text


def test_command_line_shipped_configs_param_and_help(ft, tmp_path, capsys):
    shipped = ROOT / "hf_rope_ext" / "recipes" / "configs" / "smollm2_pose_yarn_smoke.yaml"
    by_name = ft.parse_options(["--config", "smollm2_pose_yarn_smoke", "--max_steps", "7"])
    by_file = yaml.safe_load(shipped.read_text())
    assert by_name.model == by_file["model"] and by_name.factor == by_file["factor"] and by_name.max_steps == 7
    with pytest.raises(FileNotFoundError, match="smollm2_pose_yarn_smoke"):  # the error lists the shipped names
        ft.parse_options(["--config", "smollm2_pose_yarn_smok"])

    # --param KEY=VALUE: JSON when it parses, else the string; merged over method_params from the YAML
    config = tmp_path / "c.yaml"
    config.write_text("model: m\noutput_dir: o\nfactor: 4\nmethod_params: {beta_fast: 16, beta_slow: 1}\n")
    params = ["--param", "beta_fast=32", "--param", "mscale=1e0", "--param", "x=a"]
    o = ft.parse_options(["--config", str(config), *params])
    assert o.method_params == {"beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "x": "a"}
    with pytest.raises(ValueError, match="--param expects key=value, got 'beta_fast'"):
        ft.parse_options(["--config", str(config), "--param", "beta_fast"])
    # list options take several values; a flag alone means true; unknown YAML keys are named with the valid ones
    o = ft.parse_options(["--config", str(config), "--data", "a.txt", "b.txt", "--pose", "--lora_targets", "q_proj"])
    assert o.data == ["a.txt", "b.txt"] and o.pose is True and o.lora_targets == "q_proj"
    config.write_text("model: m\nlora_rank: 4\n")
    with pytest.raises(ValueError, match=r"'lora_rank' \(did you mean 'lora_r'\?\); valid options: .*lora_alpha"):
        ft.parse_options(["--config", str(config)])

    # --help: every option with its help text, then the examples; exit status 0 and nothing run
    assert ft.main(["--help"], prog="hf-rope-ext finetune") == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: hf-rope-ext finetune")
    for f in dataclasses.fields(ft.Options):
        flag = "--param" if f.name == "method_params" else f"--{f.name}"
        assert flag in text, flag
        assert " ".join(f.metadata["help"].split()[:3]) in " ".join(text.split()), f.name
    assert text.rstrip().splitlines()[-1].strip() and "examples:" in text.split("--model_card")[-1]


def test_resume_refuses_exactly_the_options_that_change_the_model_or_the_data(ft):
    saved = ft.Options(model="m", factor=4, output_dir="o")
    state = {k: getattr(saved, k) for k in ft.RESUME_KEYS}
    # may change between a run and its resumption: schedule length, logging, checkpoints, evaluation, lr
    free = dict(max_steps=800, log_every=1, save_every=5, keep_checkpoints=0, eval_chunks=0, lr=1e-5, stop_after=3,
                lora_dropout=0.1, mixed_precision="bf16", output_dir="elsewhere", cache_dir="/tmp/c", resume=True)
    assert ft.resume_mismatch(state, dataclasses.replace(saved, **free)) == []
    # must not: the model, its extension, what is trained, the data and its order
    fixed = dict(model="other", dtype="bfloat16", method="linear", factor=8, method_params={"beta_fast": 2},
                 train_mode="full", lora_r=4, lora_targets="all-linear", modules_to_save=["norm"], pose=True,
                 s2attn=True, data=["x.txt"], text_field="body", seq_len=32, max_tokens=10, batch_size=2,
                 grad_accum=1, seed=1, context_parallel=2)
    for key, value in fixed.items():
        changed = ft.resume_mismatch(state, dataclasses.replace(saved, **{key: value}))
        assert len(changed) == 1 and changed[0].startswith(f"{key} "), (key, changed)
    # a checkpoint written before an option existed records nothing for it: it ran with the default
    older = {k: v for k, v in state.items() if k != "context_parallel"}
    assert ft.resume_mismatch(older, saved) == []
    assert ft.resume_mismatch(older, dataclasses.replace(saved, context_parallel=2)) == ["context_parallel 1 -> 2"]


def test_loss_plot_leaves_the_global_matplotlib_backend_alone(ft, tmp_path, monkeypatch):
    import matplotlib

    def no_switch(*args, **kwargs):
        raise AssertionError("matplotlib.use() called: the global backend was switched")

    monkeypatch.setattr(matplotlib, "use", no_switch)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # pyplot (global figure state) is not needed either
    ft.plot_loss([[1, 3.0], [2, 2.5], [3, 2.0]], tmp_path / "loss.png", "title")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------------------------
# LongLoRA: shifted sparse attention + trainable embeddings and norms


def test_longlora_with_s2attn_trains_embeddings_norms_and_saves_full_attention(ft, random_llama, texts, tmp_path):
    out = tmp_path / "run"
    o = options(ft, random_llama, out, texts, tmp_path, train_mode="longlora", s2attn=True, max_steps=3)
    import peft

    trainable: list[str] = []
    original = peft.get_peft_model

    def spy(model, config, *args, **kwargs):
        wrapped = original(model, config, *args, **kwargs)
        trainable.extend(n for n, p in wrapped.named_parameters() if p.requires_grad)
        assert model.config._attn_implementation == "s2attn"
        return wrapped

    peft.get_peft_model = spy
    try:
        result = ft.run(o)
    finally:
        peft.get_peft_model = original
    assert any("embed_tokens" in n for n in trainable) and any("input_layernorm" in n for n in trainable)
    assert any(n.endswith("model.norm.modules_to_save.default.weight") for n in trainable)
    assert any("lora_A" in n and "q_proj" in n for n in trainable)
    assert result.model.config._attn_implementation != "s2attn"
    probe = torch.randint(3, 200, (1, 256))
    with torch.no_grad():
        in_memory = result.model(probe).logits
    torch.testing.assert_close(reload_outputs(out / "model", probe), in_memory, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# learned position tables (GPT-2 / BERT): needs the absolute-table methods


needs_tables = pytest.mark.skipif(
    "copy" not in registry.METHODS or "hierarchical" not in registry.METHODS,
    reason="learned-table methods (copy / hierarchical) are not registered in this checkout",
)


@needs_tables
def test_gpt2_copy_full_finetune_reloads_natively(ft, texts, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1
        )
    )
    folder = save_tiny(tmp_path / "gpt2", model, tokenizer)
    result = ft.run(
        options(ft, folder, tmp_path / "run", texts, tmp_path, method="copy", factor=2, train_mode="full", lr=1e-3)
    )
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["n_positions"] == 128 and result.summary.seq_len == 128
    probe = torch.randint(3, 200, (1, 128))
    with torch.no_grad():
        in_memory = result.model(probe).logits
    torch.testing.assert_close(reload_outputs(tmp_path / "run" / "model", probe), in_memory, rtol=1e-5, atol=1e-5)


@needs_tables
def test_bert_hierarchical_lora_trains_the_table_with_masked_lm(ft, texts, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    )
    folder = save_tiny(tmp_path / "bert", model, tokenizer)
    result = ft.run(options(ft, folder, tmp_path / "run", texts, tmp_path, method="hierarchical", factor=4))
    assert result.summary.eval_after["objective"] == "masked"
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["max_position_embeddings"] == 256
    table = result.model.bert.embeddings.position_embeddings.weight
    assert table.shape[0] == 256
    import hf_rope_ext

    untrained = BertForMaskedLM.from_pretrained(folder)
    hf_rope_ext.patch_model(untrained, "hierarchical", factor=4)
    initial = untrained.bert.embeddings.position_embeddings.weight
    assert not torch.equal(initial, table)  # the extended table was trained (fully, next to LoRA)
    assert torch.equal(
        untrained.bert.encoder.layer[0].output.dense.weight, result.model.bert.encoder.layer[0].output.dense.weight
    )
    probe = torch.randint(3, 200, (1, 256))
    with torch.no_grad():
        in_memory = result.model(probe).logits
    fresh = reload_outputs(tmp_path / "run" / "model", probe, auto_class="AutoModelForMaskedLM")
    torch.testing.assert_close(fresh, in_memory, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# shipped configs


def _command_line(path: Path) -> str:
    return path.read_text().splitlines()[0]


def test_every_shipped_recipe_config_parses_and_starts_with_its_command(ft):
    configs = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
    assert len(configs) >= 6
    methods_seen, modes_seen = set(), set()
    for path in configs:
        first = _command_line(path)
        rel = path.relative_to(ROOT).as_posix()
        commands = (f"recipes/finetune.py --config {rel}", f"hf-rope-ext finetune --config {path.stem} ")
        assert first.startswith("# ") and any(c in first for c in commands), f"{rel}: {first}"
        o = ft.parse_options(["--config", str(path)])
        methods_seen.add(o.method)
        if o.method not in registry.METHODS:  # learned-table methods are a separate feature; check the rest
            assert o.method in ("copy", "hierarchical"), f"{rel}: unknown method {o.method}"
            o = dataclasses.replace(o, method="linear", method_params={})
        ft.check_options(o, check_data=False)
        modes_seen.add((o.train_mode, o.pose, o.s2attn))
        assert o.output_dir and o.model
    assert {"yarn", "linear"} <= methods_seen and {"copy", "hierarchical"} & methods_seen
    assert {m for m, _, _ in modes_seen} == {"lora", "longlora", "full"}
    assert any(pose_on for _, pose_on, _ in modes_seen) and any(s2 for _, _, s2 in modes_seen)


def test_accelerate_configs_parse_against_accelerate(ft):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    dests = {a.dest for a in launch_command_parser()._actions}
    configs = {p.stem: p for p in (ROOT / "recipes" / "accelerate").glob("*.yaml")}
    assert {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"} <= set(configs)
    for name, path in configs.items():
        first = _command_line(path)
        assert (
            first.startswith("# accelerate launch --config_file recipes/accelerate/")
            and "recipes/finetune.py" in first
        )
        config = ClusterConfig.from_yaml_file(str(path))  # unknown top-level keys raise
        for key in config.fsdp_config:
            assert (key if key.startswith("fsdp_") else f"fsdp_{key}") in dests, f"{name}: unknown fsdp key {key}"
        for key in config.deepspeed_config:
            assert key in dests or key == "deepspeed_config_file", f"{name}: unknown deepspeed key {key}"
    assert ClusterConfig.from_yaml_file(str(configs["deepspeed_zero3"])).deepspeed_config["zero_stage"] == 3
    assert ClusterConfig.from_yaml_file(str(configs["deepspeed_zero2"])).deepspeed_config["zero_stage"] == 2
    assert ClusterConfig.from_yaml_file(str(configs["fsdp"])).distributed_type.value == "FSDP"
    raw = yaml.safe_load(configs["ddp"].read_text())
    assert raw["distributed_type"] == "MULTI_GPU"


# --------------------------------------------------------------------------------------------------------------------
# multi-process


def test_accelerate_launch_two_cpu_processes(random_llama, texts, tmp_path):
    """Two CPU processes talking over gloo. (``accelerate launch --cpu --num_processes 2`` starts ONE process in
    accelerate 1.x unless mpirun is configured; torchrun via --multi_gpu plus ACCELERATE_USE_CPU=1 gives gloo.)"""
    import socket

    with socket.socket() as s:  # a free port: other test sessions may be running distributed jobs too
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(port),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(RECIPE),
        "--model",
        str(random_llama),
        "--output_dir",
        str(out),
        "--factor",
        "4",
        "--data",
        str(texts["train"]),
        "--eval_data",
        str(texts["eval"]),
        "--eval_chunks",
        "2",
        "--cache_dir",
        str(tmp_path / "cache"),
        "--max_steps",
        "4",
        "--batch_size",
        "1",
        "--grad_accum",
        "2",
        "--save_every",
        "2",
        "--model_card",
        "false",
    ]
    proc = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        env={**ENV, "HF_HOME": str(tmp_path / "hf"), "ACCELERATE_USE_CPU": "1"},
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((out / "model" / "training_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 4
    assert summary["tokens"] == 4 * 2 * 2 * 256  # steps x accumulation x processes x tokens
    assert summary["eval_after"]["perplexity"] > 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    probe = torch.randint(3, 200, (1, 256))
    assert reload_outputs(out / "model", probe).shape == (1, 256, 260)


def test_attention_level_methods_are_refused_with_pose_or_s2attn(ft):
    for extra, what in ((dict(pose=True), "pose"), (dict(s2attn=True), "s2attn")):
        o = ft.Options(model="x", method="dca", factor=2, output_dir="out", **extra)
        with pytest.raises(ValueError, match=f"attention-level method 'dca' cannot be combined with {what}"):
            ft.check_options(o, check_data=False)


def test_method_params_of_the_wrong_type_are_refused_before_the_model_loads(ft, tmp_path):
    """`method_params: {truncate: "no"}` in a YAML: refused by check_options, before anything is loaded or written."""
    o = ft.Options(model=str(tmp_path / "not-loaded"), method="yarn", factor=2, output_dir=str(tmp_path / "out"),
                   data=["builtin:pydoc"], method_params={"truncate": "no"})
    with pytest.raises(ValueError, match="truncate"):
        ft.check_options(o)
    assert not (tmp_path / "out").exists()
