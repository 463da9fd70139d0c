"""Distributed fine-tuning: the engine a launch asked for is the one that trains (FSDP2 really runs on CPU processes,
other mismatches are refused), FSDP2 for real on 2 CPU processes against a single-process run (slow), and context
parallelism: its refusals and the sequence sharding of its batches (torch's own sharding, 2 gloo processes)."""

# ruff: noqa: F811  (the fixtures imported from test_recipes are parameters of the tests)
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from hf_rope_ext.training import distributed

from .test_recipes import (  # noqa: F401  (fixtures)
    ENV,
    RECIPE,
    ROOT,
    _fresh_accelerate_state,
    ft,
    options,
    random_llama,
    saved_weights,
    texts,
)
from .utils import reload_outputs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_accelerator(kind: str, *, mixed: str = "no", processes: int = 2):
    from accelerate.utils import DistributedType

    state = types.SimpleNamespace(fsdp_plugin=None, distributed_type=DistributedType[kind])
    return types.SimpleNamespace(
        distributed_type=DistributedType[kind], device=torch.device("cpu"), num_processes=processes,
        mixed_precision=mixed, state=state,
    )


# --------------------------------------------------------------------------------------------------------------------
# the engine asked for is the engine that trains


def test_fsdp_or_deepspeed_asked_for_but_not_set_up_is_refused(monkeypatch):
    """accelerate 1.15 turns an FSDP / DeepSpeed config into plain DDP (or nothing) where it cannot apply it; the
    recipe refuses instead of training unsharded."""
    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_VERSION"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.resolve_engine(_fake_accelerator("MULTI_CPU")) == "MULTI_CPU"  # nothing asked: as set up

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="DeepSpeed was asked for .* set up MULTI_CPU"):
        distributed.resolve_engine(_fake_accelerator("MULTI_CPU"))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ValueError, match="FSDP was asked for .* set up NO with 1 process"):
        distributed.resolve_engine(_fake_accelerator("NO", processes=1))
    with pytest.raises(ValueError, match="mixed_precision no only \\(asked: bf16\\)"):
        distributed.resolve_engine(_fake_accelerator("MULTI_CPU", mixed="bf16"))
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP version 1 was asked for on CPU processes.*fsdp_version: 2"):
        distributed.resolve_engine(_fake_accelerator("MULTI_CPU"))


def test_a_single_process_fsdp_launch_is_refused_before_anything_is_written(ft, random_llama, texts, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ValueError, match="FSDP was asked for"):
        ft.run(options(ft, random_llama, tmp_path / "run", texts, tmp_path, eval_chunks=0))
    assert not (tmp_path / "run").exists()


def _launch_fsdp(model: Path, out: Path, texts, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    config = tmp_path / "fsdp_cpu.yaml"
    shipped = (ROOT / "hf_rope_ext" / "recipes" / "accelerate" / "fsdp.yaml").read_text()
    config.write_text(shipped.replace("num_processes: 8", "num_processes: 2").replace("mixed_precision: bf16",
                                                                                      'mixed_precision: "no"'))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--main_process_port", str(_free_port()), str(RECIPE),
        "--model", str(model), "--output_dir", str(out), "--factor", "4", "--train_mode", "full",
        "--data", str(texts["train"]), "--eval_data", str(texts["eval"]), "--eval_chunks", "2",
        "--cache_dir", str(tmp_path / "cache"), "--max_steps", "4", "--batch_size", "1", "--grad_accum", "2",
        "--lr", "1e-2", "--warmup_steps", "1", "--save_every", "0", "--log_every", "1", "--model_card", "false",
        *extra,
    ]
    env = {**ENV, "HF_HOME": str(tmp_path / "hf"), "ACCELERATE_USE_CPU": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900, check=False)


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_resumes_and_matches_a_single_process_run(ft, random_llama, texts, tmp_path):
    """The shipped FSDP config (FSDP2) on 2 CPU processes over gloo: 2 steps, a sharded checkpoint, a resume for the
    last 2, the gathered and saved model. A single process with twice the per-process batch trains on the same
    chunks (the data order counts processes x batch), so both must end with the same weights up to float summation
    order; the saved model reloads in stock transformers."""
    out = tmp_path / "fsdp"
    first = _launch_fsdp(random_llama, out, texts, tmp_path, "--stop_after", "2")
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-4000:]
    assert "FSDP2 (CPU, gloo)" in log  # not DDP: what accelerate alone would have run
    checkpoint = out / "checkpoints" / "step-00000002"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # FSDP's sharded state, one file per process
    assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    second = _launch_fsdp(random_llama, out, texts, tmp_path, "--resume", "true")
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    assert "resumed from" in log and "step 2/4" not in log and "step 3/4" in log  # steps 1-2 not recomputed
    summary = json.loads((out / "model" / "training_summary.json").read_text())
    assert summary["distributed_type"] == "FSDP" and summary["num_processes"] == 2 and summary["steps"] == 4

    single = ft.run(options(ft, random_llama, tmp_path / "single", texts, tmp_path, train_mode="full", max_steps=4,
                            batch_size=2, grad_accum=2, eval_chunks=0))
    curve = summary["loss_curve"]
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(single.summary.loss_curve), rtol=0, atol=1e-4)
    sharded, reference = saved_weights(out / "model"), saved_weights(tmp_path / "single" / "model")
    assert sharded.keys() == reference.keys()
    moved = max(float((reference[k] - v).abs().max()) for k, v in saved_weights(Path(random_llama)).items()
                if k in reference)
    assert moved > 1e-3  # training changed the weights, so equality below is not trivial
    for name, tensor in reference.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=0, atol=2e-4, msg=name)
    probe = torch.randint(3, 200, (1, 256))
    with torch.no_grad():
        expected = single.model(probe).logits
    torch.testing.assert_close(reload_outputs(out / "model", probe), expected, rtol=0, atol=2e-3)


# --------------------------------------------------------------------------------------------------------------------
# context parallelism


CP_REFUSED = [
    ({"s2attn": True}, "s2attn"),
    ({"method": "dca"}, "attention-level method 'dca'"),
    ({"method": "dynamic_ntk"}, "dynamic method 'dynamic_ntk'"),
    ({"method": "copy"}, "method .copy.: it extends a learned position table"),
    ({"objective": "masked"}, "the masked objective"),
]


@pytest.mark.parametrize("changes, message", CP_REFUSED, ids=["s2attn", "attention", "dynamic", "table", "masked"])
def test_context_parallel_refuses_what_it_cannot_train(ft, changes, message):
    o = ft.Options(model="x", factor=2, output_dir="out", context_parallel=2, **changes)
    with pytest.raises(ValueError, match=f"context_parallel 2 cannot be combined with {message}"):
        ft.check_options(o, check_data=False)
    ft.check_options(ft.Options(model="x", factor=2, output_dir="out", context_parallel=2, pose=True),
                     check_data=False)  # PoSE is fine: its position ids are sharded with the tokens
    with pytest.raises(ValueError, match="context_parallel must be >= 1"):
        ft.check_options(ft.Options(model="x", factor=2, output_dir="out", context_parallel=0), check_data=False)


def test_context_parallel_engine_refusals_come_before_anything_is_written(ft, random_llama, texts, tmp_path,
                                                                          monkeypatch):
    for var in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_PARALLELISM_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="context_parallel 2 .* needs FSDP2 \\(launched with: no sharded engine\\)"):
        ft.run(options(ft, random_llama, run, texts, tmp_path, context_parallel=2))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="needs FSDP2 \\(launched with: fsdp1\\)"):
        ft.run(options(ft, random_llama, run, texts, tmp_path, context_parallel=2))
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="context_parallel 2 needs CUDA GPUs"):
        ft.run(options(ft, random_llama, run, texts, tmp_path, context_parallel=2))
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "4")
    with pytest.raises(ValueError, match="asks for context parallelism of 4 .* context_parallel is 1"):
        ft.run(options(ft, random_llama, run, texts, tmp_path))
    assert not run.exists()


def test_context_parallel_plan_needs_a_divisible_length_and_sdpa(ft, random_llama, texts, tmp_path):
    from hf_rope_ext.loading import load_model

    model, tokenizer = load_model(str(random_llama))
    ft.patch_model(model, "yarn", factor=4)
    base = options(ft, random_llama, tmp_path / "run", texts, tmp_path, context_parallel=2)
    model.config._attn_implementation = "sdpa"
    assert ft.make_plan(model, tokenizer, base).seq_len == 256  # 256 = 64 chunks of 4
    with pytest.raises(ValueError, match="seq_len 250 must be a multiple of 4"):
        ft.make_plan(model, tokenizer, ft.options_from_dict({**vars(base), "seq_len": 250}))
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="replaces SDPA attention.*'eager'"):
        ft.make_plan(model, tokenizer, base)


def test_data_parallel_position_counts_groups_not_processes():
    """4 processes as accelerate's mesh (dp_shard=2, cp=2): ranks 0,1 form group 0 and 2,3 group 1."""

    def mesh(rank):
        return types.SimpleNamespace(
            mesh_dim_names=("dp_shard", "cp"), get_coordinate=lambda: [rank // 2, rank % 2], size=lambda i: 2
        )

    assert [distributed.data_parallel_position(mesh(r), 2, 4, r) for r in range(4)] == [(2, 0), (2, 0), (2, 1), (2, 1)]
    assert distributed.data_parallel_position(None, 1, 4, 3) == (4, 3)  # no context parallelism: every process


_CP_WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from hf_rope_ext.training import distributed, pose
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
    ids = torch.load(sys.argv[1])
    results = {}
    for name in ("plain", "pose"):
        batch = {"input_ids": ids.clone(), "labels": ids.clone()}
        if name == "pose":
            g = torch.Generator().manual_seed(0)  # the same on every process, as the recipe seeds per group
            batch["position_ids"], batch["attention_mask"] = pose.pose_batch(2, ids.shape[1], 1000, generator=g)
        full = distributed.context_parallel_batch(batch)
        buffers = [full["input_ids"], full["position_ids"], full["shift_labels"]]
        with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[1, 1, 1], no_restore_buffers=set(buffers)):
            pass
        results[name] = {k: v.clone() for k, v in full.items()}
        results[name + "_global"] = batch.get("position_ids")
    torch.save(results, sys.argv[2] + f".{dist.get_rank()}")
    dist.destroy_process_group()
    """
)


def test_context_parallel_shards_keep_global_positions_and_next_token_labels(tmp_path):
    """torch's own context_parallel (the code accelerate's maybe_context_parallel runs) shards the recipe's
    buffers on 2 gloo processes; against a naive reference: with head-tail balancing, of 4 equal chunks process r
    holds chunks r and 3 - r; every token keeps its global position id (arange, or PoSE's gapped ones) and its label
    is the token after it in the whole sequence (-100 after the last)."""
    n, cp = 16, 2
    ids = torch.arange(100, 100 + 2 * n).view(2, n)
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "worker.py"
    script.write_text(_CP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(script), str(tmp_path / "ids.pt"), str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    chunk = n // (2 * cp)
    for rank in range(cp):
        got = torch.load(tmp_path / f"out.{rank}")
        held = [*range(rank * chunk, (rank + 1) * chunk), *range((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)]
        for name in ("plain", "pose"):
            positions = torch.arange(n).expand(2, n) if name == "plain" else got[name + "_global"]
            shard = got[name]
            assert torch.equal(shard["input_ids"], ids[:, held])
            assert torch.equal(shard["position_ids"], positions[:, held]), (name, rank)
            following = [ids[:, i + 1] if i + 1 < n else torch.full((2,), -100) for i in held]
            assert torch.equal(shard["shift_labels"], torch.stack(following, dim=1)), (name, rank)
        assert got["pose_global"].max() > n  # PoSE positions do span past the window
