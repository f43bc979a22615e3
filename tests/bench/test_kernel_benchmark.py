"""`hytrec benchmark kernels` at a tiny size on this machine's device. No timing is
asserted (the machine is shared); the figures must exist, and every backend's difference
from the float64 oracle must be small, and large for a wrong backend."""

from __future__ import annotations

import json
import math

import torch

from hytrec.bench import kernel_benchmark
from hytrec.bench.kernel_benchmark import QUICK
from hytrec.cli import main
from hytrec.kernels import naive_tadn


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
        assert 0 < r["max_abs_diff_vs_reference"] < 1e-3, r  # fp32 arithmetic vs fp64
    assert (tmp_path / "k.png").stat().st_size > 0
    assert "fwd+bwd ms" in capsys.readouterr().out


def test_a_failing_backend_gets_an_error_row_and_the_others_still_run(tmp_path, monkeypatch):
    real = kernel_benchmark.backends_for

    def with_a_broken_one(device, chunk_size):
        impls, notes = real(device, chunk_size)

        def broken(**inputs):
            raise AssertionError("fla: please use bfloat16")  # what fla says to fp32 inputs

        return {**impls, "broken": broken}, notes

    monkeypatch.setattr(kernel_benchmark, "backends_for", with_a_broken_one)
    report = kernel_benchmark.run_kernel_benchmark(QUICK, tmp_path / "k")
    broken = [r for r in report["rows"] if r["backend"] == "broken"]
    assert len(broken) == len(QUICK.lengths)
    assert all("AssertionError: fla: please use bfloat16" in r["error"] for r in broken)
    assert all("error" not in r for r in report["rows"] if r["backend"] == "torch")
    assert json.loads((tmp_path / "k.json").read_text())["rows"] == report["rows"]


def test_a_wrong_backend_shows_its_difference_from_the_reference(tmp_path, monkeypatch):
    """The figure compares with the oracle, not with another backend: a form that drops the
    state decay (a plausible kernel bug) stands out, while the PyTorch form stays small."""
    real = kernel_benchmark.backends_for

    def with_a_wrong_one(device, chunk_size):
        impls, notes = real(device, chunk_size)

        def no_decay(**inputs):
            return impls["torch"](**{**inputs, "log_decay": torch.zeros_like(inputs["log_decay"])})

        return {**impls, "wrong": no_decay}, notes

    monkeypatch.setattr(kernel_benchmark, "backends_for", with_a_wrong_one)
    report = kernel_benchmark.run_kernel_benchmark(QUICK)
    for r in report["rows"]:
        if r["backend"] == "wrong":
            assert r["max_abs_diff_vs_reference"] > 0.1, r
        else:
            assert r["max_abs_diff_vs_reference"] < 1e-4, r


def test_fla_is_called_as_the_gated_delta_rule_with_our_gates_and_no_scaling():
    """fla's `chunk_gated_delta_rule` (q, k, v, g, beta, scale, initial_state) is TADN with
    erase = 1, g = log_decay and scale 1: a stand-in that is exactly that must reproduce
    the PyTorch form through the adapter."""

    def stand_in(*, q, k, v, g, beta, scale, initial_state, output_final_state):
        assert output_final_state and scale == 1.0
        return naive_tadn(q * scale, k, v, beta, torch.ones_like(beta), g, initial_state)

    fla = kernel_benchmark._fla_under_tadn_signature(stand_in)
    x = kernel_benchmark._inputs(QUICK, 32, torch.device("cpu"))
    o, state = fla(**x)
    ref_o, ref_state = kernel_benchmark.backends_for(torch.device("cpu"), 16)[0]["torch"](**x)
    torch.testing.assert_close(o, ref_o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, ref_state, rtol=1e-4, atol=1e-4)
