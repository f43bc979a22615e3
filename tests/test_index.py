"""Item index: exact search against NumPy, exclusions, categories, persistence, hot swap,
approximate recall, backend choice."""

from __future__ import annotations

import json
import logging
import sys
import threading
from importlib import metadata

import numpy as np
import pytest

from hytrec.bench.index_benchmark import clustered_data
from hytrec.index import (
    BackendError,
    FaissInstallError,
    IndexConfig,
    IndexFileError,
    IndexHolder,
    ItemIndex,
    build_index,
    import_faiss,
    select_backend,
)
from hytrec.index import backend as backend_module
from hytrec.index import item_index as item_index_module
from hytrec.index.item_index import recall_at_k

TOL = 1e-5
APPROX_KINDS = ("ivf_flat", "ivf_pq", "hnsw")


def brute_force_scores(vectors, queries, allowed=None, exclude=None, ids=None):
    """float64 [Q, N] inner products, -inf where an item is not allowed or excluded."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    for row, excluded in enumerate(exclude or []):
        scores[row, np.isin(ids, excluded)] = -np.inf
    return scores


def assert_top_k(result, scores, ids, k):
    """result holds a valid top-k of each row of `scores` [Q, N] (ids [N] map columns):
    scores equal NumPy's sorted top-k within TOL; ids equal NumPy's wherever the score is
    not tied (within TOL) with a neighbour, and a tied id is one of the tied items."""
    position = {int(i): p for p, i in enumerate(ids)}
    for row in range(len(scores)):
        order = np.argsort(-scores[row], kind="stable")
        expected = scores[row, order[:k]]
        valid = np.isfinite(expected)
        np.testing.assert_allclose(result.scores[row][valid], expected[valid], atol=TOL, rtol=0)
        assert (result.ids[row][~valid] == -1).all()
        assert np.isneginf(result.scores[row][~valid]).all()
        got = result.ids[row][valid]
        assert len(set(got.tolist())) == len(got), "duplicate ids in one row"
        got_true = scores[row, [position[int(i)] for i in got]]
        np.testing.assert_allclose(got_true, result.scores[row][valid], atol=TOL, rtol=0)
        padded = np.concatenate([[np.inf], scores[row, order[: k + 1]], [-np.inf]])
        for j in np.flatnonzero(valid):
            if padded[j] - padded[j + 1] > TOL and padded[j + 1] - padded[j + 2] > TOL:
                assert got[j] == ids[order[j]], f"row {row} rank {j}: untied id differs"


@pytest.fixture(scope="module")
def items():
    """Clustered item vectors [3000, 32], ids 10..3009, categories 0..19, queries [64, 32]."""
    vectors, queries = clustered_data(3000, 32, 64, noise=0.75, seed=1)
    rng = np.random.default_rng(1)
    return vectors, np.arange(10, 3010), rng.integers(0, 20, 3000), queries


@pytest.fixture(scope="module")
def flat(items):
    vectors, ids, categories, _ = items
    return build_index(vectors, ids, categories, IndexConfig(kind="flat"))


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("k", [1, 10, 100])
def test_exact_equals_numpy_top_k(items, flat, batch, k):
    vectors, ids, _, queries = items
    result = flat.search(queries[:batch], k)
    assert result.ids.shape == result.scores.shape == (batch, k)
    assert result.ids.dtype == np.int64 and result.scores.dtype == np.float32
    assert_top_k(result, brute_force_scores(vectors, queries[:batch]), ids, k)


def test_exact_with_tied_scores():
    """Duplicated items tie exactly: any of the tied ids is right, scores still match."""
    rng = np.random.default_rng(2)
    base = rng.standard_normal((200, 16), dtype=np.float32)
    vectors = np.concatenate([base, base[:50], base[:50]])  # 50 items three times over
    queries = rng.standard_normal((20, 16), dtype=np.float32)
    index = build_index(vectors, config=IndexConfig(kind="flat"))
    assert_top_k(
        index.search(queries, 30), brute_force_scores(vectors, queries), np.arange(len(vectors)), 30
    )


def test_model_embeddings_exact(tmp_path):
    """Real HyTRec item embeddings via the checkpoint path: ids 1..num_items-1, version kept."""
    import torch

    from hytrec.index import build_from_checkpoint
    from hytrec.model.hytrec import HyTRec, HyTRecConfig

    model = HyTRec(HyTRecConfig(num_items=401, num_categories=9, d_model=32))
    model.item_category.copy_(torch.randint(1, 9, (401,)))
    model.save(tmp_path / "ckpt")
    index = build_from_checkpoint(tmp_path / "ckpt", IndexConfig(kind="flat"))
    vectors, ids = model.item_vectors(), np.arange(1, 401)
    np.testing.assert_array_equal(index.ids, ids)
    np.testing.assert_array_equal(index.categories, model.item_categories())
    assert index.model_version == model.version
    queries = np.random.default_rng(3).standard_normal((16, 32), dtype=np.float32) * 0.02
    assert_top_k(index.search(queries, 50), brute_force_scores(vectors, queries), ids, 50)


@pytest.mark.parametrize("kind", ["flat", *APPROX_KINDS])
def test_exclusions_still_return_k(items, kind):
    vectors, ids, categories, queries = items
    index = build_index(vectors, ids, categories, IndexConfig(kind=kind, nprobe=16))
    k = 20
    top = build_index(vectors, ids, config=IndexConfig(kind="flat")).search(queries, k).ids
    rng = np.random.default_rng(4)
    # exclude part of each query's true top-k (the hard case) plus random items, ragged
    exclude = [
        np.concatenate([top[q, : rng.integers(0, k + 1)], rng.choice(ids, q % 5)])
        for q in range(len(queries))
    ]
    result = index.search(queries, k, exclude=exclude)
    for q in range(len(queries)):
        assert (result.ids[q] >= 0).all(), f"row {q}: fewer than k results"
        assert not np.isin(result.ids[q], exclude[q]).any()
    if kind == "flat":
        scores = brute_force_scores(vectors, queries, exclude=exclude, ids=ids)
        assert_top_k(result, scores, ids, k)


@pytest.mark.parametrize("kind", ["flat", *APPROX_KINDS])
def test_category_restriction(items, kind):
    vectors, ids, categories, queries = items
    index = build_index(vectors, ids, categories, IndexConfig(kind=kind, nprobe=32))
    wanted = [3, 7, 11]
    allowed = np.isin(categories, wanted)
    exclude = [ids[allowed][q : q + 3] for q in range(len(queries))]
    result = index.search(queries, 15, categories=wanted, exclude=exclude)
    by_id = dict(zip(ids.tolist(), categories.tolist(), strict=True))
    assert (result.ids >= 0).all()
    assert all(by_id[i] in wanted for i in result.ids.ravel().tolist())
    if kind == "flat":
        scores = brute_force_scores(vectors, queries, allowed, exclude, ids)
        assert_top_k(result, scores, ids, 15)


def test_fewer_allowed_items_than_k_pads(items, flat):
    vectors, ids, categories, queries = items
    rare = np.zeros_like(categories)
    rare[:5] = 1  # only five items in category 1
    index = build_index(vectors, ids, rare, IndexConfig(kind="flat"))
    result = index.search(queries[:3], 10, categories=[1], exclude=[[ids[0]], [], []])
    assert set(result.ids[0, :4]) == set(ids[1:5]) and (result.ids[0, 4:] == -1).all()
    assert np.isneginf(result.scores[0, 4:]).all()
    assert set(result.ids[1, :5]) == set(ids[:5])
    with pytest.raises(ValueError, match="without item categories"):
        build_index(vectors, ids).search(queries[:1], 5, categories=[1])


@pytest.mark.parametrize("kind", ["flat", *APPROX_KINDS])
def test_save_load_round_trip(items, tmp_path, kind):
    vectors, ids, categories, queries = items
    index = build_index(
        vectors, ids, categories, IndexConfig(kind=kind), queries=queries, model_version="v42"
    )
    index.save(tmp_path / "ix")
    loaded = ItemIndex.load(tmp_path / "ix", expect_dim=32, expect_model_version="v42")
    meta = json.loads((tmp_path / "ix" / "meta.json").read_text())
    assert meta["kind"] == kind and meta["n"] == 3000 and meta["dim"] == 32
    assert meta["metric"] == "inner_product" and meta["model_version"] == "v42"
    assert meta["faiss_version"] == import_faiss().__version__
    assert loaded.report["recall_at_k"] == index.report["recall_at_k"]
    a, b = (
        index.search(queries, 10, categories=[1, 2]),
        loaded.search(queries, 10, categories=[1, 2]),
    )
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_load_refuses_mismatches(items, flat, tmp_path):
    vectors, ids, categories, _ = items
    saved = flat.save(tmp_path / "ix")
    with pytest.raises(IndexFileError, match=r"meta\.json: dimension 32, expected 64"):
        ItemIndex.load(saved, expect_dim=64)
    with pytest.raises(IndexFileError, match=r"meta\.json: model version None, expected 'v2'"):
        ItemIndex.load(saved, expect_model_version="v2")

    raw = bytearray((saved / "index.faiss").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (saved / "index.faiss").write_bytes(bytes(raw))
    with pytest.raises(IndexFileError, match=r"index\.faiss: checksum differs"):
        ItemIndex.load(saved)

    # a consistent checksum but an index of another dimension: caught by the content checks
    other = build_index(vectors[:, :16].copy(), ids, categories, IndexConfig(kind="flat"))
    other.save(tmp_path / "other")
    (saved / "index.faiss").write_bytes((tmp_path / "other" / "index.faiss").read_bytes())
    meta = json.loads((saved / "meta.json").read_text())
    meta["sha256"]["index.faiss"] = json.loads((tmp_path / "other" / "meta.json").read_text())[
        "sha256"
    ]["index.faiss"]
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match=r"index\.faiss: dimension 16, meta\.json says 32"):
        ItemIndex.load(saved)

    meta["format_version"] = 99
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match="format_version 99"):
        ItemIndex.load(saved)
    (saved / "meta.json").write_text("{not json")
    with pytest.raises(IndexFileError, match="not valid JSON"):
        ItemIndex.load(saved)
    with pytest.raises(IndexFileError, match=r"meta\.json: missing"):
        ItemIndex.load(tmp_path / "nowhere")


def test_hot_swap_under_concurrent_searches(items):
    """Searches running while a new index is built and swapped in always get a complete,
    correct answer from either the old or the new index, never a mix or an error."""
    vectors, ids, _, queries = items
    old = build_index(vectors, ids, config=IndexConfig(kind="flat"))
    new_vectors = np.random.default_rng(5).standard_normal(vectors.shape, dtype=np.float32)
    new_ids = ids + 100_000
    expected_old = old.search(queries, 10)
    expected_new = build_index(new_vectors, new_ids, config=IndexConfig(kind="flat")).search(
        queries, 10
    )
    holder = IndexHolder(old)
    stop, saw_old, errors = threading.Event(), threading.Event(), []
    seen = [[] for _ in range(3)]

    def searcher(log: list) -> None:
        try:
            while True:
                last_round = stop.is_set()  # one more search after the swap: must be new
                got = holder.search(queries, 10)
                if np.array_equal(got.ids, expected_old.ids):
                    log.append("old")
                    saw_old.set()
                elif np.array_equal(got.ids, expected_new.ids):
                    np.testing.assert_allclose(got.scores, expected_new.scores, atol=TOL)
                    log.append("new")
                else:
                    raise AssertionError("a search saw neither the old nor the new index")
                if last_round:
                    return
        except BaseException as err:  # re-raised in the main thread
            errors.append(err)

    def build() -> ItemIndex:
        assert saw_old.wait(timeout=30)  # searches are running before the build starts
        return build_index(new_vectors, new_ids, config=IndexConfig(kind="flat"))

    threads = [threading.Thread(target=searcher, args=(log,)) for log in seen]
    for t in threads:
        t.start()
    future = holder.swap_in_background(build)
    assert future.result(timeout=60) is holder.current
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    assert all(log[-1] == "new" for log in seen)
    assert any("old" in log for log in seen)
    assert old.search(queries, 10).ids.tolist() == expected_old.ids.tolist()  # still usable


def test_failed_background_build_keeps_old_index(items, flat):
    holder = IndexHolder(flat)

    def broken() -> ItemIndex:
        raise RuntimeError("out of memory")

    future = holder.swap_in_background(broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        future.result(timeout=10)
    assert holder.current is flat
    small = build_index(items[0][:, :16].copy(), config=IndexConfig(kind="flat"))
    with pytest.raises(ValueError, match="d=16"):
        holder.swap(small)
    with pytest.raises(RuntimeError, match="no index yet"):
        IndexHolder().search(items[3], 5)


@pytest.mark.parametrize("kind, min_recall", [("ivf_flat", 0.95), ("ivf_pq", 0.8), ("hnsw", 0.95)])
def test_approximate_recall_on_clustered_data(kind, min_recall):
    vectors, queries = clustered_data(20_000, 32, 200, noise=0.75, seed=6)
    index = build_index(
        vectors, config=IndexConfig(kind=kind, nprobe=32, recall_k=100), queries=queries
    )
    assert index.report["recall_k"] == 100 and index.report["recall_queries"] == 200
    assert index.report["recall_at_k"] >= min_recall, index.report


def test_config_resolution():
    cfg = IndexConfig(exact_max_items=1000)
    assert cfg.resolve(1000, 64, "cpu").kind == "flat"
    assert cfg.resolve(1001, 64, "cpu").kind == "hnsw"
    assert cfg.resolve(1001, 64, "gpu").kind == "ivf_flat"
    resolved = IndexConfig(kind="ivf_pq").resolve(1_000_000, 64, "cpu")
    assert resolved.nlist == 1024 and resolved.pq_m == 16
    assert IndexConfig(kind="ivf_flat").resolve(2000, 8, "cpu").nlist <= 2000 // 39
    with pytest.raises(ValueError, match="must divide"):
        IndexConfig(kind="ivf_pq", pq_m=5).resolve(100, 64, "cpu")
    with pytest.raises(ValueError, match="kind"):
        IndexConfig(kind="annoy")


def test_backend_selection_without_gpu(monkeypatch, caplog):
    faiss = import_faiss()
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    with caplog.at_level(logging.INFO, logger="hytrec.index.backend"):
        assert select_backend("auto") == "cpu"
    assert "faiss backend: cpu" in caplog.text and "0 GPU" in caplog.text
    assert select_backend("cpu") == "cpu"
    with pytest.raises(BackendError, match=r"'gpu' was requested but faiss sees no GPU"):
        select_backend("gpu")
    with pytest.raises(BackendError):
        build_index(np.zeros((10, 4), np.float32), config=IndexConfig(backend="gpu"))
    with pytest.raises(ValueError, match="expected one of"):
        select_backend("tpu")


def test_backend_auto_picks_gpu_when_faiss_sees_one(monkeypatch):
    monkeypatch.setattr(backend_module, "num_gpus", lambda faiss: 1)
    assert select_backend("auto") == "gpu"
    assert select_backend("cpu") == "cpu"


def test_faiss_install_check(monkeypatch):
    def both_installed(name):
        return "1.15.1"

    monkeypatch.setattr(metadata, "version", both_installed)
    with pytest.raises(FaissInstallError, match="faiss-cpu==1.15.1 and faiss-gpu==1.15.1"):
        import_faiss()

    def none_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", none_installed)
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(FaissInstallError, match="no faiss distribution is installed"):
        import_faiss()


@pytest.mark.skipif(import_faiss().get_num_gpus() == 0, reason="faiss sees no GPU here")
def test_gpu_exact_matches_cpu(items):
    vectors, ids, categories, queries = items
    cpu = build_index(vectors, ids, categories, IndexConfig(kind="flat", backend="cpu"))
    gpu = build_index(vectors, ids, categories, IndexConfig(kind="flat", backend="gpu"))
    a, b = cpu.search(queries, 20, categories=[1, 2]), gpu.search(queries, 20, categories=[1, 2])
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


def per_query_scores(vectors, queries, categories, query_categories, exclude, ids):
    """float64 [Q, N] brute-force inner products, -inf outside each query's own categories
    and on its excluded items."""
    scores = brute_force_scores(vectors, queries, exclude=exclude, ids=ids)
    for row, cats in enumerate(query_categories):
        scores[row, ~np.isin(categories, list(cats))] = -np.inf
    return scores


def query_category_lists(rng, queries: int) -> list[list[int]]:
    """Per-query category lists: single categories, several, repeats of the same set (so
    that queries group), an empty list and a category no item has."""
    lists = [
        [int(c) for c in rng.choice(20, rng.integers(1, 4), replace=False)] for _ in range(queries)
    ]
    lists[1], lists[2], lists[3] = [], [99], [5, 99]
    lists[4] = lists[5] = lists[6] = [7]
    return lists


@pytest.mark.parametrize("path", ["subindex", "faiss_bitmap", "gpu_post_filter"])
def test_per_query_categories_exact_against_brute_force(items, path, monkeypatch):
    """Each query gets only items of its own categories, and exactly the brute-force top-k
    there, on every path: the category sub-index, faiss's bitmap selector (CPU), and the
    GPU's over-fetch and filter (run here on a CPU flat index, with a small fetch cap so
    that rows come back short and are redone in the sub-index)."""
    vectors, ids, categories, queries = items
    cfg = IndexConfig(kind="flat", subindex_max_items=4096 if path == "subindex" else 0)
    index = build_index(vectors, ids, categories, cfg)
    if path == "gpu_post_filter":
        monkeypatch.setattr(item_index_module, "GPU_MAX_K", 40)
        index.on_cpu = False
    rng = np.random.default_rng(11)
    lists = query_category_lists(rng, len(queries))
    exclude = [rng.choice(ids, q % 4) for q in range(len(queries))]
    result = index.search(queries, 25, exclude=exclude, query_categories=lists)
    by_id = dict(zip(ids.tolist(), categories.tolist(), strict=True))
    for row, cats in enumerate(lists):
        got = result.ids[row][result.ids[row] >= 0]
        assert all(by_id[i] in cats for i in got.tolist()), f"row {row}: foreign category"
    assert (result.ids[1] == -1).all() and (result.ids[2] == -1).all()  # nothing allowed
    scores = per_query_scores(vectors, queries, categories, lists, exclude, ids)
    assert_top_k(result, scores, ids, 25)


def test_per_query_categories_small_categories_pad(items):
    """k above a category's size returns its items, then -1 / -inf; exclusions count."""
    vectors, ids, _, queries = items
    categories = np.zeros(len(ids), dtype=np.int64)
    categories[:3], categories[3:5] = 1, 2  # three items in category 1, two in category 2
    index = build_index(vectors, ids, categories, IndexConfig(kind="flat"))
    result = index.search(
        queries[:3], 4, exclude=[[ids[0]], [], []], query_categories=[[1], [1, 2], [2]]
    )
    assert set(result.ids[0, :2]) == set(ids[1:3]) and (result.ids[0, 2:] == -1).all()
    assert set(result.ids[1]) == set(ids[:4]) or set(result.ids[1]) <= set(ids[:5])
    assert (result.ids[1] >= 0).all()
    assert set(result.ids[2, :2]) == set(ids[3:5]) and np.isneginf(result.scores[2, 2:]).all()


def test_per_query_categories_refusals_and_round_trip(items, flat, tmp_path):
    vectors, ids, categories, queries = items
    with pytest.raises(ValueError, match="not both"):
        flat.search(queries[:2], 5, categories=[1], query_categories=[[1], [2]])
    with pytest.raises(ValueError, match="1 category lists for 2 queries"):
        flat.search(queries[:2], 5, query_categories=[[1]])
    with pytest.raises(ValueError, match="without item categories"):
        build_index(vectors, ids).search(queries[:1], 5, query_categories=[[1]])
    lists = query_category_lists(np.random.default_rng(12), len(queries))
    loaded = ItemIndex.load(flat.save(tmp_path / "ix"))
    a = flat.search(queries, 10, query_categories=lists)
    b = loaded.search(queries, 10, query_categories=lists)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)


@pytest.mark.parametrize("kind", APPROX_KINDS)
def test_per_query_categories_approximate_kinds(items, kind):
    """Approximate kinds keep every query inside its categories, and their sub-index (the
    index's own reconstructed vectors) agrees with the faiss path on most of the top-k."""
    vectors, ids, categories, queries = items
    lists = query_category_lists(np.random.default_rng(13), len(queries))
    by_id = dict(zip(ids.tolist(), categories.tolist(), strict=True))
    results = []
    for limit in (4096, 0):
        index = build_index(
            vectors, ids, categories, IndexConfig(kind=kind, nprobe=32, subindex_max_items=limit)
        )
        result = index.search(queries, 10, query_categories=lists)
        for row, cats in enumerate(lists):
            got = result.ids[row][result.ids[row] >= 0]
            assert all(by_id[i] in cats for i in got.tolist())
        results.append(result.ids)
    assert recall_at_k(results[1], results[0]) >= 0.8
