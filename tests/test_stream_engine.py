"""The recommendation engine without Kafka: served vectors equal the offline model's,
replays are skipped (per partition, and exactly at the applied offset after a restore),
events sharing a time and late ones within the tolerance are applied, older ones rejected
with a reason, unknown items move the user through the unknown-item row, and a tiny state
budget (eviction to host and back) changes nothing."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from hytrec.index import IndexConfig, build_from_checkpoint
from hytrec.model.batch import EventBatch
from hytrec.model.evaluate import ranking_scores
from hytrec.model.events import Behavior, Vocabulary
from hytrec.model.hytrec import HyTRec, HyTRecConfig
from hytrec.model.repeat import RepeatConfig
from hytrec.stream.engine import EngineConfig, RecommendationEngine, build_engine
from hytrec.stream.recent_engine import RecentItemsEngine
from hytrec.stream.schemas import ENGINE_REASONS, REASONS, BehaviorEvent
from hytrec.stream.snapshots import FORMAT, decode_snapshot, encode_snapshot

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


def engine_of(checkpoint, **config) -> RecommendationEngine:
    return build_engine(checkpoint, config=EngineConfig(device="cpu", **config))


def count_of(engine, user: str) -> int:
    return int(engine.store.export_users([user])[user].parts["count"])


def test_a_replay_at_exactly_the_applied_offset_after_a_restore_is_skipped(checkpoint):
    """After a restore the partition is consumed again from the committed offset, which may
    be the snapshot's applied offset itself: that event must be skipped, not applied twice
    (an `offset < applied` mutant applies it again)."""
    events = random_events(num_users=1, per_user=12, seed=6)
    first = engine_of(checkpoint)
    first.process(events[:8])
    (snapshot,) = first.export_states({"u0": 0})
    assert snapshot.applied_offset == events[7].offset

    restored = engine_of(checkpoint)
    assert restored.import_states([snapshot]) == 1
    replay = restored.process(events[7:])  # the group resumes at the applied offset
    assert [e.offset for e in replay.skipped] == [events[7].offset]
    assert [e.offset for e in replay.applied] == [e.offset for e in events[8:]]
    assert count_of(restored, "u0") == len(events)
    straight = engine_of(checkpoint)
    want = straight.process(events).recommendations[-1]
    got = replay.recommendations[-1]
    assert got.items == want.items
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)


def test_offsets_are_compared_per_partition(checkpoint):
    """A user's events from two partitions (a producer that partitions otherwise): offsets
    of one partition say nothing about the other's, so none is taken for a replay."""
    engine = engine_of(checkpoint)
    events = random_events(num_users=1, per_user=6, seed=7)
    mixed = [replace(e, partition=i % 2, offset=100 - 10 * i) for i, e in enumerate(events)]
    mixed[1] = replace(mixed[1], offset=500)  # partition 1 runs far ahead of partition 0
    mixed[3] = replace(mixed[3], offset=501)
    mixed[5] = replace(mixed[5], offset=502)
    mixed[2] = replace(mixed[2], offset=101)
    mixed[4] = replace(mixed[4], offset=102)
    result = engine.process(mixed)
    assert not result.skipped and len(result.applied) == 6
    assert engine.store.applied["u0"] == {0: 102, 1: 502}
    again = engine.process([mixed[4], mixed[5]])  # true replays, one per partition
    assert len(again.skipped) == 2 and not again.applied


@pytest.mark.parametrize("tolerance", [0.0, 300.0])
def test_events_sharing_a_timestamp_are_applied(checkpoint, tolerance):
    """Several events of one second (a click and an add-to-cart) are in order, not late."""
    engine = engine_of(checkpoint, out_of_order_tolerance_s=tolerance)
    base = random_events(num_users=1, per_user=4, seed=8)
    same = [replace(e, ts=base[0].ts) for e in base]
    result = engine.process(same[:2])  # within one batch
    result2 = engine.process(same[2:])  # and across batches
    assert not result.rejected and not result2.rejected
    assert count_of(engine, "u0") == 4


def test_late_events_within_the_tolerance_apply_at_the_newest_time_and_older_ones_are_refused(
    checkpoint,
):
    """One event from a client whose clock ran ahead must not block its user's real-time
    events: up to the tolerance older than the newest, an event is applied (its time taken
    as the newest, time never runs backwards in a state); beyond it, `out_of_order`."""
    tolerance = 300
    engine = engine_of(checkpoint, out_of_order_tolerance_s=tolerance)
    events = random_events(num_users=1, per_user=3, seed=9)
    newest = events[1].ts
    at_limit = replace(events[2], ts=newest - tolerance, offset=10)
    beyond = replace(events[2], ts=newest - tolerance - 1, offset=11)
    result = engine.process([*events[:2], at_limit, beyond])
    assert [e.offset for e in result.applied] == [events[0].offset, events[1].offset, 10]
    assert [(e.offset, reason) for e, reason, _ in result.rejected] == [(11, "out_of_order")]
    assert "tolerance" in result.rejected[0][2]
    # the late event counted as happening at the newest time: equal to an offline replay
    expected = [*events[:2], replace(at_limit, ts=newest)]
    twin = engine_of(checkpoint)
    want = twin.process(expected).recommendations[-1]
    got = result.recommendations[-1]
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)
    assert engine.store.newest_ts("u0") == newest


def test_events_after_a_refused_one_in_the_same_batch_are_still_applied(checkpoint):
    """A refused event is dead-lettered alone: the user's and other users' later events of
    the batch go on (mutmut's _admit__mutmut_44 stopped the batch there)."""
    engine = engine_of(checkpoint)
    events = random_events(num_users=2, per_user=4, seed=10)
    stale = replace(events[0], offset=50, ts=events[0].ts - 10**6)
    later = [replace(e, offset=60 + i) for i, e in enumerate(events[4:])]
    result = engine.process([*events[:4], stale, *later])
    assert [e.offset for e, _, _ in result.rejected] == [50]
    assert len(result.applied) == len(events)
    assert count_of(engine, "u0") + count_of(engine, "u1") == len(events)


# every reason code the engine can give, with an event that makes it give it
ENGINE_REASON_CASES = {
    "out_of_order": lambda events: [*events, replace(events[0], offset=99, ts=events[0].ts - 10**6)]
}


@pytest.mark.parametrize("reason", ENGINE_REASONS)
def test_every_engine_reason_code_is_a_dead_letter_reason(checkpoint, reason):
    """The worker dead-letters what the engine refuses with one of `REASONS`: each engine
    reason is produced by the engine and listed there (so /metrics shows it from 0)."""
    assert set(ENGINE_REASON_CASES) == set(ENGINE_REASONS), "a reason without a case"
    engine = engine_of(checkpoint)
    batch = ENGINE_REASON_CASES[reason](random_events(num_users=1, per_user=3, seed=10))
    result = engine.process(batch)
    assert [r for _, r, _ in result.rejected] == [reason]
    assert reason in REASONS


def test_events_on_unknown_items_move_the_user_through_the_unknown_item_row(checkpoint):
    """An item the model never saw (new in the shop) is applied through row 0 with its
    category and behaviour: the user's state and vector move exactly as the offline model's
    over the same events (which maps the unknown item to row 0 too)."""
    engine = engine_of(checkpoint, top_k=NUM_ITEMS)
    events = random_events(num_users=1, per_user=3, seed=11)
    new = replace(events[-1], item_id="new-in-shop", offset=50, ts=events[-1].ts + 60)
    result = engine.process([*events, new])
    assert not result.rejected and len(result.applied) == 4
    assert engine.stats.unknown_items == 1
    rec = result.recommendations[-1]
    assert rec.source_offset == 50 and "new-in-shop" not in rec.items  # not in the index
    model = engine.model
    scores = (model.item_table()[1:] @ offline_vector(model, [*events, new])).detach().numpy()
    top = np.argsort(-scores, kind="stable")[: len(rec.items)]
    assert rec.items == [model.items.raw(int(i) + 1) for i in top]
    without = (model.item_table()[1:] @ offline_vector(model, events)).detach().numpy()
    assert not np.allclose(scores, without)  # the unknown item's category and stage count


def test_a_new_item_enters_the_index_with_a_published_checkpoint_that_knows_it(tmp_path):
    """The documented path for new items: a checkpoint whose vocabulary holds them (trained
    on fresh data), published with `hytrec publish-model`; the worker swaps it in and its
    index serves them."""
    from hytrec.stream.hotswap import checkpoint_loader, publish_model

    torch.manual_seed(1)
    items = Vocabulary([f"i{n}" for n in range(1, NUM_ITEMS)])
    cfg = HyTRecConfig(num_items=NUM_ITEMS, num_categories=NUM_CATEGORIES, d_model=32, dropout=0)
    old = HyTRec(cfg, items, Vocabulary(f"c{n}" for n in range(1, NUM_CATEGORIES))).save(
        tmp_path / "old"
    )
    grown = Vocabulary([*items.raw_ids(), "new-in-shop"])
    cfg2 = replace(cfg, num_items=NUM_ITEMS + 1)
    new = HyTRec(cfg2, grown, Vocabulary(f"c{n}" for n in range(1, NUM_CATEGORIES))).save(
        tmp_path / "new"
    )
    load = checkpoint_loader(EngineConfig(top_k=NUM_ITEMS + 1, device="cpu"))
    events = random_events(num_users=1, per_user=3, seed=12)
    new_item = replace(events[-1], item_id="new-in-shop")
    before = load(publish_model(old, tmp_path / "models")).process([*events[:-1], new_item])
    assert "new-in-shop" not in before.recommendations[-1].items
    after = load(publish_model(new, tmp_path / "models")).process([*events[:-1], new_item])
    assert "new-in-shop" in after.recommendations[-1].items


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


# ---------------------------------------------------------------------------- the repeat head

HEAD = RepeatConfig(buffer_size=8, hidden=8)


def head_model(gate_bias: float = 0.3) -> HyTRec:
    """A HyTRec with a small repeat head whose weights are away from their initial zeros;
    a large gate_bias makes the copy side win most places."""
    torch.manual_seed(0)
    cfg = HyTRecConfig(
        num_items=NUM_ITEMS,
        num_categories=NUM_CATEGORIES,
        d_model=32,
        long_layers=4,
        dropout=0,
        repeat_head=HEAD,
    )
    items = Vocabulary(f"i{n}" for n in range(1, NUM_ITEMS))
    categories = Vocabulary(f"c{n}" for n in range(1, NUM_CATEGORIES))
    model = HyTRec(cfg, items, categories).eval()
    with torch.no_grad():
        model.repeat_head.score_scale.fill_(0.7)
        model.repeat_head.score_w.normal_()
        model.repeat_head.gate[2].bias.fill_(gate_bias)
        model.item_table().mul_(20)  # item scores of order 1
    return model


@pytest.fixture(scope="module")
def head_checkpoint(tmp_path_factory):
    return head_model().save(tmp_path_factory.mktemp("head") / "checkpoint")


def offline_log_p(model, events: list[BehaviorEvent]) -> torch.Tensor:
    """The offline ranking after all of a user's events: log P(i) [num_items] of the
    model's repeat/explore mixture (`evaluate.ranking_scores`, the accuracy harness's)."""
    columns = [
        [model.items.get(e.item_id) for e in events],
        [model.categories.get(e.category_id) for e in events],
        [int(Behavior.parse(e.behavior)) for e in events],
        [e.ts for e in events],
    ]
    batch = EventBatch(*(torch.tensor([c]) for c in columns), lengths=torch.tensor([len(events)]))
    with torch.no_grad():
        return ranking_scores(model, batch)[0]


def newest_distinct(events: list[BehaviorEvent], n: int) -> list[str]:
    return list(dict.fromkeys(e.item_id for e in reversed(events)))[:n]


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_served_items_and_log_p_equal_the_offline_ranking_with_the_head(
    head_checkpoint, batch_size
):
    """Train/serve parity through the engine: the published top K, their log P(i) and
    sources are the offline model's full ranking by log P(i) after the same events."""
    engine = engine_of(head_checkpoint, top_k=10)
    events = random_events(num_users=5, per_user=30, seed=11)
    results, latest = serve(engine, events, batch_size)
    assert all(not r.rejected for r in results)
    served = assert_served_as_ranked_with_the_head(
        engine.model, events, latest, lambda i: "explore"
    )
    assert {"repeat", "explore"} <= served


def assert_served_as_ranked_with_the_head(model, events, latest, explore_source) -> set[str]:
    """Each user's published top 10 and log P(i) are the offline ranking's after the same
    events; a buffered item's source is "repeat", any other's `explore_source(index)`.
    Returns every source served."""
    for user in {e.user_id for e in events}:
        mine = [e for e in events if e.user_id == user]
        log_p = offline_log_p(model, mine)
        top = log_p.topk(10).indices.tolist()
        rec = latest[user]
        assert rec.items == [model.items.raw(i) for i in top]
        np.testing.assert_allclose(rec.scores, log_p[top].numpy(), rtol=0, atol=1e-4)
        buffered = set(newest_distinct(mine, HEAD.buffer_size))
        expected = ["repeat" if model.items.raw(i) in buffered else explore_source(i) for i in top]
        assert rec.sources == expected
    return {s for rec in latest.values() for s in rec.sources}


def test_a_model_without_the_head_publishes_explore_items_only(checkpoint):
    rec = engine_of(checkpoint, top_k=5).process(random_events(1, 5, seed=1)).recommendations[-1]
    assert rec.sources == ["explore"] * 5


def buffer_of(engine, user: str) -> dict[str, torch.Tensor]:
    parts = engine.store.export_users([user])[user].parts
    return {name: parts[name] for name in ("recent", "recent_counts")}


def test_a_snapshot_round_trip_restores_the_buffer_exactly(head_checkpoint):
    """Export, encode, decode, import into a fresh engine: the buffer is the same tensor, and
    the next events get the same recommendations as in the engine that never stopped."""
    events = random_events(num_users=3, per_user=20, seed=12)
    first, rest = events[:40], events[40:]
    engine = engine_of(head_checkpoint, top_k=10)
    engine.process(first)
    users = sorted({e.user_id for e in first})
    snapshots = engine.export_states({u: 0 for u in users})
    restored = engine_of(head_checkpoint, top_k=10)
    decoded = [decode_snapshot(encode_snapshot(s)) for s in snapshots]
    assert restored.import_states(decoded) == len(users)
    for user in users:
        before, after = buffer_of(engine, user), buffer_of(restored, user)
        assert int(before["recent_counts"][1]) == sum(e.user_id == user for e in first)
        for name in before:
            assert torch.equal(before[name], after[name]), name
    want = {r.user_id: r for r in engine.process(rest).recommendations}
    got = {r.user_id: r for r in restored.process(rest).recommendations}
    assert {u: r.items for u, r in got.items()} == {u: r.items for u, r in want.items()}


def test_an_old_format_snapshot_is_refused_by_name(head_checkpoint):
    engine = engine_of(head_checkpoint)
    engine.process(random_events(1, 3, seed=1))
    value = encode_snapshot(engine.export_states({"u0": 0})[0])
    old = value.replace(FORMAT.encode(), b"hytrec-user-state/3")
    with pytest.raises(ValueError, match="unknown snapshot format 'hytrec-user-state/3'"):
        decode_snapshot(old)


def test_a_refused_event_goes_to_the_dead_letters_and_leaves_the_buffer_alone(head_checkpoint):
    engine = engine_of(head_checkpoint)
    events = random_events(num_users=1, per_user=5, seed=13)
    engine.process(events)
    before = buffer_of(engine, "u0")
    stale = replace(events[0], item_id="i1", offset=50, ts=events[0].ts - 10**6)
    result = engine.process([stale])
    assert [(e.offset, reason) for e, reason, _ in result.rejected] == [(50, "out_of_order")]
    for name, tensor in buffer_of(engine, "u0").items():
        assert torch.equal(tensor, before[name]), name


# ---------------------------------------------------------------------------- shop rules


def test_explore_only_recommends_only_items_new_to_the_user(head_checkpoint):
    """The top K of log P(i) among the items outside the user's buffer, all "explore"."""
    engine = engine_of(head_checkpoint, top_k=10, explore_only=True)
    events = random_events(num_users=3, per_user=12, seed=14)
    _, latest = serve(engine, events, 5)
    for user, rec in latest.items():
        mine = [e for e in events if e.user_id == user]
        known = {engine.model.items.get(i) for i in newest_distinct(mine, HEAD.buffer_size)}
        log_p = offline_log_p(engine.model, mine)
        log_p[sorted(known)] = float("-inf")
        top = log_p.topk(10).indices.tolist()
        assert rec.items == [engine.model.items.raw(i) for i in top]
        assert rec.sources == ["explore"] * 10


def test_items_paid_for_within_the_window_are_left_out(head_checkpoint):
    """An item paid for less than H hours before the user's newest event is not
    recommended; once the newest event is H hours or more later, it may be again."""
    hours = 2
    engine = engine_of(head_checkpoint, top_k=NUM_ITEMS, exclude_paid_hours=hours)
    base = random_events(num_users=1, per_user=4, seed=15)
    paid = replace(base[1], item_id="i7", category_id="c1", behavior="PAYMENT", ts=TS + 100)
    clicks = [replace(e, ts=TS + 200 + n, offset=10 + n) for n, e in enumerate(base[2:])]
    events = [replace(base[0], ts=TS), replace(paid, offset=1), *clicks]
    rec = engine.process(events).recommendations[-1]
    assert "i7" not in rec.items
    assert len(rec.items) == NUM_ITEMS - 2  # every other item still comes
    within = replace(base[3], ts=TS + 100 + hours * 3600 - 1, offset=20)
    assert "i7" not in engine.process([within]).recommendations[-1].items
    after = replace(base[3], ts=TS + 100 + hours * 3600, offset=21)
    rec = engine.process([after]).recommendations[-1]
    assert "i7" in rec.items and rec.sources[rec.items.index("i7")] == "repeat"
    # and without the rule the item was there all along
    plain = engine_of(head_checkpoint, top_k=NUM_ITEMS).process(events).recommendations[-1]
    assert "i7" in plain.items


def test_a_minimum_explore_share_keeps_the_best_explore_items(tmp_path):
    """With the copy side winning (a high gate), the plain top K is mostly repeats; with a
    minimum share s the best ceil(s K) explore candidates join the best of the rest, in log
    P order."""
    checkpoint = head_model(gate_bias=4.0).save(tmp_path / "checkpoint")
    events = random_events(num_users=4, per_user=20, seed=16)
    plain = serve(engine_of(checkpoint, top_k=10), events, 9)[1]
    assert min(r.sources.count("explore") for r in plain.values()) < 5  # the rule has work
    _, latest = serve(engine_of(checkpoint, top_k=10, min_explore_share=0.5), events, 9)
    for user, rec in latest.items():
        base = plain[user]
        assert rec.sources.count("explore") >= 5
        assert rec.scores == sorted(rec.scores, reverse=True)
        pool = sorted(zip(base.scores, base.items, base.sources, strict=True), reverse=True)
        repeats = [i for _, i, s in pool if s == "repeat"]
        explore_taken = [i for i, s in zip(rec.items, rec.sources, strict=True) if s == "explore"]
        # the repeats kept are the best repeats, as many as the explore quota leaves room for
        kept = [i for i, s in zip(rec.items, rec.sources, strict=True) if s == "repeat"]
        assert kept == repeats[: len(kept)] and len(kept) == 10 - len(explore_taken)
        assert len(kept) == min(5, len(repeats)) or len(explore_taken) > 5


@pytest.mark.parametrize(
    "rule", [{"explore_only": True}, {"exclude_paid_hours": 1.0}, {"min_explore_share": 0.2}]
)
def test_shop_rules_need_a_model_with_the_head(checkpoint, rule):
    with pytest.raises(ValueError, match=f"{next(iter(rule))}.*repeat head"):
        engine_of(checkpoint, **rule)


@pytest.mark.parametrize("bad", [{"min_explore_share": 1.5}, {"exclude_paid_hours": -1.0}])
def test_shop_rule_values_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EngineConfig(**bad)


def worker_engine_config(monkeypatch, argv: list[str]) -> EngineConfig:
    """The EngineConfig `hytrec worker ARGV` would serve with (nothing is started)."""
    from hytrec import cli
    from hytrec.stream import app

    seen = {}

    def sources(checkpoint, index, engine, engine_config, models_dir):
        seen["config"] = engine_config
        return None, None

    monkeypatch.setattr(app, "engine_sources", sources)
    monkeypatch.setattr(app, "run_worker", lambda *args, **kwargs: 0)
    args = cli.build_parser().parse_args(["worker", "--checkpoint=unused", *argv])
    assert args.func(args) == 0
    return seen["config"]


RULE_SETTINGS = {  # (option, environment variable, value, EngineConfig field, its value)
    "paid": ("--exclude-paid-hours=12", "HYTREC_EXCLUDE_PAID_HOURS", "12", 12.0),
    "explore_only": ("--explore-only", "HYTREC_EXPLORE_ONLY", "1", True),
    "share": ("--min-explore-share=0.25", "HYTREC_MIN_EXPLORE_SHARE", "0.25", 0.25),
}
RULE_FIELDS = {
    "paid": "exclude_paid_hours",
    "explore_only": "explore_only",
    "share": "min_explore_share",
}


@pytest.mark.parametrize("rule", RULE_SETTINGS)
def test_shop_rules_come_from_worker_options_and_environment_variables(monkeypatch, rule):
    from hytrec.stream.app import _engine_config_from_env

    option, variable, value, expected = RULE_SETTINGS[rule]
    field = RULE_FIELDS[rule]
    assert getattr(worker_engine_config(monkeypatch, []), field) != expected  # off by default
    assert getattr(worker_engine_config(monkeypatch, [option]), field) == expected
    monkeypatch.setenv(variable, value)
    assert getattr(worker_engine_config(monkeypatch, []), field) == expected
    assert getattr(_engine_config_from_env({variable: value}), field) == expected


def test_a_bad_shop_rule_value_stops_the_worker_command_with_its_name(monkeypatch, capsys):
    with pytest.raises(SystemExit) as stopped:
        worker_engine_config(monkeypatch, ["--min-explore-share=2"])
    assert stopped.value.code == 2 and "min_explore_share" in capsys.readouterr().err


def test_the_compiled_step_comes_from_a_worker_option_and_an_environment_variable(monkeypatch):
    from hytrec.stream.app import _engine_config_from_env

    assert not worker_engine_config(monkeypatch, []).compile_step  # off by default
    assert worker_engine_config(monkeypatch, ["--compile-step"]).compile_step
    monkeypatch.setenv("HYTREC_COMPILE_STEP", "1")
    assert worker_engine_config(monkeypatch, []).compile_step
    assert _engine_config_from_env({"HYTREC_COMPILE_STEP": "1"}).compile_step
    assert not _engine_config_from_env({"HYTREC_COMPILE_STEP": "0"}).compile_step


@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler for inductor"
)
def test_an_engine_with_the_compiled_step_serves_what_the_eager_one_does(checkpoint):
    """One event per user per micro-batch (the compiled call) and a run of several (eager):
    the same recommendations and scores as the eager engine."""
    eager = engine_of(checkpoint, top_k=5)
    compiled = engine_of(checkpoint, top_k=5, compile_step=True)
    assert compiled.compiled_step.active, compiled.compiled_step.reason
    events = random_events(num_users=4, per_user=6, seed=9)
    for size in (1, 1, 1, 4, 17):
        chunk, events = events[:size], events[size:]
        expected, served = eager.process(chunk), compiled.process(chunk)
        assert [r.items for r in served.recommendations] == [
            r.items for r in expected.recommendations
        ]
        for a, b in zip(served.recommendations, expected.recommendations, strict=True):
            np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


def small_ulim(tmp_path, head=None, merge="joint", user_term=False, cross_interest=False):
    """A ULIM over the engine tests' items, 8 categories (item n in category n % 8 + 1),
    its cascade over the top 3; with the head's weights, the user term's W_u and the cross
    interest's W_x away from their initial zeros."""
    from hytrec.model.ulim import ULIM, ULIMConfig

    torch.manual_seed(0)
    cfg = ULIMConfig(
        num_items=NUM_ITEMS, num_categories=NUM_CATEGORIES, d_model=16, dropout=0.0,
        top_categories=3, repeat_head=head, merge=merge, user_term=user_term,
        cross_interest=cross_interest,
    )  # fmt: skip
    items = Vocabulary(f"i{n}" for n in range(1, NUM_ITEMS))
    categories = Vocabulary(f"c{n}" for n in range(1, NUM_CATEGORIES))
    model = ULIM(cfg, items, categories).eval()
    model.item_category[1:] = torch.arange(1, NUM_ITEMS) % (NUM_CATEGORIES - 1) + 1
    with torch.no_grad():
        if head is not None:
            model.repeat_head.gate[2].bias.fill_(0.3)
            model.repeat_head.copy_out.weight.normal_()
        for term in (model.user_to_interest, model.cross_to_interest):
            if term is not None:
                term.weight.normal_()
    return model, engine_of(model.save(tmp_path / "ulim"), top_k=10)


@pytest.mark.parametrize(
    "merge, user_term, cross_interest",
    [("joint", False, False), ("joint", True, False), ("joint", True, True), ("dot", False, False)],
)
@pytest.mark.parametrize("batch_size", [1, 13])
def test_ulim_serves_its_category_cascade_as_offline_with_each_items_category(
    tmp_path, batch_size, merge, user_term, cross_interest
):
    """A per-category model (ULIM): the engine's top K, one filtered search per top category
    merged by the search score plus `ULIM.merge_offset` (log P(c) - log Z_c, or
    log P(c) for the dot merge), equals the offline cascade's (`rank_scores`: the top 3
    categories, over the same events), items, scores and the category each came through."""
    model, engine = small_ulim(
        tmp_path, merge=merge, user_term=user_term, cross_interest=cross_interest
    )
    events = random_events(num_users=5, per_user=20, seed=3)
    _, latest = serve(engine, events, batch_size)
    for user in {e.user_id for e in events}:
        scores = offline_log_p(model, [e for e in events if e.user_id == user])
        top = scores.topk(10).indices.tolist()
        rec = latest[user]
        assert rec.items == [model.items.raw(i) for i in top]
        np.testing.assert_allclose(rec.scores, scores[top].numpy(), rtol=1e-4, atol=1e-4)
        categories_of = model.item_category[top].tolist()
        assert rec.sources == [f"category:{model.categories.raw(c)}" for c in categories_of]
        assert len({s for s in rec.sources}) <= 3  # only the top three categories


@pytest.mark.parametrize("batch_size", [1, 13])
def test_ulim_with_the_head_serves_its_mixture_with_the_cascade_as_offline(tmp_path, batch_size):
    """ULIM + repeat head: the engine's top K (the buffer's items and the category
    searches' items, scored by the mixture) equals the offline `rank_scores`' top K over
    the same events, items and log P; a repeat item says so, an explore one names its
    category."""
    model, engine = small_ulim(tmp_path, HEAD)
    events = random_events(num_users=5, per_user=20, seed=3)
    _, latest = serve(engine, events, batch_size)
    served = assert_served_as_ranked_with_the_head(
        model, events, latest,
        lambda i: f"category:{model.categories.raw(int(model.item_category[i]))}",
    )  # fmt: skip
    # both sides served, or the test proves little
    assert {s.split(":")[0] for s in served} == {"repeat", "category"}


def test_a_per_category_model_needs_an_index_with_categories(tmp_path):
    from hytrec.index import build_index
    from hytrec.model.ulim import ULIM, ULIMConfig

    cfg = ULIMConfig(num_items=NUM_ITEMS, num_categories=NUM_CATEGORIES, d_model=16)
    items = Vocabulary(f"i{n}" for n in range(1, NUM_ITEMS))
    model = ULIM(cfg, items, Vocabulary(f"c{n}" for n in range(1, NUM_CATEGORIES)))
    vectors = model.item_vectors()
    index = build_index(vectors, np.arange(1, NUM_ITEMS), None, IndexConfig())
    with pytest.raises(ValueError, match="build the index with item categories"):
        RecommendationEngine(model, index, EngineConfig(device="cpu"))


def test_hisac_mi_serves_the_max_over_its_agents_as_offline():
    """A multi-query model (HiSAC-mi): the engine searches with each of the user's agents
    and merges by max score; its top K equals the offline `rank_scores` (max over agents)
    over the same events."""
    from hytrec.bench.hisac_parity import codebook_for, randomised
    from hytrec.index import build_index
    from hytrec.model.hisac import HiSACMulti, HiSACMultiConfig

    torch.manual_seed(0)
    cfg = HiSACMultiConfig(num_items=NUM_ITEMS, d_model=16, beams=(3, 2, 2))
    items = Vocabulary(f"i{n}" for n in range(1, NUM_ITEMS))
    codebook = codebook_for(NUM_ITEMS, sizes=(4, 3, 3), route_top=3, seed=0)
    model = randomised(HiSACMulti(cfg, items, codebook=codebook)).eval()
    index = build_index(model.item_vectors(), np.arange(1, NUM_ITEMS), None, IndexConfig())
    engine = RecommendationEngine(model, index, EngineConfig(top_k=10, device="cpu"))
    events = random_events(num_users=5, per_user=25, seed=4)
    _, latest = serve(engine, events, batch_size=9)
    agents_seen = 0
    for user in {e.user_id for e in events}:
        mine = [e for e in events if e.user_id == user]
        batch = EventBatch(
            torch.tensor([[items.get(e.item_id) for e in mine]]),
            torch.zeros(1, len(mine), dtype=torch.long),
            torch.tensor([[int(Behavior.parse(e.behavior)) for e in mine]]),
            torch.tensor([[e.ts for e in mine]]),
            lengths=torch.tensor([len(mine)]),
        )
        scores = model.rank_scores(batch)[0].numpy()  # [num_items]
        agents_seen = max(agents_seen, int(model.readout(batch)[0].present.sum()))
        top = np.argsort(-scores, kind="stable")[:10]
        rec = latest[user]
        assert rec.items == [items.raw(int(i)) for i in top]
        np.testing.assert_allclose(rec.scores, scores[top], rtol=1e-4, atol=1e-4)
        assert rec.sources == ["explore"] * 10
    assert agents_seen > 1  # several queries per user, or the test proves nothing
