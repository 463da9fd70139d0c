"""The benchmark scripts parse their arguments and print usage (`--help`); the benchmarks themselves never run here."""

from __future__ import annotations

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
