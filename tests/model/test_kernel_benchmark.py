"""`hytrec benchmark kernels` at a tiny size on this machine's device. No timing is
asserted (the machine is shared); the figures must exist, and every backend must agree
with the PyTorch form on the same inputs."""

from __future__ import annotations

import json
import math

import torch

from hytrec.cli import main
from hytrec.model.kernel_benchmark import QUICK


def test_the_kernel_benchmark_writes_a_row_per_backend_and_length(tmp_path, capsys):
    assert main(["benchmark", "kernels", "--quick", "--output", str(tmp_path / "k")]) == 0
    report = json.loads((tmp_path / "k.json").read_text())
    assert report["command"].startswith("hytrec benchmark kernels --lengths 16,64")
    if not torch.cuda.is_available():
        assert report["backends"] == ["torch"] and report["notes"], "say why others are absent"
    rows = report["rows"]
    assert {(r["backend"], r["length"]) for r in rows} == {
        (b, T) for b in report["backends"] for T in QUICK.lengths
    }
    for r in rows:
        assert "error" not in r, r
        for key in ("forward_ms", "train_ms", "train_tokens_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["max_abs_diff"] < 1e-3, r
    assert (tmp_path / "k.png").stat().st_size > 0
    assert "fwd+bwd ms" in capsys.readouterr().out
