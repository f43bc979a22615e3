"""Message schemas of the stream: behaviour events in, recommendations out, dead letters.

All three are JSON objects encoded as UTF-8, keyed by the user id (the DLQ by the original
key). `parse_behavior` is the one gate every input message passes: what it refuses goes to
the dead-letter topic with one of `REASONS` and a human-readable detail, never stops a worker.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from hytrec.model.events import Behavior

# Why a message went to the DLQ. The first group is parse_behavior's, the last the engine's.
REASONS = (
    "oversized",
    "empty_value",
    "invalid_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "unknown_field",
    "empty_field",
    "too_long",
    "key_mismatch",
    "unknown_behavior",
    "negative_ts",
    "future_ts",
    "unknown_item",
    "out_of_order",
)
ID_FIELDS = ("user_id", "item_id", "category_id")
REQUIRED_FIELDS = (*ID_FIELDS, "behavior", "ts")
OPTIONAL_FIELDS = ("extras",)
_ALLOWED_FIELDS = frozenset(REQUIRED_FIELDS + OPTIONAL_FIELDS)
# ids are keys of the state store and Kafka keys: a runaway producer's 60 KB "id" is refused
MAX_ID_CHARS = 256


class InvalidMessage(ValueError):
    """A message that cannot become a `BehaviorEvent`; `reason_code` is one of `REASONS`."""

    def __init__(self, reason_code: str, detail: str):
        super().__init__(f"{reason_code}: {detail}")
        self.reason_code = reason_code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class BehaviorEvent:
    """A validated input message and where it came from."""

    user_id: str
    item_id: str
    category_id: str
    behavior: str  # raw behaviour name, valid for Behavior.parse
    ts: int  # unix seconds, event time
    partition: int  # source position in `behaviors`
    offset: int
    received_at: float  # time.time() when the worker consumed it
    extras: Mapping[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        """The message body this event parses from (what a producer sends)."""
        body = {
            "user_id": self.user_id,
            "item_id": self.item_id,
            "category_id": self.category_id,
            "behavior": self.behavior,
            "ts": self.ts,
        }
        if self.extras:
            body["extras"] = dict(self.extras)
        return body


def encode_behavior(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def parse_behavior(
    value: bytes | None,
    key: bytes | None,
    *,
    partition: int,
    offset: int,
    received_at: float,
    max_bytes: int,
    max_future_s: float,
) -> BehaviorEvent:
    """Validate one `behaviors` message; raise InvalidMessage with the first problem found.

    Ids may be strings or integers (normalised to strings); category_id may be "" (unknown).
    A key, when present, must equal the user id, since the key chooses the user's partition.
    """
    if value is None or not value:
        raise InvalidMessage("empty_value", "the message has no value")
    if len(value) > max_bytes:
        raise InvalidMessage("oversized", f"{len(value)} bytes > limit {max_bytes}")
    try:
        body = json.loads(value)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidMessage("invalid_json", str(exc)) from None
    if not isinstance(body, dict):
        raise InvalidMessage("not_object", f"expected a JSON object, got {type(body).__name__}")
    if not _ALLOWED_FIELDS.issuperset(body):
        unknown = sorted(set(body) - _ALLOWED_FIELDS)
        raise InvalidMessage("unknown_field", f"unknown fields {unknown}; put them in 'extras'")
    missing = [name for name in REQUIRED_FIELDS if name not in body]
    if missing:
        raise InvalidMessage("missing_field", f"missing fields {missing}")

    ids = {}
    for name in ID_FIELDS:
        raw = body[name]
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = str(raw)
        if not isinstance(raw, str):
            raise InvalidMessage("wrong_type", f"{name} must be a string, got {_type(raw)}")
        if not raw.strip() and name != "category_id":  # "": category unknown
            raise InvalidMessage("empty_field", f"{name} is empty")
        if len(raw) > MAX_ID_CHARS:
            raise InvalidMessage(
                "too_long", f"{name} has {len(raw)} characters > limit {MAX_ID_CHARS}"
            )
        ids[name] = raw
    behavior, ts, extras = body["behavior"], body["ts"], body.get("extras", {})
    if not isinstance(behavior, str):
        raise InvalidMessage("wrong_type", f"behavior must be a string, got {_type(behavior)}")
    if not isinstance(ts, int) or isinstance(ts, bool):
        raise InvalidMessage("wrong_type", f"ts must be integer unix seconds, got {_type(ts)}")
    if not isinstance(extras, dict):
        raise InvalidMessage("wrong_type", f"extras must be an object, got {_type(extras)}")

    if key is not None and key != ids["user_id"].encode():
        raise InvalidMessage("key_mismatch", f"key {key[:64]!r} != user_id {ids['user_id'][:64]!r}")
    try:
        Behavior.parse(behavior)
    except ValueError:
        raise InvalidMessage("unknown_behavior", f"unknown behaviour {behavior[:64]!r}") from None
    if ts < 0:
        raise InvalidMessage("negative_ts", f"ts {ts} < 0")
    if ts > received_at + max_future_s:
        raise InvalidMessage(
            "future_ts",
            f"ts {ts} is more than {max_future_s:g} s after the receive time {received_at:.0f}",
        )
    return BehaviorEvent(
        **ids,
        behavior=behavior,
        ts=ts,
        partition=partition,
        offset=offset,
        received_at=received_at,
        extras=extras,
    )


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The top items for a user, answering the newest event of theirs in a micro-batch."""

    user_id: str
    items: list[str]  # ranked, best first
    scores: list[float]  # same length as items
    model_version: str
    source_partition: int  # position of the answered event in `behaviors`
    source_offset: int
    event_ts: int  # its event time
    received_at: float  # when the worker consumed it (time.time())
    produced_at: float  # when this recommendation was made

    def to_json(self) -> bytes:
        # the fields in declaration order, like `asdict` (which deep-copies every list
        # element and was most of the cost of encoding a recommendation)
        body = {name: getattr(self, name) for name in _RECOMMENDATION_FIELDS}
        # JSON has no NaN/inf: a broken score must not make the whole message unreadable
        isfinite = math.isfinite
        body["scores"] = [s if isfinite(s) else None for s in self.scores]
        return _COMPACT_JSON.encode(body).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Recommendation:
        body = json.loads(data)
        body["scores"] = [math.nan if s is None else float(s) for s in body["scores"]]
        return cls(**body)


_RECOMMENDATION_FIELDS = tuple(f.name for f in fields(Recommendation))
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # as json.dumps


@dataclass
class EngineResult:
    recommendations: list[Recommendation]  # one per user whose state changed in the batch
    rejected: list[tuple[BehaviorEvent, str, str]]  # (event, reason_code, detail) -> DLQ
    skipped_duplicates: int  # events at or below a user's applied offset (replays)


class Engine(Protocol):
    model_version: str

    def process(self, events: Sequence[BehaviorEvent]) -> EngineResult:
        """Apply a micro-batch (events in consumption order); synchronous, may be slow."""
        ...


def dead_letter(
    reason_code: str,
    detail: str,
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    failed_at: float,
) -> bytes:
    """A DLQ record: why, where from, and the original message (text, or base64 if binary)."""

    def text(data: bytes | None) -> tuple[str | None, str]:
        if data is None:
            return None, "none"
        try:
            return data.decode(), "utf-8"
        except UnicodeDecodeError:
            return base64.b64encode(data).decode(), "base64"

    key_text, key_encoding = text(key)
    payload, payload_encoding = text(value)
    return json.dumps(
        {
            "reason_code": reason_code,
            "detail": detail,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "key": key_text,
            "key_encoding": key_encoding,
            "payload": payload,
            "payload_encoding": payload_encoding,
            "failed_at": failed_at,
        },
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def original_bytes(record: Mapping[str, Any], name: str = "payload") -> bytes | None:
    """Decode `payload` (or `key`) of a parsed DLQ record back to the original bytes."""
    encoding = record[f"{name}_encoding"]
    if encoding == "none":
        return None
    data = record[name]
    return base64.b64decode(data) if encoding == "base64" else data.encode()
