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


@pytest.mark.slow
def test_the_gpu_check_script_runs_every_step_and_writes_its_files(tmp_path):
    env = {
        **os.environ,
        "QUICK": "1",
        "DEVICE": "cpu",
        "OUT": str(tmp_path),
        "KERNEL_TESTS": "tests/kernels/test_triton_step.py",  # the others run in make test
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
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
