"""Max-over-queries search (`index/multi_query.py`) against brute force on an exact index."""

from __future__ import annotations

import numpy as np
import pytest

from hytrec.index import IndexConfig, build_index
from hytrec.index.multi_query import search_max_over_queries


def test_merged_search_is_the_brute_force_max_over_each_users_queries():
    rng = np.random.default_rng(0)
    items = rng.standard_normal((500, 16)).astype(np.float32)
    ids = np.arange(1, 501)
    index = build_index(items, ids, config=IndexConfig(kind="flat"))
    queries = rng.standard_normal((6, 4, 16)).astype(np.float32)
    present = rng.random((6, 4)) < 0.7
    present[:, 0] = True
    result = search_max_over_queries(index, queries, present, k=20)
    for u in range(6):
        best = (queries[u][present[u]] @ items.T).max(0)  # [500]
        want = np.argsort(-best, kind="stable")[:20]
        np.testing.assert_array_equal(np.sort(result.ids[u]), np.sort(ids[want]))
        np.testing.assert_allclose(result.scores[u], best[want], rtol=1e-5)
    with pytest.raises(ValueError, match="a query for every user"):
        search_max_over_queries(index, queries, np.zeros((6, 4), dtype=bool), k=5)

    # each user's exclusions hold for every one of its queries: its own top items are gone
    exclude = [ids[np.argsort(-(queries[u][present[u]] @ items.T).max(0))[:5]] for u in range(6)]
    result = search_max_over_queries(index, queries, present, k=20, exclude=exclude)
    for u in range(6):
        best = (queries[u][present[u]] @ items.T).max(0)
        best[exclude[u] - 1] = -np.inf
        want = np.argsort(-best, kind="stable")[:20]
        np.testing.assert_array_equal(np.sort(result.ids[u]), np.sort(ids[want]))
    with pytest.raises(ValueError, match="exclusion lists for 6 users"):
        search_max_over_queries(index, queries, present, k=5, exclude=exclude[:2])
