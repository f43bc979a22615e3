"""After the first failure a worker processes, checkpoints and acknowledges nothing more (a
step that failed half-way may have left half-applied states that no snapshot may save); and
it hands over at once (flush and checkpoint) on a rebalance or a graceful stop, never
after a crash."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from test_stream_support import Acks, FailingEngine, no_publish, pending_event

from hytrec.stream.app import WorkerConfig
from hytrec.stream.worker import BatchingWorker


class CrashRecorder:
    """Stands in for the Faust app: records crashes."""

    def __init__(self):
        self.crashes = []

    async def crash(self, exc) -> None:
        self.crashes.append(exc)


def test_after_a_failed_batch_nothing_more_is_processed_or_acknowledged():
    async def scenario():
        app = CrashRecorder()
        worker = BatchingWorker(app, WorkerConfig(snapshot_interval_s=0), FailingEngine)
        worker.engine = FailingEngine()
        worker.publisher.publish = no_publish
        worker.stream = Acks()
        worker.batcher.add(pending_event("u", 0), 0.0)
        await worker.flush(checkpoint=True)  # a good batch: processed and acknowledged
        assert worker.stream.acked == 1
        worker.batcher.add(pending_event("u", 1, item="boom"), 0.0)
        with pytest.raises(RuntimeError, match="engine bug"):
            await worker.flush()
        worker.batcher.add(pending_event("u", 2), 0.0)
        await worker.flush(checkpoint=True)  # the timer or a rebalance, after the failure
        return app, worker

    app, worker = asyncio.run(scenario())
    assert len(app.crashes) == 1
    assert worker.engine.applied == {("u", 0): 0}, "the event after the failure was processed"
    assert worker.stream.acked == 1, "something was acknowledged after the failure"
    assert len(worker.batcher) == 1  # left for the partition's next owner to consume again


@pytest.mark.parametrize(
    "rebalancing, should_stop, crashed, hands_over",
    [
        (False, False, False, False),
        (True, False, False, True),  # a rebalance: Faust waits for every ack
        (False, True, False, True),  # a graceful stop: likewise, and the successor restores
        (False, True, True, False),  # stopping because it crashed: acknowledge nothing
    ],
)
def test_the_worker_hands_over_on_a_rebalance_or_a_graceful_stop_only(
    rebalancing, should_stop, crashed, hands_over
):
    app = SimpleNamespace(rebalancing=rebalancing, should_stop=should_stop, crashed=crashed)
    assert BatchingWorker(app, WorkerConfig(), FailingEngine).handing_over() is hands_over
