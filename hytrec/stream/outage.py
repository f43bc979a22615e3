"""Broker outages: retry what the broker refused, log once per change of state.

When the broker goes away (a restart, a network cut), every client the worker holds fails
for a while: aiokafka logs every failed connection (dozens of lines a second), and a
produce may come back with an error, even a non-retriable `UnknownError` from a broker
that is still starting. None of that is a reason to stop: `deliver` retries each record
until the broker takes it, and `Outage` logs one line when an operation starts failing and
one when it works again. Only errors that no retry can fix (a record too large, a topic
that may not be written, a local encoding error) come back to the caller, which logs and
counts them.

`RepeatFilter` keeps the client libraries' own logs readable in an outage: a message seen
in the last `window_s` seconds is dropped, and the next one let through says how many were.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import errors as aioerrors

log = logging.getLogger(__name__)

# errors a retry cannot fix: the record itself or the client's rights are at fault
PERMANENT_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(aioerrors, name)
    for name in (
        "MessageSizeTooLargeError",
        "RecordListTooLargeError",
        "InvalidTopicError",
        "TopicAuthorizationFailedError",
        "ClusterAuthorizationFailedError",
        "UnsupportedVersionError",
        "UnsupportedForMessageFormatError",
        "CorruptRecordException",
        "InvalidRequiredAcksError",
        "ProducerClosed",
    )
    if hasattr(aioerrors, name)
) + (ValueError, TypeError)


def is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, PERMANENT_ERRORS)


class Outage:
    """One warning when `what` starts failing, one when it works again."""

    def __init__(self, what: str):
        self.what = what
        self.since: float | None = None
        self.failures = 0
        self.outages = 0  # how many times it started failing

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            self.outages += 1
            log.warning(
                "%s failed (%s: %s); retrying until the broker answers",
                self.what,
                type(exc).__name__,
                exc,
            )

    def recovered(self) -> None:
        if self.since is not None:
            log.warning(
                "%s works again after %.1f s (%d failed tries)",
                self.what,
                time.monotonic() - self.since,
                self.failures,
            )
            self.since, self.failures = None, 0

    @property
    def down(self) -> bool:
        return self.since is not None


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    key: bytes | None
    value: bytes
    partition: int | None = None


async def deliver(
    producer: Any,
    records: Sequence[Record],
    outage: Outage,
    stopping: Callable[[], bool],
    backoff_s: tuple[float, float] = (0.1, 5.0),
) -> dict[int, BaseException]:
    """Send `records` with a Faust producer and wait for the broker's acknowledgements,
    sending again what failed for a reason a retry can fix, with backoff, until every record
    is in (or `stopping()`: then the last errors come back). Returns index -> error for the
    records that cannot be sent (permanent errors)."""
    todo = list(range(len(records)))
    failed: dict[int, BaseException] = {}
    delay = backoff_s[0]
    while todo:
        results = await asyncio.gather(
            *(_send(producer, records[i]) for i in todo), return_exceptions=True
        )
        retry = []
        for i, result in zip(todo, results, strict=True):
            if not isinstance(result, BaseException):
                continue
            if isinstance(result, asyncio.CancelledError):
                raise result
            if is_permanent(result) or stopping():
                failed[i] = result
            else:
                retry.append(i)
                outage.failed(result)
        if not retry:
            outage.recovered()
            break
        await asyncio.sleep(delay)
        delay = min(delay * 2, backoff_s[1])
        todo = retry
    return failed


async def _send(producer: Any, record: Record) -> Any:
    delivery = await producer.send(
        record.topic, record.key, record.value, record.partition, None, None
    )
    return await delivery


async def until_answered(
    call: Callable[[], Any],
    outage: Outage,
    stopping: Callable[[], bool],
    backoff_s: tuple[float, float] = (0.2, 5.0),
) -> Any:
    """Run the blocking `call()` in a thread until it returns (a broker request of a
    kafka-python client); failures are retried with backoff and logged through `outage`,
    permanent ones raise, and so does the last one once `stopping()`."""
    delay = backoff_s[0]
    loop = asyncio.get_running_loop()
    while True:
        try:
            result = await loop.run_in_executor(None, call)
        except Exception as exc:  # noqa: BLE001 - kafka-python's errors vary by version
            if is_permanent(exc) or stopping():
                raise
            outage.failed(exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, backoff_s[1])
            continue
        outage.recovered()
        return result


class RepeatFilter(logging.Filter):
    """Drop a log message (same logger, same text) seen in the last `window_s` seconds; the
    next one let through tells how many were dropped."""

    def __init__(self, window_s: float = 30.0, loggers: tuple[str, ...] = ("aiokafka", "kafka")):
        super().__init__()
        self.window_s = window_s
        self.loggers = loggers
        self.seen: dict[tuple[str, str], tuple[float, int]] = {}  # -> (first shown, dropped)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.loggers):
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        shown, dropped = self.seen.get(key, (float("-inf"), 0))
        if now - shown < self.window_s:
            self.seen[key] = (shown, dropped + 1)
            return False
        if dropped:
            record.msg = f"{record.msg} [and {dropped} more like it in {self.window_s:g} s]"
        self.seen[key] = (now, 0)
        if len(self.seen) > 10_000:  # messages that embed changing values: forget old ones
            self.seen = {k: v for k, v in self.seen.items() if now - v[0] < self.window_s}
        return True


def quiet_client_logs(window_s: float = 30.0) -> RepeatFilter:
    """Install a `RepeatFilter` on every handler of the root logger (after Faust set up
    logging); the filter."""
    repeat = RepeatFilter(window_s)
    for handler in logging.getLogger().handlers:
        handler.addFilter(repeat)
    return repeat
