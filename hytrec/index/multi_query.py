"""Several queries per user (HiSAC-mi's agents), merged by max score: an item's score for
the user is its best score over the user's queries.

Exact when each query's search is: an item in the user's true top k by max score is in the
top k of the query that gives it that score (every item that query ranks above it has a
max score at least as high), so the merged per-query top-k lists hold it.
"""

from __future__ import annotations

import numpy as np

from hytrec.index.item_index import ItemIndex, SearchResult


def search_max_over_queries(
    index: ItemIndex,
    queries: np.ndarray,
    present: np.ndarray,
    k: int,
    exclude: list[list[int] | np.ndarray] | None = None,
) -> SearchResult:
    """Top-k items [U, k] of each user by max over its queries. queries float32 [U, M, d]
    (M per user, padded), present bool [U, M] (which are real; a user needs one); exclude:
    U lists of items the user's queries must not return."""
    U, M, d = queries.shape
    if present.shape != (U, M) or not present.any(1).all():
        raise ValueError(f"present must be bool [{U}, {M}] with a query for every user")
    if exclude is not None and len(exclude) != U:
        raise ValueError(f"{len(exclude)} exclusion lists for {U} users")
    user = np.repeat(np.arange(U), present.sum(1))  # the user of each real query
    per_query = None if exclude is None else [exclude[u] for u in user]
    found = index.search(queries[present].reshape(-1, d), k, exclude=per_query)  # [Q, k]
    ids = np.full((U, k), -1, dtype=np.int64)
    scores = np.full((U, k), -np.inf, dtype=np.float32)
    for u in range(U):
        cand, cand_scores = found.ids[user == u].ravel(), found.scores[user == u].ravel()
        order = np.argsort(-cand_scores, kind="stable")
        cand, cand_scores = cand[order], cand_scores[order]
        keep = cand >= 0
        cand, cand_scores = cand[keep], cand_scores[keep]
        _, first = np.unique(cand, return_index=True)  # an item's best score comes first
        first = np.sort(first)[:k]
        ids[u, : len(first)], scores[u, : len(first)] = cand[first], cand_scores[first]
    return SearchResult(ids, scores)
