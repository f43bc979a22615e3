"""HiSAC's figures: the semantic-IDs build report (`hytrec build-semantic-ids`) and hard vs
soft routing (`hytrec benchmark hisac-routing`). Fidelity: "reading" (`model/hisac.py`)."""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from hytrec.bench.reports import machine_info, provenance
from hytrec.index.semantic_ids import SemanticIdConfig, build_from_checkpoint


def _same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def semantic_ids_report(
    checkpoint: str, out: str | Path, config: SemanticIdConfig, check_repeat: bool = True
) -> dict:
    """Build semantic IDs over `checkpoint`'s item table into `out`; with `check_repeat`
    build them a second time (same seed) and compare every file byte by byte."""
    began = time.perf_counter()
    sids = build_from_checkpoint(checkpoint, config)
    build_s = time.perf_counter() - began
    sids.save(out)
    report = {
        "benchmark": "semantic-ids",
        "fidelity": "reading",
        "method": "RQ-KMeans (faiss k-means on residuals, level by level), a dedup level, "
        "top-r routes per item and level (own node first); the semantic space is the "
        "checkpoint's frozen item table, L2-normalised (a substitution: the shared sets "
        "have no content features)",
        **{k: v for k, v in sids.meta.items() if k != "report"},
        **sids.meta["report"],
        "build_s": round(build_s, 2),
        "saved": str(out),
    }
    if check_repeat:
        with tempfile.TemporaryDirectory(prefix="hytrec-sids-") as second:
            build_from_checkpoint(checkpoint, config).save(second)
            report["second_build_byte_identical"] = _same_bytes(Path(out), Path(second))
    report |= {
        "command": " ".join(shlex.quote(a) for a in ["hytrec", *sys.argv[1:]]),
        **provenance(),
        "machine": machine_info(),
    }
    return report


def write_json(report: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
