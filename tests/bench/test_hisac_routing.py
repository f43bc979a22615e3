"""`hytrec benchmark hisac-routing`: the behaviour weights against a brute force from their
definitions, and the report's figures against a direct recomputation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hytrec.bench.hisac_benchmark import RoutingConfig, _agents, _weights, run_routing
from hytrec.bench.hisac_parity import codebook_for
from hytrec.model.codebook import SemanticIds
from tests.model.test_registry import tiny_log

N = 120


@pytest.fixture(scope="module")
def setup():
    log = tiny_log(users=8, length=40, items=N)
    return log, codebook_for(N, sizes=(4, 3, 3), route_top=3, seed=1)


def test_weights_match_their_definitions(setup):
    log, sids = setup
    tree = (torch.from_numpy(sids.node_level), torch.from_numpy(sids.node_parent))
    items = log.item[:40]
    agents = _agents(sids, items, RoutingConfig(), tree)
    assert len(agents)
    hard, soft = _weights(sids, items, agents, None), _weights(sids, items, agents, 0.1)
    for i, item in enumerate(items):
        want_hard = [float(p in sids.item_nodes[item - 1]) for p in agents]
        np.testing.assert_array_equal(hard[i], want_hard)
        x = []
        for p in agents:
            level = sids.node_level[p] - 1
            routes = list(sids.routes[item - 1, level])
            x.append(float(sids.route_logits[item - 1, level, routes.index(p)]) / 0.1 if p in routes
                     else -np.inf)  # fmt: skip
        x = np.array(x, dtype=np.float64)
        if np.isfinite(x).any():
            w = np.exp(x - x[np.isfinite(x)].max())
            np.testing.assert_allclose(soft[i], w / w.sum(), atol=1e-9)
        else:
            assert (soft[i] == 0).all()
        assert hard[i].sum() <= 1  # a tree cut: at most one agent owns a behaviour
        # the agent owning a behaviour is among its routes: soft reaches every one hard does
        assert not (hard[i] > 0).any() or soft[i].sum() == pytest.approx(1.0)


def test_report_recomputes_and_writes_json_and_png(setup, tmp_path):
    log, sids = setup
    sids.save(tmp_path / "sids")
    cfg = RoutingConfig(dataset="tiny", semantic_ids=str(tmp_path / "sids"), temperatures=(0.1,))
    report = run_routing(cfg, log, tmp_path / "out")
    assert json.loads((tmp_path / "out.json").read_text())["fidelity"] == "reading"
    assert (tmp_path / "out.png").stat().st_size > 0
    hard, soft = report["rows"]
    # the hard error recomputed: |s - mu(owner)|^2, or |s|^2 = 1 with no owner
    from hytrec.model.evaluate import leave_one_out

    tree = (torch.from_numpy(sids.node_level), torch.from_numpy(sids.node_parent))
    errors = []
    for start, target in zip(*leave_one_out(log).targets("test"), strict=True):
        items = log.item[start:target]
        agents = _agents(sids, items, cfg, tree)
        for item in items:
            owner = [p for p in agents if p in sids.item_nodes[item - 1]]
            centre = sids.centres[owner[0]] if owner else 0.0
            errors.append(float(np.sum((sids.vectors[item - 1] - centre) ** 2)))
    assert hard["mean_quantization_error"] == pytest.approx(np.mean(errors), rel=1e-6)
    assert report["behaviours"] == len(errors)
    assert 0.0 <= report["share_of_users_hitting_the_cap"] <= 1.0


def test_accuracy_harness_runs_the_hisac_rows_over_given_semantic_ids(tmp_path):
    from hytrec.bench.accuracy import PRESETS, run_accuracy
    from hytrec.model.synthetic import revisiting_log
    from hytrec.model.train import TrainConfig

    log = revisiting_log(users=30, length=(8, 14))
    tc = TrainConfig(epochs=1, batch_size=16, max_len=16, negatives=8, valid_users=None)
    kwargs = dict(d_model=8, train_config=tc, progress=False)
    rows = ["HiSAC", "HiSAC-mi", "HiSAC hard routing"]
    with pytest.raises(ValueError, match="need --semantic-ids"):
        run_accuracy("planted", log, PRESETS["taobao"], tmp_path / "a", models=rows, **kwargs)
    run_accuracy("planted", log, PRESETS["taobao"], tmp_path / "b", models=[], **kwargs)
    assert not set(rows) & set(json.loads((tmp_path / "b.json").read_text())["models"])
    codebook_for(len(log.items), sizes=(3, 2, 2), route_top=2).save(tmp_path / "sids")
    run_accuracy("planted", log, PRESETS["taobao"], tmp_path / "c", models=rows,
                 semantic_ids=str(tmp_path / "sids"), **kwargs)  # fmt: skip
    models = json.loads((tmp_path / "c.json").read_text())["models"]
    assert list(models)[-3:] == rows
    assert models["HiSAC hard routing"]["config"]["route_top"] == 1
    assert models["HiSAC"]["config"]["semantic_ids"] == str(tmp_path / "sids")


def test_the_demo_gives_hisac_semantic_ids_from_a_cached_sasrec(tmp_path, monkeypatch):
    from hytrec.bench import demo
    from hytrec.model.hisac import HiSACConfig
    from hytrec.model.registry import load_model
    from hytrec.model.synthetic import revisiting_log
    from hytrec.model.train import TrainConfig

    monkeypatch.setenv("HYTREC_CACHE", str(tmp_path / "cache"))
    log = revisiting_log(users=30, length=(8, 14))
    config = demo.DemoConfig(
        model=HiSACConfig(d_model=8),
        train=TrainConfig(epochs=1, batch_size=16, max_len=16, valid_users=None),
        train_seconds=10,
        device="cpu",
    )
    checkpoint, reused = demo.trained_checkpoint(log, log, config, "cpu")
    model = load_model(checkpoint)
    codes = SemanticIds.load(model.cfg.semantic_ids)
    source = load_model(Path(model.cfg.semantic_ids).parent)
    assert not reused and model.NAME == "hisac" and source.NAME == "sasrec"
    assert codes.meta["model_version"] == source.version
    assert model.cfg.num_nodes == codes.num_nodes
    assert demo.trained_checkpoint(log, log, config, "cpu") == (checkpoint, True)
