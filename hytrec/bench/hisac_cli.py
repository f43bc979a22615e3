"""`hytrec build-semantic-ids` and `hytrec benchmark hisac-routing`: their options, and
handlers that import the builders lazily (torch and faiss are slow to import)."""

from __future__ import annotations

import argparse
from pathlib import Path

RESULTS = Path("benchmarks/results")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def register(commands, benchmarks) -> None:
    p = commands.add_parser(
        "build-semantic-ids",
        help="HiSAC's semantic IDs: residual k-means over a checkpoint's item table",
        description="Residual k-means (faiss, seeded) over the frozen item table of a trained "
        "checkpoint, a dedup level, node centres and top-r routes per item; saved with "
        "checksums and the model version. Prints and writes the report (utilisation and "
        "reconstruction error per level, unique_paths_share, a second build compared byte "
        "by byte).",
    )
    p.add_argument("--checkpoint", required=True, help="a trained checkpoint directory")
    p.add_argument("--out", required=True, help="directory for the semantic IDs")
    p.add_argument("--sizes", type=_ints, default=(64, 64, 64), help="codes per level: 64,64,64")
    p.add_argument("--route-top", type=int, default=4, help="r: routes per item and level")
    p.add_argument("--niter", type=int, default=25, help="k-means iterations per level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", help="also write the report JSON here")
    p.add_argument(
        "--no-repeat", action="store_true", help="skip the second build (byte comparison)"
    )
    p.set_defaults(func=_build_semantic_ids)

    p = benchmarks.add_parser(
        "hisac-routing",
        help="HiSAC: quantisation error and long-tail retention, hard vs soft routing",
        description="Activates each test user's interest agents from the semantic IDs and "
        "measures, over every behaviour of the history and over the long tail, the "
        "quantisation error |s_i - sum_p beta_{i,p} mu(p)|^2 and the share of behaviours "
        "kept (weight >= 0.1 on an agent), for hard routing and soft routing at several "
        "temperatures; also the share of users whose serving map overflows its cap. Writes "
        "benchmarks/results/hisac-routing-DATASET.{json,png}.",
    )
    p.add_argument("--dataset", default="taobao")
    p.add_argument("--semantic-ids", required=True, help="a build-semantic-ids directory")
    p.add_argument("--max-users", type=int, help="the first N test users (default: all)")
    p.add_argument(
        "--output", help="report stem (default: benchmarks/results/hisac-routing-DATASET)"
    )
    p.set_defaults(func=_benchmark_routing)


def _build_semantic_ids(args: argparse.Namespace) -> int:
    import json

    from hytrec.bench.hisac_benchmark import semantic_ids_report, write_json
    from hytrec.index.semantic_ids import SemanticIdConfig

    config = SemanticIdConfig(
        sizes=args.sizes, route_top=args.route_top, niter=args.niter, seed=args.seed
    )
    report = semantic_ids_report(args.checkpoint, args.out, config, not args.no_repeat)
    print(json.dumps(report, indent=2))
    if args.report:
        write_json(report, args.report)
    return 0


def _benchmark_routing(args: argparse.Namespace) -> int:
    from hytrec.bench.hisac_benchmark import RoutingConfig, run_routing
    from hytrec.model.data import load_named

    cfg = RoutingConfig(
        dataset=args.dataset, semantic_ids=args.semantic_ids, max_users=args.max_users
    )
    output = args.output or str(RESULTS / f"hisac-routing-{args.dataset}")
    report = run_routing(cfg, load_named(args.dataset), output)
    for row in report["rows"]:
        print(row)
    print(f"share of users hitting the cap: {report['share_of_users_hitting_the_cap']:.3f}")
    print(f"-> {output}.json and {output}.png")
    return 0
