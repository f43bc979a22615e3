"""The main job end to end on synthetic events, small enough for CI: it trains, streams
through a real broker and a worker process, reports, and leaves no process behind."""

from __future__ import annotations

import json
import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hytrec.bench import demo
from hytrec.bench.demo import DemoConfig, run_demo, summary_lines
from hytrec.bench.reports import git_commit
from hytrec.model.hytrec import HyTRecConfig
from hytrec.model.registry import load_model
from hytrec.model.repeat import RepeatConfig
from hytrec.model.train import TrainConfig
from hytrec.stream.schemas import Recommendation

pytestmark = pytest.mark.integration


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # state, ppid, ...
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def recent_distinct(items: list[str], k: int) -> list[str]:
    out: list[str] = []
    for item in reversed(items):
        if item not in out:
            out.append(item)
    return out[:k]


def by_frequency(items: list[str], k: int) -> list[str]:
    """The user's items by count, ties by the newest event on them."""
    score = {item: (items.count(item), n) for n, item in enumerate(items)}
    return sorted(score, key=lambda item: score[item], reverse=True)[:k]


def by_recency_frequency(items: list[str], k: int) -> list[str]:
    """The user's items by count / (1 + items whose newest event is later), exactly; ties
    by the newest event on them."""
    newest = {item: n for n, item in enumerate(items)}
    later = {i: sum(newest[j] > newest[i] for j in newest) for i in newest}
    key = {i: (Fraction(items.count(i), 1 + later[i]), newest[i]) for i in newest}
    return sorted(newest, key=key.__getitem__, reverse=True)[:k]


def next_items(history: list[dict], last: str | None, popular: list[str], k: int) -> list[str]:
    """Items that directly followed `last` in a user's history events, most often first
    (ties by popularity, its rank in `popular` or after), then the popular ones."""
    users: dict[str, list[str]] = {}
    for p in history:
        users.setdefault(p["user_id"], []).append(p["item_id"])
    after = [
        b for items in users.values() for a, b in zip(items, items[1:], strict=False) if a == last
    ]
    counts = {item: after.count(item) for item in after}
    total = {}
    for p in history:
        total[p["item_id"]] = total.get(p["item_id"], 0) + 1
    ranked = sorted(counts, key=lambda item: (-counts[item], -total[item]))
    return list(dict.fromkeys(ranked + popular))[:k]


def expected_quality(replays: dict, recommendations: list, top_k: int) -> dict:
    """The summary's hit rates recomputed from what was replayed (payloads and where each
    landed) and the recommendations that came back: each held-out event is scored against
    its user's newest recommendation answering an earlier offset."""
    history, _ = replays["history"]
    heldout, heldout_sent = replays["held-out"]
    events: dict[str, list[tuple[int, str]]] = {}  # user -> (offset, item), in order
    for payloads, sent in (replays["history"], replays["held-out"]):
        for i, p in enumerate(payloads):
            events.setdefault(p["user_id"], []).append((int(sent.offset[i]), p["item_id"]))
    answered: dict[str, list[tuple[int, list[str]]]] = {}
    for rec in recommendations:
        answered.setdefault(rec.user_id, []).append((rec.source_offset, rec.items))
    counts: dict[str, int] = {}
    for p in history:
        counts[p["item_id"]] = counts.get(p["item_id"], 0) + 1
    first_seen = {item: i for i, item in reversed(list(enumerate(p["item_id"] for p in history)))}
    popular_list = sorted(counts, key=lambda item: (-counts[item], first_seen[item]))[:top_k]
    popular = set(popular_list)
    past: dict[str, list[str]] = {}
    for p in history:
        past.setdefault(p["user_id"], []).append(p["item_id"])
    transitions: dict[str | None, list[str]] = {}  # last item -> the baseline's list
    n = dict.fromkeys(["scored", "new", "new_hits", "new_popular", "new_next", "recent_all"], 0)
    n["no_lag"] = 0
    hits: dict[str, int] = {}
    no_lag_hits: dict[str, int] = {}
    gains: dict[str, float] = {}
    for i, p in enumerate(heldout):
        user, item, offset = p["user_id"], p["item_id"], int(heldout_sent.offset[i])
        earlier = [(o, items) for o, items in answered.get(user, []) if o < offset]
        mine = past.setdefault(user, [])
        if earlier:
            answered_offset, recommended = max(earlier, key=lambda pair: pair[0])
            recommended = recommended[:top_k]
            # the baselines know what the recommendation knew
            known = [i for o, i in events[user] if o <= answered_offset]
            last = known[-1] if known else None
            if last not in transitions:
                transitions[last] = next_items(history, last, popular_list, top_k)
            lists = {
                "model": recommended,
                "popularity": popular_list,
                "recent_items": recent_distinct(known, top_k),
                "user_frequency": by_frequency(known, top_k),
                "recency_frequency": by_recency_frequency(known, top_k),
                "item_transition": transitions[last],
            }
            n["scored"] += 1
            knew_all = len(known) == len(mine)  # no event of the user between
            n["no_lag"] += knew_all
            for name, ranked in lists.items():
                hits[name] = hits.get(name, 0) + (item in ranked)
                no_lag_hits[name] = no_lag_hits.get(name, 0) + (knew_all and item in ranked)
                # NDCG of one target: 1 / log2(2 + its 0-based rank) when listed
                gain = 1 / math.log2(2 + ranked.index(item)) if item in ranked else 0.0
                gains[name] = gains.get(name, 0.0) + gain
            n["recent_all"] += item in recent_distinct(mine, top_k)
            if item not in mine:
                n["new"] += 1
                n["new_hits"] += item in recommended
                n["new_popular"] += item in popular
                n["new_next"] += item in transitions[last]
        mine.append(item)
    return {
        "scored_events": n["scored"],
        **{f"{name}_hit@{top_k}": count / n["scored"] for name, count in hits.items()},
        **{f"{name}_ndcg@{top_k}": total / n["scored"] for name, total in gains.items()},
        f"recent_items_hit@{top_k}_all_events": n["recent_all"] / n["scored"],
        "new_item_events": n["new"],
        f"model_hit@{top_k}_new_items": n["new_hits"] / n["new"],
        f"popularity_hit@{top_k}_new_items": n["new_popular"] / n["new"],
        f"item_transition_hit@{top_k}_new_items": n["new_next"] / n["new"],
        "no_lag_events": n["no_lag"],
        **{f"{name}_hit@{top_k}_no_lag": c / n["no_lag"] for name, c in no_lag_hits.items()},
    }


def test_each_held_out_event_is_scored_against_the_recommendation_before_it():
    """By hand: the recommendation answering an event itself must not score it (it may
    already hold the item), and a user with no earlier recommendation is not scored."""

    def rec(user: str, offset: int, items: list[str]) -> tuple[int, Recommendation]:
        return 0, Recommendation(user, items, [0.0] * len(items), "v", 0, offset, 0, 0.0, 0.0)

    history = [{"user_id": "u", "item_id": i} for i in "abab"] + [  # offsets 0-3
        {"user_id": "w", "item_id": i}
        for i in "dcdc"  # d -> c twice, c -> d once
    ]
    heldout = [
        {"user_id": "u", "item_id": "a"},  # offset 8: answered before by ["a"]: a hit
        {"user_id": "u", "item_id": "c"},  # offset 9: before by ["x"] (its own answer: ["c"])
        {"user_id": "v", "item_id": "a"},  # offset 10: a new user, nothing before it
        # offsets 11 and 12 came in one micro-batch with 9: the answer before them is still
        # the one to offset 8, which knew u's events up to "a" at 8 only
        {"user_id": "u", "item_id": "d"},
        {"user_id": "u", "item_id": "c"},
    ]
    sent = demo.Sent(np.zeros(5, np.int64), np.arange(8, 13), np.zeros(5, np.int64))
    received = [rec("u", 3, ["a"]), rec("u", 8, ["x"]), rec("v", 10, ["a"]), rec("u", 12, ["c"])]
    rates = demo.hit_rates(received, history, heldout, sent, top_k=2)
    # every baseline hits "a" at 8 only (as does the model): the first of them is the best,
    # and u, the one scored user, is every resample
    no_difference = {"heuristic": "popularity", "diff": 0.0, "diff_ci95": [0.0, 0.0]}
    assert rates.pop("vs_best_heuristic") == {"hit@2": no_difference, "ndcg@2": no_difference}
    assert rates.pop("vs_best_heuristic_no_lag") == {"hit@2": no_difference}
    second = 1 / math.log2(3)  # the gain of a hit at rank 1
    assert rates == {
        "scored_events": 4,
        "model_hit@2": 1 / 4,  # "a" only
        "popularity_hit@2": 1 / 4,  # each item twice, the first counted first: a, b
        # from u's events up to the answered one: (b, a) before "a" at 8, then (a, b)
        "recent_items_hit@2": 1 / 4,
        # by count, ties by recency: (b, a) before "a" at 8, then (a, b)
        "user_frequency_hit@2": 1 / 4,
        # count / (1 + distinct items since): b 2/1, a 2/2 before "a" at 8, then a 3/1, b 2/2
        "recency_frequency_hit@2": 1 / 4,
        # after b: a (u's b -> a), then a, b; after a: b, then a: "a" at 8 hits only (with
        # every event known, "d" would hit after c, w's c -> d)
        "item_transition_hit@2": 1 / 4,
        # knowing every event, (d, c) before "c" at 12 hits too
        "recent_items_hit@2_all_events": 2 / 4,
        # "a" at 8 at rank 0 in the model's, popularity's and item transition's lists, at
        # rank 1 in the user baselines' (b first)
        "model_ndcg@2": 1 / 4,
        "popularity_ndcg@2": 1 / 4,
        "recent_items_ndcg@2": second / 4,
        "user_frequency_ndcg@2": second / 4,
        "recency_frequency_ndcg@2": second / 4,
        "item_transition_ndcg@2": 1 / 4,
        "new_item_events": 2,  # "c" at 9 and "d" are new to u
        "model_hit@2_new_items": 0.0,
        "popularity_hit@2_new_items": 0.0,
        "item_transition_hit@2_new_items": 0.0,
        # the answers to 3 and 8 knew every earlier event of u; "d" at 11 and "c" at 12
        # were scored against the answer to 8, one and two events behind: only "a" at 8 hits
        "no_lag_events": 2,
        "model_hit@2_no_lag": 1 / 2,
        "popularity_hit@2_no_lag": 1 / 2,
        "recent_items_hit@2_no_lag": 1 / 2,
        "user_frequency_hit@2_no_lag": 1 / 2,
        "recency_frequency_hit@2_no_lag": 1 / 2,
        "item_transition_hit@2_no_lag": 1 / 2,
    }


def test_demo_runs_end_to_end_and_cleans_up(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYTREC_CACHE", str(tmp_path / "cache"))
    config = DemoConfig(
        dataset="synthetic",
        model=HyTRecConfig(
            d_model=16,
            long_layers=2,
            softmax_every=2,
            dropout=0,
            repeat_head=RepeatConfig(buffer_size=20, hidden=8),
        ),
        train=TrainConfig(epochs=2, patience=1, valid_users=50),
        train_seconds=20,
        heldout_seconds=3,
        device="cpu",
        output=tmp_path / "run",
    )
    # keep what the demo replayed (and where each event landed) and what came back
    replays: dict[str, tuple[list[dict], demo.Sent]] = {}
    real_replay = demo.replay

    def recording_replay(payloads, bootstrap, speed, desc):
        sent = real_replay(payloads, bootstrap, speed, desc)
        replays[desc] = (list(payloads), sent)
        return sent

    collectors: list[demo.Collector] = []

    class RecordingCollector(demo.Collector):
        def __post_init__(self) -> None:
            collectors.append(self)
            super().__post_init__()

    trained_on = []
    real_train = demo.train

    def recording_train(model_config, log, *args):
        trained_on.append(log)
        return real_train(model_config, log, *args)

    monkeypatch.setattr(demo, "replay", recording_replay)
    monkeypatch.setattr(demo, "Collector", RecordingCollector)
    monkeypatch.setattr(demo, "train", recording_train)
    before = set(children(os.getpid()))
    summary = run_demo(config)
    assert set(children(os.getpid())) <= before, "the demo left a process running"

    # the counts are those of the events replayed: the earlier 80 % of the time span, then
    # the rest
    history, history_sent = replays["history"]
    heldout, heldout_sent = replays["held-out"]
    everything = history + heldout
    first, last = min(p["ts"] for p in everything), max(p["ts"] for p in everything)
    cut = last - 0.2 * (last - first)
    assert all(p["ts"] < cut for p in history) and all(p["ts"] >= cut for p in heldout)
    assert summary["history_events"] == len(history) > 0
    assert summary["heldout_events"] == len(heldout) > 0
    assert summary["events_in"] == len(everything)
    assert summary["users"] == len({p["user_id"] for p in everything})

    # training left out the last tenth of the history's span; the head's gate bias was
    # fitted on it and is served from the checkpoint
    (training_log,) = trained_on
    span = [min(p["ts"] for p in history), max(p["ts"] for p in history)]
    calibration_start = int(span[1] - 0.1 * (span[1] - span[0]))
    assert training_log.ts.max() < calibration_start
    fit = summary["gate_calibration"]
    later = [p for p in history if p["ts"] >= calibration_start]
    assert 0 < fit["events"] <= len(later) and fit["top_k"] == config.top_k
    assert fit["shift"] in map(float, fit[f"hit@{config.top_k}_by_shift"])
    assert float(load_model(summary["checkpoint"]).repeat_head.gate_bias) == fit["gate_bias"]

    # every recommendation answers a replayed event of its own user, and every user's
    # newest event was answered
    (collector,) = collectors
    recommendations = [rec for _, rec in collector.received if rec.user_id != demo.PROBE_USER]
    assert summary["recommendations_out"] == len(recommendations)
    landed = {
        (int(sent.partition[i]), int(sent.offset[i])): p
        for payloads, sent in (replays["history"], replays["held-out"])
        for i, p in enumerate(payloads)
    }
    for rec in recommendations:
        event = landed[(rec.source_partition, rec.source_offset)]
        assert (rec.user_id, rec.event_ts) == (event["user_id"], event["ts"])
        assert len(rec.items) == len(rec.sources) == config.top_k
        assert set(rec.sources) <= {"repeat", "explore"}
    answered = {(rec.source_partition, rec.source_offset) for rec in recommendations}
    newest = {p["user_id"]: key for key, p in sorted(landed.items())}
    assert set(newest.values()) <= answered
    heldout_keys = {
        (int(heldout_sent.partition[i]), int(heldout_sent.offset[i])) for i in range(len(heldout))
    }
    latency = summary["latency_ms"]
    assert latency["recommendations"] == len(answered & heldout_keys)
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]

    # the hit rates and both baselines, recomputed from the replayed events and the
    # recommendations that came back
    quality = dict(summary["quality"])
    versus = quality.pop("vs_best_heuristic")
    versus_no_lag = quality.pop("vs_best_heuristic_no_lag")
    expected = expected_quality(replays, recommendations, config.top_k)
    assert quality == pytest.approx(expected)
    assert quality["scored_events"] > 0.9 * len(heldout)
    assert 0 < quality["no_lag_events"] <= quality["scored_events"]
    # the model against the best baseline on each metric, and on hit rate without lag
    for metric, v, suffix in (
        ("hit", versus[f"hit@{config.top_k}"], ""),
        ("ndcg", versus[f"ndcg@{config.top_k}"], ""),
        ("hit", versus_no_lag[f"hit@{config.top_k}"], "_no_lag"),
    ):
        rates = {
            name: expected[f"{name}_{metric}@{config.top_k}{suffix}"]
            for name in (
                "popularity",
                "recent_items",
                "user_frequency",
                "recency_frequency",
                "item_transition",
            )
        }
        assert rates[v["heuristic"]] == max(rates.values())
        model = expected[f"model_{metric}@{config.top_k}{suffix}"]
        assert v["diff"] == pytest.approx(model - max(rates.values()))
        assert v["diff_ci95"][0] <= v["diff"] <= v["diff_ci95"][1]

    assert summary["git_commit"] == git_commit() and "provenance_ok" in summary
    assert summary["machine"]["cpus"] == len(os.sched_getaffinity(0))
    assert len(summary["sample_users"]) == 3
    assert all(user["recommended"] for user in summary["sample_users"])
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert (tmp_path / "run" / "demo.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "\n".join(summary_lines(written)) in printed

    # a second run reuses the trained checkpoint
    assert run_demo(config)["checkpoint_reused"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from("abcdefg"), max_size=40), st.integers(1, 8))
def test_the_demos_recency_frequency_is_the_heuristic(items, k):
    """The demo's list (floats) equals the definition computed with exact fractions."""
    assert demo.recency_frequency(items, k) == by_recency_frequency(items, k)
