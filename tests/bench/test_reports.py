"""Provenance of every benchmark report: the commit of the code that ran (marked loudly
when it is unknown or dirty, never None) and the machine as measured."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from hytrec.bench import reports
from hytrec.bench.accuracy import PRESETS, run_accuracy
from hytrec.bench.reports import ProvenanceWarning, git_commit, machine_info, provenance
from hytrec.model.synthetic import SyntheticConfig, generate


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A repository of one commit: code, and a committed benchmark result."""
    root = tmp_path / "repo"
    (root / "hytrec").mkdir(parents=True)
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "hytrec" / "code.py").write_text("x = 1\n")
    (root / "benchmarks" / "results" / "a.json").write_text("{}\n")
    (root / ".gitignore").write_text("/runs/\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    return root


def test_a_clean_checkout_gives_its_existing_head(checkout, recwarn):
    record = provenance(checkout)
    assert record == {"git_commit": git(checkout, "rev-parse", "HEAD"), "provenance_ok": True}
    git(checkout, "cat-file", "-e", f"{record['git_commit']}^{{commit}}")  # it exists
    assert not [w for w in recwarn if w.category is ProvenanceWarning]
    # rewritten results and ignored files leave the code clean
    (checkout / "benchmarks" / "results" / "a.json").write_text('{"new": 1}\n')
    (checkout / "benchmarks" / "results" / "b.json").write_text("{}\n")
    (checkout / "runs").mkdir()
    (checkout / "runs" / "out.txt").write_text("x")
    assert provenance(checkout)["provenance_ok"]


@pytest.mark.parametrize("change", ["edit", "untracked"])
def test_a_dirty_tree_is_marked_and_warned_about(checkout, change):
    if change == "edit":
        (checkout / "hytrec" / "code.py").write_text("x = 2\n")
    else:  # a module that exists only on this disk is code the commit does not hold
        (checkout / "hytrec" / "new.py").write_text("y = 1\n")
    with pytest.warns(ProvenanceWarning, match="-dirty: not a clean commit"):
        record = provenance(checkout)
    assert record == {
        "git_commit": git(checkout, "rev-parse", "HEAD") + "-dirty",
        "provenance_ok": False,
    }


def test_outside_a_checkout_the_commit_is_unknown_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above it
    with pytest.warns(ProvenanceWarning, match="UNKNOWN"):
        record = provenance(tmp_path)
    assert record["provenance_ok"] is False
    assert record["git_commit"].startswith("UNKNOWN (git failed: ")
    assert "not a git repository" in record["git_commit"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert git_commit(tmp_path).startswith("UNKNOWN (git failed: ")


def test_the_package_reports_the_checkout_it_runs_from(tmp_path, monkeypatch):
    """Not the caller's working directory: the code that runs is what the commit names."""
    monkeypatch.chdir(tmp_path)
    assert reports.SOURCE_ROOT == Path(__file__).resolve().parents[2]
    expected = git(reports.SOURCE_ROOT, "rev-parse", "HEAD")
    assert git_commit().removesuffix("-dirty") == expected


def test_machine_info_is_measured():
    info = machine_info()
    assert info["cpus"] == len(os.sched_getaffinity(0))
    assert info["cpu"] == reports.cpu_name() and info["cpu"]
    assert info["platform"] and info["python"].count(".") == 2
    assert info["gpus"] == reports.gpu_names()


def test_the_accuracy_report_records_provenance_and_the_measured_machine(tmp_path):
    log = generate(SyntheticConfig(users=30, min_events=5, max_events=12, seed=1))
    result = run_accuracy("synthetic", log, PRESETS["taobao"], tmp_path / "acc", models=[])
    written = json.loads((tmp_path / "acc.json").read_text())
    assert written["git_commit"] == result["header"]["git_commit"] == git_commit()
    assert written["provenance_ok"] == (not git_commit().endswith("-dirty"))
    machine = written["machine"]
    measured = machine_info()
    for key in ("platform", "python", "cpu", "cpus", "gpus"):
        assert machine[key] == measured[key], key
    assert machine["device"] == PRESETS["taobao"].train.device


def _reporting_configs():
    """Every benchmark whose report records `command_line`, with configs that exercise each
    kind of option: defaults, flags off, quoted paths, negative numbers, names with spaces."""
    from hytrec.bench.cascade import CascadeConfig
    from hytrec.bench.efficiency import EfficiencyConfig
    from hytrec.bench.head_benchmark import HeadCostConfig
    from hytrec.bench.head_calibration import HeadCalibrationConfig
    from hytrec.bench.kernel_benchmark import KernelBenchConfig
    from hytrec.bench.long_range import LongRangeConfig
    from hytrec.bench.profiling import ProfileConfig
    from hytrec.bench.step_benchmark import StepBenchConfig

    return [
        ("cascade", CascadeConfig()),
        (
            "cascade",
            CascadeConfig(
                dataset="ml100k", preset=True, user_term=True, valid_users=None, versus="SASRec"
            ),
        ),
        ("cascade", CascadeConfig(versus="ULIM + user term")),
        ("cascade", CascadeConfig(user_term=True, cross_interest=True)),
        ("efficiency", EfficiencyConfig()),
        ("efficiency", EfficiencyConfig(compile_step=False, compile_train=False, threads=1)),
        ("head-cost", HeadCostConfig()),
        ("head-calibration", HeadCalibrationConfig(checkpoint="runs/a model dir")),
        ("kernels", KernelBenchConfig()),
        ("long-range", LongRangeConfig()),
        ("long-range", LongRangeConfig(models_run=("HyTRec 3:1", "TADN-only"))),
        ("profile", ProfileConfig()),
        ("step", StepBenchConfig()),
    ]


@pytest.mark.parametrize(
    "benchmark, config", _reporting_configs(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_a_reports_command_reruns_its_config(benchmark, config):
    """The command a report records parses with `hytrec` and gives back every field (a
    benchmark's committed command must be one a reader can paste)."""
    import shlex
    from dataclasses import fields

    from hytrec.cli import build_parser

    command = reports.command_line(benchmark, config, "out dir/stem")
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.output == "out dir/stem"
    for field in fields(config):
        expected, given = getattr(config, field.name), getattr(args, field.name)
        if isinstance(given, list):
            given = tuple(given)
        if isinstance(given, str) and isinstance(expected, tuple):  # "-1.0,0.0,1.0"
            given = tuple(type(expected[0])(x) for x in given.split(","))
        assert given == expected, f"{benchmark} --{field.name}: {given!r} != {expected!r}"
