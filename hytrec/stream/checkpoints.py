"""Checkpoints and restores of user state: what makes state effectively-once.

Checkpoint. Processed messages wait in `unacked` and the users they changed in `dirty`. A
checkpoint first *cuts* (under the worker's flush lock, so between two batches): it takes
the waiting messages and copies the changed users' states (`engine.export_states`),
labelled with the `behaviors` log their offsets belong to. Then, in a task while the next
batches run, it writes one snapshot per user to the group's user-state topic
(co-partitioned with `behaviors`, key = user id; see `snapshots.py`), waits until the
broker confirmed them all, checks that the `behaviors` log is still the one the offsets
belong to (before writing the snapshots too: offsets of a replaced log are not written),
and only then acknowledges the messages: Faust commits an offset only past
events whose effect is published *and* saved. Checkpoints confirm one after another.
Engines without `export_states` (test engines) write no snapshots: their messages are
acknowledged right after the publish.

A checkpoint that cannot be written (the broker refused a snapshot for good) is not a
reason to stop: its users are marked changed again and its messages wait for the next
checkpoint, which writes their states as they are then. Messages of a log that was
replaced meanwhile are released without an acknowledgement (`newlog.py`).

Restore. When partitions are assigned, the worker (before it processes any event of the
new assignment: the agent waits, and so does Faust's resume) checkpoints what it holds,
checks whether the `behaviors` topic was made again (then the users' offsets are reset
before anything is read), drops the users of partitions it lost, and reads the user-state
partitions it holds up to a sentinel it appends itself (Tansu misreports end offsets): for
each user the snapshot of the current log with the highest applied offset replaces the
store's state when it is ahead of it. Partitions it kept are read only from where it
stopped last time. The engine then skips every replayed event at or below a user's applied
offset.

A corrupt snapshot record (`snapshots.CorruptRecord`) never makes the worker restore an
older state and move on: the user's last good state (its best valid snapshot, or what the
worker holds, or none) is restored and the user's events from just past that state's
offset up to where the group resumes consuming are read from `behaviors` and applied
before any new event; the user is written again at the next checkpoint, which supersedes
the corrupt record. A corrupt record that does not say whose it is stops the worker with
an error naming topic, partition and offset.

Ordering invariants, asserted where they matter:
- a cut happens under the flush lock (no batch half-way) and never after a failure;
- a checkpoint acknowledges its messages only after its own snapshots and every earlier
  checkpoint are confirmed, never after a failure, and only those of the current log;
- no event of a partition reaches the engine before that partition's states are restored
  (`wait_restored`; the worker asserts it again before a batch runs).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hytrec.stream.outage import Outage, Record, deliver, until_answered
from hytrec.stream.schemas import InvalidMessage
from hytrec.stream.snapshots import (
    NO_OFFSET,
    CorruptRecord,
    SnapshotRead,
    ahead_of,
    decode_snapshot,
    encode_snapshot,
    read_snapshots,
)
from hytrec.stream.tail import committed_offsets, read_range

if TYPE_CHECKING:
    from hytrec.stream.worker import BatchingWorker, Pending

log = logging.getLogger(__name__)


class CorruptSnapshotError(RuntimeError):
    """A snapshot record that cannot be decoded and does not say whose it is."""


@dataclass
class Cut:
    """What one checkpoint covers."""

    unacked: list[Pending]
    snapshots: list = field(default_factory=list)
    users: dict[str, int] = field(default_factory=dict)  # user -> partition, to redo
    log_id: str | None = None
    started: float = 0.0
    failed_before: int = 0  # checkpoints failed when it was cut (see `_confirm`)


class Checkpoints:
    def __init__(self, worker: BatchingWorker):
        self.worker = worker
        # messages processed but not yet covered by a checkpoint, users changed since the
        # last one, each known user's behaviours partition
        self.unacked: list[Pending] = []
        self.redo: list[Pending] = []  # of checkpoints that failed, in order: next one first
        self.dirty: set[str] = set()
        self.partition_of: dict[str, int] = {}
        # the behaviours partitions whose states are restored (events may be processed),
        # and where their user-state partitions were read up to
        self.assignment: set[int] = set()
        self.state_position: dict[int, int] = {}
        self.restoring: asyncio.Future | None = None
        self.last_checkpoint = time.monotonic()
        self.confirming: asyncio.Future | None = None  # the newest checkpoint's task
        self.outage = Outage("writing snapshots")
        self.restore_outage = Outage("restoring user states")

    # ------------------------------------------------------------------ bookkeeping

    def processed(self, pending: list[Pending], changed: dict[str, int]) -> None:
        """A batch ran and was published: its messages wait for the next checkpoint, and
        the users whose state changed (user -> behaviours partition) are to be saved."""
        self.unacked.extend(pending)
        self.dirty.update(changed)
        self.partition_of.update(changed)

    def users_of(self, partition: int) -> list[str]:
        return [u for u, p in self.partition_of.items() if p == partition]

    def new_log(self, partition: int, users: list[str]) -> None:
        """The partition's log was replaced: its users' snapshots go into the new log (the
        old ones are gone with it, or belong to the old log), and its user-state partition
        is read from the start."""
        self.dirty.update(users)
        self.state_position.pop(partition, None)

    @property
    def waiting(self) -> bool:
        """Messages wait for a checkpoint (processed, or of one that failed)."""
        return bool(self.unacked or self.redo)

    def due(self) -> bool:
        if not self.worker.snapshots:
            return True
        interval = self.worker.config.snapshot_interval_s
        return interval <= 0 or time.monotonic() - self.last_checkpoint >= interval

    # ------------------------------------------------------------------ checkpoint

    async def start(self) -> asyncio.Future:
        """Under the flush lock: cut what the checkpoint covers (the messages processed so
        far and the states of the users they changed, copied now), then write the snapshots
        and acknowledge the messages in a task, while the next batches run. The task
        (awaited where everything must be acknowledged before going on)."""
        worker = self.worker
        assert worker.flush_lock.locked(), "a checkpoint cut between two batches only"
        assert worker.failed is None, "nothing is checkpointed after a failure"
        # a failed checkpoint's messages first: acknowledgements keep consumption order
        # (Faust may commit past a message not acknowledged when the partition has no
        # commit yet, so later messages must never be acknowledged before earlier ones)
        cut = Cut(
            self.redo + self.unacked,
            log_id=worker.logs.log_id,
            started=time.perf_counter(),
            failed_before=worker.stats.checkpoints_failed,
        )
        self.redo, self.unacked = [], []
        if worker.snapshots and self.dirty:
            cut.users = {u: self.partition_of[u] for u in self.dirty if u in self.partition_of}
            self.dirty = set()
            cut.snapshots = await worker.on_engine_thread(
                worker.engine.export_states, cut.users, cut.log_id or ""
            )
        self.last_checkpoint = time.monotonic()
        previous = self.confirming
        self.confirming = asyncio.ensure_future(self._confirm(cut, previous))
        return self.confirming

    async def _confirm(self, cut: Cut, previous: asyncio.Future | None) -> bool:
        """Write the snapshots, wait for the broker, check the log, then acknowledge the
        messages they cover (only now may Faust commit past these offsets). Whether it
        did. A checkpoint cut before an earlier one failed is redone too (its messages come
        after the failed one's, which it does not hold), in order."""
        worker = self.worker
        if previous is not None:
            await previous  # never raises
        if worker.stats.checkpoints_failed > cut.failed_before:
            self._redo(cut)
            return False
        try:
            records, failed = [], {}
            if cut.snapshots and not await self._log_still(cut):
                cut.snapshots = []  # offsets of a replaced log: not written at all
            if cut.snapshots:
                records, failed = await self._write(cut.snapshots)
            if failed:
                first = next(iter(failed.values()))
                log.error(
                    "checkpoint: %d of %d snapshots could not be written (first: %s: %s); "
                    "their users are saved again at the next checkpoint",
                    len(failed),
                    len(records),
                    type(first).__name__,
                    first,
                )
                self._redo(cut)
                return False
            same_log = await self._log_still(cut)  # again: the broker may have gone meanwhile
            if worker.failed is not None:
                return False  # stopping: nothing more is acknowledged
            assert previous is None or previous.done(), "checkpoints confirm in order"
            released = 0
            for p in cut.unacked:
                if not same_log or p.generation != worker.logs.generation_of(p.partition):
                    p.release()  # of a gone log: never committed into the new one
                    released += 1
                else:
                    await worker.stream.ack(p.event)
            if released:
                log.warning(
                    "checkpoint: %d messages of a replaced behaviors log released without "
                    "acknowledgement",
                    released,
                )
        except Exception as exc:
            await worker.stop_on(exc, "checkpoint of %d snapshots failed", len(cut.snapshots))
            return False
        stats = worker.stats
        stats.snapshots_written += len(records)
        stats.snapshot_bytes += sum(len(value) for _, _, value in records)
        stats.checkpoints += 1
        stats.checkpoint_seconds += time.perf_counter() - cut.started
        return True

    async def _write(self, snapshots: list) -> tuple[list, dict]:
        """Encode and send snapshots to the group's user-state topic; wait for the broker.
        (the records as (user, partition, value), index -> error of those it refused)."""
        worker = self.worker
        records = await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(_encode_all, snapshots)
        )
        topic = worker.config.state_topic
        failed = await deliver(
            worker.app.producer,
            [Record(topic, user.encode(), value, p) for user, p, value in records],
            self.outage,
            worker.stopping,
        )
        return records, failed

    async def write_states(self, engine: Any, users: dict[str, int]) -> bool:
        """Write these users' states (user -> behaviours partition) of `engine`, which need
        not be the serving one (a swap writes the new model's states before it serves), and
        wait for the broker; whether it took them all."""
        snapshots = await asyncio.get_running_loop().run_in_executor(
            None, engine.export_states, users, self.worker.logs.log_id or ""
        )
        records, failed = await self._write(snapshots)
        self.worker.stats.snapshots_written += len(records) - len(failed)
        self.worker.stats.snapshot_bytes += sum(len(value) for _, _, value in records)
        return not failed

    async def _log_still(self, cut: Cut) -> bool:
        """Whether the behaviors topic is still the one the cut's offsets belong to (the
        log id is learned at the first assignment; without one there is nothing to check)."""
        return cut.log_id is None or await self.worker.logs.current_log_id() == cut.log_id

    def _redo(self, cut: Cut) -> None:
        """A checkpoint not written: its users are saved, and its messages acknowledged, by
        the next checkpoint cut (checkpoints cut meanwhile are redone too, in order)."""
        self.dirty.update(u for u in cut.users if u in self.partition_of)
        self.redo.extend(cut.unacked)
        self.worker.stats.checkpoints_failed += 1

    # ------------------------------------------------------------------ rebalances

    def on_assigned(self, assigned: set) -> None:
        """Faust's signal: start restoring the new assignment's states (the agent and
        Faust's resume wait for it; see `wait_restored`)."""
        behaviors = self.worker.config.topics.behaviors
        partitions = {tp.partition for tp in assigned if tp.topic == behaviors}
        previous = self.restoring
        self.restoring = asyncio.ensure_future(self._reassign(partitions, previous))

    async def wait_restored(self, partition: int) -> bool:
        """No event of a newly assigned partition before that partition's user states;
        False for a partition that was never assigned (after a warning)."""
        deadline = time.monotonic() + 5.0
        while partition not in self.assignment:
            if self.restoring is not None and not self.restoring.done():
                await self.restoring
            elif time.monotonic() > deadline:
                log.warning("an event of partition %d, which was never assigned", partition)
                return False
            else:
                await asyncio.sleep(0.01)
        return True

    async def wait_all_restored(self) -> None:
        """Faust's on_rebalance_complete signal, awaited before it resumes the partitions:
        wait for a restore in progress. Not before the engine exists: Faust starts the task
        that builds it only after this first rebalance (the agent waits then)."""
        if self.worker.ready.is_set() and self.restoring is not None:
            await self.restoring

    async def _reassign(self, partitions: set[int], previous: asyncio.Future | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        worker = self.worker
        await worker.ready.wait()
        try:
            async with worker.flush_lock:
                await worker.flush_locked(checkpoint=True)  # usually done on revocation
                lost = self.assignment - partitions
                self.assignment = set()  # events wait until the states are back
                # a topic made again (the broker lost its data): offsets reset first
                await worker.logs.check_topic(partitions, flushed=True)
                if worker.snapshots:
                    await self._restore(partitions, lost)
                self.assignment = set(partitions)
        except Exception as exc:
            await worker.stop_on(exc, "restoring user states failed")
            raise

    async def _restore(self, partitions: set[int], lost: set[int]) -> None:
        worker = self.worker
        started = time.perf_counter()
        gone = [u for u, p in self.partition_of.items() if p in lost]
        for user in gone:
            del self.partition_of[user]
            self.dirty.discard(user)
        for p in lost:
            self.state_position.pop(p, None)
            worker.run_through.pop(p, None)  # others run it now
        dropped = await worker.on_engine_thread(worker.engine.drop_users, gone)
        config = worker.config
        found: SnapshotRead = await until_answered(
            functools.partial(
                read_snapshots,
                config.bootstrap,
                config.state_topic,
                sorted(partitions),
                dict(self.state_position),
                config.restore_timeout_s,
                worker.logs.log_id,
            ),
            self.restore_outage,
            worker.stopping,
        )
        newly = partitions - set(self.state_position)  # not read before: Faust seeks them
        restored = await worker.on_engine_thread(self._import_states, found.latest)
        replayed = await self._recover_corrupt(found.corrupt, newly)
        self.state_position.update(found.ends)
        stats = worker.stats
        stats.users_restored += restored
        stats.users_dropped += dropped
        stats.snapshots_other_log += found.other_log
        stats.snapshots_corrupt += len(found.corrupt) + found.superseded
        stats.restore_seconds += time.perf_counter() - started
        log.info(
            "assignment %s: restored %d of %d users from %s, dropped %d, %d events replayed "
            "for %d corrupt snapshots (%.2f s)",
            sorted(partitions),
            restored,
            len(found.latest),
            config.state_topic,
            dropped,
            replayed,
            len(found.corrupt),
            time.perf_counter() - started,
        )

    def _import_states(self, latest: dict[str, Any]) -> int:
        """Runs on the engine's thread: decode the snapshots ahead of the store, import."""
        engine = self.worker.engine
        store = getattr(engine, "store", None)
        snapshots = []
        for header, value in latest.values():
            self.partition_of.setdefault(header.user_id, header.partition)
            if ahead_of(header, store):
                snapshots.append(decode_snapshot(value))
        return engine.import_states(snapshots) if snapshots else 0

    async def _recover_corrupt(self, corrupt: list[CorruptRecord], newly: set[int]) -> int:
        """For each corrupt record: stop when it does not say whose it is; else replay its
        user's events from past the user's state (as restored) up to where the group
        resumes. How many events were applied."""
        if not corrupt:
            return 0
        worker = self.worker
        nameless = [c for c in corrupt if c.user_id is None]
        if nameless:
            raise CorruptSnapshotError(
                "snapshot records that cannot be decoded and do not say whose they are: "
                + "; ".join(c.describe() for c in nameless)
                + " (the worker cannot tell which user's events to replay; inspect the "
                "records, delete the topic's bad records or the topic, and restart)"
            )
        by_partition: dict[int, set[str]] = {}
        for c in corrupt:
            log.error(
                "corrupt snapshot %s: falling back to user %r's last good state and "
                "replaying its events",
                c.describe(),
                c.user_id,
            )
            by_partition.setdefault(c.partition, set()).add(c.user_id)
        store = getattr(worker.engine, "store", None)
        topic = worker.config.topics.behaviors
        applied = 0
        for partition, users in sorted(by_partition.items()):
            self.dirty.update(users)  # a good snapshot supersedes the corrupt one
            for user in users:
                self.partition_of.setdefault(user, partition)
            if partition not in newly:
                continue  # kept: the worker holds these users' states as they are
            held = {u: store.offset_of(u, partition) if store else NO_OFFSET for u in users}
            start = min(held.values()) + 1
            end = (
                await until_answered(
                    lambda p=partition: committed_offsets(
                        worker.config.bootstrap, worker.config.app_id, topic, [p]
                    ),
                    self.restore_outage,
                    worker.stopping,
                )
            ).get(partition)
            if end is None:  # nothing committed: the group reads the partition from its start
                continue
            records = await until_answered(
                lambda p=partition, s=start, e=end: read_range(
                    worker.config.bootstrap, topic, p, s, e, worker.config.restore_timeout_s
                ),
                self.restore_outage,
                worker.stopping,
            )
            events = []
            for record in records:
                event = worker.parse(record)  # judged against the record's time, as first
                if isinstance(event, InvalidMessage) or event.user_id not in users:
                    continue  # dead-lettered when first consumed, or not a corrupt user's
                events.append(event)
            if events:
                result = await worker.on_engine_thread(worker.engine.process, events)
                applied += len(result.applied)
            worker.stats.events_replayed_for_corrupt += len(events)
        return applied


def _encode_all(snapshots: list) -> list[tuple[str, int, bytes]]:
    return [(s.user_id, s.partition, encode_snapshot(s)) for s in snapshots]
