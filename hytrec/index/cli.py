"""`hytrec` subcommands of the index package: `index build|info|search`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

KINDS = ("auto", "flat", "ivf_flat", "ivf_pq", "hnsw")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def register(commands, benchmarks) -> None:
    """Add this package's subcommands to `hytrec`."""
    index = commands.add_parser("index", help="FAISS item index: build, info, search")
    sub = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    build = sub.add_parser(
        "build",
        help="build an index and save it to a directory",
        description="Build from a HyTRec checkpoint or from .npy files and "
        "print the build report (recall@k with --queries).",
    )
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="HyTRec checkpoint directory")
    source.add_argument("--vectors", help=".npy float32 [N, d] item vectors")
    build.add_argument("--ids", help=".npy int64 [N] item ids (default 0..N-1)")
    build.add_argument("--categories", help=".npy int64 [N] item categories")
    build.add_argument("--model-version", help="recorded in the metadata (with --vectors)")
    build.add_argument("--queries", help=".npy float32 [Q, d]: measure recall@k on a sample")
    build.add_argument("--out", required=True, help="directory to save the index into")
    build.add_argument("--kind", choices=KINDS, default="auto")
    build.add_argument("--backend", choices=("auto", "cpu", "gpu"), default="auto")
    build.add_argument("--exact-max-items", type=int)
    build.add_argument("--nlist", type=int)
    build.add_argument("--nprobe", type=int)
    build.add_argument("--pq-m", type=int)
    build.add_argument("--hnsw-m", type=int)
    build.add_argument("--ef-search", type=int)
    build.add_argument("--seed", type=int)
    build.set_defaults(func=_build)

    info = sub.add_parser("info", help="print a saved index's metadata as JSON")
    info.add_argument("directory")
    info.set_defaults(func=_info)

    search = sub.add_parser("search", help="search a saved index, print JSON lines")
    search.add_argument("directory")
    search.add_argument("--queries", required=True, help=".npy float32 [Q, d]")
    search.add_argument("-k", "--k", type=int, default=10)
    search.add_argument("--exclude", type=_ints, help="ids excluded for every query: 1,2,3")
    search.add_argument("--categories", type=_ints, help="only these categories: 4,5")
    search.add_argument("--nprobe", type=int)
    search.add_argument("--ef-search", type=int)
    search.add_argument("--backend", choices=("auto", "cpu", "gpu"), default="auto")
    search.set_defaults(func=_search)


def _overrides(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """The options the user gave (not None), keyed by config field name."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _build(args: argparse.Namespace) -> int:
    import numpy as np

    from hytrec.index.item_index import IndexConfig, build_from_checkpoint, build_index

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = IndexConfig(
        kind=args.kind,
        backend=args.backend,
        **_overrides(
            args, ("exact_max_items", "nlist", "nprobe", "pq_m", "hnsw_m", "ef_search", "seed")
        ),
    )
    queries = np.load(args.queries) if args.queries else None
    if args.checkpoint:
        index = build_from_checkpoint(args.checkpoint, config, queries)
    else:
        index = build_index(
            np.load(args.vectors),
            np.load(args.ids) if args.ids else None,
            np.load(args.categories) if args.categories else None,
            config,
            queries,
            args.model_version,
        )
    index.save(args.out)
    print(json.dumps(index.report | {"saved": str(Path(args.out).resolve())}))
    return 0


def _info(args: argparse.Namespace) -> int:
    from hytrec.index.item_index import read_metadata

    print(json.dumps(read_metadata(args.directory), indent=2))
    return 0


def _search(args: argparse.Namespace) -> int:
    import numpy as np

    from hytrec.index.item_index import ItemIndex

    index = ItemIndex.load(args.directory, backend=args.backend)
    queries = np.load(args.queries)
    exclude = [args.exclude] * len(queries) if args.exclude else None
    result = index.search(
        queries,
        args.k,
        exclude=exclude,
        categories=args.categories,
        nprobe=args.nprobe,
        ef_search=args.ef_search,
    )
    for ids, scores in zip(result.ids, result.scores, strict=True):
        print(json.dumps({"ids": ids.tolist(), "scores": [round(float(s), 6) for s in scores]}))
    return 0
