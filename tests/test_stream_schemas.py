"""Message schemas: parse_behavior accepts every valid event and names what is wrong with
every invalid one; recommendations and dead letters survive their JSON round trip."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hytrec.model.events import BEHAVIOR_ALIASES
from hytrec.stream.schemas import (
    MAX_ID_CHARS,
    REASONS,
    InvalidMessage,
    Recommendation,
    dead_letter,
    encode_behavior,
    original_bytes,
    parse_behavior,
)

NOW = 1_700_000_000.0
LIMITS = {"max_bytes": 4096, "max_future_s": 3600.0}

ids = st.text(min_size=1, max_size=20).filter(lambda s: s.strip())
payloads = st.fixed_dictionaries(
    {
        "user_id": ids,
        "item_id": ids,
        "category_id": st.text(max_size=10),
        "behavior": st.sampled_from(sorted(BEHAVIOR_ALIASES)),
        "ts": st.integers(0, int(NOW)),
    },
    optional={
        "extras": st.dictionaries(st.text(max_size=5), st.integers(), min_size=1, max_size=3)
    },
)


def parse(value, key, **limits):
    return parse_behavior(
        value, key, partition=2, offset=7, received_at=NOW, **{**LIMITS, **limits}
    )


@settings(max_examples=200, deadline=None)
@given(payloads)
def test_valid_events_round_trip(payload):
    event = parse(encode_behavior(payload), payload["user_id"].encode())
    assert event.payload() == payload
    assert (event.partition, event.offset, event.received_at) == (2, 7, NOW)
    assert parse(encode_behavior(payload), None) == event  # a key is optional


def test_integer_ids_are_normalised_to_strings():
    event = parse(b'{"user_id":1,"item_id":2,"category_id":3,"behavior":"pv","ts":5}', b"1")
    assert (event.user_id, event.item_id, event.category_id) == ("1", "2", "3")


def test_ids_up_to_the_length_limit_are_accepted():
    user = "u" * MAX_ID_CHARS
    payload = {"user_id": user, "item_id": "i", "category_id": "", "behavior": "pv", "ts": 1}
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
    )
    assert Recommendation.from_json(rec.to_json()) == rec
    assert json.loads(rec.to_json())["items"] == ["a", "b"]


@pytest.mark.parametrize("value", [b'{"user_id": 1', b"\x00\xff binary", None])
def test_dead_letter_keeps_the_original_bytes(value):
    record = json.loads(
        dead_letter(
            "invalid_json",
            "detail",
            topic="behaviors",
            partition=3,
            offset=11,
            key=b"u1",
            value=value,
            failed_at=NOW,
        )
    )
    assert (record["reason_code"], record["partition"], record["offset"]) == ("invalid_json", 3, 11)
    assert original_bytes(record) == value
    assert original_bytes(record, "key") == b"u1"
