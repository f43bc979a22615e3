"""The embedded broker: starts, answers, creates topics, and never outlives its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from test_stream_support import REPO, wait_for

from hytrec.stream.broker import EmbeddedBroker, TopicConfig, ensure_topics

pytestmark = pytest.mark.integration


def gone(pid: int) -> bool:
    """True once `pid` no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_topics_are_created_with_their_partition_counts_and_checked():
    topics = TopicConfig(behaviors_partitions=6, recommendations_partitions=3, dlq_partitions=2)
    with EmbeddedBroker(topics=topics) as broker:
        pid = broker.pid
        assert ensure_topics(broker.bootstrap, topics) == {
            "behaviors": 6,
            "recommendations": 3,
            "behaviors-dlq": 2,
        }
        with pytest.raises(ValueError, match="behaviors"):
            ensure_topics(broker.bootstrap, TopicConfig())  # 4 wanted, 6 there
    assert gone(pid)


def test_broker_dies_with_a_parent_killed_by_sigkill():
    script = (
        "from hytrec.stream.broker import EmbeddedBroker\n"
        "import time\n"
        "b = EmbeddedBroker(); b.start(); print(b.pid, flush=True); time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        tansu = int(parent.stdout.readline())
        assert not gone(tansu)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        wait_for(lambda: gone(tansu), 10, f"tansu pid {tansu} to exit")
    finally:
        parent.kill()
        parent.wait()


def test_broker_command_stops_its_broker_on_sigterm():
    command = subprocess.Popen(
        [sys.executable, "-m", "hytrec.cli", "broker", "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = command.stdout.readline()
        assert line.startswith("broker ready at 127.0.0.1:"), line
        tansu = int(line.split("(pid ")[1].split(")")[0])
        command.send_signal(signal.SIGTERM)
        assert command.wait(20) == 0
        wait_for(lambda: gone(tansu), 10, f"tansu pid {tansu} to exit")
    finally:
        command.kill()
        command.wait()


def test_a_taken_port_is_reported():
    with EmbeddedBroker(topics=None) as first:
        with pytest.raises(RuntimeError, match="taken"):
            EmbeddedBroker(port=first.port, topics=None).start()
        command = subprocess.run(
            [sys.executable, "-m", "hytrec.cli", "broker", "--port", str(first.port)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert command.returncode == 1
    assert f"port {first.port} on 127.0.0.1 is taken" in command.stderr
    assert "--port 0" in command.stderr and "Traceback" not in command.stderr


def test_the_broker_listens_where_every_client_looks_by_default():
    """`hytrec broker` then `hytrec worker`/`replay`/`tail` with no --bootstrap: one port."""
    from hytrec.cli import build_parser
    from hytrec.stream.app import WorkerConfig

    parser = build_parser()
    port = parser.parse_args(["broker"]).port
    for command in (["worker", "--engine", "m:f"], ["replay", "x"], ["tail"]):
        bootstrap = parser.parse_args(command).bootstrap
        assert bootstrap.endswith(f":{port}"), (command, bootstrap)
    assert WorkerConfig().bootstrap.endswith(f":{port}")
