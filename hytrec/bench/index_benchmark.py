"""`hytrec benchmark index`: queries/s and recall@k of each index kind on clustered data.

Items and queries are drawn from one seeded Gaussian mixture (recommendation embeddings
are clustered; on uniform random vectors graph and list indexes look far worse than they
are in use). For every size n and dimension d, exact top-k of a fixed query set is the
ground truth; each kind is built once, then searched at two or three settings (IVF nprobe,
HNSW efSearch), each at every batch size for about `seconds` of wall time (at least one
batch). Recall does not depend on the batch size, so it is measured once per setting.

Per-query category search (`category_rows`, the exact flat index): the items get
`n / category_size` categories of Zipf-skewed sizes (real catalogues are skewed: on the
Taobao sample the largest of 2,914 categories holds 2,026 items, the median 3), each query
`categories_per_query` of them drawn by item (a user's categories are the big ones more
often), and each query is searched inside its own set through the category sub-index and
through faiss's bitmap selector: recall@k against brute force, the searched share of the
catalogue and queries/s, per batch size.
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info
from tqdm import tqdm

from hytrec.bench.reports import machine_info, provenance
from hytrec.index.backend import import_faiss, select_backend
from hytrec.index.item_index import IndexConfig, ItemIndex, build_index, exact_top_k, recall_at_k


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run; written into the JSON with the command that reproduces it."""

    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    dims: tuple[int, ...] = (64, 128)
    batches: tuple[int, ...] = (1, 64, 1024)
    kinds: tuple[str, ...] = ("flat", "ivf_flat", "ivf_pq", "hnsw")
    k: int = 100
    nprobes: tuple[int, ...] = (4, 16, 64)  # IVF settings
    ef_searches: tuple[int, ...] = (128, 256, 512)  # HNSW settings (faiss uses max(ef, k))
    hnsw_m: int = 32
    queries: int = 1024  # ground-truth query set, cycled through for timing
    seconds: float = 1.5  # wall time of one measurement
    noise: float = 0.75  # spread of a cluster relative to the spread of the centres (overlap)
    backend: str = "auto"
    category_size: int = 20  # mean items per category of the per-query category rows
    categories_per_query: int = 10  # allowed categories per query (0 = no category rows)
    seed: int = 0

    def command(self) -> str:
        """The CLI command that runs exactly this config."""

        def csv(values):
            return ",".join(map(str, values))

        return (
            f"hytrec benchmark index --sizes {csv(self.sizes)} --dims {csv(self.dims)} "
            f"--batches {csv(self.batches)} --kinds {csv(self.kinds)} --k {self.k} "
            f"--nprobes {csv(self.nprobes)} --ef-searches {csv(self.ef_searches)} "
            f"--hnsw-m {self.hnsw_m} "
            f"--queries {self.queries} --seconds {self.seconds} --backend {self.backend} "
            f"--category-size {self.category_size} "
            f"--categories-per-query {self.categories_per_query} --seed {self.seed}"
        )


QUICK = BenchConfig(
    categories_per_query=3,
    sizes=(2000,),
    dims=(16,),
    batches=(1, 16),
    k=10,
    nprobes=(2, 8),
    ef_searches=(16, 64),
    hnsw_m=16,
    queries=64,
    seconds=0.02,
)


def clustered_data(
    n: int, d: int, queries: int, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Items float32 [n, d] and queries float32 [queries, d] from one Gaussian mixture of
    n / 100 clusters, centres and spreads scaled by 1 / sqrt(d). The cluster size is fixed
    so that a top-100 spans a few clusters at every n (with a fixed cluster count, IVF lists
    at 1M items line up with the clusters and look perfect)."""
    rng = np.random.default_rng(seed)
    clusters = max(1, n // 100)
    centres = rng.standard_normal((clusters, d), dtype=np.float32) / np.sqrt(d)

    def draw(count: int) -> np.ndarray:
        points = rng.standard_normal((count, d), dtype=np.float32)
        points *= noise / np.sqrt(d)
        points += centres[rng.integers(0, clusters, count)]
        return points

    return draw(n), draw(queries)


def settings_of(kind: str, cfg: BenchConfig) -> list[dict]:
    """Search settings to measure for one index kind."""
    if kind in ("ivf_flat", "ivf_pq"):
        return [{"nprobe": p} for p in cfg.nprobes]
    if kind == "hnsw":
        return [{"ef_search": e} for e in cfg.ef_searches]
    return [{}]


def build_params(index: ItemIndex) -> dict:
    """The build parameters that matter for this index's kind."""
    c = index.config
    return {
        "flat": {},
        "ivf_flat": {"nlist": c.nlist},
        "ivf_pq": {"nlist": c.nlist, "pq_m": c.pq_m, "pq_bits": c.pq_bits},
        "hnsw": {"hnsw_m": c.hnsw_m, "ef_construction": c.ef_construction},
    }[c.kind]


def queries_per_second(
    index: ItemIndex,
    queries: np.ndarray,
    batch: int,
    k: int,
    seconds: float,
    settings: dict,
    query_categories: list[list[int]] | None = None,
) -> float:
    """Search batches of `batch` queries (cycling through `queries`, each with its own
    categories when given) for about `seconds`."""
    done, start = 0, time.perf_counter()
    while True:
        rows = np.arange(done, done + batch) % len(queries)
        if query_categories is not None:
            settings = {"query_categories": [query_categories[r] for r in rows]}
        index.search(queries[rows], k, **settings)
        done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def zipf_categories(n: int, mean_size: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [n]: a category per item, n / mean_size categories with Zipf(1)-like sizes
    (every category holds at least one item)."""
    count = max(1, n // mean_size)
    weights = 1.0 / np.arange(1, count + 1)
    categories = np.concatenate(
        [np.arange(count), rng.choice(count, n - count, p=weights / weights.sum())]
    )
    return rng.permutation(categories).astype(np.int64)


def category_rows(
    items: np.ndarray, queries: np.ndarray, cfg: BenchConfig, backend: str
) -> list[dict]:
    """Per-query category search on the exact index: sub-index vs faiss's selector."""
    rng = np.random.default_rng(cfg.seed)
    n, d = items.shape
    categories = zipf_categories(n, cfg.category_size, rng)
    # a query's categories: those of random items (size-biased, as a user's are)
    lists = [
        sorted({int(c) for c in categories[rng.integers(0, n, 4 * cfg.categories_per_query)]})[
            : cfg.categories_per_query
        ]
        for _ in range(len(queries))
    ]
    sizes = np.bincount(categories)
    searched = float(np.mean([sizes[c].sum() for c in lists]) / n)
    scores = queries @ items.T  # [Q, n] brute force
    k = cfg.k
    truth = []
    for row, cats in enumerate(lists):
        allowed = np.flatnonzero(np.isin(categories, cats))
        truth.append(allowed[np.argsort(-scores[row, allowed], kind="stable")[:k]])
    rows = []
    for path, limit in (("subindex", n), ("faiss_bitmap", 0)):
        index = build_index(
            items,
            categories=categories,
            config=IndexConfig(kind="flat", backend=backend, subindex_max_items=limit),
        )
        found = index.search(queries, k, query_categories=lists).ids
        recall = np.mean(
            [len(np.intersect1d(f[f >= 0], t)) / len(t) for f, t in zip(found, truth, strict=True)]
        )
        for batch in cfg.batches:
            qps = queries_per_second(index, queries, batch, k, cfg.seconds, {}, lists)
            rows.append(
                {
                    "path": path,
                    "backend": index.config.backend,
                    "n": n,
                    "d": d,
                    "categories": int(len(sizes)),
                    "categories_per_query": cfg.categories_per_query,
                    "searched_fraction": round(searched, 4),
                    "batch": batch,
                    "k": k,
                    "qps": round(qps, 1),
                    "recall_at_k": round(float(recall), 4),
                }
            )
    return rows


def environment() -> dict:
    """Machine, BLAS and faiss facts that the figures depend on."""
    faiss = import_faiss()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **provenance(),
        "machine": {
            **machine_info(),
            # set on these machines; it picks the BLAS kernel (reported, not changed)
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
        "faiss_version": faiss.__version__,
        "faiss_compile_options": faiss.get_compile_options(),
        "faiss_gpus": faiss.get_num_gpus(),
        # `architecture` is the OpenBLAS kernel that runs (faiss's own libopenblas first)
        "blas": [
            {
                key: lib.get(key)
                for key in (
                    "internal_api",
                    "prefix",
                    "version",
                    "architecture",
                    "threading_layer",
                    "num_threads",
                    "filepath",
                )
            }
            for lib in threadpool_info()
        ],
    }


def run_benchmark(cfg: BenchConfig, output: Path | None = None, progress: bool = True) -> dict:
    """Run every (n, d, kind, setting, batch) measurement; write JSON (and a PNG beside it)
    to `output` when given. Returns the report: environment, config, builds, rows."""
    backend = select_backend(cfg.backend)
    report = environment() | {
        "command": cfg.command(),
        "backend": backend,
        "config": asdict(cfg),
        "builds": [],
        "rows": [],
        "category_rows": [],
    }
    total = (
        sum(len(settings_of(kind, cfg)) for kind in cfg.kinds)
        * len(cfg.batches)
        * len(cfg.sizes)
        * len(cfg.dims)
    )
    bar = tqdm(total=total, unit="meas", disable=not progress, dynamic_ncols=True)
    for n in cfg.sizes:
        for d in cfg.dims:
            items, queries = clustered_data(n, d, cfg.queries, cfg.noise, cfg.seed)
            bar.set_description(f"n={n} d={d} exact top-{cfg.k}")
            truth = exact_top_k(items, queries, cfg.k)  # ids are positions 0..n-1
            if cfg.categories_per_query:
                bar.set_description(f"n={n} d={d} per-query categories")
                report["category_rows"] += category_rows(items, queries, cfg, backend)
            for kind in cfg.kinds:
                bar.set_description(f"n={n} d={d} build {kind}")
                index = build_index(
                    items,
                    config=IndexConfig(
                        kind=kind, backend=backend, hnsw_m=cfg.hnsw_m, seed=cfg.seed
                    ),
                )
                report["builds"].append(index.report | {"params": build_params(index)})
                for settings in settings_of(kind, cfg):
                    label = " ".join(f"{key}={value}" for key, value in settings.items())
                    bar.set_description(f"n={n} d={d} {kind} {label}".rstrip())
                    found = index.search(queries, cfg.k, **settings).ids
                    recall = recall_at_k(found, truth)
                    for batch in cfg.batches:
                        qps = queries_per_second(
                            index, queries, batch, cfg.k, cfg.seconds, settings
                        )
                        report["rows"].append(
                            {
                                "index": kind,
                                "params": settings,
                                "backend": index.config.backend,
                                "n": n,
                                "d": d,
                                "batch": batch,
                                "k": cfg.k,
                                "qps": round(qps, 1),
                                "recall_at_k": round(recall, 4),
                            }
                        )
                        bar.update()
                del index
                gc.collect()  # free this kind's memory before the next build (1M x 128)
    bar.close()
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        plot_recall_vs_qps(report, output.with_suffix(".png"))
    return report


def plot_recall_vs_qps(report: dict, path: Path) -> None:
    """One panel per (batch, n): recall@k against queries/s, a line per (kind, d)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    cfg, rows = report["config"], report["rows"]
    batches, sizes = cfg["batches"], cfg["sizes"]
    fig, axes = plt.subplots(
        len(batches), len(sizes), squeeze=False, figsize=(4.5 * len(sizes), 3.5 * len(batches))
    )
    colours = dict(
        zip(cfg["kinds"], plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False)
    )
    markers = dict(zip(cfg["dims"], "o^sD", strict=False))
    for ax, (batch, n) in zip(axes.flat, [(b, n) for b in batches for n in sizes], strict=True):
        for kind in cfg["kinds"]:
            for d in cfg["dims"]:
                points = [
                    (r["qps"], r["recall_at_k"])
                    for r in rows
                    if (r["index"], r["d"], r["batch"], r["n"]) == (kind, d, batch, n)
                ]
                if points:
                    qps, recall = zip(*sorted(points), strict=True)
                    ax.plot(
                        qps, recall, marker=markers[d], color=colours[kind], label=f"{kind} d={d}"
                    )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short decades
        ax.set_title(f"n={n:,} batch={batch}", fontsize=9)
        ax.set_xlabel("queries / s")
        ax.set_ylabel(f"recall@{cfg['k']}")
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(
        f"faiss {report['faiss_version']} on {report['backend']} "
        f"({report['machine']['cpu']}, {report['machine']['cpus']} cpus)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
