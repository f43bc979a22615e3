"""The recommendation engine without Kafka: served vectors equal the offline model's,
replays are skipped, what the model cannot apply is rejected with a reason, and a tiny
state budget (eviction to host and back) changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hytrec.index import IndexConfig, build_from_checkpoint
from hytrec.model.events import Behavior, Vocabulary
from hytrec.model.hytrec import EventBatch, HyTRec, HyTRecConfig
from hytrec.stream.engine import EngineConfig, RecommendationEngine, build_engine
from hytrec.stream.recent_engine import RecentItemsEngine
from hytrec.stream.schemas import BehaviorEvent

NUM_ITEMS, NUM_CATEGORIES, TS = 60, 8, 1_511_544_000
BEHAVIORS = [b.name for b in Behavior if b != Behavior.UNKNOWN]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = HyTRecConfig(
        num_items=NUM_ITEMS, num_categories=NUM_CATEGORIES, d_model=32, long_layers=4, dropout=0
    )
    items = Vocabulary(f"i{n}" for n in range(1, NUM_ITEMS))
    categories = Vocabulary(f"c{n}" for n in range(1, NUM_CATEGORIES))
    model = HyTRec(cfg, items, categories).eval()
    model.item_category[1:] = torch.arange(1, NUM_ITEMS) % (NUM_CATEGORIES - 1) + 1
    return model.save(tmp_path_factory.mktemp("engine") / "checkpoint")


def random_events(num_users: int, per_user: int, seed: int) -> list[BehaviorEvent]:
    """Interleaved events of `num_users` users on one partition, offsets in arrival order."""
    rng = np.random.default_rng(seed)
    owners = rng.permutation(np.repeat(np.arange(num_users), per_user))
    clock = np.full(num_users, TS)
    events = []
    for offset, u in enumerate(owners):
        clock[u] += int(rng.integers(1, 200_000))
        item = int(rng.integers(1, NUM_ITEMS))
        events.append(
            BehaviorEvent(
                user_id=f"u{u}",
                item_id=f"i{item}",
                category_id=f"c{item % (NUM_CATEGORIES - 1) + 1}",
                behavior=BEHAVIORS[int(rng.integers(len(BEHAVIORS)))],
                ts=int(clock[u]),
                partition=0,
                offset=offset,
                received_at=0.0,
            )
        )
    return events


def offline_vector(model: HyTRec, events: list[BehaviorEvent]) -> torch.Tensor:
    """The offline (parallel) user vector after all of a user's events: [d]."""
    columns = [
        [model.items.get(e.item_id) for e in events],
        [model.categories.get(e.category_id) for e in events],
        [int(Behavior.parse(e.behavior)) for e in events],
        [e.ts for e in events],
    ]
    batch = EventBatch(*(torch.tensor([c]) for c in columns), lengths=torch.tensor([len(events)]))
    return model.user_vector(batch)[0]


def serve(engine, events, batch_size):
    results = [
        engine.process(events[i : i + batch_size]) for i in range(0, len(events), batch_size)
    ]
    latest = {}
    for result in results:
        for rec in result.recommendations:
            latest[rec.user_id] = rec
    return results, latest


def test_served_recommendations_equal_the_offline_model(checkpoint):
    engine = build_engine(checkpoint, device="cpu", config=EngineConfig(top_k=10, device="cpu"))
    events = random_events(num_users=7, per_user=30, seed=1)
    results, latest = serve(engine, events, batch_size=13)

    assert sum(len(r.recommendations) for r in results) > 7  # users answered along the way
    assert all(not r.rejected and not r.skipped_duplicates for r in results)
    model = engine.model
    table = model.item_table()[1:].detach()
    for user in {e.user_id for e in events}:
        mine = [e for e in events if e.user_id == user]
        rec = latest[user]
        assert (rec.source_offset, rec.event_ts) == (mine[-1].offset, mine[-1].ts)
        scores = (table @ offline_vector(model, mine)).numpy()
        top = np.argsort(-scores, kind="stable")[:10]
        assert rec.items == [model.items.raw(int(i) + 1) for i in top]
        np.testing.assert_allclose(rec.scores, scores[top], rtol=1e-4, atol=1e-4)
        assert rec.model_version == model.version


def test_replayed_events_are_skipped_and_leave_the_state_alone(checkpoint):
    engine = build_engine(checkpoint, device="cpu", config=EngineConfig(top_k=5, device="cpu"))
    events = random_events(num_users=3, per_user=10, seed=2)
    engine.process(events)
    before = {name: t.clone() for name, t in engine.store.state.parts().items()}
    again = engine.process(events[:20])  # a consumer restarted before its commit
    assert again.skipped_duplicates == 20 and not again.recommendations and not again.rejected
    for name, new in engine.store.state.parts().items():
        assert torch.equal(before[name], new), name


def test_unknown_items_and_out_of_order_events_are_rejected_with_reasons(checkpoint):
    engine = build_engine(checkpoint, device="cpu", config=EngineConfig(top_k=5, device="cpu"))
    first = random_events(num_users=1, per_user=2, seed=3)
    unknown = BehaviorEvent("u0", "no-such-item", "c1", "click", first[-1].ts + 5, 0, 2, 0.0)
    late = BehaviorEvent("u0", "i3", "c4", "click", first[0].ts - 1, 0, 3, 0.0)
    result = engine.process([*first, unknown, late])
    reasons = [(event.offset, reason) for event, reason, _ in result.rejected]
    assert reasons == [(2, "unknown_item"), (3, "out_of_order")]
    assert "no-such-item" in result.rejected[0][2]
    assert [r.source_offset for r in result.recommendations] == [1]


def test_a_tiny_state_budget_evicts_users_without_changing_any_answer(checkpoint):
    events = random_events(num_users=9, per_user=12, seed=4)
    roomy = build_engine(checkpoint, device="cpu", config=EngineConfig(device="cpu"))
    model = HyTRec.load(checkpoint)
    per_user = model.state_bytes_per_user()
    tiny = RecommendationEngine(
        model,
        build_from_checkpoint(checkpoint, IndexConfig()),
        EngineConfig(state_budget_bytes=3 * per_user, device="cpu"),
    )
    assert tiny.store.num_slots == 3
    _, expected = serve(roomy, events, batch_size=5)
    _, got = serve(tiny, events, batch_size=5)
    assert tiny.store.evictions > 0
    assert got.keys() == expected.keys()
    for user, rec in expected.items():
        assert got[user].items == rec.items
        np.testing.assert_allclose(got[user].scores, rec.scores, rtol=1e-5, atol=1e-5)


def test_recent_items_can_be_left_out(checkpoint):
    config = EngineConfig(top_k=NUM_ITEMS, exclude_recent=3, device="cpu")
    engine = build_engine(checkpoint, device="cpu", config=config)
    events = random_events(num_users=1, per_user=6, seed=5)
    rec = engine.process(events).recommendations[-1]
    assert not {e.item_id for e in events[-3:]} & set(rec.items)
    assert len(rec.items) == NUM_ITEMS - 1 - len({e.item_id for e in events[-3:]})


def test_a_model_without_vocabulary_is_refused(checkpoint):
    model = HyTRec(HyTRecConfig(num_items=NUM_ITEMS, num_categories=NUM_CATEGORIES, d_model=32))
    with pytest.raises(ValueError, match="vocabulary"):
        RecommendationEngine(model, build_from_checkpoint(checkpoint), EngineConfig(device="cpu"))


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_the_recent_items_engine_answers_each_users_newest_distinct_items(batch_size):
    events = random_events(num_users=5, per_user=30, seed=3)
    engine = RecentItemsEngine(top_k=4)
    results, latest = serve(engine, events, batch_size)
    for user in {e.user_id for e in events}:
        newest_first = [e.item_id for e in events if e.user_id == user][::-1]
        assert latest[user].items == list(dict.fromkeys(newest_first))[:4]
        assert latest[user].source_offset == max(e.offset for e in events if e.user_id == user)
    assert sum(len(r.recommendations) for r in results) >= len(events) // batch_size
    replayed = engine.process(events[:10])  # at-least-once delivery: already applied
    assert replayed.skipped_duplicates == 10 and not replayed.recommendations
