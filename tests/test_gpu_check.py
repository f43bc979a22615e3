"""benchmarks/gpu_check.sh is what a session lent a GPU runs, once, with no time to debug
it there: run it here at tiny sizes on the CPU, so that it cannot rot unseen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _gpu_check(out: Path, **env) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "OUT": str(out),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **env,
    }
    return subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_the_gpu_check_script_runs_every_step_and_writes_its_files(tmp_path):
    # the kernel tests that also run in make test are left to it
    done = _gpu_check(tmp_path, QUICK="1", KERNEL_TESTS="tests/kernels/test_triton_step.py")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "!! failed" not in done.stdout
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) <= 8, "the device tool brings back at most 8 files"
    for stem in ("kernels-gpu", "step-gpu", "efficiency-gpu"):
        assert json.loads((tmp_path / f"{stem}.json").read_text())["command"]
        assert (tmp_path / f"{stem}.png").stat().st_size > 0
    assert 'failures="0"' in (tmp_path / "pytest-kernels.xml").read_text()
    assert (
        "== python3 -m hytrec.cli benchmark efficiency" in (tmp_path / "gpu_check.log").read_text()
    )


@pytest.mark.slow
def test_the_leaderboard_call_stops_at_its_limit_and_brings_its_cells_back(tmp_path, shared_data):
    """LEADERBOARD_S: a limit that ends the gpu profile mid-run is not a failure, and the
    cells folder comes back as one archive (the tool brings back at most 8 files)."""
    import tarfile

    out, cells = tmp_path / "out", tmp_path / "cells"
    env = {"HYTREC_SHARED_DATA": str(shared_data), "LEADERBOARD_CELLS": str(cells)}
    done = _gpu_check(out, LEADERBOARD_S="8", **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "leaderboard: rc 124" in done.stdout and "cells kept: " in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "leaderboard-cells.tgz"]
    (cells / "gpu" / "taobao").mkdir(parents=True, exist_ok=True)
    (cells / "gpu" / "taobao" / "planted-seed0.json").write_text("{}")
    done = _gpu_check(out, LEADERBOARD_S="1", **env)  # the cells so far come back, whatever
    assert "cells kept: 1" in done.stdout
    with tarfile.open(out / "leaderboard-cells.tgz") as archive:
        assert "./gpu/taobao/planted-seed0.json" in archive.getnames()
