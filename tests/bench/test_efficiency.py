"""`hytrec benchmark efficiency` at tiny sizes: rows, JSON and PNG come out, numbers are
finite and positive. No timing assertions (shared CI machines)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import torch

from hytrec.bench.efficiency import (
    MEASURES,
    QUICK,
    STEPPED,
    EfficiencyConfig,
    _interleaved_step_us,
    run_efficiency,
    time_calls,
)
from hytrec.bench.hisac_parity import codebook_for
from hytrec.bench.parity import random_user
from hytrec.cli import main
from hytrec.model.hisac import HiSAC
from hytrec.model.hytrec import HyTRec
from hytrec.model.recgrela import RecGRELA


def test_run_efficiency_writes_rows_json_and_png(tmp_path):
    cfg = EfficiencyConfig(
        lengths=(32, 8),  # unsorted on purpose: rows come out by length
        cache_sizes=(16, 4),
        d_model=16,
        build_chunk=5,  # not a divisor of the lengths: the state is built over ragged chunks
        step_repeats=3,
        recompute_repeats=2,
        train_iters=2,
        budget_s=1.0,
        compile_step=False,  # compiling takes a minute: tests below cover the columns
        compile_train=False,
        hisac_node_cap=100,  # 71 nodes after 8 events, more after 32: the map evicts there
    )
    report = run_efficiency(cfg, tmp_path / "eff", progress=False)

    assert [r["length"] for r in report["rows"]] == [8, 32]
    for row in report["rows"]:
        for key in MEASURES:
            assert math.isfinite(row[key]) and row[key] > 0, (row["length"], key)
    assert report["notes"] == []
    for timing in report["timed_calls"]:
        assert timing["timed_calls"] >= 1 and 0 < timing["min"] <= timing["max"]

    written = json.loads((tmp_path / "eff.json").read_text())
    assert written["rows"] == report["rows"]
    for key in ("device", "command", "date", "git_commit", "torch", "config"):
        assert key in written
    assert written["device"].startswith("cpu: ")
    assert written["config"]["lengths"] == [32, 8]
    assert written["max_length"] == 32
    last = written["rows"][-1]  # the ratio of the row's figures (at L=32 it may round to 0.0)
    speedup = round(last["sasrec_recompute_us"] / last["hytrec_step_us"], 1)
    assert written["step_speedup_vs_sasrec_at_max_length"] == speedup
    assert written["hytrec_step_flatness_max_over_min"] >= 1.0
    recgrela = round(last["sasrec_recompute_us"] / last["recgrela_step_us"], 1)
    assert written["recgrela_step_speedup_vs_sasrec_at_max_length"] == recgrela
    assert written["recgrela_step_flatness_max_over_min"] >= 1.0
    assert written["recgrela_state_bytes_per_user"] > 0
    # HiSAC: stepped like the others; its node map fills with the history up to its cap,
    # then evicts (the short history is timed under the cap, the long one evicting)
    hisac = round(last["sasrec_recompute_us"] / last["hisac_step_us"], 1)
    assert written["hisac_step_speedup_vs_sasrec_at_max_length"] == hisac
    assert written["hisac_state_bytes_per_user"] > 0
    assert written["hisac_config"]["node_cap"] == 100
    short, long = written["rows"]
    assert 0 < short["hisac_nodes_held"] < 100 and short["hisac_evictions"] == 0
    assert long["hisac_nodes_held"] == 100 and long["hisac_evictions"] > 0
    assert short["hisac_step_evictions"] == 0  # a map under its cap makes room without
    assert 0 <= long["hisac_step_evictions"] <= 3 * 4  # at most one per route (3 levels x 4)
    for r, against in zip(written["rows"], written["hytrec_over_sasrec_train"], strict=True):
        assert against["length"] == r["length"]
        work = r["hytrec_train_mflop_per_token"] / r["sasrec_train_mflop_per_token"]
        assert against["mflop_per_token"] == round(work, 2)
    assert written["hytrec_train_flatness_from_500"] is None  # no L >= 500 here
    assert all(r["hytrec_compiled_step_us"] is None for r in written["rows"])
    assert written["hytrec_compiled_step_speedup_min_max"] is None
    assert all(r["hytrec_compiled_train_tokens_per_s"] is None for r in written["rows"])
    assert all(a["compiled_tokens_per_s"] is None for a in written["hytrec_over_sasrec_train"])
    assert written["sasrec_config"]["max_len"] >= 33  # covers the L+1 recompute
    # HSTU by cache size: its state grows with N (keys and values of N events per layer)
    cache = written["cache_rows"]
    assert [r["cache"] for r in cache] == [4, 16]
    assert all(r["hstu_step_us"] > 0 and r["hpgr_step_us"] > 0 for r in cache)
    per_event = 2 * 2 * 16 * 4 + 8  # K and V of 2 layers (d 16, fp32), and a timestamp
    assert cache[1]["hstu_state_bytes"] - cache[0]["hstu_state_bytes"] == 12 * per_event
    per_event += 8 + 8  # HPGR also keeps each cached event's item and session id
    assert cache[1]["hpgr_state_bytes"] - cache[0]["hpgr_state_bytes"] == 12 * per_event
    assert "--lengths 32,8" in written["command"]

    png = (tmp_path / "eff.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_command_line_runs_the_benchmark(tmp_path, capsys):
    stem = tmp_path / "cli"
    assert (
        main(
            [
                "benchmark",
                "efficiency",
                "--quick",
                "--lengths",
                "8",
                "--no-progress",
                "--output",
                str(stem),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "cli.json").read_text())
    assert [r["length"] for r in report["rows"]] == [8]
    assert report["config"]["d_model"] == QUICK.d_model
    assert (tmp_path / "cli.png").exists()
    assert "step us" in capsys.readouterr().out


def test_time_calls_runs_setup_before_every_call_and_respects_repeats():
    calls = []
    times = time_calls(
        lambda: calls.append("fn"), repeats=3, budget_s=60.0, setup=lambda: calls.append("setup")
    )
    assert len(times) == 3 and min(times) >= 0
    assert calls == ["setup", "fn"] * 4  # one warm-up call, then three timed


def test_each_timed_step_sees_a_state_of_exactly_L_events_round_robin():
    """The step timings alternate over the lengths, and every timed call steps event L into
    a state that holds L events (not the one left by the previous call)."""
    cfg = EfficiencyConfig(
        lengths=(8, 3, 20), d_model=16, build_chunk=5, step_repeats=4, compile_step=False
    )
    models = {
        "hytrec": HyTRec(cfg.hytrec()).eval(),
        "recgrela": RecGRELA(cfg.recgrela()).eval(),
        "hisac": HiSAC(cfg.hisac(), codebook=codebook_for(cfg.hisac().num_items)).eval(),
    }
    seen = []
    for name, model in models.items():
        original = model.step

        def spy(state, slot, batch, name=name, original=original):
            seen.append((name, int(state.count[slot].item()), int(batch.item[0, 0])))
            return original(state, slot, batch)

        model.step = spy
    user = random_user(21, cfg.hytrec(), torch.Generator().manual_seed(0))
    lengths = [3, 8, 20]
    times, saved, stepped = _interleaved_step_us(models, user, lengths, cfg)

    timed = seen[-(cfg.step_repeats + 1) * len(STEPPED) * len(lengths) :]  # after the builds
    pairs = [(name, L) for name in STEPPED for L in lengths]
    assert [(name, count) for name, count, _ in timed] == pairs * (cfg.step_repeats + 1)
    for _, count, item in timed:  # the new event is event number L of the history
        assert item == int(user.item[count])
    assert sorted(times) == sorted(pairs)
    assert all(len(v) == cfg.step_repeats and min(v) > 0 for v in times.values())
    # the states it returns: L events, and one more after the timed event
    for name, L in pairs:
        assert int(saved[name, L]["count"][0]) == L and int(stepped[name, L]["count"][0]) == L + 1


def test_cpu_attention_is_counted_and_a_causal_call_at_half():
    """The counter did not know SASRec's CPU attention kernel (its work counted as 0); the
    formulas registered by the benchmark count 2 products of 2 B H L^2 d flops each, half
    of them when causal; the backward likewise."""
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g, requires_grad=True) for _ in range(3))

    def flops(is_causal: bool, backward: bool) -> int:
        with FlopCounterMode(display=False) as counter:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
            if backward:
                out.sum().backward()
        return counter.get_total_flops()

    assert flops(False, False) == 2 * 2 * 1 * 2 * 8 * 8 * 4
    assert flops(True, False) == 2 * 1 * 2 * 8 * 8 * 4
    full_backward = flops(False, True) - flops(False, False)
    assert full_backward > 0
    assert flops(True, True) - flops(True, False) == full_backward // 2


def test_the_compiled_step_is_timed_in_the_same_rounds(tmp_path, monkeypatch):
    """With compile_step on, every length gets the compiled step's figure and the speedup
    range is the eager / compiled ratio of the rows (the compile itself is tested in
    tests/model/test_compiled_step.py; here a stand-in that counts its calls)."""
    from hytrec.bench import efficiency

    calls = []

    class CountingStep:
        def __init__(self, model):
            self.model = model

        def warm_up(self):
            return True

        def __call__(self, state, slots, batch):
            calls.append(batch.item.shape)
            return self.model.step(state, slots, batch)

    monkeypatch.setattr(efficiency, "CompiledStep", CountingStep)
    cfg = replace(QUICK, compile_step=True, cache_sizes=(4,))
    report = run_efficiency(cfg, None, progress=False)
    assert len(calls) == len(cfg.lengths) * (cfg.step_repeats + 1)  # a warm-up round too
    assert all(shape == (1, 1) for shape in calls)
    speedups = [r["hytrec_step_us"] / r["hytrec_compiled_step_us"] for r in report["rows"]]
    low, high = report["hytrec_compiled_step_speedup_min_max"]
    assert low == round(min(speedups), 2) and high == round(max(speedups), 2)


def test_the_compiled_training_forward_is_timed_at_every_length(monkeypatch):
    """With compile_train on, HyTRec's training forward goes through torch.compile (here a
    stand-in that counts the calls of what it wraps) at every length, and the derived
    ratios are the rows' figures over SASRec's and over HyTRec's eager ones."""
    from hytrec.bench import efficiency

    calls = []

    def counting_compile(fn, dynamic=None):
        def wrapped(batch):
            calls.append(batch.item.shape)
            return fn(batch)

        return wrapped

    monkeypatch.setattr(efficiency.torch, "compile", counting_compile)
    cfg = replace(QUICK, compile_train=True, cache_sizes=(4,))
    report = run_efficiency(cfg, None, progress=False)
    assert sorted({shape[1] for shape in calls}) == sorted(cfg.lengths)  # [1, L] batches
    for row, against in zip(report["rows"], report["hytrec_over_sasrec_train"], strict=True):
        compiled = row["hytrec_compiled_train_tokens_per_s"]
        assert compiled > 0
        assert against["compiled_tokens_per_s"] == round(
            compiled / row["sasrec_train_tokens_per_s"], 2
        )
        assert against["compiled_over_eager"] == round(
            compiled / row["hytrec_train_tokens_per_s"], 2
        )
