"""The README's claims that a test can check: its references point into the repository, its
demo block is the print of the committed demo summary, the state sizes it and the
architecture notes quote are the model's."""

from __future__ import annotations

import json
import re
import runpy
import shlex
from pathlib import Path

from hytrec.bench.demo import summary_lines
from hytrec.model.hytrec import HyTRec, HyTRecConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEMO_SUMMARY = ROOT / "benchmarks" / "results" / "demo-cpu.json"


def test_every_architecture_reference_points_to_a_file_in_the_repository():
    references = re.findall(r"[\w./-]*ARCHITECTURE\.md", README)
    assert references, "the README cites the architecture notes"
    for reference in references:
        path = (ROOT / reference).resolve()
        assert path.is_relative_to(ROOT) and path.is_file(), reference


def test_the_readme_demo_block_is_the_committed_summary():
    """Regenerate with `python -m hytrec.bench.demo benchmarks/results/demo-cpu.json`."""
    summary = json.loads(DEMO_SUMMARY.read_text())
    block = "\n".join(summary_lines(summary))
    assert f"```\n{block}\n```" in README
    assert summary["git_commit"] in README or summary["git_commit"][:12] in README


def test_the_architecture_notes_quote_the_models_state_size():
    model = HyTRec(HyTRecConfig())
    notes = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    model_bytes = model.state_bytes_per_user()
    assert f"{model_bytes:,} bytes per user" in notes
    assert f"so a slot costs {model_bytes + 8:,} B" in notes  # + the applied offset, int64


def test_the_readme_inspect_block_is_what_inspect_prints(
    shared_data, tmp_path, monkeypatch, capsys
):
    """The "Your own data" example: `benchmarks/shop_csv.py`, then `hytrec data inspect`."""
    from hytrec.cli import main

    write_shop_csv = runpy.run_path(str(ROOT / "benchmarks" / "shop_csv.py"))["write_shop_csv"]
    monkeypatch.chdir(tmp_path)
    write_shop_csv(shared_data / "taobao" / "UserBehavior_head84k.csv.gz", Path("shop.csv"))
    section = README[README.index("## Your own data") :]
    command = re.search(r"hytrec data inspect shop\.csv .*\n", section)
    cols = re.search(r"cols=\((.*?)\)", section, re.S).group(1)
    assert command and "${cols[@]}" in command.group(0)
    args = shlex.split(cols)
    assert main(["data", "inspect", "shop.csv", *args]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    assert f"```\n{printed}\n```" in section
