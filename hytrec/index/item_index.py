"""The item index: build, search, save and load a faiss index over item vectors.

Scores are inner products (the model scores an item by the dot product of the user vector
with its embedding). Faiss stores the items at positions 0..N-1; `ItemIndex.ids` maps a
position to the item's vocabulary index and `ItemIndex.categories` to its category.

Kinds (faiss names): "flat" = IndexFlatIP, exact; "ivf_flat" = IndexIVFFlat, k-means lists
with full vectors; "ivf_pq" = IndexIVFPQ, lists with product-quantised codes; "hnsw" =
IndexHNSWFlat, a navigable small-world graph (CPU only). "auto" takes "flat" up to
`exact_max_items` items, above that "hnsw" on the CPU and "ivf_flat" on a GPU.

Category filters. `search(categories=[...])` restricts every query to one set of categories;
`search(query_categories=[[...], [...], ...])` gives each query its own set (a category
cascade asks for one user's top categories, or one query per category). Queries with the
same set are searched together. A set holding at most `subindex_max_items` items is
searched exactly in the per-category sub-index (`CategoryBlocks`: the items' vectors
grouped by category, one contiguous block each, scored by brute force); a larger one goes
through faiss with a bitmap selector on the CPU, or over-fetch and filter on a GPU (no
selectors there), where a row that comes back short is redone in the sub-index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType

import numpy as np

from hytrec.index.backend import import_faiss, select_backend

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivf_flat", "ivf_pq", "hnsw")
FORMAT = "hytrec-item-index"
FORMAT_VERSION = 1
METRIC = "inner_product"
META_FILE, INDEX_FILE, IDS_FILE, CATEGORIES_FILE = (
    "meta.json",
    "index.faiss",
    "ids.npy",
    "categories.npy",
)
GPU_MAX_K = 2048  # faiss GPU indexes return at most this many neighbours per query


@dataclass(frozen=True)
class IndexConfig:
    """How to build the index and its default search settings. None = derived from N, d."""

    kind: str = "auto"  # one of KINDS
    backend: str = "auto"  # auto | cpu | gpu
    exact_max_items: int = 200_000  # auto: exact search up to this many items
    nlist: int | None = None  # IVF lists; None -> power of two near sqrt(N)
    nprobe: int = 16  # IVF lists visited per query
    train_size: int = 100_000  # IVF k-means sample (seeded); faiss wants >= 39 * nlist
    pq_m: int | None = None  # IVF-PQ sub-quantizers (must divide d); None -> d // 4
    pq_bits: int = 8  # bits per sub-quantizer code
    hnsw_m: int = 32  # graph neighbours per node
    ef_construction: int = 40  # faiss default
    ef_search: int = 128  # candidate list length per query
    recall_k: int = 100  # the build reports recall@recall_k ...
    recall_queries: int = 1000  # ... on a sample of this many of the given queries
    # per-query category search: a category set of at most this many items is searched by
    # brute force in the category sub-index instead of faiss (0 = always faiss)
    subindex_max_items: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"IndexConfig.kind {self.kind!r}: expected one of {KINDS}")
        if self.nprobe < 1 or self.ef_search < 1 or self.hnsw_m < 2:
            raise ValueError("IndexConfig: nprobe, ef_search >= 1 and hnsw_m >= 2")

    def resolve(self, n: int, d: int, backend: str) -> IndexConfig:
        """This config with kind, nlist and pq_m fixed for N items of dimension d."""
        kind = self.kind
        if kind == "auto":
            kind = (
                "flat" if n <= self.exact_max_items else "hnsw" if backend == "cpu" else "ivf_flat"
            )
        # faiss warns below 39 training points per list; keep lists a power of two near sqrt(N)
        nlist = self.nlist or max(1, min(2 ** round(math.log2(math.sqrt(n))), n // 39))
        pq_m = self.pq_m or max(1, d // 4)
        if kind == "ivf_pq" and d % pq_m:
            raise ValueError(f"IndexConfig.pq_m={pq_m} must divide the dimension d={d}")
        return replace(self, kind=kind, backend=backend, nlist=nlist, pq_m=pq_m)


@dataclass
class SearchResult:
    """ids int64 [Q, K] (vocabulary indices, -1 = no result) and scores float32 [Q, K]
    (inner products, -inf where there is no result), best first."""

    ids: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class CategoryBlocks:
    """The per-category sub-index: every item's vector, grouped by category so that each
    category is one contiguous block (positions starts[j]..stops[j]-1 of `keys[j]`).

    ids int64 [N] and vectors float32 [N, d] are in block order; keys int64 [C] sorted."""

    ids: np.ndarray
    vectors: np.ndarray
    keys: np.ndarray
    starts: np.ndarray
    stops: np.ndarray

    @classmethod
    def of(cls, vectors: np.ndarray, ids: np.ndarray, categories: np.ndarray) -> CategoryBlocks:
        order = np.argsort(categories, kind="stable")
        keys, starts, counts = np.unique(categories[order], return_index=True, return_counts=True)
        return cls(ids[order], np.ascontiguousarray(vectors[order]), keys, starts, starts + counts)

    def positions(self, categories: tuple[int, ...]) -> np.ndarray:
        """Block-order positions of the items of these categories (unknown ones hold none)."""
        j = np.searchsorted(self.keys, categories)
        j = j[(j < len(self.keys)) & (self.keys[np.minimum(j, len(self.keys) - 1)] == categories)]
        if not len(j):
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(
            [np.arange(a, b) for a, b in zip(self.starts[j], self.stops[j], strict=True)]
        )

    def search(
        self,
        queries: np.ndarray,
        k: int,
        positions: np.ndarray,
        exclude: list | None = None,
    ) -> SearchResult:
        """Exact top-k of each query [G, d] among the items at `positions` (brute force)."""
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        if not len(positions) or not len(queries):
            return SearchResult(ids, scores)
        candidates = self.ids[positions]
        all_scores = queries @ self.vectors[positions].T  # [G, A]
        if exclude is not None:
            for row, excluded in enumerate(exclude):
                if len(excluded):
                    all_scores[row, np.isin(candidates, np.asarray(excluded, np.int64))] = -np.inf
        m = min(k, len(positions))
        top = np.argpartition(-all_scores, m - 1, axis=1)[:, :m] if m < len(positions) else None
        if top is None:
            top = np.broadcast_to(np.arange(len(positions)), all_scores.shape)
        top_scores = np.take_along_axis(all_scores, top, 1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        top, top_scores = (
            np.take_along_axis(top, order, 1),
            np.take_along_axis(top_scores, order, 1),
        )
        found = np.isfinite(top_scores)  # excluded items score -inf: never returned
        ids[:, :m] = np.where(found, candidates[top], -1)
        scores[:, :m] = np.where(found, top_scores, -np.inf)
        return SearchResult(ids, scores)


class IndexFileError(ValueError):
    """A saved index that is missing, corrupt, or does not match what the caller expects."""


_GPU_RESOURCES = None


def _gpu_resources(faiss: ModuleType):
    # one set of GPU resources (streams, scratch memory) per process, made on first use
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES


def _to_backend(faiss: ModuleType, index, cfg: IndexConfig):
    """Move a CPU index to GPU 0 when the backend is 'gpu' (HNSW has no GPU form: stays)."""
    if cfg.backend != "gpu" or cfg.kind == "hnsw":
        if cfg.backend == "gpu":
            log.warning("faiss has no GPU HNSW: this index searches on the CPU")
        return index
    return faiss.index_cpu_to_gpu(_gpu_resources(faiss), 0, index)


def _new_faiss_index(faiss: ModuleType, cfg: IndexConfig, d: int):
    ip = faiss.METRIC_INNER_PRODUCT
    if cfg.kind == "flat":
        return faiss.IndexFlatIP(d)
    if cfg.kind == "ivf_flat":
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, cfg.nlist, ip)
    if cfg.kind == "ivf_pq":
        return faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, cfg.nlist, cfg.pq_m, cfg.pq_bits, ip)
    index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, ip)
    index.hnsw.efConstruction = cfg.ef_construction
    return index


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Positions [Q, k] of the k largest inner products (faiss brute force, no index)."""
    faiss = import_faiss()
    _, positions = faiss.knn(
        np.ascontiguousarray(queries, dtype=np.float32),
        np.ascontiguousarray(vectors, dtype=np.float32),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    return positions


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / K for id arrays [Q, K] (-1 never matches)."""
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


class ItemIndex:
    """A built faiss index with its id map, category map and metadata. Searches may run
    from many threads at once; nothing here is mutated after construction."""

    def __init__(
        self,
        index,
        ids: np.ndarray,
        categories: np.ndarray | None,
        config: IndexConfig,
        model_version: str | None = None,
        report: dict | None = None,
        blocks: CategoryBlocks | None = None,
    ):
        self.faiss = import_faiss()
        self.index = index
        self.ids = ids  # int64 [N]: position -> vocabulary index
        self.categories = categories  # int64 [N] or None: position -> category
        self.config = config  # resolved: kind, backend, nlist, pq_m are fixed
        self.model_version = model_version
        self.report = report or {}
        self.n, self.d = len(ids), index.d
        # faiss ID selectors work on CPU indexes only; GPU searches over-fetch and filter
        self.on_cpu = config.backend == "cpu" or config.kind == "hnsw"
        # the category sub-index, from the index's own (CPU) vectors: None without categories
        self.blocks = blocks
        self._gpu_lock = threading.Lock()  # faiss GPU indexes are not thread-safe

    def __repr__(self) -> str:
        return (
            f"ItemIndex(kind={self.config.kind}, backend={self.config.backend}, "
            f"n={self.n}, d={self.d}, model_version={self.model_version})"
        )

    # ------------------------------------------------------------------ search

    def _search_params(self, nprobe: int, ef_search: int, allowed: np.ndarray | None):
        """faiss SearchParameters for one call: per-call settings and an optional bitmap
        selector over positions. Returns (params, objects the caller keeps alive)."""
        faiss, kind = self.faiss, self.config.kind
        if not self.on_cpu:
            return None, None  # GPU: nprobe is set on the index in _faiss_search
        sel = bitmap = None
        if allowed is not None:
            bitmap = np.packbits(allowed, bitorder="little")
            sel = faiss.IDSelectorBitmap(bitmap)
        if kind in ("ivf_flat", "ivf_pq"):
            params = (
                faiss.SearchParametersIVF(nprobe=nprobe, sel=sel)
                if sel is not None
                else faiss.SearchParametersIVF(nprobe=nprobe)
            )
        elif kind == "hnsw":
            params = (
                faiss.SearchParametersHNSW(efSearch=ef_search, sel=sel)
                if sel is not None
                else faiss.SearchParametersHNSW(efSearch=ef_search)
            )
        else:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
        return params, (sel, bitmap)

    def _faiss_search(
        self, queries: np.ndarray, k: int, params, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores float32 [Q, k] and positions int64 [Q, k] (-1 = none) from faiss."""
        if self.on_cpu:
            return self.index.search(queries, k, params=params)
        with self._gpu_lock:
            if self.config.kind != "flat":
                self.index.nprobe = nprobe
            return self.index.search(queries, k)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: list[list[int] | np.ndarray] | None = None,
        categories: list[int] | np.ndarray | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        query_categories: Sequence[Sequence[int]] | None = None,
    ) -> SearchResult:
        """Top-k items for each query.

        queries: float32 [Q, d]. exclude: Q lists of vocabulary indices each query must not
        return (still returns k results: over-fetch and filter). categories: only items of
        these categories; or query_categories: Q lists, query q only items of its list's
        categories (an empty list allows nothing). nprobe / ef_search override the config
        for this call. Returns a SearchResult of shape [Q, k]; rows are padded with -1 / -inf
        only when fewer than k items are allowed or the (approximate) index finds fewer.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.d:
            raise ValueError(f"queries of shape {queries.shape}, expected [Q, {self.d}]")
        if exclude is not None and len(exclude) != len(queries):
            raise ValueError(f"{len(exclude)} exclusion lists for {len(queries)} queries")
        if (categories is not None or query_categories is not None) and self.categories is None:
            raise ValueError("category-restricted search on an index built without item categories")
        if query_categories is not None:
            if categories is not None:
                raise ValueError(
                    "give categories (one list for every query) or query_categories (one "
                    "list per query), not both"
                )
            if len(query_categories) != len(queries):
                raise ValueError(
                    f"{len(query_categories)} category lists for {len(queries)} queries"
                )
            return self._search_per_query(
                queries, k, exclude, query_categories, nprobe=nprobe, ef_search=ef_search
            )
        allowed = None
        if categories is not None:
            allowed = np.isin(self.categories, np.asarray(categories, dtype=np.int64))
        n_allowed = self.n if allowed is None else int(allowed.sum())
        nprobe = nprobe or self.config.nprobe
        # the selector and its bitmap must outlive the faiss calls below (raw pointers)
        params, _selector = self._search_params(nprobe, ef_search or self.config.ef_search, allowed)
        post_filter = allowed if (allowed is not None and not self.on_cpu) else None
        limit = min(
            self.n if post_filter is not None else n_allowed, self.n if self.on_cpu else GPU_MAX_K
        )
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        if post_filter is not None:
            extra = max(extra, 4 * k)  # a GPU has no selector: fetch more, keep the allowed

        fetch = min(k + extra, limit)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        if exclude is None and post_filter is None and fetch > 0:  # one vectorised call
            d, pos = self._faiss_search(queries, fetch, params, nprobe)
            found = pos >= 0
            ids[:, :fetch] = np.where(found, self.ids[np.maximum(pos, 0)], -1)
            scores[:, :fetch] = np.where(found, d, -np.inf)
            return SearchResult(ids, scores)

        todo = np.arange(len(queries))
        while len(todo) and fetch > 0:
            d, pos = self._faiss_search(queries[todo], fetch, params, nprobe)
            short = []
            for row, q in enumerate(todo):
                keep = pos[row] >= 0
                if post_filter is not None:
                    keep &= post_filter[np.maximum(pos[row], 0)]
                found = self.ids[pos[row][keep]]
                found_scores = d[row][keep]
                if exclude is not None and len(exclude[q]):
                    mask = ~np.isin(found, np.asarray(exclude[q], dtype=np.int64))
                    found, found_scores = found[mask], found_scores[mask]
                m = min(k, len(found))
                ids[q, :m], scores[q, :m] = found[:m], found_scores[:m]
                if m < k and fetch < limit:
                    short.append(q)
            # an approximate index (or a GPU filter) can fall short: ask those rows for more
            todo, fetch = np.array(short, dtype=np.int64), min(2 * fetch, limit)
        return SearchResult(ids, scores)

    def _search_per_query(
        self,
        queries: np.ndarray,
        k: int,
        exclude: list | None,
        query_categories: Sequence[Sequence[int]],
        **settings,
    ) -> SearchResult:
        """`search` with a category list per query: one search per distinct category set,
        in the sub-index when the set is small, else through faiss (see the module doc)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for q, cats in enumerate(query_categories):
            groups.setdefault(tuple(sorted({int(c) for c in cats})), []).append(q)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        for cats, members in groups.items():
            rows = np.asarray(members, dtype=np.int64)
            excluded = [exclude[q] for q in members] if exclude is not None else None
            positions = self.blocks.positions(cats)
            if len(positions) <= self.config.subindex_max_items:
                found = self.blocks.search(queries[rows], k, positions, excluded)
            else:
                found = self.search(queries[rows], k, excluded, list(cats), **settings)
                short = (found.ids < 0).any(1)
                if not self.on_cpu and short.any():  # the GPU's over-fetch fell short: exact
                    redo = self.blocks.search(
                        queries[rows[short]],
                        k,
                        positions,
                        [excluded[i] for i in np.flatnonzero(short)] if excluded else None,
                    )
                    found.ids[short], found.scores[short] = redo.ids, redo.scores
            ids[rows], scores[rows] = found.ids, found.scores
        return SearchResult(ids, scores)

    # ------------------------------------------------------------------ persistence

    def metadata(self) -> dict:
        """What `save` writes to meta.json (without the file checksums)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_version": self.model_version,
            "dim": self.d,
            "metric": METRIC,
            "kind": self.config.kind,
            "params": asdict(self.config),
            "faiss_version": self.faiss.__version__,
            "n": self.n,
            "has_categories": self.categories is not None,
            "build_report": self.report,
        }

    def save(self, directory: str | Path) -> Path:
        """Write meta.json, index.faiss, ids.npy (and categories.npy) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index = self.index
        if self.config.backend == "gpu" and self.config.kind != "hnsw":
            index = self.faiss.index_gpu_to_cpu(index)
        self.faiss.write_index(index, str(directory / INDEX_FILE))
        np.save(directory / IDS_FILE, self.ids)
        files = [INDEX_FILE, IDS_FILE]
        if self.categories is not None:
            np.save(directory / CATEGORIES_FILE, self.categories)
            files.append(CATEGORIES_FILE)
        meta = self.metadata() | {"sha256": {f: _sha256(directory / f) for f in files}}
        # meta.json last: a directory without it is recognisably incomplete
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        backend: str = "auto",
        expect_dim: int | None = None,
        expect_model_version: str | None = None,
    ) -> ItemIndex:
        """Load what `save` wrote; raise IndexFileError naming the file and the mismatch."""
        directory = Path(directory)
        meta = read_metadata(directory)
        for what, key, want in (
            ("dimension", "dim", expect_dim),
            ("model version", "model_version", expect_model_version),
        ):
            if want is not None and meta[key] != want:
                raise IndexFileError(
                    f"{directory / META_FILE}: {what} {meta[key]!r}, expected {want!r}"
                )
        for name, digest in meta["sha256"].items():
            if _sha256(directory / name) != digest:
                raise IndexFileError(
                    f"{directory / name}: checksum differs from meta.json "
                    "(corrupt or replaced file)"
                )
        faiss = import_faiss()
        if meta["faiss_version"] != faiss.__version__:
            log.warning(
                "%s was written by faiss %s, reading with faiss %s",
                directory,
                meta["faiss_version"],
                faiss.__version__,
            )
        try:
            index = faiss.read_index(str(directory / INDEX_FILE))
        except RuntimeError as err:
            raise IndexFileError(f"{directory / INDEX_FILE}: faiss cannot read it ({err})") from err
        ids = np.load(directory / IDS_FILE, allow_pickle=False)
        categories = (
            np.load(directory / CATEGORIES_FILE, allow_pickle=False)
            if meta["has_categories"]
            else None
        )
        checks = [
            (INDEX_FILE, "dimension", index.d, meta["dim"]),
            (INDEX_FILE, "item count", index.ntotal, meta["n"]),
            (IDS_FILE, "shape", ids.shape, (meta["n"],)),
            (IDS_FILE, "dtype", str(ids.dtype), "int64"),
        ]
        if categories is not None:
            checks.append((CATEGORIES_FILE, "shape", categories.shape, (meta["n"],)))
        for name, what, got, want in checks:
            if got != want:
                raise IndexFileError(f"{directory / name}: {what} {got}, meta.json says {want}")
        config = replace(IndexConfig(**meta["params"]), backend=select_backend(backend))
        return cls(
            _to_backend(faiss, index, config),
            ids,
            categories,
            config,
            meta["model_version"],
            meta["build_report"],
            _category_blocks(faiss, index, ids, categories),
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _category_blocks(
    faiss: ModuleType, cpu_index, ids: np.ndarray, categories: np.ndarray | None
) -> CategoryBlocks | None:
    """The sub-index of a CPU faiss index's own vectors (exact for flat, HNSW and IVF-flat;
    IVF-PQ's decoded codes), so that a built and a loaded index search it alike."""
    if categories is None:
        return None
    ivf = faiss.try_extract_index_ivf(cpu_index)
    if ivf is not None:
        ivf.make_direct_map()  # IVF lists need the id -> list map to reconstruct by id
    vectors = cpu_index.reconstruct_n(0, cpu_index.ntotal)  # float32 [N, d]
    return CategoryBlocks.of(vectors, ids, categories)


def read_metadata(directory: str | Path) -> dict:
    """meta.json of a saved index, checked for format, version and required keys."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise IndexFileError(f"{path}: missing (not a saved item index directory?)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise IndexFileError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise IndexFileError(f"{path}: a JSON {type(meta).__name__}, expected an object")
    if meta.get("format") != FORMAT:
        raise IndexFileError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise IndexFileError(
            f"{path}: format_version {meta.get('format_version')!r}, this "
            f"code reads version {FORMAT_VERSION}"
        )
    if meta.get("metric") != METRIC:
        raise IndexFileError(f"{path}: metric {meta.get('metric')!r}, expected {METRIC!r}")
    missing = {
        "model_version",
        "dim",
        "kind",
        "params",
        "faiss_version",
        "n",
        "has_categories",
        "sha256",
        "build_report",
    } - meta.keys()
    if missing:
        raise IndexFileError(f"{path}: missing keys {sorted(missing)}")
    return meta


def build_index(
    vectors: np.ndarray,
    ids: np.ndarray | None = None,
    categories: np.ndarray | None = None,
    config: IndexConfig | None = None,
    queries: np.ndarray | None = None,
    model_version: str | None = None,
) -> ItemIndex:
    """Build an index over item vectors float32 [N, d] with ids int64 [N] (default 0..N-1)
    and optional categories int64 [N]. With queries float32 [Q, d], the build measures
    recall@config.recall_k against exact search on a seeded sample of them (in `.report`).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if ids.shape != (n,) or len(np.unique(ids)) != n:
        raise ValueError(f"ids must be {n} distinct integers, got shape {ids.shape}")
    if categories is not None:
        categories = np.asarray(categories, dtype=np.int64)
        if categories.shape != (n,):
            raise ValueError(f"categories of shape {categories.shape}, expected ({n},)")
    faiss = import_faiss()
    config = config or IndexConfig()
    cfg = config.resolve(n, d, select_backend(config.backend))
    start = time.perf_counter()
    index = _new_faiss_index(faiss, cfg, d)
    if cfg.kind in ("ivf_flat", "ivf_pq"):
        rng = np.random.default_rng(cfg.seed)
        sample = vectors[np.sort(rng.choice(n, min(n, cfg.train_size), replace=False))]
        index.train(sample)
    index.add(vectors)
    blocks = _category_blocks(faiss, index, ids, categories)
    index = _to_backend(faiss, index, cfg)
    report = {
        "kind": cfg.kind,
        "backend": cfg.backend,
        "n": n,
        "d": d,
        "build_s": round(time.perf_counter() - start, 3),
    }
    item_index = ItemIndex(index, ids, categories, cfg, model_version, report, blocks)
    if queries is not None:
        rng = np.random.default_rng(cfg.seed)
        sample = queries[
            np.sort(rng.choice(len(queries), min(len(queries), cfg.recall_queries), replace=False))
        ]
        k = min(cfg.recall_k, n)
        truth = ids[exact_top_k(vectors, sample, k)]
        report.update(
            recall_k=k,
            recall_queries=len(sample),
            recall_at_k=round(recall_at_k(item_index.search(sample, k).ids, truth), 4),
        )
    log.info("built %s: %s", item_index, report)
    return item_index


def build_from_checkpoint(
    path: str | Path, config: IndexConfig | None = None, queries: np.ndarray | None = None
) -> ItemIndex:
    """Build over a checkpoint's item embeddings (any registered model): ids are vocabulary
    indices 1..num_items-1 (0 is padding), categories and model version come from it."""
    from hytrec.model.registry import load_model  # model (torch) only when a checkpoint is used

    model = load_model(path)
    vectors = model.item_vectors()  # float32 [num_items - 1, d]
    ids = np.arange(1, len(vectors) + 1, dtype=np.int64)
    return build_index(vectors, ids, model.item_categories(), config, queries, model.version)
