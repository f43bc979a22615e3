"""Message schemas: parse_behavior accepts every valid event and names what is wrong with
every invalid one (bounded parsing: nesting and size before json.loads, time rules, keys);
recommendations and dead letters survive their JSON round trip, and a dead letter stays
small whatever came in."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hytrec.model.events import BEHAVIOR_ALIASES
from hytrec.stream.schemas import (
    DLQ_MAX_KEY_BYTES,
    MAX_ID_CHARS,
    REASONS,
    InvalidMessage,
    ParseLimits,
    Recommendation,
    dead_letter,
    encode_behavior,
    json_depth,
    original_bytes,
    parse_behavior,
)

NOW = 1_700_000_000.0
LIMITS = ParseLimits(max_bytes=4096, max_future_s=3600.0)

ids = st.text(min_size=1, max_size=20).filter(lambda s: s.strip())
payloads = st.fixed_dictionaries(
    {
        "user_id": ids,
        "item_id": ids,
        "category_id": st.text(max_size=10),
        "behavior": st.sampled_from(sorted(BEHAVIOR_ALIASES)),
        "ts": st.integers(LIMITS.min_ts, int(NOW)),
    },
    optional={
        "extras": st.dictionaries(st.text(max_size=5), st.integers(), min_size=1, max_size=3)
    },
)


def parse(value, key, reference_ts=None, **limits):
    return parse_behavior(
        value,
        key,
        partition=2,
        offset=7,
        received_at=NOW,
        limits=dataclasses.replace(LIMITS, **limits),
        reference_ts=reference_ts,
    )


@settings(max_examples=200, deadline=None)
@given(payloads)
def test_valid_events_round_trip(payload):
    event = parse(encode_behavior(payload), payload["user_id"].encode())
    assert event.payload() == payload
    assert (event.partition, event.offset, event.received_at) == (2, 7, NOW)


def test_integer_ids_are_normalised_to_strings():
    value = b'{"user_id":1,"item_id":2,"category_id":3,"behavior":"pv","ts":1000000000}'
    event = parse(value, b"1")
    assert (event.user_id, event.item_id, event.category_id) == ("1", "2", "3")


def test_ids_up_to_the_length_limit_are_accepted():
    user = "u" * MAX_ID_CHARS
    payload = {"user_id": user, "item_id": "i", "category_id": "", "behavior": "pv", "ts": int(NOW)}
    assert parse(encode_behavior(payload), user.encode()).user_id == user


@st.composite
def invalid_messages(draw):
    """(value, key, limits, expected reason) made by one mutation of a valid event."""
    payload = draw(payloads)
    key = payload["user_id"].encode()
    field = draw(st.sampled_from(["user_id", "item_id", "category_id", "behavior", "ts"]))
    kind = draw(
        st.sampled_from(
            [
                "missing",
                "unknown_field",
                "wrong_type",
                "truncated",
                "not_object",
                "key",
                "behavior",
                "negative_ts",
                "future_ts",
                "oversized",
                "empty_user",
                "empty_value",
                "too_long",
                "extras",
                "too_deep",
                "ancient_ts",
                "missing_key",
            ]
        )
    )
    if kind == "missing":
        del payload[field]
        return encode_behavior(payload), key, {}, "missing_field"
    if kind == "unknown_field":
        payload[draw(st.sampled_from(["user", "price", "Ts"]))] = 1
        return encode_behavior(payload), key, {}, "unknown_field"
    if kind == "wrong_type":
        bad = [None, 1.5, [], {}, True] + (
            [] if field in ("user_id", "item_id", "category_id") else [12]
        )
        payload[field] = draw(st.sampled_from(bad))
        if field == "ts":
            payload[field] = draw(st.sampled_from([None, 1.5, "12", [], True]))
        return encode_behavior(payload), None, {}, "wrong_type"
    if kind == "truncated":
        value = encode_behavior(payload)
        return value[: draw(st.integers(1, len(value) - 1))], key, {}, "invalid_json"
    if kind == "not_object":
        value = json.dumps(draw(st.sampled_from([[payload], 1, "x", None]))).encode()
        return value, key, {}, "not_object"
    if kind == "key":
        return encode_behavior(payload), key + b"x", {}, "key_mismatch"
    if kind == "behavior":
        payload["behavior"] = draw(
            st.text(max_size=8).filter(
                lambda s: (
                    s.strip().lower().replace("-", "_").replace(" ", "_") not in BEHAVIOR_ALIASES
                )
            )
        )
        return encode_behavior(payload), key, {}, "unknown_behavior"
    if kind == "negative_ts":
        payload["ts"] = draw(st.integers(max_value=-1))
        return encode_behavior(payload), key, {}, "negative_ts"
    if kind == "future_ts":
        payload["ts"] = draw(st.integers(int(NOW + 3601), 2**62))
        return encode_behavior(payload), key, {}, "future_ts"
    if kind == "oversized":
        value = encode_behavior(payload)
        return value, key, {"max_bytes": len(value) - 1}, "oversized"
    if kind == "too_deep":
        depth = draw(st.integers(LIMITS.max_depth, 3 * LIMITS.max_depth))
        payload["extras"] = {"x": json.loads("[" * depth + "]" * depth)}
        return encode_behavior(payload), key, {}, "too_deep"
    if kind == "ancient_ts":
        payload["ts"] = draw(st.integers(0, LIMITS.min_ts - 1))
        return encode_behavior(payload), key, {}, "ancient_ts"
    if kind == "missing_key":
        return encode_behavior(payload), draw(st.sampled_from([None, b""])), {}, "missing_key"
    if kind == "empty_user":
        payload["user_id"] = draw(st.sampled_from(["", " ", "\t"]))
        return encode_behavior(payload), None, {}, "empty_field"
    if kind == "empty_value":
        return draw(st.sampled_from([None, b""])), key, {}, "empty_value"
    if kind == "too_long":
        name = draw(st.sampled_from(["user_id", "item_id", "category_id"]))
        payload[name] = "x" * draw(st.integers(MAX_ID_CHARS + 1, 5000))
        return encode_behavior(payload), None, {"max_bytes": 10_000}, "too_long"
    payload["extras"] = draw(st.sampled_from([[], 1, "x"]))
    return encode_behavior(payload), key, {}, "wrong_type"


@settings(max_examples=400, deadline=None)
@given(invalid_messages())
def test_every_mutation_is_refused_with_its_reason(case):
    value, key, limits, reason = case
    with pytest.raises(InvalidMessage) as refused:
        parse(value, key, **limits)
    assert refused.value.reason_code == reason
    assert refused.value.reason_code in REASONS and refused.value.detail


def test_invalid_utf8_is_invalid_json():
    with pytest.raises(InvalidMessage, match="invalid_json"):
        parse(b'{"user_id": "\xff"}', None)


def test_recommendation_json_round_trip():
    rec = Recommendation(
        user_id="u1",
        items=["a", "b"],
        scores=[0.5, -1.0],
        model_version="v",
        source_partition=1,
        source_offset=9,
        event_ts=100,
        received_at=1.5,
        produced_at=2.5,
        sources=["repeat", "explore"],
    )
    assert Recommendation.from_json(rec.to_json()) == rec
    assert json.loads(rec.to_json())["items"] == ["a", "b"]
    assert json.loads(rec.to_json())["sources"] == ["repeat", "explore"]
    # a message from a worker before sources were published still reads
    older = {k: v for k, v in json.loads(rec.to_json()).items() if k != "sources"}
    assert Recommendation.from_json(json.dumps(older).encode()).sources == []


def letter(key, value, **limits):
    return dead_letter(
        "invalid_json",
        "detail",
        topic="behaviors",
        partition=3,
        offset=11,
        key=key,
        value=value,
        failed_at=NOW,
        **limits,
    )


@pytest.mark.parametrize("value", [b'{"user_id": 1', b"\x00\xff binary", None])
@pytest.mark.parametrize("key", [b"u1", None])
def test_dead_letter_keeps_the_original_key_and_bytes(value, key):
    out = letter(key, value)
    record = json.loads(out.value)
    assert (record["reason_code"], record["partition"], record["offset"]) == ("invalid_json", 3, 11)
    assert original_bytes(record) == value
    assert original_bytes(record, "key") == key
    assert out.key == key  # published with the original key; keyless stays keyless
    assert not record.get("payload_truncated")


@pytest.mark.parametrize(
    "value",
    [
        b"x" * 1_000_000,  # a 1 MB message
        json.dumps({"blob": "\x01" * 180_000}).encode(),  # 180 KB, 1 MB once JSON-escaped
        bytes(range(256)) * 4000,  # binary: base64
    ],
    ids=["1MB", "control-bytes", "binary"],
)
def test_a_dead_letter_stays_small_and_says_what_it_cut(value):
    key = b"k" * 5000
    out = letter(key, value, max_payload_bytes=16 * 1024)
    assert len(out.value) < 120_000  # far below a producer's 1 MB limit
    record = json.loads(out.value)
    assert record["payload_truncated"] and record["payload_bytes"] == len(value)
    assert record["payload_sha256"] == hashlib.sha256(value).hexdigest()
    assert original_bytes(record) == value[: 16 * 1024]
    assert out.key == key[:DLQ_MAX_KEY_BYTES] and record["key_bytes"] == len(key)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.integers() | st.text(alphabet='[]{}\\"ab', max_size=6),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
        max_leaves=30,
    )
)
def test_json_depth_is_the_nesting_of_the_parsed_value(value):
    def depth(v):
        if isinstance(v, list):
            return 1 + max(map(depth, v), default=0)
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        return 0

    assert json_depth(json.dumps(value).encode()) == depth(value)


def test_deep_nesting_is_refused_before_the_parser_recurses():
    for depth in (2048, 200_000):  # 2 KB of "[" raised RecursionError in json.loads
        with pytest.raises(InvalidMessage) as refused:
            parse(b"[" * depth, b"u", max_bytes=10**6)
        assert refused.value.reason_code == "too_deep"
    payload = {"user_id": "u", "item_id": "i", "category_id": "", "behavior": "pv", "ts": int(NOW)}
    payload["extras"] = {"x": json.loads("[" * 30 + "]" * 30)}  # deep, within the limit
    assert parse(encode_behavior(payload), b"u").extras == payload["extras"]


def test_future_times_are_dead_lettered_or_clamped_by_policy_against_the_record_time():
    payload = {"user_id": "u", "item_id": "i", "category_id": "", "behavior": "pv"}
    ahead = encode_behavior({**payload, "ts": int(NOW) + 3 * 3600})  # a clock 3 h fast
    with pytest.raises(InvalidMessage, match="future_ts"):
        parse(ahead, b"u", max_future_s=300)
    clamped = parse(ahead, b"u", max_future_s=300, future_policy="clamp")
    assert clamped.ts == int(NOW) + 300
    within = encode_behavior({**payload, "ts": int(NOW) + 299})
    assert parse(within, b"u", max_future_s=300).ts == int(NOW) + 299
    # replayed later, a record is judged against when it first came, so replays agree
    with pytest.raises(InvalidMessage, match="future_ts"):
        parse(ahead, b"u", max_future_s=300, reference_ts=NOW)
    with pytest.raises(ValueError, match="future_policy"):
        ParseLimits(future_policy="ignore")


def test_ts_zero_is_a_missing_time_not_1970():
    payload = {"user_id": "u", "item_id": "i", "category_id": "", "behavior": "pv", "ts": 0}
    with pytest.raises(InvalidMessage, match="ancient_ts"):
        parse(encode_behavior(payload), b"u")
    payload["ts"] = LIMITS.min_ts  # the earliest allowed
    assert parse(encode_behavior(payload), b"u").ts == LIMITS.min_ts
