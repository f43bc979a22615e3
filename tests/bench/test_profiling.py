"""`hytrec benchmark profile` at tiny sizes: every table comes out, the modules account
for the whole profiled time, and the modules that run show up by name."""

from __future__ import annotations

import json
import math

from hytrec.bench.profiling import QUICK, group_of, run_profile
from hytrec.cli import main


def test_profile_charges_every_operator_to_a_module(tmp_path):
    report = run_profile(QUICK, tmp_path / "prof")

    assert [row["length"] for row in report["training"]] == sorted(QUICK.lengths)
    for row in [*report["training"], report["streaming"]]:
        charged = sum(t["forward_ms"] + t["backward_ms"] for t in row["modules"].values())
        assert math.isclose(charged, row["total_ms"], rel_tol=1e-6)
        assert row["wall_ms"] > 0 and len(row["operators"]) == QUICK.top_ops
    for row in report["training"]:
        modules = row["modules"]
        # every block's mixer runs forward and backward, and is charged for both
        for name in ("long_blocks.0.mixer", "long_blocks.3.mixer", "short_blocks.0.mixer"):
            assert modules[name]["forward_ms"] > 0 and modules[name]["backward_ms"] > 0, name
        assert modules["loss"]["backward_ms"] > 0
    # the serving form runs each mixer's `step`, which the profile sees too
    assert report["streaming"]["modules"]["long_blocks.0.mixer"]["forward_ms"] > 0

    written = json.loads((tmp_path / "prof.json").read_text())
    assert written["training"] == report["training"]
    md = (tmp_path / "prof.md").read_text()
    assert written["command"] in md and "| long_blocks.0.mixer |" in md
    assert (tmp_path / "prof.png").read_bytes().startswith(b"\x89PNG")


def test_module_groups():
    assert group_of("long_blocks.0.mixer.q_proj") == "long_blocks.0.mixer"
    assert group_of("long_blocks.0.norm1") == "long_blocks.0.norm1"
    assert group_of("item_emb") == group_of("age_emb") == "embeddings"
    assert group_of("fusion.gate") == "fusion.gate"


def test_command_line_writes_the_tables(tmp_path, capsys):
    stem = tmp_path / "cli"
    assert main(["benchmark", "profile", "--quick", "--lengths", "12", "--output", str(stem)]) == 0
    assert "Training step, L = 12" in (tmp_path / "cli.md").read_text()
    assert "cli.md" in capsys.readouterr().out
