"""The command line itself: --version (a subprocess, against pyproject.toml) and the progress display (captured, not a terminal)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from rich.console import Console

from rwcnet.data.formats import Image, write_image
from rwcnet.progress import StageProgress

REPO = Path(__file__).resolve().parents[2]


def test_version_prints_the_package_version_and_exits_0():
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)[1]
    result = subprocess.run([sys.executable, "-m", "rwcnet", "--version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"rwcnet {version}\n"


def test_plain_progress_names_each_stage_with_real_step_counts():
    buffer = io.StringIO()
    with StageProgress(Console(file=buffer, force_terminal=False), interval=0.0) as progress:
        progress.stage("network")
        progress.stage("instance optimisation")
        for done in range(1, 4):
            progress.step(done, 3, 0.5)
        progress.stage("output")
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "network ..."
    assert re.fullmatch(r"network: done \(\d+\.\d s\)", lines[1])
    assert [line.split(",")[0] for line in lines[3:6]] == [f"instance optimisation: {n}/3 steps" for n in (1, 2, 3)]
    assert all("ETA 0:00:0" in line for line in lines[3:6])
    assert re.fullmatch(r"instance optimisation: done \(3/3 steps, \d+\.\d s\)", lines[6])
    assert lines[7:] == ["output ...", lines[8]] and lines[8].startswith("output: done")


def test_terminal_progress_shows_counts_and_no_none():
    buffer = io.StringIO()
    with StageProgress(Console(file=buffer, force_terminal=True, width=120)) as progress:
        progress.stage("network")
        progress.stage("instance optimisation")
        for done in range(1, 81):
            progress.step(done, 80)
        progress.stage("output")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue())
    assert "80/80 steps" in text and "None" not in text
    final = text.rsplit("output", 1)[1]
    assert "/80" not in final  # the last stage has no steps: no stale count from the one before


def test_register_output_in_a_log_has_plain_lines_with_real_counts(tmp_path):
    reference = Image(np.zeros((24, 24, 24), np.float32), np.eye(4))
    rng = np.random.default_rng(0)
    for name in ("fixed", "moving"):
        write_image(tmp_path / f"{name}.nii.gz", np.kron(rng.random((6, 6, 6)), np.ones((4, 4, 4))), reference)
    result = subprocess.run(
        [sys.executable, "-m", "rwcnet", "register", "--fixed", "fixed.nii.gz", "--moving", "moving.nii.gz", "-o",
         "d.nii.gz", "--model", "none", "--io-iters", "12"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "\x1b" not in result.stderr and "None" not in result.stderr
    assert "instance optimisation: 12/12 steps, " in "\n".join(lines)
    assert any(re.fullmatch(r"instance optimisation: done \(12/12 steps, \d+\.\d s\)", line) for line in lines)
    totals: dict[str, set[int]] = {}
    for line in lines:
        match = re.match(r"(.+?): (?:done \()?(\d+)/(\d+) steps", line)
        if match:
            assert 0 < int(match[2]) <= int(match[3]), line
            totals.setdefault(match[1], set()).add(int(match[3]))
    assert totals["instance optimisation"] == {12}
    assert set(totals) == {"instance optimisation", "refinement"} and len(totals["refinement"]) == 1
