"""The benchmark scripts parse their arguments and print usage (`--help`), and the baselines they compute match
hand-computed references on toy inputs; the benchmarks themselves never run here."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [
    "benchmarks/bench_zero_shot.py",
    "benchmarks/bench_testbed.py",
    "benchmarks/bench_overhead.py",
    "benchmarks/bench_finetune_cost.py",
    "benchmarks/bench_attention.py",
    "scripts/train_testbed.py",
    "scripts/bench_minilm_retrieval.py",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_zero_shot_plans() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_zero_shot as z
    finally:
        sys.path.pop(0)
    cpu = z.parse_args([])
    assert cpu.lengths == [12288, 16384] and cpu.factor == 2 and cpu.longrope_from == "none"
    gpu = z.parse_args(["--device", "cuda"])
    assert max(gpu.lengths) == 32768 and gpu.factor == 4 and gpu.longrope_from == "yarn"
    assert "longrope" not in z.default_methods("none") and "longrope" in z.default_methods("yarn")


def _load(path: str):
    import importlib.util

    name = Path(path).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_bigram_baseline_by_hand() -> None:
    """An alternating stream 0 1 0 1 ...: the bigram is certain of the next token, so the deleted-interpolation
    weight goes to the top of its grid (0.95); held-out 0 1 0 1 scores the first token by the add-one unigram
    (51 / 102) and the other three at 0.95 * 1 + 0.05 * 0.5."""
    tb = _load("benchmarks/bench_testbed.py")
    out = tb.bigram_ppl([0, 1] * 50, [0, 1, 0, 1], vocab=2)
    assert out["lambda"] == 0.95
    expected = math.exp(-(math.log(0.5) + 3 * math.log(0.95 + 0.05 * 0.5)) / 4)
    assert out["bigram"] == pytest.approx(expected, rel=1e-12)
    assert out["unigram"] == pytest.approx(2.0, rel=1e-12)


def test_loss_by_position_aligns_positions() -> None:
    """A stub LM puts logit p on the true token at position p (and 0 elsewhere): the loss of the token at position
    p (predicted from the p tokens before it) is -log(e^(p-1) / (e^(p-1) + V - 1)) -- the logit at index p-1."""
    import torch

    tb = _load("benchmarks/bench_testbed.py")
    vocab, window = 7, 6

    class Stub(torch.nn.Module):
        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, vocab)
            nxt = torch.roll(input_ids, -1, dims=1)  # the token each position must predict (last one unused)
            pos = torch.arange(input_ids.shape[1], dtype=torch.float)
            logits.scatter_(2, nxt[..., None], pos[None, :, None].expand(input_ids.shape[0], -1, 1))
            return type("Out", (), {"logits": logits})()

    ids = torch.randint(0, vocab, (3 * window + 2,), generator=torch.Generator().manual_seed(0))
    got = tb.loss_by_position(Stub(), ids, window)
    want = [-math.log(math.exp(p - 1) / (math.exp(p - 1) + vocab - 1)) for p in range(1, window)]
    assert got == pytest.approx(want, rel=1e-5)


def test_chunked_embedding_is_the_mean_of_its_pieces() -> None:
    """scripts/bench_minilm_retrieval.py's chunked baseline against a naive loop: each piece of max_len - 2 tokens
    embedded alone as [CLS] piece [SEP] (mean pooling, L2 norm), the piece vectors averaged, then L2-normalised."""
    import types

    import torch
    import transformers

    bench = _load("scripts/bench_minilm_retrieval.py")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                           num_attention_heads=2, intermediate_size=64,
                                                           max_position_embeddings=16)).eval()
    tok = types.SimpleNamespace(cls_token_id=1, sep_token_id=2, pad_token_id=0)
    texts = [list(range(3, 33)), list(range(40, 50)), [5, 6, 7]]  # 30 tokens -> 5 pieces of 6; 10 -> 6 + 4; 3
    got = bench.embed_chunked(model, tok, texts, max_len=8)
    want = []
    with torch.no_grad():
        for ids in texts:
            vecs = []
            for start in range(0, len(ids), 6):
                x = torch.tensor([[1, *ids[start:start + 6], 2]])
                hidden = model(input_ids=x).last_hidden_state[0]  # [n, h]
                vecs.append(torch.nn.functional.normalize(hidden.mean(0), dim=-1))
            want.append(torch.nn.functional.normalize(torch.stack(vecs).mean(0), dim=-1))
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)


def test_finetune_compare_rows_and_controls(tmp_path) -> None:
    """bench_finetune_smollm2.py --report-only --compare: one row per JSON in the given order, before → after of each
    text, and the controls line names a run whose unpatched control differs from the first's."""
    import json

    def run(method: str, before: float, after: float, control: float) -> dict:
        text = {"ppl_16k": 1.0, "ppl_8k_16k": before, "ppl_8k": 2.0}
        return {"meta": {"method": method},
                "before": {"pydoc": text, "heldout": text, "pydoc_window_control": {"ppl_8k_16k": control},
                           "heldout_window_control": {"ppl_8k_16k": 3.0}, "heldout_original_ppl_8k": 4.0},
                "after": {"pydoc": {**text, "ppl_8k_16k": after}, "heldout": {**text, "ppl_8k_16k": after},
                          "heldout_window_control": {"ppl_8k_16k": 5.0}},
                "train": {"steps": 30, "loss_first": 2.5, "final_loss": 2.0},
                "train_processes": {"0": {"cpu_seconds": 600.0}, "1": {"cpu_seconds": 300.0}}}

    paths = []
    for method, before, after, control in (("yarn", 11.0, 9.5, 10.0), ("linear", 12.0, 9.0, 10.0),
                                           ("ntk_by_parts", 11.5, 9.25, 10.5)):
        paths.append(tmp_path / f"{method}.json")
        paths[-1].write_text(json.dumps(run(method, before, after, control)))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_finetune_smollm2.py"), "--report-only",
                           "--compare", *map(str, paths)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "method" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["yarn", "linear", "ntk_by_parts"]
    assert rows[1].split("|")[3].strip() == "15.0"  # (600 + 300) CPU-seconds / 60
    assert rows[1].split("|")[5].strip() == "12.00 → 9.00"  # pydoc 8k-16k before → after
    assert rows[2].split("|")[6].strip() == "11.50 → 9.25"  # held-out
    assert rows[0].split("|")[9].strip() == "not run"  # passkey not measured after
    assert "8k sliding window 10.00 (pydoc), 3.00 (held-out); held-out 0–8k 4.00." in proc.stdout
    assert f"Different in {paths[2]}." in proc.stdout and str(paths[1]) not in proc.stdout.split("Different")[1]
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_finetune_smollm2.py"), "--compare",
                          str(paths[0])], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "--compare goes with --report-only" in bad.stderr


def test_finetune_controls_from_copies_only_unpatched_figures_of_the_same_windows(tmp_path) -> None:
    import json

    bf = _load("benchmarks/bench_finetune_smollm2.py")
    args = bf.parse_args(["--out", str(tmp_path / "linear.json"), "--method", "linear",
                          "--controls-from", str(tmp_path / "yarn.json")])
    before = {"pydoc": {"ppl_8k_16k": 11.7}, "pydoc_window_control": {"ppl_8k_16k": 11.41},
              "heldout_original_ppl_8k": 6.03, "passkey": {"0.1": {"correct": 1, "total": 2}}}
    meta = {"length": 16384, "eval_text": "builtin:pydoc", "eval_offset": 20000, "heldout_text": "builtin:stdlib",
            "heldout_offset": 100000, "passkey_depths": [0.1, 0.3, 0.5, 0.7, 0.9], "passkey_trials": 2}
    (tmp_path / "yarn.json").write_text(json.dumps({"meta": meta, "before": before}))
    state = bf.State(args)
    assert bf.copy_controls(args, state) == ["pydoc_window_control", "heldout_original_ppl_8k"]
    saved = json.loads((tmp_path / "linear.json").read_text())
    # the method's own figures (pydoc, passkey at 16k) are not copied: they are measured with --method
    assert saved["before"] == {"pydoc_window_control": {"ppl_8k_16k": 11.41}, "heldout_original_ppl_8k": 6.03}
    assert saved["controls_from"]["keys"] == ["heldout_original_ppl_8k", "pydoc_window_control"]
    (tmp_path / "yarn.json").write_text(json.dumps({"meta": {**meta, "eval_offset": 0}, "before": before}))
    fresh = bf.parse_args(["--out", str(tmp_path / "other.json"), "--controls-from", str(tmp_path / "yarn.json")])
    with pytest.raises(SystemExit, match="eval_offset 0 there, 20000 here"):
        bf.copy_controls(fresh, bf.State(fresh))
    assert not (tmp_path / "other.json").exists()
