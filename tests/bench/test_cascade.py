"""A tiny `hytrec benchmark cascade` run on a synthetic log: every K row, the oracle and
the category baselines are reported, and the figures obey what the cascade guarantees."""

from __future__ import annotations

import json

from hytrec.bench.cascade import QUICK, run_cascade
from hytrec.model.synthetic import SyntheticConfig, generate


def test_quick_cascade_writes_rows_that_obey_the_cascade(tmp_path):
    log = generate(
        SyntheticConfig(users=40, min_events=15, max_events=40, categories=8, items_per_category=12)
    )
    report = run_cascade(QUICK, log, tmp_path / "cascade")
    saved = json.loads((tmp_path / "cascade.json").read_text())
    assert (tmp_path / "cascade.png").stat().st_size > 0
    assert saved["fidelity"] == "reading" and saved["command"].startswith(
        "hytrec benchmark cascade"
    )
    rows = {r["K"]: r for r in report["rows"]}
    assert list(rows) == ["1", "2", "all", "oracle"]
    # more categories, more of the catalogue searched; all categories search everything
    assert rows["1"]["searched_fraction_mean"] <= rows["2"]["searched_fraction_mean"]
    assert rows["all"]["searched_fraction_mean"] == 1.0
    # the oracle searches the target's category alone
    assert 0 < rows["oracle"]["searched_fraction_mean"] < 1
    for row in rows.values():
        assert 0 <= row["HR@50"] <= 1 and row["searched_fraction_p90"] <= 1
    assert set(report["next_category"]) == {
        "ULIM",
        "repeat last category",
        "most frequent categories",
    }
    for metrics in report["next_category"].values():
        assert metrics["users"] == 40
        assert metrics["HR@1"] <= metrics["HR@5"] <= metrics["HR@20"]
