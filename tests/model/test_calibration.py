"""The repeat head's gate bias (`calibration.py`, `RepeatHead.gate_bias`): a recorded
mixture re-mixed under a shift is the ranking served with the bias moved, the hit counts by
shift against re-running the model, the fit's choice, and the bias saved with the weights
while checkpoints from before it existed still load with their version."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hytrec.bench.demo import load_events
from hytrec.model import calibration
from hytrec.model.base import CheckpointError
from hytrec.model.calibration import GateCalibrationConfig, fit_gate_bias, hits_by_shift
from hytrec.model.evaluate import history_batch, ranking_scores
from hytrec.model.registry import build_model, load_model
from hytrec.model.repeat import RepeatConfig
from hytrec.model.sasrec import SASRecConfig
from hytrec.model.ulim import ULIMConfig

CONFIGS = {
    # the explore side a softmax over all items ...
    "sasrec": SASRecConfig(d_model=16, layers=1, heads=1, max_len=20, repeat_head=RepeatConfig()),
    # ... and ULIM's cascade, which gives items outside its top categories probability 0
    "ulim": ULIMConfig(d_model=16, top_categories=2, repeat_head=RepeatConfig()),
}


@pytest.fixture(scope="module")
def events():
    return load_events("synthetic")[0]


def untrained(name: str, events):
    torch.manual_seed(0)
    model = build_model(CONFIGS[name], events).eval()
    # a gate and copy scores away from their initial values, so that shifts change lists
    with torch.no_grad():
        for p in model.repeat_head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def later_rows(events, count: int = 60) -> np.ndarray:
    """Events with an earlier event of their user, a seeded sample."""
    first = calibration.user_starts(events)
    rows = np.nonzero(np.arange(len(events)) > first)[0]
    return np.sort(np.random.default_rng(0).choice(rows, count, replace=False))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_recorded_mixture_ranks_as_the_model_served_with_the_bias_moved(name, events):
    model = untrained(name, events)
    rows = later_rows(events, 8)
    first = calibration.user_starts(events)
    batch = history_batch(events, first[rows], rows, 20)
    with torch.no_grad(), model.repeat_head.recording_mixtures() as mixtures:
        served = ranking_scores(model, batch)
    (mixture,) = mixtures
    assert torch.equal(mixture.log_p(), served)
    for shift in (-1.5, 2.0):
        model.repeat_head.gate_bias.fill_(shift)
        with torch.no_grad():
            moved = ranking_scores(model, batch)
        finite = moved.isfinite()
        assert torch.equal(finite, mixture.log_p(shift).isfinite())
        assert torch.allclose(mixture.log_p(shift)[finite], moved[finite], atol=1e-5)
        assert not torch.allclose(moved[finite], served[finite], atol=1e-3)  # it moved
    assert model.repeat_head._recorded is None  # recording ends with the block


def test_recording_ends_when_the_block_raises(events):
    head = untrained("sasrec", events).repeat_head
    with pytest.raises(RuntimeError), head.recording_mixtures():
        raise RuntimeError
    assert head._recorded is None


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hits_by_shift_against_running_the_model_at_each_bias(name, events):
    model = untrained(name, events)
    rows, shifts, K = later_rows(events), (-10.0, 0.0, 3.0), 20
    hits = hits_by_shift(model, events, rows, shifts, K, batch=16)
    first = calibration.user_starts(events)
    context = getattr(model, "max_len", None)
    for shift in shifts:
        model.repeat_head.gate_bias.fill_(shift)
        want = 0
        for row in rows:  # one event at a time, after every earlier event of its user
            begin = first[row] if context is None else max(first[row], row - context)
            with torch.no_grad():
                scores = ranking_scores(
                    model, history_batch(events, np.array([begin]), np.array([row]))
                )
            want += int(events.item[row]) in scores[0].topk(K).indices.tolist()
        assert hits[shift] == want, shift
    assert len(set(hits.values())) > 1  # the shifts change the lists


def test_the_fit_takes_the_most_hits_then_the_smallest_shift(events, monkeypatch):
    model = untrained("sasrec", events)
    model.repeat_head.gate_bias.fill_(0.5)
    counts = {-2.0: 7, -1.0: 3, 0.0: 5, 1.5: 7, 3.0: 7}
    monkeypatch.setattr(calibration, "hits_by_shift", lambda *args: counts)
    cfg = GateCalibrationConfig(shifts=tuple(counts), max_events=None)
    report = fit_gate_bias(model, events, later_rows(events, 10), cfg)
    assert report["shift"] == 1.5 and float(model.repeat_head.gate_bias) == 2.0
    assert report["gate_bias_before"] == 0.5 and report["gate_bias"] == 2.0
    assert report[f"hit@{cfg.top_k}_by_shift"] == {str(s): c / 10 for s, c in counts.items()}
    # a tie with the trained gate keeps it
    monkeypatch.setattr(calibration, "hits_by_shift", lambda *args: dict.fromkeys(counts, 4))
    assert fit_gate_bias(model, events, later_rows(events, 10), cfg)["shift"] == 0.0


def test_the_fit_is_refused_without_a_head_or_events(events):
    plain = build_model(SASRecConfig(d_model=16, layers=1, heads=1, max_len=20), events)
    with pytest.raises(ValueError, match="no repeat head"):
        fit_gate_bias(plain, events, later_rows(events, 5), GateCalibrationConfig())
    with pytest.raises(ValueError, match="no events"):
        fit_gate_bias(untrained("sasrec", events), events, np.array([], dtype=np.int64),
                      GateCalibrationConfig())  # fmt: skip
    with pytest.raises(ValueError, match="must hold 0.0"):
        GateCalibrationConfig(shifts=(1.0, 2.0))


def test_the_bias_is_saved_and_a_checkpoint_from_before_it_loads(events, tmp_path):
    model = untrained("sasrec", events)
    model.save(tmp_path / "zero")
    at_zero = model.version
    # an older checkpoint: the same weights without the bias, its version from then
    weights = load_file(tmp_path / "zero" / "model.safetensors")
    del weights["repeat_head.gate_bias"]
    save_file(weights, tmp_path / "zero" / "model.safetensors")
    old = load_model(tmp_path / "zero")
    assert float(old.repeat_head.gate_bias) == 0.0 and old.version == at_zero
    # a fitted bias is saved, loaded and changes the version
    model.repeat_head.gate_bias.fill_(1.25)
    model.save(tmp_path / "fitted")
    fitted = load_model(tmp_path / "fitted")
    assert float(fitted.repeat_head.gate_bias) == 1.25 and fitted.version != at_zero
    meta = json.loads((tmp_path / "fitted" / "checkpoint.json").read_text())
    assert meta["version"] == fitted.version
    # any other weight missing is still refused
    del weights["repeat_head.score_w"]
    save_file(weights, tmp_path / "zero" / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path / "zero")


def test_calibrate_gate_fits_and_saves_a_checkpoint_from_the_command_line(events, tmp_path, capsys):
    from hytrec import cli
    from hytrec.model.calibration import events_since

    untrained("sasrec", events).save(tmp_path / "ckpt")
    events.save(tmp_path / "log")
    since = int(np.quantile(events.ts, 0.9))
    argv = ["calibrate-gate", "--dataset", str(tmp_path / "log"), "--checkpoint",
            str(tmp_path / "ckpt"), "--since", str(since), "--max-events", "40"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert saved["extra"]["gate_calibration"] == printed
    assert printed["events"] == 40 < len(events_since(events, since))
    model = load_model(tmp_path / "ckpt")
    assert float(model.repeat_head.gate_bias) == printed["gate_bias"] == printed["shift"]
    # every calibrated event is from --since on and has an earlier event of its user
    rows = events_since(events, since)
    first = calibration.user_starts(events)
    assert (events.ts[rows] >= since).all() and (rows > first[rows]).all()
    assert len(rows) == int(((events.ts >= since) & (np.arange(len(events)) > first)).sum())


def test_calibrate_gate_refuses_what_it_cannot_calibrate(events, tmp_path, capsys):
    from hytrec import cli
    from hytrec.model.cli import unix_seconds
    from hytrec.model.events import Vocabulary

    events.save(tmp_path / "log")
    model = untrained("sasrec", events)
    model.items = Vocabulary(model.items.to_json()[1:-1])  # another vocabulary
    model.save(tmp_path / "other")
    plain = build_model(SASRecConfig(d_model=16, layers=1, heads=1, max_len=20), events)
    plain.save(tmp_path / "plain")
    untrained("sasrec", events).save(tmp_path / "ckpt")
    after_last = str(int(events.ts.max()) + 1)
    for checkpoint, since, message in (
        ("other", "0", "vocabulary"),
        ("plain", "0", "no repeat head"),
        ("ckpt", after_last, "no events"),
    ):
        argv = ["calibrate-gate", "--dataset", str(tmp_path / "log"), "--checkpoint",
                str(tmp_path / checkpoint), "--since", since]  # fmt: skip
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err
    assert unix_seconds("1512345678") == 1512345678
    assert unix_seconds("2017-12-03") == unix_seconds("2017-12-03T01:00+01:00") == 1512259200
    with pytest.raises(SystemExit, match="neither unix seconds nor an ISO date"):
        unix_seconds("yesterday")
