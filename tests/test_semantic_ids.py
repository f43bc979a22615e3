"""Semantic IDs (`index/semantic_ids.py`, format `model/codebook.py`): reproducible by seed
byte for byte, unique paths after dedup, centres that are the prefix reconstructions,
routes that are the nearest nodes, files refused when corrupt."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hytrec.index.semantic_ids import SemanticIdConfig, build_semantic_ids
from hytrec.model.codebook import SemanticIds, SemanticIdsError

CONFIG = SemanticIdConfig(sizes=(8, 6, 4), route_top=3, niter=10, seed=3)


def table(n=600, d=12, duplicates=40, seed=0) -> np.ndarray:
    """Clustered vectors with `duplicates` exact copies (equal codes: dedup must split)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((10, d))
    x = centres[rng.integers(0, 10, n)] + 0.3 * rng.standard_normal((n, d))
    x[-duplicates:] = x[:duplicates]
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def built():
    x = table()
    return x, build_semantic_ids(x, np.arange(1, len(x) + 1), CONFIG)


def test_two_builds_with_one_seed_are_byte_identical_and_another_seed_differs(built, tmp_path):
    x, first = built
    first.save(tmp_path / "a")
    build_semantic_ids(x, np.arange(1, len(x) + 1), CONFIG).save(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "semantic-ids.json" in names and "codes.npy" in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    other = build_semantic_ids(x, np.arange(1, len(x) + 1), SemanticIdConfig(**{
        **CONFIG.__dict__, "seed": 4}))  # fmt: skip
    assert not np.array_equal(other.codes, first.codes)


def test_every_item_has_a_unique_path_after_dedup(built):
    _, sids = built
    report = sids.meta["report"]
    # the copies share their three codes: without the dedup level paths collide
    assert report["unique_paths_share_before_dedup"] < 1.0
    assert len(np.unique(sids.codes[:, :3], axis=0)) < len(sids.codes)
    assert len(np.unique(sids.codes, axis=0)) == len(sids.codes)
    assert report["unique_paths_share"] == 1.0


def test_centres_are_prefix_reconstructions_and_errors_fall_by_level(built):
    x, sids = built
    s = x / np.linalg.norm(x, axis=1, keepdims=True)
    errors = []
    for level in range(3):
        node = sids.item_nodes[:, level]
        assert (sids.node_level[node] == level + 1).all()
        # items with one node share the code prefix, and the parent is the shorter prefix
        for p in np.unique(node)[:20]:
            members = sids.codes[node == p, : level + 1]
            assert (members == members[0]).all()
        if level:
            assert (sids.node_parent[node] == sids.item_nodes[:, level - 1]).all()
        else:
            assert (sids.node_parent[node] == -1).all()
        errors.append(float(np.mean(np.sum((s - sids.centres[node]) ** 2, axis=1))))
    measured = [lv["reconstruction_error"] for lv in sids.meta["report"]["levels"]]
    np.testing.assert_allclose(errors, measured, rtol=1e-4)
    assert errors[0] > errors[1] > errors[2]
    assert sids.meta["report"]["levels"][0]["utilisation"] == 1.0


def test_routes_are_the_own_node_then_the_nearest_others_by_inner_product(built):
    x, sids = built
    s = sids.vectors
    assert (sids.routes[:, :, 0] == sids.item_nodes).all()
    for level in range(3):
        nodes = np.flatnonzero(sids.node_level == level + 1)
        ip = s @ sids.centres[nodes].T  # [n, P_l]
        own = sids.item_nodes[:, level]
        ip[np.arange(len(s)), np.searchsorted(nodes, own)] = -np.inf
        best = nodes[np.argsort(-ip, axis=1, kind="stable")[:, :2]]
        np.testing.assert_array_equal(sids.routes[:, level, 1:], best)
        np.testing.assert_allclose(
            sids.route_logits[:, level],
            np.einsum("nrd,nd->nr", sids.centres[sids.routes[:, level]], s),
            atol=1e-5,
        )


def test_load_gives_back_the_arrays_and_refuses_a_changed_file(built, tmp_path):
    _, sids = built
    sids.save(tmp_path / "s")
    back = SemanticIds.load(tmp_path / "s")
    np.testing.assert_array_equal(back.routes, sids.routes)
    assert back.meta == json.loads(json.dumps(sids.meta))
    routes = np.load(tmp_path / "s" / "routes.npy")
    routes[0, 0, 0] += 1
    np.save(tmp_path / "s" / "routes.npy", routes)
    with pytest.raises(SemanticIdsError, match="routes.npy: checksum differs"):
        SemanticIds.load(tmp_path / "s")
    with pytest.raises(SemanticIdsError, match="missing"):
        SemanticIds.load(tmp_path / "nothing")


def test_build_semantic_ids_command_reports_a_checkpoint_build(tmp_path, capsys):
    from hytrec.cli import main
    from hytrec.model.codebook import vocabulary_hash
    from hytrec.model.registry import build_model, spec
    from tests.model.test_registry import tiny_log

    log = tiny_log(items=120)
    model = build_model(spec("sasrec").config(d_model=8), log)
    model.save(tmp_path / "ckpt")
    report_path = tmp_path / "report.json"
    args = ["build-semantic-ids", "--checkpoint", str(tmp_path / "ckpt"), "--out"]
    args += [str(tmp_path / "sids"), "--sizes", "4,3,2", "--report", str(report_path)]
    assert main(args) == 0
    report = json.loads(report_path.read_text())
    assert report["second_build_byte_identical"] is True
    assert report["unique_paths_share"] == 1.0 and report["fidelity"] == "reading"
    assert report["model_version"] == model.version
    assert [lv["codes"] for lv in report["levels"]] == [4, 3, 2]
    sids = SemanticIds.load(tmp_path / "sids")
    assert sids.meta["items_hash"] == vocabulary_hash(log.items.to_json())
    assert json.loads(capsys.readouterr().out)["items"] == len(log.items) - 1


def test_level_one_codes_become_the_events_categories():
    from hytrec.bench.hisac_parity import codebook_for
    from hytrec.model.codebook import vocabulary_hash
    from hytrec.model.synthetic import revisiting_log

    log = revisiting_log(users=10, length=(5, 9))
    sids = codebook_for(len(log.items))
    pseudo = sids.as_categories(log)
    code = dict(zip(sids.ids.tolist(), sids.codes[:, 0].tolist(), strict=True))
    assert pseudo.category.tolist() == [code[i] + 1 for i in log.item.tolist()]
    assert pseudo.categories.raw(1) == "code0" and len(pseudo.categories) == 16 + 1
    assert (pseudo.item == log.item).all() and (pseudo.ts == log.ts).all()
    sids.meta["items_hash"] = vocabulary_hash(["<pad>", "another"])
    with pytest.raises(SemanticIdsError, match="another item vocabulary"):
        sids.as_categories(log)
