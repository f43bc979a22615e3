"""The worker's robustness rules without a broker: a producer that refuses records for good
or for a while, a parser that fails, the accounting of a batch, and commits refused while
the behaviours topic is not the one the offsets belong to."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from types import SimpleNamespace

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from test_stream_support import TS, Acks, LastItemsEngine, behavior_event, pending_event

from hytrec.stream import schemas
from hytrec.stream.accounting import Accounting
from hytrec.stream.app import WorkerConfig
from hytrec.stream.batcher import BatchConfig
from hytrec.stream.outage import Outage, Record, RepeatFilter, deliver
from hytrec.stream.schemas import EngineResult, InvalidMessage, encode_behavior
from hytrec.stream.worker import BatchingWorker


class FakeProducer:
    """Faust's producer.send: a future of the broker's answer. `refuse(topic)` decides."""

    def __init__(self, refuse=lambda topic, attempt: None):
        self.refuse = refuse
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.attempts = 0

    async def send(self, topic, key, value, partition, timestamp, headers):
        self.attempts += 1
        future = asyncio.get_running_loop().create_future()
        error = self.refuse(topic, self.attempts)
        if error is None:
            self.sent.append((topic, key, value))
            future.set_result(SimpleNamespace(topic=topic))
        else:
            future.set_exception(error)
        return future


class App:
    """Stands in for the Faust app: a producer, crashes recorded, never stopping."""

    should_stop = False

    def __init__(self, producer):
        self.producer = producer
        self.crashes = []

    async def crash(self, exc) -> None:
        self.crashes.append(exc)


def new_worker(producer, engine=None, **config) -> BatchingWorker:
    worker = BatchingWorker(App(producer), WorkerConfig(**config), LastItemsEngine)
    worker.engine = engine or LastItemsEngine()
    worker.stream = Acks()
    return worker


def vars_of(event) -> dict:
    return {name: getattr(event, name) for name in event.__dataclass_fields__}


def test_a_dead_letter_the_broker_refuses_is_counted_and_the_stream_goes_on(caplog):
    def refuse(topic, attempt):
        return MessageSizeTooLargeError("too large") if topic == "behaviors-dlq" else None

    producer = FakeProducer(refuse)
    worker = new_worker(producer, snapshot_interval_s=0)
    good = pending_event("u", 1)
    late = pending_event("u", 2)  # older than the user's newest: the test engine refuses it
    late.parsed = dataclasses.replace(late.parsed, ts=0)

    async def scenario():
        for pending in (good, late):  # as `consume` does
            worker.stats.accounting.consumed(pending.partition)
            worker.batcher.add(pending, 0.0)
        with caplog.at_level(logging.ERROR, logger="hytrec.stream.publishing"):
            await worker.flush(checkpoint=True)

    asyncio.run(scenario())
    assert not worker.app.crashes and worker.failed is None
    assert worker.stats.dlq_publish_failures == 1
    assert worker.stream.acked == 2  # both acknowledged: never read again and again
    assert "refused a record of behaviors-dlq for good" in caplog.text
    account = worker.stats.accounting.total()
    assert (account.applied, account.dead_lettered, account.in_flight) == (1, 1, 0)


def test_through_an_outage_every_record_is_sent_again_until_the_broker_takes_it(caplog):
    def refuse(topic, attempt):  # the broker is away for the first five attempts
        return KafkaConnectionError("connection refused") if attempt <= 5 else None

    producer = FakeProducer(refuse)
    outage = Outage("publishing")
    records = [Record("recommendations", b"u", b"1"), Record("behaviors-dlq", None, b"2")]
    with caplog.at_level(logging.WARNING, logger="hytrec.stream.outage"):
        failed = asyncio.run(deliver(producer, records, outage, lambda: False, (0.001, 0.002)))
    assert failed == {}
    assert sorted(value for _, _, value in producer.sent) == [b"1", b"2"]
    # one line when it started failing, one when it worked again
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and not outage.down
    assert lines[0].startswith("publishing failed (KafkaConnectionError")
    assert lines[1].startswith("publishing works again after")


def test_a_checkpoint_the_broker_refuses_is_redone_not_a_reason_to_stop():
    class Snapshots(LastItemsEngine):  # an engine whose states are checkpointed
        def export_states(self, partition_of, log=""):
            from hytrec.stream.snapshots import UserSnapshot

            return [UserSnapshot(u, p, {p: 0}, "v", {}, log) for u, p in partition_of.items()]

    refusing = {"on": True}

    def refuse(topic, attempt):
        if topic.startswith("user-state") and refusing["on"]:
            return MessageSizeTooLargeError("snapshot too large")
        return None

    worker = new_worker(FakeProducer(refuse), Snapshots(), snapshot_interval_s=0)
    worker.checkpoints.assignment = {0}
    acked = []

    class OrderedAcks:
        async def ack(self, event) -> None:
            acked.append(event)

    worker.stream = OrderedAcks()

    async def scenario():
        batches = [pending_event("u", offset) for offset in range(1, 4)]
        for event in batches:
            message = SimpleNamespace(partition=0, offset=event.parsed.offset)
            event.event = SimpleNamespace(message=message, offset=message.offset)  # acked
        worker.batcher.add(batches[0], 0.0)
        await worker.flush(checkpoint=True)
        assert not acked and worker.checkpoints.waiting  # waiting, not lost
        assert worker.checkpoints.dirty == {"u"} and worker.stats.checkpoints_failed == 1
        worker.batcher.add(batches[1], 0.0)  # a later checkpoint while the broker refuses
        await worker.flush(checkpoint=True)
        assert not acked, "a later message acknowledged before an earlier one"
        refusing["on"] = False
        worker.batcher.add(batches[2], 0.0)
        await worker.flush(checkpoint=True)

    asyncio.run(scenario())
    assert not worker.app.crashes and worker.failed is None
    assert [e.offset for e in acked] == [1, 2, 3]  # in consumption order
    assert not worker.checkpoints.waiting and worker.stats.checkpoints == 1


def test_a_failure_of_the_parser_itself_is_a_dead_letter_reason(monkeypatch):
    def broken(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(schemas, "parse_behavior", broken)
    worker = new_worker(FakeProducer())
    message = SimpleNamespace(
        value=b"{}", key=b"u", partition=0, offset=3, topic="behaviors", timestamp=1.0
    )
    parsed = worker.parse(message)
    assert isinstance(parsed, InvalidMessage) and parsed.reason_code == "unparseable"
    assert "RecursionError" in parsed.detail


def test_a_record_is_judged_against_the_time_it_first_came():
    """A replay an hour later gives the same verdict: the reference is the record's time
    (or the clock, when the record claims a later one)."""
    worker = new_worker(FakeProducer())
    written = 1_700_000_000.0
    payload = {"user_id": "u", "item_id": "i", "category_id": "", "behavior": "pv"}

    def message(ts, timestamp):
        value = encode_behavior({**payload, "ts": ts})
        return SimpleNamespace(
            value=value, key=b"u", partition=0, offset=1, topic="behaviors", timestamp=timestamp
        )

    later = written + 3600
    ahead = message(int(written) + 600, written)  # 10 min after it was written: future
    assert worker.parse(ahead, received_at=written).reason_code == "future_ts"
    assert worker.parse(ahead, received_at=later).reason_code == "future_ts"  # the replay
    fast_producer = message(int(written) + 600, written + 3600)  # a producer clock ahead
    assert worker.parse(fast_producer, received_at=written).reason_code == "future_ts"
    on_time = message(int(written) - 5, int(written * 1000))  # kafka-python's ms
    assert worker.parse(on_time, received_at=later).ts == int(written) - 5


def test_the_accounting_balances_and_shows_what_an_engine_lost():
    accounting = Accounting()
    events = [behavior_event("u", offset) for offset in range(4)]
    for _ in range(5):
        accounting.consumed(0)
    ok = EngineResult(
        [], [(events[2], "out_of_order", "")], skipped=[events[3]], applied=events[:2]
    )
    accounting.settle([0], events, ok)
    account = accounting.partitions[0]
    assert (account.applied, account.dead_lettered, account.replays_skipped) == (2, 2, 1)
    assert account.balanced and account.in_flight == 0

    for _ in range(3):
        accounting.consumed(1)
    more = [behavior_event("v", offset) for offset in range(3)]
    more = [SimpleNamespace(**{**vars_of(e), "partition": 1}) for e in more]
    lost = EngineResult([], [], applied=[more[0], more[0]])  # one twice, two in no list
    accounting.settle([], more, lost)
    bad = accounting.partitions[1]
    assert bad.unaccounted == 3 and not bad.balanced
    assert "NOT BALANCED" in accounting.line()
    assert accounting.as_dict()["total"]["consumed"] == 8


def test_commits_wait_while_the_topic_is_not_the_one_the_offsets_belong_to(caplog):
    worker = new_worker(FakeProducer())
    logs = worker.logs
    answers = iter(["topic-a", "topic-b", "topic-b", KafkaConnectionError("down"), "topic-a"])

    def topic_ids(topic):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    logs.topic_ids = topic_ids

    async def scenario():
        assert await logs.may_commit()  # nothing learned yet: nothing consumed either
        logs.log_id = "topic-a"
        verdicts = [await logs.may_commit() for _ in range(5)]
        return verdicts

    with caplog.at_level(logging.WARNING, logger="hytrec.stream.newlog"):
        verdicts = asyncio.run(scenario())
    assert verdicts == [True, False, False, False, True]
    assert caplog.text.count("no offset is committed") == 1


def test_repeated_client_log_lines_are_shown_once_per_window():
    repeat = RepeatFilter(window_s=30.0)

    def record(msg, name="aiokafka.conn"):
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, ("x",), None)

    shown = [repeat.filter(record("Unable connect to node %s")) for _ in range(50)]
    assert shown.count(True) == 1
    assert repeat.filter(record("Unable connect to node %s", name="hytrec.stream.worker"))
    assert repeat.filter(record("another message %s"))


def test_the_data_folder_is_made_with_its_parents(tmp_path):
    """The README's commands on a fresh clone: `.cache/hytrec/faust` did not exist."""
    from hytrec.stream.app import create_app

    data_dir = tmp_path / "fresh" / "clone" / ".cache" / "faust"
    create_app(WorkerConfig(data_dir=str(data_dir)), LastItemsEngine)
    assert data_dir.is_dir()


def test_each_consumer_group_has_its_own_snapshot_topic():
    """A worker of another group restored 97 snapshots of this one: no longer possible."""
    assert WorkerConfig(app_id="a").state_topic == "user-state.a"
    assert WorkerConfig(app_id="a").state_topic != WorkerConfig(app_id="b").state_topic
    with pytest.raises(ValueError, match="cannot name its user-state topic"):
        WorkerConfig(app_id="team a/b")


def test_a_checkpoint_that_does_not_load_is_reported_before_joining_the_group(tmp_path):
    """No broker at all: the worker must say what is wrong with the checkpoint, not wait
    for the broker or fail later with a traceback."""
    import subprocess
    import sys

    from test_stream_support import REPO

    from hytrec.stream.broker import free_port

    broken = tmp_path / "checkpoint"
    broken.mkdir()
    (broken / "checkpoint.json").write_text("{not json")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "hytrec.cli",
            "worker",
            "--checkpoint",
            str(broken),
            "--bootstrap",
            f"127.0.0.1:{free_port()}",
            "--data-dir",
            str(tmp_path / "faust"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "cannot start the engine: CheckpointError" in run.stderr
    assert "model.safetensors: missing" in run.stderr and "Traceback" not in run.stderr


def test_a_tolerance_below_the_future_allowance_is_refused():
    from hytrec.stream.app import check_time_rules
    from hytrec.stream.engine import EngineConfig
    from hytrec.stream.schemas import ParseLimits

    engine = SimpleNamespace(config=EngineConfig(out_of_order_tolerance_s=60.0))
    with pytest.raises(ValueError, match="would block its user's later events"):
        check_time_rules(WorkerConfig(parse=ParseLimits(max_future_s=300.0)), engine)
    check_time_rules(WorkerConfig(parse=ParseLimits(max_future_s=60.0)), engine)
    check_time_rules(WorkerConfig(), LastItemsEngine())  # a test engine has no tolerance


def test_a_partition_without_a_committed_offset_starts_at_offset_0(monkeypatch):
    """Not where ListOffsets(EARLIEST) says: Tansu names the batch whose write finished
    first, which skips the first batches when a partition's first writes raced. The worker's
    accounting learns where each behaviours partition is read from."""
    import faust.transport.drivers.aiokafka as faust_aiokafka
    from faust.types import TP

    from hytrec.stream.app import _Consumer

    none, zero, resumes = TP("behaviors", 0), TP("behaviors", 1), TP("behaviors", 2)
    other = TP("user-state.g", 2)
    committed = {none: None, zero: 0, resumes: 57, other: 9}

    async def seek_to_committed(self):
        return dict(committed)

    monkeypatch.setattr(faust_aiokafka.Consumer, "seek_to_committed", seek_to_committed)
    consumer = object.__new__(_Consumer)  # no Faust app: only the seek logic runs
    worker = new_worker(FakeProducer())
    consumer.app = SimpleNamespace(hytrec_config=worker.config, hytrec_worker=worker)
    seeks = []

    async def seek(tp, offset):
        seeks.append((tp, offset))

    consumer.seek = seek
    assert asyncio.run(consumer.seek_to_committed()) == committed
    assert seeks == [(none, 0), (zero, 0)]  # a committed offset is where Faust resumes
    assert worker.stats.accounting.next_offset == {0: 0, 1: 0, 2: 57}


def test_offsets_the_consumer_jumps_over_are_counted_and_logged(caplog):
    accounting = Accounting()
    accounting.reading_from(0, 10)  # the assignment's seek: the group's commit
    with caplog.at_level(logging.ERROR, logger="hytrec.stream.accounting"):
        for offset in (10, 11, 15, 16):  # 12..14 never came
            accounting.consumed(0, offset)
        accounting.consumed(0, 3)  # back: a replay after a seek, not a jump
        accounting.consumed(0, 4)
    assert accounting.partitions[0].never_delivered == 3
    assert "behaviors[0]: offsets 12..14 were never delivered" in caplog.text
    assert len(caplog.records) == 1
    assert "3 offsets never delivered" in accounting.line()
    accounting.reading_from(1, 0)
    accounting.consumed(1, 7)  # a partition read from 0 whose first event is 7
    assert accounting.partitions[1].never_delivered == 7
    accounting.consumed(2, 40)  # never placed: nothing to compare with
    assert accounting.partitions[2].never_delivered == 0


class FakeStream(Acks):
    """Stands in for the Faust stream the agent iterates: these messages, then the end."""

    def __init__(self, messages):
        self.messages = messages

    def noack(self):
        return self

    async def events(self):
        for message in self.messages:
            yield SimpleNamespace(message=message)


def test_an_event_of_a_partition_no_longer_assigned_is_left_to_its_owner():
    worker = new_worker(FakeProducer(), batch=BatchConfig(max_items=1), snapshot_interval_s=0)
    worker.ready.set()
    worker.checkpoints.assignment = {0}

    def message(partition, offset):
        payload = {"user_id": "u", "item_id": "i", "category_id": "c", "behavior": "pv"}
        value = encode_behavior({**payload, "ts": TS + offset})
        return SimpleNamespace(
            value=value,
            key=b"u",
            partition=partition,
            offset=offset,
            topic="behaviors",
            timestamp=None,
            acked=False,
        )

    ours, revoked = message(0, 0), message(1, 0)  # partition 1 went to another worker
    stale = message(0, 7)  # fetched in the generation before: no hole 1..6 is counted
    stale.generation_id = 3
    worker.app.consumer_generation_id = 4
    for m in (ours, revoked):
        m.generation_id = 4

    async def wait_restored(partition):  # no 5 s wait for the restore that never comes
        assert partition == 1
        return False

    worker.checkpoints.wait_restored = wait_restored
    worker.stats.accounting.reading_from(0, 0)
    asyncio.run(worker.consume(FakeStream([revoked, ours, stale])))
    assert worker.stats.events_not_held == 1
    assert revoked.acked  # done with here, and its offset never acknowledged
    assert worker.engine.applied == {("u", 0): 7} and worker.stream.acked == 2
    account = worker.stats.accounting
    assert 1 not in account.partitions and account.partitions[0].applied == 2
    assert account.partitions[0].never_delivered == 0
