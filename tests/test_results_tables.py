"""benchmarks/RESULTS.md: every table is generated from its results JSON, never typed.

Each generated block of RESULTS.md sits between ``<!-- generated: COMMAND -->`` and ``<!-- end generated -->``;
COMMAND is a ``python <script> --report-only ...`` call that reprints the block from ``benchmarks/results/*.json``
without loading a model. These tests run every such command and compare its output with the committed block, check
that no markdown table lies outside a block, and that ``--report-only`` imports nothing heavy (no torch,
transformers or matplotlib: it only reads JSON).
"""

from __future__ import annotations

import difflib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
START = re.compile(r"^<!-- generated: (?P<command>.+?) -->$")
END = "<!-- end generated -->"
HEAVY = ("torch", "transformers", "matplotlib")
# Runs a script as __main__ with the given arguments, then fails when it imported anything in HEAVY.
WRAPPER = f"""
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    if exit.code not in (0, None):
        raise
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
if heavy:
    sys.exit("--report-only imported " + ", ".join(heavy))
"""
# Every benchmark script whose results RESULTS.md reports (sections 1-8 and 2d).
REPORTED = [
    "benchmarks/bench_zero_shot.py",
    "benchmarks/bench_testbed.py",
    "benchmarks/bench_overhead.py",
    "benchmarks/bench_finetune_cost.py",
    "benchmarks/bench_attention.py",
    "scripts/bench_minilm_retrieval.py",
    "benchmarks/bench_finetune_smollm2.py",
    "benchmarks/bench_search.py",
    "benchmarks/bench_loss_memory.py",
]


def generated_blocks(text: str) -> list[tuple[str, str, int]]:
    """(command, content, line number of the start marker) for every generated block of ``text``."""
    blocks, current, body = [], None, []
    for number, line in enumerate(text.splitlines(), 1):
        match = START.match(line)
        if match:
            if current is not None:
                raise ValueError(f"line {number}: generated block opened inside the block of line {current[1]}")
            current, body = (match["command"], number), []
        elif line == END:
            if current is None:
                raise ValueError(f"line {number}: '{END}' without a start marker")
            blocks.append((current[0], "\n".join(body), current[1]))
            current = None
        elif current is not None:
            body.append(line)
    if current is not None:
        raise ValueError(f"line {current[1]}: generated block never closed with '{END}'")
    return blocks


def run_report(command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    if argv[0] != "python" or "--report-only" not in argv:
        raise ValueError(f"not a 'python SCRIPT --report-only ...' command: {command!r}")
    return subprocess.run([sys.executable, "-c", WRAPPER, str(ROOT / argv[1]), *argv[2:]], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


BLOCKS = generated_blocks(RESULTS_MD.read_text(encoding="utf-8"))


@pytest.mark.parametrize(("command", "content", "line"), BLOCKS, ids=[f"line{b[2]}" for b in BLOCKS])
def test_block_equals_its_report(command: str, content: str, line: int) -> None:
    proc = run_report(command)
    assert proc.returncode == 0, f"RESULTS.md line {line}: `{command}` failed:\n{proc.stderr[-2000:]}"
    printed = proc.stdout.rstrip("\n")
    if printed != content:
        diff = "\n".join(difflib.unified_diff(content.splitlines(), printed.splitlines(), "RESULTS.md", command,
                                              lineterm=""))
        pytest.fail(f"RESULTS.md line {line} differs from `{command}` (regenerate it):\n{diff[:4000]}")


def test_every_table_is_generated() -> None:
    text = RESULTS_MD.read_text(encoding="utf-8")
    inside, loose = False, []
    for number, line in enumerate(text.splitlines(), 1):
        if START.match(line):
            inside = True
        elif line == END:
            inside = False
        elif line.lstrip().startswith("|") and not inside:
            loose.append(f"line {number}: {line[:80]}")
    assert not loose, "markdown tables typed outside a generated block:\n" + "\n".join(loose)


def test_every_reported_benchmark_has_a_block() -> None:
    scripts = {shlex.split(command)[1] for command, _, _ in BLOCKS}
    assert set(REPORTED) <= scripts, sorted(set(REPORTED) - scripts)


def test_no_machine_paths() -> None:
    text = RESULTS_MD.read_text(encoding="utf-8")
    found = re.findall(r"(?:/work|/home|/root)/\S+", text)
    assert not found, found


def test_block_parser() -> None:
    text = "intro\n<!-- generated: python a.py --report-only -->\n| x |\n\nline\n<!-- end generated -->\ntail\n"
    assert generated_blocks(text) == [("python a.py --report-only", "| x |\n\nline", 2)]
    with pytest.raises(ValueError, match="never closed"):
        generated_blocks("<!-- generated: python a.py --report-only -->\n| x |\n")
    with pytest.raises(ValueError, match="without a start"):
        generated_blocks("| x |\n<!-- end generated -->\n")
    with pytest.raises(ValueError, match="inside the block"):
        generated_blocks("<!-- generated: a -->\n<!-- generated: b -->\n<!-- end generated -->\n")


def test_report_reads_the_json(tmp_path: Path) -> None:
    """The printed figures come from the JSON (an edited copy prints the edited figure), not from the script."""
    state = json.loads((ROOT / "benchmarks" / "results" / "overhead.json").read_text())
    state["rows"][0]["forward_ratio"] = 9.876
    edited = tmp_path / "overhead.json"
    edited.write_text(json.dumps(state))
    proc = run_report(f"python benchmarks/bench_overhead.py --report-only --out {edited}")
    assert proc.returncode == 0, proc.stderr
    assert f"| {state['rows'][0]['method']} |" in proc.stdout and "| 9.876 |" in proc.stdout

    state = json.loads((ROOT / "benchmarks" / "results" / "testbed.json").read_text())
    run = state["recovery"]["runs"]["yarn|8"]
    run["steps"]["100"], run["short"]["100"] = 123.456, 100.0
    edited = tmp_path / "testbed.json"
    edited.write_text(json.dumps(state))
    proc = run_report(f"python benchmarks/bench_testbed.py --report-only --block recovery --out {edited}")
    assert proc.returncode == 0, proc.stderr
    assert "| yarn | 8 |" in proc.stdout and "| 123.46 |" in proc.stdout and "| +23.5 |" in proc.stdout


def test_missing_block_is_an_error() -> None:
    proc = run_report("python benchmarks/bench_testbed.py --report-only --block recovery --out /nonexistent.json")
    assert proc.returncode != 0
    proc = run_report("python benchmarks/bench_zero_shot.py --report-only --block nonsense")
    assert proc.returncode != 0 and "--block" in proc.stderr
