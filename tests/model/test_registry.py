"""The model registry: every registered model builds from a log, trains a step, saves, loads
back the same (version included) and, when it streams, has a consistent serving state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hytrec.bench.parity import pad_batch, random_user
from hytrec.model.base import CheckpointError
from hytrec.model.events import EventLog, Vocabulary
from hytrec.model.hytrec import HyTRecConfig
from hytrec.model.registry import MODELS, build_model, describe, load_model, spec, spec_of
from hytrec.model.streaming import SlotState, StreamingModel


def tiny_log(users=6, length=9, items=20, categories=4) -> EventLog:
    rng = np.random.default_rng(0)
    n = users * length
    return EventLog(
        user=np.repeat(np.arange(1, users + 1), length),
        item=rng.integers(1, items, n),
        category=rng.integers(1, categories, n),
        behavior=rng.integers(1, 5, n),
        ts=np.tile(np.arange(length) * 60, users) + 1_600_000_000,
        users=Vocabulary(str(u) for u in range(1, users + 1)),
        items=Vocabulary(str(i) for i in range(1, items)),
        categories=Vocabulary(str(c) for c in range(1, categories)),
    )


def test_a_model_is_refused_data_without_what_it_needs():
    """ULIM predicts categories: on a log without any (every event's category unknown) it
    is refused by name with what to use instead, and `missing_input` gives the harness's
    reason; HPGR the same for times."""
    from dataclasses import replace

    from hytrec.model.data import DataError
    from hytrec.model.registry import missing_input

    log = tiny_log()
    no_categories = replace(log, category=np.zeros_like(log.category))
    ulim = spec("ulim").config()
    assert missing_input(ulim, log) is None
    assert missing_input(ulim, no_categories) == "no item categories"
    with pytest.raises(DataError, match="ULIM predicts the next category.*taobao, ml100k"):
        build_model(ulim, no_categories)
    positions = replace(log, ts=np.tile(np.arange(9), 6))
    assert missing_input(spec("hpgr").config(), positions).startswith("no timestamps")
    assert missing_input(spec("sasrec").config(), no_categories) is None


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_builds_saves_and_loads_back(name, tmp_path):
    log = tiny_log()
    line = spec(name)
    model = build_model(line.config(), log)
    assert spec_of(model.cfg) is line and model.NAME == name
    assert model.cfg.num_items == len(log.items)
    assert model.item_category[1:].any()  # filled from the log
    model.save(tmp_path / name, extra={"note": name})
    assert json.loads((tmp_path / name / "checkpoint.json").read_text())["model"] == name
    loaded = load_model(tmp_path / name)
    assert type(loaded) is type(model) and loaded.version == model.version
    assert loaded.checkpoint_extra == {"note": name}
    assert loaded.items == log.items


@pytest.mark.parametrize("name", sorted(n for n, s in MODELS.items() if s.streams))
def test_every_streaming_model_meets_the_protocol(name):
    model = build_model(spec(name).config(), tiny_log()).eval()
    assert isinstance(model, StreamingModel)
    state = model.new_state(4)
    assert isinstance(state, SlotState) and state.num_slots == 4
    assert (
        model.state_bytes_per_user()
        == state.bytes_per_user()
        == sum(t[0].numel() * t.element_size() for t in state.parts().values())
    )
    shape = HyTRecConfig(num_items=model.cfg.num_items, num_categories=3)
    user = random_user(5, shape, torch.Generator().manual_seed(0))
    vectors = model.step(state, torch.tensor([2]), pad_batch([user]))
    assert vectors.shape == (1, model.item_table().shape[1])
    assert int(state.count[2]) == 5 and int(state.last_ts[2]) == int(user.ts[-1])
    assert int(state.count[0]) == 0


def test_a_checkpoint_of_an_unregistered_model_is_refused_by_name(tmp_path):
    model = build_model(spec("sasrec").config(), tiny_log())
    model.save(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "checkpoint.json").read_text())
    meta["model"] = "nonesuch"
    (tmp_path / "c" / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="'nonesuch' is not registered"):
        load_model(tmp_path / "c")
    with pytest.raises(ValueError, match="unknown model 'nonesuch'; registered"):
        spec("nonesuch")


def test_describe_lists_every_model_with_its_fidelity():
    rows = {row["name"]: row for row in describe()}
    assert rows.keys() == MODELS.keys()
    assert rows["recgrela"]["fidelity"] == "code" and rows["hytrec"]["query"] == "single"
