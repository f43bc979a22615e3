"""Build semantic IDs (`hytrec build-semantic-ids`): residual k-means over a frozen item
table, level by level with faiss's k-means, a dedup level, node centres and a per-item
top-r routing table (the format: `model/codebook.py`).

RQ-KMeans, as in TIGER / GRID (a READING for HiSAC, arXiv 2602.21009: see
`model/hisac.py`): with s_i the item's vector, L2-normalised,

    r_i^0 = s_i;   c_i^l = argmin_k |r_i^{l-1} - e^l_k|;   r_i^l = r_i^{l-1} - e^l_{c_i^l}

where e^l is k-means (seed + l) on the level's residuals r^{l-1}. A node is a code prefix,
its centre the prefix's reconstruction. Items sharing all L codes get a dedup code 0, 1, ...
in vocabulary order, so every item has a unique path. The report gives per level the share
of the K_l codes used (utilisation) and the mean squared reconstruction error
E|s_i - centre(c_i^1..c_i^l)|^2, and the share of unique paths before and after dedup.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hytrec.index.backend import import_faiss
from hytrec.model.codebook import SemanticIds, vocabulary_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SemanticIdConfig:
    sizes: tuple[int, ...] = (64, 64, 64)  # K_l codes per level (Taobao, 55k items)
    route_top: int = 4  # r: routes per item and level (its own node first)
    niter: int = 25  # k-means iterations per level
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1 or self.route_top < 1 or self.niter < 1:
            raise ValueError("SemanticIdConfig: sizes >= 1 per level, route_top >= 1, niter >= 1")


def _kmeans(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    """float32 [min(k, n), d] centroids of faiss k-means on every point (no subsampling)."""
    faiss = import_faiss()
    k = min(k, len(x))
    km = faiss.Kmeans(
        x.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=len(x), verbose=False
    )
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """int64 [n]: the nearest centroid (L2) of each row of x."""
    faiss = import_faiss()
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    return index.search(x, 1)[1][:, 0].astype(np.int64)


def _routes(vectors: np.ndarray, own: np.ndarray, centres: np.ndarray, r: int) -> np.ndarray:
    """int64 [n, r] node positions (within `centres`): each item's own node first, then the
    r - 1 others with the largest <centre, s_i> (-1 where the level has fewer nodes)."""
    faiss = import_faiss()
    n, p = len(vectors), len(centres)
    out = np.full((n, r), -1, dtype=np.int64)
    out[:, 0] = own
    if r == 1 or p == 1:
        return out
    index = faiss.IndexFlatIP(centres.shape[1])
    index.add(centres)
    found = index.search(vectors, min(r, p))[1]  # [n, r'] best first
    others = np.where(found == own[:, None], -1, found)
    # keep the first r - 1 that are not the own node, in their order
    keep = np.argsort(others < 0, axis=1, kind="stable")[:, : min(r, p) - 1]
    out[:, 1 : min(r, p)] = np.take_along_axis(others, keep, 1)
    return out


def build_semantic_ids(
    vectors: np.ndarray,
    ids: np.ndarray,
    config: SemanticIdConfig = SemanticIdConfig(),
    meta: dict | None = None,
) -> SemanticIds:
    """Semantic IDs of items `ids` int64 [N] with vectors float32 [N, d] (normalised here);
    `meta` (source model version, item-vocabulary hash) is kept with the build report."""
    cfg = config
    s = np.asarray(vectors, dtype=np.float32)
    s = np.ascontiguousarray(s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12))
    n, L = len(s), len(cfg.sizes)
    codes = np.zeros((n, L + 1), dtype=np.int64)
    recon = np.zeros_like(s)
    prefix_recon = []  # [n, d] per level: the reconstruction from the codes up to it
    levels = []
    for level, k in enumerate(cfg.sizes):
        residual = np.ascontiguousarray(s - recon)
        book = _kmeans(residual, k, cfg.niter, cfg.seed + level)
        code = _nearest(residual, book)
        codes[:, level] = code
        recon = recon + book[code]
        prefix_recon.append(recon)
        used = len(np.unique(code))
        levels.append(
            {
                "level": level + 1,
                "codes": k,
                "codes_used": used,
                "utilisation": used / k,
                "reconstruction_error": float(np.mean(np.sum((s - recon) ** 2, axis=1))),
            }
        )
    # dedup: the rank of each item among those with the same L codes, in vocabulary order
    paths, group = np.unique(codes[:, :L], axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.lexsort((ids, group))
    starts = np.r_[0, np.flatnonzero(np.diff(group[order])) + 1]
    codes[order, L] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))

    # nodes: the distinct prefixes, level by level, each level sorted
    node_level, node_parent, centres = [], [], []
    item_nodes = np.zeros((n, L), dtype=np.int64)
    routes = np.zeros((n, L, cfg.route_top), dtype=np.int64)
    offset = 0
    for level in range(L):
        prefixes, which = np.unique(codes[:, : level + 1], axis=0, return_inverse=True)
        which = which.reshape(-1)
        first = np.zeros(len(prefixes), dtype=np.int64)
        first[which[::-1]] = np.arange(n)[::-1]  # the first item of each prefix
        level_centres = prefix_recon[level][first]  # equal for every item of the prefix
        item_nodes[:, level] = offset + which
        node_level.append(np.full(len(prefixes), level + 1, dtype=np.int64))
        node_parent.append(
            item_nodes[first, level - 1] if level else np.full(len(prefixes), -1, dtype=np.int64)
        )
        centres.append(level_centres)
        local = _routes(s, which, level_centres, cfg.route_top)
        routes[:, level] = np.where(local >= 0, local + offset, -1)
        offset += len(prefixes)
    centres = np.ascontiguousarray(np.concatenate(centres), dtype=np.float32)
    route_logits = np.einsum("nlrd,nd->nlr", centres[routes.clip(min=0)], s).astype(np.float32)
    route_logits[routes < 0] = 0.0
    unique_after = len(np.unique(codes, axis=0))
    report = {
        "items": n,
        "dim": int(s.shape[1]),
        "levels": levels,
        "nodes_per_level": [int((np.concatenate(node_level) == lv + 1).sum()) for lv in range(L)],
        "unique_paths_share_before_dedup": len(paths) / n,
        "unique_paths_share": unique_after / n,
        "max_dedup_code": int(codes[:, L].max()),
        "reconstruction_error_falls_by_level": all(
            a["reconstruction_error"] > b["reconstruction_error"]
            for a, b in zip(levels, levels[1:], strict=False)
        ),
    }
    return SemanticIds(
        ids=np.asarray(ids, dtype=np.int64),
        codes=codes,
        node_level=np.concatenate(node_level),
        node_parent=np.concatenate(node_parent),
        centres=centres,
        item_nodes=item_nodes,
        routes=routes,
        route_logits=route_logits,
        vectors=s,
        meta={"config": asdict(cfg), **(meta or {}), "report": report},
    )


def build_from_model(model, config: SemanticIdConfig, meta: dict | None = None) -> SemanticIds:
    """Semantic IDs over a trained model's item table (vocabulary indices 1..N-1), the model
    named in their metadata (with `meta` beside it)."""
    vectors = model.item_vectors()
    ids = np.arange(1, len(vectors) + 1, dtype=np.int64)
    meta = {
        **(meta or {}),
        "source_model": model.NAME,
        "model_version": model.version,
        "items_hash": vocabulary_hash(model.items.to_json()) if model.items else None,
    }
    log.info("semantic IDs over %s items of %s (%s)", len(ids), model.NAME, model.version)
    return build_semantic_ids(vectors, ids, config, meta)


def build_from_checkpoint(checkpoint: str | Path, config: SemanticIdConfig) -> SemanticIds:
    """Semantic IDs over a trained checkpoint's item table (vocabulary indices 1..N-1)."""
    from hytrec.model.registry import load_model

    return build_from_model(load_model(checkpoint), config, {"source_checkpoint": str(checkpoint)})
