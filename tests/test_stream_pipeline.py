"""The model engine in a worker process against a real broker: real Taobao events in, and
the user vectors the worker ends with equal the offline model's over the same events
(parity through the whole pipeline), an event on an item the model never saw included;
an event too late to apply goes to the DLQ."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from test_stream_support import start_worker, stop_worker, wait_for

from hytrec.model.batch import EventBatch
from hytrec.model.data import load_dataset, select
from hytrec.model.events import Behavior
from hytrec.model.hytrec import HyTRec, HyTRecConfig
from hytrec.stream.broker import EmbeddedBroker
from hytrec.stream.replay import ReplayConfig, log_events, publish_events
from hytrec.stream.schemas import Recommendation
from hytrec.stream.tail import read_topic

pytestmark = pytest.mark.integration
USERS = 30  # the head of the sample is sorted by user: about 3,000 events


@pytest.fixture
def taobao_head(shared_data, tmp_path_factory):
    """(events, checkpoint dir): the first users of the Taobao sample and an untrained model
    over their vocabulary (parity needs no training; seeded weights)."""
    log = load_dataset(
        shared_data / "taobao" / "UserBehavior_head84k.csv.gz", on_bad_row="skip", progress=False
    )
    events = select(log, log.user <= USERS)
    torch.manual_seed(0)
    cfg = HyTRecConfig(
        num_items=len(log.items), num_categories=len(log.categories), d_model=32, dropout=0
    )
    model = HyTRec(cfg, log.items, log.categories)
    return events, model.save(tmp_path_factory.mktemp("pipeline") / "checkpoint")


def offline_vectors(model: HyTRec, payloads: list[dict]) -> dict[str, np.ndarray]:
    by_user = defaultdict(list)
    for p in payloads:
        by_user[p["user_id"]].append(p)
    out = {}
    for user, mine in by_user.items():
        columns = [
            [model.items.get(p["item_id"]) for p in mine],
            [model.categories.get(p["category_id"]) for p in mine],
            [int(Behavior.parse(p["behavior"])) for p in mine],
            [p["ts"] for p in mine],
        ]
        batch = EventBatch(*(torch.tensor([c]) for c in columns), lengths=torch.tensor([len(mine)]))
        out[user] = model.user_vector(batch)[0].numpy()
    return out


def test_worker_vectors_equal_the_offline_model_and_late_events_reach_the_dlq(
    taobao_head, tmp_path, monkeypatch
):
    events, checkpoint = taobao_head
    payloads = list(log_events(events))
    assert 2000 < len(payloads) < 6000
    first = payloads[0]
    # a new item in the shop: applied through the unknown-item row, like offline
    payloads.append(dict(first, item_id="never-seen-item", ts=payloads[-1]["ts"] + 1))
    monkeypatch.setenv("HYTREC_TEST_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("HYTREC_TEST_VECTORS", str(tmp_path / "vectors.json"))
    vectors_file = tmp_path / "vectors.json"
    with EmbeddedBroker() as broker:
        worker = start_worker(
            broker.bootstrap,
            tmp_path,
            engine="test_stream_support:make_recording_model_engine",
            batch_size=128,
        )
        try:
            positions = {}
            publish_events(
                payloads,
                broker.bootstrap,
                ReplayConfig(progress=False),
                on_delivery=lambda i, meta: positions.__setitem__(i, (meta.partition, meta.offset)),
            )
            late = dict(first, ts=first["ts"] - 10**6)  # far older than the user's newest
            publish_events([late], broker.bootstrap, ReplayConfig(progress=False))
            last = {p["user_id"]: positions[i] for i, p in enumerate(payloads)}

            def answered():
                latest = {}
                for record in read_topic(broker.bootstrap, "recommendations", idle_timeout_s=0.5):
                    rec = Recommendation.from_json(record.value)
                    assert rec.source_offset > latest.get(rec.user_id, (0, -1))[1], "order"
                    latest[rec.user_id] = (rec.source_partition, rec.source_offset)
                return latest if latest == last else None

            wait_for(answered, 120, "a recommendation answering every user's last event")
            letters = wait_for(
                lambda: (
                    [
                        json.loads(r.value)
                        for r in read_topic(broker.bootstrap, "behaviors-dlq", idle_timeout_s=0.5)
                    ]
                    or None
                ),
                30,
                "dead letters",
            )
        finally:
            stop_worker(worker)
        assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]

    assert [letter["reason_code"] for letter in letters] == ["out_of_order"]
    assert json.loads(letters[0]["payload"]) == late
    served = json.loads(vectors_file.read_text())
    model = HyTRec.load(checkpoint).eval()
    offline = offline_vectors(model, payloads)
    assert served.keys() == offline.keys()
    worst = max(np.abs(np.array(served[u]) - offline[u]).max() for u in offline)
    assert worst < 1e-4, f"served vs offline user vectors differ by {worst:.2e}"
