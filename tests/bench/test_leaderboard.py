"""The leaderboard: its statistics on planted answers, a resumed run that trains nothing
again, the trained config in the report, and the README block generated from the JSON."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hytrec.bench import leaderboard
from hytrec.bench.leaderboard import (
    PROFILES,
    DatasetBudget,
    Profile,
    dataset_table,
    readme_block,
    run_leaderboard,
    verdict,
)

REPO = Path(__file__).resolve().parents[2]


def test_every_profile_names_zoo_rows_and_accuracy_presets():
    from hytrec.bench.accuracy import PRESETS, model_zoo

    zoo = model_zoo()
    for profile in PROFILES.values():
        assert set(profile.models) <= set(zoo), profile.name
        assert {d.name for d in profile.datasets} <= set(PRESETS), profile.name
    cpu = {d.name for d in PROFILES["cpu"].datasets}
    assert {"taobao", "foursquare", "ml-latest", "beauty"} <= cpu  # the minimum
    assert PROFILES["cpu"].seeds == (0, 1, 2)
    # every registered model has a row: in the gpu profile all, in the cpu one all but
    # HiSAC's multi-interest variant (HiSAC's single-vector form stands for it)
    from hytrec.model.registry import MODELS, spec_of

    def served(profile):
        return {spec_of(zoo[row]).name for row in profile.models}

    assert served(PROFILES["gpu"]) == set(MODELS)
    assert served(PROFILES["cpu"]) == set(MODELS) - {"hisacmulti"}


def test_the_table_on_planted_answers():
    """A model exactly 0.05 above the best heuristic for every user and seed: its paired
    difference is 0.05 with a zero-width interval (a win); a model equal to SASRec ties it;
    cohorts count their users and mark those under 30."""
    rng = np.random.default_rng(0)
    users = 200
    history = np.concatenate([np.full(150, 10), np.full(40, 150), np.full(10, 600)])
    heuristic = rng.random(users) * 0.2
    worse = heuristic * 0.5
    seeds3 = lambda v: np.stack([v, v, v])  # noqa: E731
    per_user = {
        "recent-items": (heuristic[None], (heuristic > 0.1)[None].astype(float)),
        "popularity": (worse[None], np.zeros((1, users))),
        "SASRec": (seeds3(heuristic + 0.05), seeds3(np.ones(users))),
        "HyTRec": (seeds3(heuristic + 0.05), seeds3(np.ones(users))),
    }
    kinds = {"recent-items": "heuristic", "popularity": "baseline", "SASRec": "model"}
    kinds["HyTRec"] = "model"
    seeds = {"recent-items": [], "popularity": [], "SASRec": [0, 1, 2], "HyTRec": [0, 1, 2]}
    table = dataset_table(per_user, kinds, seeds, history, {"HyTRec": "SASRec"})
    assert table["best_heuristic"] == "recent-items"
    row = table["rows"]["HyTRec"]
    vs = row["paired_vs_best_heuristic"]
    assert vs["diff"] == pytest.approx(0.05) and vs["diff_ci95"] == pytest.approx([0.05, 0.05])
    assert verdict(vs["diff_ci95"]) == "wins"
    assert row["paired_vs_sasrec"]["diff_ci95"] == pytest.approx([0.0, 0.0])
    assert verdict(row["paired_vs_sasrec"]["diff_ci95"]) == "ties"
    assert "paired_vs_sasrec" not in table["rows"]["SASRec"]  # not against itself
    assert row["ndcg@10_mean"] == pytest.approx(heuristic.mean() + 0.05)
    assert row["seeds"] == [0, 1, 2] and row["users"] == users
    cohorts = row["cohorts"]
    assert {k: c["users"] for k, c in cohorts.items()} == {
        "1-20": 150,
        "21-100": 0,
        "101-200": 40,
        "201-500": 0,
        "501+": 10,
        "201+": 10,  # the long histories together
    }
    assert cohorts["501+"]["too_small"] and not cohorts["101-200"]["too_small"]
    long = heuristic[history == 600].mean() + 0.05
    assert cohorts["501+"]["ndcg@10_mean"] == pytest.approx(long)
    assert verdict([-0.02, -0.01]) == "loses"


def test_a_resumed_run_trains_no_finished_cell_and_reports_the_trained_config(
    shared_data, tmp_path, monkeypatch
):
    profile = Profile(
        "test",
        (DatasetBudget("ml100k", 20.0, max_users=60),),
        models=("SASRec",),
        seeds=(0, 1),
        epochs=1,
        patience=1,
        d_model=16,
    )
    first = run_leaderboard(profile, tmp_path, shared_data, progress=False)
    cells = sorted(tmp_path.rglob("*.json"))
    assert len(cells) == 2  # one per seed (a grid of one point)

    import hytrec.model.train as training

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(training, "train", no_training)
    again = run_leaderboard(profile, tmp_path, shared_data, progress=False)
    assert json.dumps(again["tables"]) == json.dumps(first["tables"])  # NaN ratios compare

    row = first["tables"]["ml100k"]["rows"]["SASRec"]
    assert row["seeds"] == [0, 1] and row["users"] == 60
    trained = row["training"]["config"]
    from hytrec.bench.leaderboard import sample_users
    from hytrec.model.data import load_named

    log = sample_users(load_named("ml100k", shared_data, progress=False), 60)
    assert trained["num_items"] == len(log.items) != 1000  # the data's, not the default
    assert trained["d_model"] == 16

    # a report over cells trained at another commit says so
    commit = row["training"]["cell_commits"][0]
    header = {"command": "c", "machine": {}}
    text = leaderboard.markdown({**again, **header, "git_commit": "f" * 40})
    assert f"commit ffffffffff; cells trained at {commit[:10]} and read back" in text
    text = leaderboard.markdown({**again, **header, "git_commit": commit})
    assert "cells trained at" not in text

    changed = replace(profile, epochs=2)  # another budget: other cells, trained afresh
    with pytest.raises(AssertionError, match="trained again"):
        run_leaderboard(changed, tmp_path, shared_data, progress=False)


def test_hpgr_cells_start_from_a_kept_pretraining_and_need_timestamps(
    shared_data, tmp_path, monkeypatch
):
    """HPGR's row pre-trains once per seed (kept beside the cells, read again on resume, its
    checkpoint the cell's init_from); on a data set without timestamps it is left out. ULIM
    on one without categories (Beauty has neither) reads the level-1 codes of the seed's
    semantic IDs as categories (its head beside them)."""
    hpgr, ulim = "HPGR + repeat head", "ULIM + repeat head"
    profile = Profile(
        "test",
        (DatasetBudget("ml100k", 20.0, max_users=40), DatasetBudget("beauty", 20.0, 40)),
        models=(hpgr, ulim),
        seeds=(0,),
        epochs=1,
        patience=1,
        d_model=16,
    )
    first = run_leaderboard(profile, tmp_path, shared_data, progress=False)
    pretrained = sorted((tmp_path / "test" / "ml100k" / "pretraining").glob("*/checkpoint.json"))
    assert len(pretrained) == 1
    row = first["tables"]["ml100k"]["rows"][hpgr]
    assert row["training"]["config"]["repeat_head"] is not None
    beauty = first["tables"]["beauty"]
    assert hpgr not in beauty["rows"] and "timestamps" in beauty["left_out"][hpgr]
    assert ulim not in beauty["left_out"]
    pseudo = beauty["rows"][ulim]["training"]
    assert pseudo["categories"].startswith("pseudo") and pseudo["config"]["num_categories"] > 1
    assert len(list((tmp_path / "test" / "beauty" / "semantic-ids").iterdir())) == 1
    assert pseudo["config"]["repeat_head"] is not None
    ml100k = first["tables"]["ml100k"]["rows"][ulim]["training"]
    assert ml100k["config"]["num_categories"] > 1 and "categories" not in ml100k  # genres
    cell = json.loads(
        next((tmp_path / "test" / "ml100k" / "hpgr-repeat-head").glob("*.json")).read_text()
    )
    assert cell["model"] == hpgr

    import hytrec.bench.accuracy as accuracy
    import hytrec.model.train as training

    def no_run(*args, **kwargs):
        raise AssertionError("run again")

    monkeypatch.setattr(accuracy, "hpgr_pretraining", no_run)
    monkeypatch.setattr(training, "train", no_run)
    again = run_leaderboard(profile, tmp_path, shared_data, progress=False)
    assert json.dumps(again["tables"]) == json.dumps(first["tables"])
    assert "HPGR + repeat head: not run here (no timestamps" in leaderboard.markdown(
        {**again, "command": "c", "machine": {}}
    )


def test_hisac_cells_route_through_semantic_ids_built_once_per_seed(
    shared_data, tmp_path, monkeypatch
):
    """HiSAC's row first trains the SASRec row and builds semantic IDs over its item table,
    once per data set and seed, kept beside the cells (the cell's config names them, a
    resumed run builds nothing again)."""
    import hytrec.index.semantic_ids as semantic_ids
    from hytrec.model.codebook import SemanticIds

    hisac = "HiSAC + repeat head"
    profile = Profile(
        "test",
        (DatasetBudget("ml100k", 20.0, max_users=40),),
        models=(hisac,),
        seeds=(0, 1),
        epochs=1,
        patience=1,
        d_model=16,
    )
    first = run_leaderboard(profile, tmp_path, shared_data, progress=False)
    built = sorted((tmp_path / "test" / "ml100k" / "semantic-ids").iterdir())
    assert [p.name.split("-")[0] for p in built] == ["seed0", "seed1"]
    codebook = SemanticIds.load(built[0])
    assert codebook.meta["source_model"] == "sasrec" and codebook.levels == 3
    row = first["tables"]["ml100k"]["rows"][hisac]
    assert row["seeds"] == [0, 1] and row["training"]["config"]["semantic_ids"] == str(built[0])

    def no_build(*args, **kwargs):
        raise AssertionError("built again")

    monkeypatch.setattr(semantic_ids, "build_from_model", no_build)
    again = run_leaderboard(profile, tmp_path, shared_data, progress=False)
    assert json.dumps(again["tables"]) == json.dumps(first["tables"])


def test_the_readme_shows_the_committed_leaderboard():
    result = json.loads((REPO / "benchmarks/results/leaderboard.json").read_text())
    readme = (REPO / "README.md").read_text()
    assert readme_block(result) in readme, (
        "README's leaderboard block differs from benchmarks/results/leaderboard.json: run "
        "`hytrec benchmark leaderboard --from-json benchmarks/results/leaderboard.json --readme`"
    )
    assert result["profile"]["name"] in ("cpu", "gpu") and result["provenance_ok"]
    assert leaderboard.MIN_COHORT_USERS == 30
