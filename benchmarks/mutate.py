"""`make mutate`: mutation testing (mutmut) of the modules where a bug loses data or
corrupts figures, each against its own fast tests; writes benchmarks/results/mutation.{json,md}.

Each group below is mutated in a scratch copy of the committed tree (`git archive HEAD`,
under .mutate/GROUP, ignored by git), so the figures belong to HEAD whatever the working
tree holds. mutmut runs a mutant only against the tests of the group that execute the
mutated function (it records which tests reach which function first); the broker
integration tests are never selected (`-m "not integration"`). A mutant is killed when a
test fails, survived when every selected test passes, timeout when the tests ran past
mutmut's limit (an infinite loop counts as caught), "no tests" when no selected test reaches
the function.

Survivors are judged by hand in benchmarks/mutation-judgements.toml (mutant name, or a
pattern with *, = "one line": "equivalent: ..." or "gap: ..."); the report prints each
survivor with its judgement, and NOT JUDGED for a new one.

    python benchmarks/mutate.py [GROUP ...] [--jobs N]     (all groups by default)
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hytrec.bench.reports import git_commit, machine_info  # noqa: E402

SCRATCH = ROOT / ".mutate"
RESULTS = ROOT / "benchmarks" / "results" / "mutation"
JUDGEMENTS = ROOT / "benchmarks" / "mutation-judgements.toml"


@dataclass(frozen=True)
class Group:
    name: str
    modules: tuple[str, ...]  # files mutated
    tests: tuple[str, ...]  # the fast tests run against them
    functions: tuple[str, ...] = ()  # only these functions' mutants (mutmut's names); all if ()


GROUPS = (
    Group(
        "kernels",
        (
            "hytrec/kernels/reference.py",
            "hytrec/kernels/chunked.py",
            "hytrec/kernels/step.py",
            "hytrec/kernels/__init__.py",
        ),
        ("tests/kernels/test_tadn.py",),
    ),
    Group(
        "engine",
        ("hytrec/stream/engine.py",),
        ("tests/test_stream_engine.py", "tests/bench/test_chaos.py"),
        tuple(
            f"hytrec.stream.engine.xǁRecommendationEngineǁ{method}__mutmut_*"
            for method in (
                "process",
                "_admit",
                "export_states",
                "import_states",
                "drop_users",
                "reset_offsets",
            )
        ),
    ),
    Group(
        "schemas",
        ("hytrec/stream/schemas.py",),
        ("tests/test_stream_schemas.py", "tests/test_stream_engine.py"),
    ),
    Group(
        "split-and-ranking",
        ("hytrec/model/evaluate.py",),
        ("tests/model/test_evaluate.py",),
        (
            "hytrec.model.evaluate.x_leave_one_out__mutmut_*",
            "hytrec.model.evaluate.xǁEvalSplitǁtargets__mutmut_*",
            *(
                f"hytrec.model.evaluate.x_{name}__mutmut_*"
                for name in (
                    "hit_rate",
                    "ndcg",
                    "mrr",
                    "auc",
                    "ranking_metrics",
                    "target_ranks",
                    "history_batch",
                    "context_length",
                    "cohort_name",
                    "rank_targets",
                    "summarize",
                    "evaluate",
                )
            ),
        ),
    ),
    Group(
        "state-store",
        ("hytrec/stream/state_store.py", "hytrec/stream/disk_tier.py"),
        ("tests/test_state_store.py", "tests/bench/test_chaos.py", "tests/test_stream_engine.py"),
    ),
    Group(
        "snapshots",
        ("hytrec/stream/snapshots.py",),
        ("tests/bench/test_chaos.py",),
    ),
)

MUTMUT_CONFIG = """
[tool.mutmut]
source_paths = ["hytrec/"]
only_mutate = {modules}
pytest_add_cli_args_test_selection = {tests}
pytest_add_cli_args = ["-p", "no:cacheprovider", "-m", "not integration", "-q"]
use_git_change_detection = false
"""


def prepare(group: Group) -> Path:
    """A fresh copy of HEAD's code, tests and pyproject, with the group's mutmut config."""
    scratch = SCRATCH / group.name
    subprocess.run(["rm", "-rf", str(scratch)], check=True)
    scratch.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", "HEAD", "hytrec", "tests", "pyproject.toml"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "x", "-C", str(scratch)], input=archive, check=True)
    config = MUTMUT_CONFIG.format(
        modules=json.dumps(list(group.modules)), tests=json.dumps(list(group.tests))
    )
    with open(scratch / "pyproject.toml", "a") as f:
        f.write(config)
    return scratch


def mutmut(scratch: Path, *args: str, log=None) -> str:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # mutmut forks a child per mutant: no OpenMP pool across fork
        "HYTREC_SHARED_DATA": os.environ.get(
            "HYTREC_SHARED_DATA", str(ROOT.parent / "shared" / "data")
        ),
        "PYTHONPATH": "",
    }
    command = [sys.executable, "-m", "mutmut", *args]
    if log is not None:
        subprocess.run(command, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT)
        return ""
    return subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True).stdout


def changed_lines(diff: str) -> str:
    """The mutated line, before -> after, from mutmut's diff of the function."""
    removed = [line[1:].strip() for line in diff.splitlines() if line.startswith("-")]
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+")]
    removed = [line for line in removed if not line.startswith("--")]
    added = [line for line in added if not line.startswith("++")]
    return f"{' / '.join(removed)}  ->  {' / '.join(added)}"


def run_group(group: Group, jobs: int) -> dict:
    scratch = prepare(group)
    began = time.monotonic()
    with open(scratch / "mutmut.log", "w") as log:
        mutmut(scratch, "run", "--max-children", str(jobs), *group.functions, log=log)
    seconds = time.monotonic() - began
    statuses = {}
    for line in mutmut(scratch, "results", "--all", "true").splitlines():
        match = re.match(r"\s+(\S+): (.+)$", line)
        if match and match.group(2) != "not checked":  # outside the group's functions
            statuses[match.group(1)] = match.group(2)
    if not statuses:
        tail = (scratch / "mutmut.log").read_text()[-2000:]
        raise RuntimeError(f"{group.name}: mutmut produced no results; its log ends:\n{tail}")
    notable = {}
    for name, status in statuses.items():
        if status not in ("killed", "timeout"):
            notable[name] = {
                "status": status,
                "change": changed_lines(mutmut(scratch, "show", name)),
            }
    counts = Counter(statuses.values())
    print(f"{group.name}: {dict(counts)} in {seconds:.0f} s", flush=True)
    return {
        "git_commit": git_commit().removesuffix("-dirty"),  # the mutants come from HEAD
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "modules": list(group.modules),
        "tests": list(group.tests),
        "seconds": round(seconds),
        "counts": dict(counts),
        "not_killed": notable,
    }


def judgement_of(mutant: str, judgements: dict[str, str]) -> str:
    """The mutant's own line, else the first pattern (with *) that matches its name."""
    if mutant in judgements:
        return judgements[mutant]
    for pattern, judgement in judgements.items():
        if "*" in pattern and fnmatch.fnmatchcase(mutant, pattern):
            return judgement
    return "NOT JUDGED"


def write_report(report: dict) -> None:
    judgements = tomllib.loads(JUDGEMENTS.read_text()) if JUDGEMENTS.exists() else {}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Mutation testing",
        "",
        f"Command: `make mutate` (`python benchmarks/mutate.py [GROUP ...]`, mutmut "
        f"{report['mutmut']}); {report['machine']['cpu']}, {report['jobs']} parallel mutants "
        f"on {report['machine']['cpus']} cpus shared with other work (load "
        f"{report['machine']['load_average_1m']:.1f} at the start), under nice.",
        "",
        "Each group's mutants come from the commit named in its row (`git archive`) and ran "
        "against its fast tests only (integration tests deselected); mutmut runs a mutant "
        "against the tests that execute its function. Timeouts count as caught.",
        "",
        "| group | commit | modules | tests | mutants | killed | timeout | survived | no tests "
        "| other | minutes |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, g in report["groups"].items():
        c = g["counts"]
        total = sum(c.values())
        other = total - sum(c.get(k, 0) for k in ("killed", "timeout", "survived", "no tests"))
        lines.append(
            f"| {name} | `{g['git_commit'][:10]}` "
            f"| {', '.join(m.removeprefix('hytrec/') for m in g['modules'])} "
            f"| {', '.join(t.removeprefix('tests/') for t in g['tests'])} | {total} "
            f"| {c.get('killed', 0)} | {c.get('timeout', 0)} | {c.get('survived', 0)} "
            f"| {c.get('no tests', 0)} | {other} | {g['seconds'] / 60:.1f} |"
        )
    lines += ["", "## Mutants not killed, with a judgement each", ""]
    for name, g in report["groups"].items():
        if not g["not_killed"]:
            continue
        lines += [f"### {name}", ""]
        for mutant, info in sorted(g["not_killed"].items()):
            judgement = judgement_of(mutant, judgements)
            lines.append(f"- `{mutant}` ({info['status']}): `{info['change']}`  ")
            lines.append(f"  {judgement}")
        lines.append("")
    RESULTS.with_suffix(".md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("groups", nargs="*", help=f"default: all of {[g.name for g in GROUPS]}")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite mutation.md from mutation.json and the judgements (after judging)",
    )
    args = parser.parse_args()
    chosen = [g for g in GROUPS if not args.groups or g.name in args.groups]
    unknown = set(args.groups) - {g.name for g in GROUPS}
    if unknown:
        parser.error(f"unknown groups {sorted(unknown)}")
    import mutmut

    # a run of some groups keeps the other groups' last results
    previous = RESULTS.with_suffix(".json")
    data = json.loads(previous.read_text()) if previous.exists() else {"groups": {}}
    # (reports written before groups carried their own commit and date had them at the top)
    inherited = {key: data[key] for key in ("git_commit", "date") if key in data}
    kept = {name: {**inherited, **group} for name, group in data["groups"].items()}
    if args.report_only:
        write_report({**data, "groups": kept})
        print(f"wrote {RESULTS}.md", flush=True)
        return 0
    report = {
        "benchmark": "mutation",
        "mutmut": mutmut.__version__,
        "machine": machine_info(),
        "jobs": args.jobs,
        "groups": {g.name: kept[g.name] for g in GROUPS if g.name in kept},
    }
    for group in chosen:
        report["groups"][group.name] = run_group(group, args.jobs)
        write_report(report)  # after every group: a long run leaves what it finished
    print(f"wrote {RESULTS}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
