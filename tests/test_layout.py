"""The architecture's one-way dependencies: bench -> stream -> index, model -> kernels; no
cycles."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hytrec"

# what each package may import from the project (besides itself)
ALLOWED = {
    "kernels": set(),
    "model": {"kernels"},
    "index": {"model"},
    "stream": {"index", "model", "kernels"},
    "bench": {"stream", "index", "model", "kernels"},
}


def project_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= {n.split(".")[1] for n in names if n.startswith("hytrec.") and n.count(".")}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_the_architecture_allows(package):
    for path in sorted((PACKAGE / package).rglob("*.py")):
        wrong = project_imports(path) - ALLOWED[package] - {package}
        assert not wrong, f"{path.relative_to(PACKAGE.parent)} imports hytrec.{sorted(wrong)}"


def test_check_parity_command_prints_the_figures():
    out = subprocess.run(
        [sys.executable, "-m", "hytrec.cli", "check", "parity"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    report = json.loads(out.stdout)
    for key in (
        "chunked_vs_reference_max_abs",
        "step_vs_reference_max_abs",
        "stream_vs_parallel_max_abs",
        "state_bytes_per_user",
    ):
        assert key in report
    assert report["stream_vs_parallel_max_abs"] <= 1e-4
