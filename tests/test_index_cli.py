"""`hytrec index build|info|search` and a tiny `hytrec benchmark index` run."""

from __future__ import annotations

import json

import numpy as np

from hytrec.bench.index_benchmark import clustered_data
from hytrec.cli import main

ROW_KEYS = {"index", "backend", "n", "d", "batch", "k", "qps", "recall_at_k"}


def test_build_info_search(tmp_path, capsys):
    vectors, queries = clustered_data(500, 8, 4, noise=0.75, seed=0)
    ids = np.arange(1, 501, dtype=np.int64)
    categories = np.arange(500, dtype=np.int64) % 4
    for name, array in (("v", vectors), ("ids", ids), ("cats", categories), ("q", queries)):
        np.save(tmp_path / f"{name}.npy", array)
    out = tmp_path / "ix"
    assert (
        main(
            [
                "index",
                "build",
                "--vectors",
                str(tmp_path / "v.npy"),
                "--ids",
                str(tmp_path / "ids.npy"),
                "--categories",
                str(tmp_path / "cats.npy"),
                "--queries",
                str(tmp_path / "q.npy"),
                "--kind",
                "hnsw",
                "--model-version",
                "m1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["kind"] == "hnsw" and report["n"] == 500 and 0 <= report["recall_at_k"] <= 1

    assert main(["index", "info", str(out)]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert (meta["dim"], meta["model_version"], meta["kind"]) == (8, "m1", "hnsw")

    assert (
        main(
            [
                "index",
                "search",
                str(out),
                "--queries",
                str(tmp_path / "q.npy"),
                "-k",
                "5",
                "--exclude",
                "1,2,3",
                "--categories",
                "0,1",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert len(row["ids"]) == 5 and not {1, 2, 3} & set(row["ids"])
        assert all(categories[i - 1] in (0, 1) for i in row["ids"])
        assert row["scores"] == sorted(row["scores"], reverse=True)


def test_quick_benchmark_writes_valid_rows(tmp_path, capsys):
    output = tmp_path / "index-cpu.json"
    assert main(["benchmark", "index", "--quick", "--no-progress", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert output.with_suffix(".png").stat().st_size > 0
    cfg = report["config"]
    settings = sum(
        len(cfg["nprobes"])
        if kind.startswith("ivf")
        else len(cfg["ef_searches"])
        if kind == "hnsw"
        else 1
        for kind in cfg["kinds"]
    )
    assert len(report["rows"]) == settings * len(cfg["batches"]) * len(cfg["sizes"]) * len(
        cfg["dims"]
    )
    for row in report["rows"]:
        assert ROW_KEYS <= row.keys()
        assert row["qps"] > 0 and 0 <= row["recall_at_k"] <= 1 and row["k"] == cfg["k"]
        if row["index"] == "flat":
            assert row["recall_at_k"] == 1.0
    assert report["command"].startswith("hytrec benchmark index --sizes 2000")
    category_rows = report["category_rows"]
    assert {r["path"] for r in category_rows} == {"subindex", "faiss_bitmap"}
    assert len(category_rows) == 2 * len(cfg["batches"]) * len(cfg["sizes"]) * len(cfg["dims"])
    for row in category_rows:  # both paths are exact on the flat index
        assert row["recall_at_k"] == 1.0 and row["qps"] > 0
        assert 0 < row["searched_fraction"] < 1
    assert report["faiss_version"] and report["blas"] and report["date"]
