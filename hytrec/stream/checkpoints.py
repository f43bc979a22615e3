"""Checkpoints and restores of user state: what makes state effectively-once.

Checkpoint. Processed messages wait in `unacked` and the users they changed in `dirty`. A
checkpoint first *cuts* (under the worker's flush lock, so between two batches): it takes
the waiting messages and copies the changed users' states (`engine.export_states`). Then,
in a task while the next batches run, it writes one snapshot per user to the `user-state`
topic (co-partitioned with `behaviors`, key = user id; see `snapshots.py`), waits until the
broker confirmed them all, and only then acknowledges the messages: Faust commits an offset
only past events whose effect is published *and* saved. Checkpoints confirm one after
another. Engines without `export_states` (test engines) write no snapshots: their messages
are acknowledged right after the publish.

Restore. When partitions are assigned, the worker (before it processes any event of the new
assignment: the agent waits, and so does Faust's resume) checkpoints what it holds, drops
the users of partitions it lost, and reads the `user-state` partitions it holds up to a
sentinel it appends itself (Tansu misreports end offsets): for each user the snapshot with
the highest applied offset replaces the store's state when it is ahead of it. Partitions
it kept are read only from where it stopped last time. The engine then skips every
replayed event at or below a user's applied offset.

Ordering invariants, asserted where they matter:
- a cut happens under the flush lock (no batch half-way) and never after a failure;
- a checkpoint acknowledges its messages only after its own snapshots and every earlier
  checkpoint are confirmed, and never after a failure;
- no event of a partition reaches the engine before that partition's states are restored
  (`wait_restored`; the worker asserts it again before a batch runs).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING, Any

from hytrec.stream.snapshots import decode_snapshot, encode_snapshot, read_snapshots

if TYPE_CHECKING:
    from hytrec.stream.worker import BatchingWorker, Pending

log = logging.getLogger(__name__)


class Checkpoints:
    def __init__(self, worker: BatchingWorker):
        self.worker = worker
        # messages processed but not yet covered by a checkpoint, users changed since the
        # last one, each known user's behaviours partition
        self.unacked: list[Pending] = []
        self.dirty: set[str] = set()
        self.partition_of: dict[str, int] = {}
        # the behaviours partitions whose states are restored (events may be processed),
        # and where their user-state partitions were read up to
        self.assignment: set[int] = set()
        self.state_position: dict[int, int] = {}
        self.restoring: asyncio.Future | None = None
        self.last_checkpoint = time.monotonic()
        self.confirming: asyncio.Future | None = None  # the newest checkpoint's task

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
        old ones are gone with it), and its user-state partition is read from the start."""
        self.dirty.update(users)
        self.state_position.pop(partition, None)

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
        started = time.perf_counter()
        unacked, self.unacked = self.unacked, []
        snapshots: list = []
        if worker.snapshots and self.dirty:
            dirty = {u: self.partition_of[u] for u in self.dirty}
            self.dirty = set()
            snapshots = await worker.on_engine_thread(worker.engine.export_states, dirty)
        self.last_checkpoint = time.monotonic()
        previous = self.confirming
        self.confirming = asyncio.ensure_future(
            self._confirm(snapshots, unacked, previous, started)
        )
        return self.confirming

    async def _confirm(
        self,
        snapshots: list,
        unacked: list[Pending],
        previous: asyncio.Future | None,
        started: float,
    ) -> None:
        """Write the snapshots, wait for the broker, then acknowledge the messages they cover
        (only now may Faust commit past these offsets). A failure stops the worker with
        nothing of this checkpoint acknowledged."""
        worker = self.worker
        records: list[tuple[str, int, bytes]] = []
        try:
            if previous is not None:
                await previous
            if snapshots:
                records = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: [(s.user_id, s.partition, encode_snapshot(s)) for s in snapshots]
                )
                producer, topic = worker.app.producer, worker.config.topics.user_state
                deliveries = [
                    await producer.send(topic, user.encode(), value, partition, None, None)
                    for user, partition, value in records
                ]
                await asyncio.gather(*deliveries)
            assert previous is None or previous.done(), "checkpoints confirm in order"
            for p in unacked:
                assert worker.failed is None, "nothing is acknowledged after a failure"
                await worker.stream.ack(p.event)
        except Exception as exc:
            await worker.stop_on(exc, "checkpoint of %d snapshots failed", len(snapshots))
            raise
        stats = worker.stats
        stats.snapshots_written += len(records)
        stats.snapshot_bytes += sum(len(value) for _, _, value in records)
        stats.checkpoints += 1
        stats.checkpoint_seconds += time.perf_counter() - started

    # ------------------------------------------------------------------ rebalances

    def on_assigned(self, assigned: set) -> None:
        """Faust's signal: start restoring the new assignment's states (the agent and
        Faust's resume wait for it; see `wait_restored`)."""
        behaviors = self.worker.config.topics.behaviors
        partitions = {tp.partition for tp in assigned if tp.topic == behaviors}
        previous = self.restoring
        self.restoring = asyncio.ensure_future(self._reassign(partitions, previous))

    async def wait_restored(self, partition: int) -> None:
        """No event of a newly assigned partition before that partition's user states."""
        deadline = time.monotonic() + 5.0
        while partition not in self.assignment:
            if self.restoring is not None and not self.restoring.done():
                await self.restoring
            elif time.monotonic() > deadline:
                log.warning("an event of partition %d, which was never assigned", partition)
                return
            else:
                await asyncio.sleep(0.01)

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
        dropped = await worker.on_engine_thread(worker.engine.drop_users, gone)
        latest, ends = await asyncio.get_running_loop().run_in_executor(
            None,
            functools.partial(
                read_snapshots,
                worker.config.bootstrap,
                worker.config.topics.user_state,
                sorted(partitions),
                dict(self.state_position),
                worker.config.restore_timeout_s,
            ),
        )
        restored = await worker.on_engine_thread(self._import_states, latest)
        self.state_position.update(ends)
        worker.stats.users_restored += restored
        worker.stats.users_dropped += dropped
        worker.stats.restore_seconds += time.perf_counter() - started
        log.info(
            "assignment %s: restored %d of %d users from %s, dropped %d (%.2f s)",
            sorted(partitions),
            restored,
            len(latest),
            worker.config.topics.user_state,
            dropped,
            time.perf_counter() - started,
        )

    def _import_states(self, latest: dict[str, Any]) -> int:
        """Runs on the engine's thread: decode the snapshots ahead of the store, import."""
        engine = self.worker.engine
        offset_of = getattr(getattr(engine, "store", None), "offset_of", None)
        snapshots = []
        for header, value in latest.values():
            self.partition_of.setdefault(header.user_id, header.partition)
            if offset_of is None or header.applied_offset > offset_of(header.user_id):
                snapshots.append(decode_snapshot(value))
        return engine.import_states(snapshots) if snapshots else 0
