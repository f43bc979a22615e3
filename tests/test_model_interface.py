"""One model interface: a model added through the registry alone (its own file's worth of
code and one registry line) trains, is indexed, served by the engine with eviction, and
snapshotted and restored, with nothing in the stream naming it; and every registered
streaming model is served with the vectors of its offline form."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn

from hytrec.index import IndexConfig, build_from_checkpoint
from hytrec.model.base import SequentialModel
from hytrec.model.batch import EventBatch, PackedRuns
from hytrec.model.evaluate import leave_one_out, ranking_scores
from hytrec.model.events import Behavior, EventLog, Vocabulary
from hytrec.model.registry import MODELS, ModelSpec, build_model, load_model, spec
from hytrec.model.streaming import SlotState
from hytrec.model.train import TrainConfig, train
from hytrec.stream.engine import EngineConfig, build_engine
from hytrec.stream.schemas import BehaviorEvent

TS = 1_600_000_000


# ---------------------------------------------------------------------------- a toy model


@dataclass(frozen=True)
class MeanConfig:
    num_items: int = 10
    d_model: int = 8


@dataclass
class MeanState(SlotState):
    total: torch.Tensor  # [P, d] sum of the item vectors seen
    count: torch.Tensor
    last_ts: torch.Tensor


class MeanOfItems(SequentialModel):
    """The user vector is the mean of the embeddings of the items seen so far."""

    NAME = "mean-of-items"
    CONFIG = MeanConfig

    def __init__(self, cfg, items=None, categories=None):
        super().__init__(cfg, items, categories)
        self.item_emb = nn.Embedding(cfg.num_items, cfg.d_model, padding_idx=0)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, batch: EventBatch) -> torch.Tensor:
        seen = torch.arange(1, batch.item.shape[1] + 1, device=batch.item.device)[:, None]
        return self.proj(self.item_emb(batch.item).cumsum(1) / seen)

    def new_state(self, num_slots, device="cpu") -> MeanState:
        return MeanState(
            total=torch.zeros(num_slots, self.cfg.d_model, device=device),
            count=torch.zeros(num_slots, dtype=torch.long, device=device),
            last_ts=torch.zeros(num_slots, dtype=torch.long, device=device),
        )

    @torch.no_grad()
    def step(self, state: MeanState, slots, batch: EventBatch) -> torch.Tensor:
        runs = PackedRuns.of(batch.lengths, batch.item.shape[1])
        added = runs.unpack(self.item_emb(runs.pack(batch.item))).sum(1)  # [U, d]
        state.total[slots] += added
        state.count[slots] += batch.lengths
        state.last_ts[slots] = batch.ts[torch.arange(len(slots)), batch.lengths - 1]
        return self.proj(state.total[slots] / state.count[slots, None])


@pytest.fixture
def toy_registered(monkeypatch):
    """The one registry line a new model needs."""
    monkeypatch.setitem(
        MODELS, "mean-of-items", ModelSpec("mean-of-items", MeanConfig, MeanOfItems)
    )


def small_log(users=12, length=8, items=9) -> EventLog:
    rng = np.random.default_rng(1)
    n = users * length
    return EventLog(
        user=np.repeat(np.arange(1, users + 1), length),
        item=rng.integers(1, items + 1, n),
        category=np.ones(n, dtype=np.int64),
        behavior=np.full(n, int(Behavior.CLICK)),
        ts=np.tile(np.arange(length) * 60, users) + TS,
        users=Vocabulary(str(u) for u in range(1, users + 1)),
        items=Vocabulary(f"i{i}" for i in range(1, items + 1)),
        categories=Vocabulary(["c"]),
    )


def events_of(log: EventLog) -> list[BehaviorEvent]:
    """The log as stream events, users interleaved in time order, on one partition."""
    order = np.lexsort((log.user, log.ts))
    return [
        BehaviorEvent(
            user_id=log.users.raw(int(log.user[i])),
            item_id=log.items.raw(int(log.item[i])),
            category_id="c",
            behavior="click",
            ts=int(log.ts[i]),
            partition=0,
            offset=offset,
            received_at=0.0,
        )
        for offset, i in enumerate(order)
    ]


def offline_of(model, log: EventLog, read) -> dict[str, torch.Tensor]:
    """`read(model, batch)[0]` of each user's whole history (a batch of one), by user."""
    out = {}
    for u in range(1, len(log.users)):
        rows = np.flatnonzero(log.user == u)
        columns = [
            torch.from_numpy(getattr(log, c)[rows])[None]
            for c in ("item", "category", "behavior", "ts")
        ]
        out[log.users.raw(u)] = read(
            model, EventBatch(*columns, lengths=torch.tensor([len(rows)]))
        )[0]
    return out


def offline_vectors(model, log: EventLog) -> dict[str, torch.Tensor]:
    """Each user's vector after all of its events, from the training form."""
    return offline_of(model, log, lambda m, batch: m.user_vector(batch))


def test_a_model_added_through_the_registry_alone_trains_indexes_and_streams(
    toy_registered, tmp_path
):
    log = small_log()
    result = train(
        MeanConfig(),
        log,
        leave_one_out(log),
        TrainConfig(epochs=2, valid_users=None),
        tmp_path / "ckpt",
    )
    assert type(result.model) is MeanOfItems
    assert type(load_model(tmp_path / "ckpt")) is MeanOfItems
    index = build_from_checkpoint(tmp_path / "ckpt", IndexConfig(kind="flat"))
    assert index.model_version == result.model.version
    # a budget of 3 slots for 12 users: eviction to host memory and back on every batch
    engine = build_engine(
        tmp_path / "ckpt",
        config=EngineConfig(top_k=3, device="cpu", state_budget_bytes=3 * 8 * 4 + 3 * 16),
    )
    assert engine.store.num_slots == 3
    events = events_of(log)
    recommendations = []
    for start in range(0, len(events), 5):
        recommendations += engine.process(events[start : start + 5]).recommendations
    assert recommendations and all(len(r.items) == 3 for r in recommendations)
    expected = offline_vectors(engine.model, log)
    parts = engine.store.export_users(list(expected))
    for user, vector in expected.items():
        total, count = parts[user].parts["total"], parts[user].parts["count"]
        served = engine.model.proj(total / count)
        assert int(count) == int((log.user == log.users.get(user)).sum())
        assert (served - vector).abs().max() <= 1e-5
    # snapshots of the toy state restore into a fresh engine, name by name
    snapshots = engine.export_states({u: 0 for u in expected})
    fresh = build_engine(tmp_path / "ckpt", config=EngineConfig(device="cpu"))
    assert fresh.import_states(snapshots) == len(expected)
    back = fresh.store.export_users(list(expected))
    for user in expected:
        for name, tensor in parts[user].parts.items():
            assert torch.equal(back[user].parts[name], tensor), (user, name)


@pytest.mark.parametrize("name", sorted(n for n, s in MODELS.items() if s.streams))
def test_every_registered_streaming_model_is_served_with_its_offline_vectors(name, tmp_path):
    log = small_log(users=6, length=30, items=40)
    torch.manual_seed(0)
    line = spec(name)
    model = build_model(line.config(d_model=16), log).eval()
    model.save(tmp_path / name)
    # two slots for six users: states go to host memory and back on every batch
    budget = 2 * model.state_bytes_per_user()
    config = EngineConfig(top_k=5, device="cpu", state_budget_bytes=budget)
    engine = build_engine(tmp_path / name, config=config)
    assert engine.store.num_slots == 2
    events = events_of(log)
    last = {}
    for start in range(0, len(events), 7):
        for rec in engine.process(events[start : start + 7]).recommendations:
            last[rec.user_id] = rec
    expected = offline_of(engine.model, log, ranking_scores)  # user -> [num_items]
    for user, scores in expected.items():
        # the served list's best item is the offline ranking's best, at its score, whatever
        # the query kind (one vector; max over HiSAC-mi's agents; ULIM's category cascade)
        best = engine.model.items.get(last[user].items[0])
        assert abs(float(scores[best]) - last[user].scores[0]) <= 1e-4, (name, user)
        assert float(scores[best]) >= float(scores[1:].max()) - 1e-4, (name, user)
    # every part of every user's state survives a snapshot and a restore, name by name
    parts = engine.store.export_users(list(expected))
    fresh = build_engine(tmp_path / name, config=config)
    assert fresh.import_states(engine.export_states({u: 0 for u in expected})) == len(expected)
    back = fresh.store.export_users(list(expected))
    for user in expected:
        assert back[user].parts.keys() == parts[user].parts.keys()
        for part, tensor in parts[user].parts.items():
            assert torch.equal(back[user].parts[part], tensor), (name, user, part)
