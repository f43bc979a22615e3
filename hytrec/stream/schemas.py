"""Message schemas of the stream: behaviour events in, recommendations out, dead letters.

All three are JSON objects encoded as UTF-8, keyed by the user id (dead letters by the
original message's key). `parse_behavior` is the one gate every input message passes: what
it refuses goes to the dead-letter topic with one of `REASONS` and a human-readable detail,
never stops a worker.

Time. An event's `ts` is compared with a reference time: the Kafka record's timestamp or
the worker's clock, whichever is earlier (a replayed record is judged as when it first
came, and a producer whose clock runs ahead gains nothing). More than
`ParseLimits.max_future_s` ahead of it, the event is dead-lettered (`future_ts`) or, with
`future_policy="clamp"`, applied at the reference time plus the allowance. Before
`min_ts` (default 1990-01-01) it is refused as `ancient_ts`: a ts of 0 is a missing time,
not 1970.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np

from hytrec.model.events import Behavior

log = logging.getLogger(__name__)

# Why a message went to the DLQ: parse_behavior's reasons, then the engine's.
PARSE_REASONS = (
    "oversized",
    "empty_value",
    "too_deep",
    "invalid_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "unknown_field",
    "empty_field",
    "too_long",
    "missing_key",
    "key_mismatch",
    "unknown_behavior",
    "negative_ts",
    "ancient_ts",
    "future_ts",
    "unparseable",  # the parser itself failed (a bug there): dead-lettered, never a crash
)
ENGINE_REASONS = ("out_of_order",)  # older than the user's newest event beyond the tolerance
REASONS = PARSE_REASONS + ENGINE_REASONS
ID_FIELDS = ("user_id", "item_id", "category_id")
REQUIRED_FIELDS = (*ID_FIELDS, "behavior", "ts")
OPTIONAL_FIELDS = ("extras",)
_ALLOWED_FIELDS = frozenset(REQUIRED_FIELDS + OPTIONAL_FIELDS)
# ids are keys of the state store and Kafka keys: a runaway producer's 60 KB "id" is refused
MAX_ID_CHARS = 256
FUTURE_POLICIES = ("dead_letter", "clamp")


@dataclass(frozen=True, slots=True)
class ParseLimits:
    """What `parse_behavior` accepts."""

    max_bytes: int = 64 * 1024  # larger messages go to the DLQ (`oversized`)
    max_depth: int = 32  # JSON nesting (`too_deep`), checked before json.loads
    max_future_s: float = 300.0  # event time allowance ahead of the reference time
    future_policy: str = "dead_letter"  # or "clamp": apply at the reference + allowance
    min_ts: int = 631_152_000  # 1990-01-01; earlier times are refused (`ancient_ts`)

    def __post_init__(self) -> None:
        if self.future_policy not in FUTURE_POLICIES:
            raise ValueError(f"future_policy must be one of {FUTURE_POLICIES}, got {self}")
        if self.max_bytes < 1 or self.max_depth < 1 or self.max_future_s < 0:
            raise ValueError(f"need max_bytes, max_depth >= 1 and max_future_s >= 0: {self}")


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
    ts: int  # unix seconds, event time (clamped when future_policy="clamp")
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


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NESTING = np.zeros(256, dtype=np.int8)
_NESTING[[ord("["), ord("{")]] = 1
_NESTING[[ord("]"), ord("}")]] = -1


def json_depth(value: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, strings left out (an
    estimate for invalid JSON, which json.loads then refuses anyway). Vectorised: a
    64 KB message takes well under a millisecond."""
    if b"[" not in value and b"{" not in value:
        return 0
    brackets = _JSON_STRING.sub(b"", value)
    steps = _NESTING[np.frombuffer(brackets, dtype=np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def parse_behavior(
    value: bytes | None,
    key: bytes | None,
    *,
    partition: int,
    offset: int,
    received_at: float,
    limits: ParseLimits = ParseLimits(),
    reference_ts: float | None = None,
) -> BehaviorEvent:
    """Validate one `behaviors` message; raise InvalidMessage with the first problem found.

    Ids may be strings or integers (normalised to strings); category_id may be "" (unknown).
    The key must be the user id: it chose the user's partition, and a user's events must
    all come in order from one partition (keyless messages are refused as `missing_key`;
    re-publish them keyed by user id). `reference_ts` (default `received_at`) is the time
    `ts` is judged against.
    """
    if value is None or not value:
        raise InvalidMessage("empty_value", "the message has no value")
    if len(value) > limits.max_bytes:
        raise InvalidMessage("oversized", f"{len(value)} bytes > limit {limits.max_bytes}")
    # depth <= the count of brackets: most messages need no scan
    if value.count(b"[") + value.count(b"{") > limits.max_depth:
        depth = json_depth(value)
        if depth > limits.max_depth:
            raise InvalidMessage("too_deep", f"nesting depth {depth} > limit {limits.max_depth}")
    try:
        body = json.loads(value)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidMessage("invalid_json", str(exc)[:200]) from None
    except RecursionError:  # the depth check above makes this unreachable; kept as a guard
        raise InvalidMessage("too_deep", "nesting too deep for the JSON parser") from None
    if not isinstance(body, dict):
        raise InvalidMessage("not_object", f"expected a JSON object, got {type(body).__name__}")
    if not _ALLOWED_FIELDS.issuperset(body):
        unknown = sorted(set(body) - _ALLOWED_FIELDS)
        raise InvalidMessage(
            "unknown_field", f"unknown fields {unknown[:10]}; put them in 'extras'"[:500]
        )
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

    if not key:
        raise InvalidMessage(
            "missing_key", "the message has no key: key behaviour events by user id"
        )
    if key != ids["user_id"].encode():
        raise InvalidMessage("key_mismatch", f"key {key[:64]!r} != user_id {ids['user_id'][:64]!r}")
    try:
        Behavior.parse(behavior)
    except ValueError:
        raise InvalidMessage("unknown_behavior", f"unknown behaviour {behavior[:64]!r}") from None
    if ts < 0:
        raise InvalidMessage("negative_ts", f"ts {ts} < 0")
    if ts < limits.min_ts:
        raise InvalidMessage(
            "ancient_ts", f"ts {ts} is before the earliest allowed {limits.min_ts}"
        )
    reference = received_at if reference_ts is None else reference_ts
    latest = int(reference + limits.max_future_s)
    if ts > latest:
        if limits.future_policy == "dead_letter":
            raise InvalidMessage(
                "future_ts",
                f"ts {ts} is more than {limits.max_future_s:g} s after the reference time "
                f"{reference:.0f}",
            )
        ts = latest  # "clamp": as if it happened at the latest time allowed
    return BehaviorEvent(
        **ids,
        behavior=behavior,
        ts=ts,
        partition=partition,
        offset=offset,
        received_at=received_at,
        extras=extras,
    )


def parse_record(
    message: Any, limits: ParseLimits, received_at: float
) -> BehaviorEvent | InvalidMessage:
    """A consumed `behaviors` record (Faust's, timestamp in seconds, or kafka-python's, in
    ms) as a behaviour event, or why not. Never raises: a failure of the parser itself is a
    reason too (`unparseable`). The worker and the backfill read records through it."""
    stamp = message.timestamp
    record_ts = stamp if isinstance(stamp, float) else stamp / 1000 if stamp else None
    # judged against when the record first came (replays agree) unless that is ahead
    reference = received_at if not record_ts or record_ts <= 0 else min(record_ts, received_at)
    try:
        return parse_behavior(
            message.value,
            message.key,
            partition=message.partition,
            offset=message.offset,
            received_at=received_at,
            limits=limits,
            reference_ts=reference,
        )
    except InvalidMessage as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - a parser bug must not stop the stream
        log.exception(
            "the parser failed on %s[%d]@%d", message.topic, message.partition, message.offset
        )
        return InvalidMessage("unparseable", f"{type(exc).__name__}: {exc}"[:500])


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
    # per item: "repeat" (from the user's recent-items buffer) or "explore" (from the index);
    # for a category cascade (ULIM) "category:<raw category id>", the category searched
    sources: list[str] = field(default_factory=list)

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
    """What the engine made of a batch. Every event it was given is in exactly one of
    `applied`, `rejected` and `skipped` (the worker checks, see `accounting.py`)."""

    recommendations: list[Recommendation]  # one per user whose state changed in the batch
    rejected: list[tuple[BehaviorEvent, str, str]]  # (event, reason_code, detail) -> DLQ
    skipped: list[BehaviorEvent] = field(default_factory=list)  # replays: offset at or below
    # the last one applied to the user from the same partition
    applied: list[BehaviorEvent] = field(default_factory=list)

    @property
    def skipped_duplicates(self) -> int:
        return len(self.skipped)


class Engine(Protocol):
    model_version: str

    def process(self, events: Sequence[BehaviorEvent]) -> EngineResult:
        """Apply a micro-batch (events in consumption order); synchronous, may be slow."""
        ...


DLQ_MAX_PAYLOAD_BYTES = 16 * 1024  # of the original value; JSON may grow it 6x at worst
DLQ_MAX_KEY_BYTES = 1024
DLQ_MAX_DETAIL_CHARS = 1000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A DLQ record: published with the original key (truncated past `DLQ_MAX_KEY_BYTES`;
    no key when the message had none) and this JSON value."""

    key: bytes | None
    value: bytes


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
    max_payload_bytes: int = DLQ_MAX_PAYLOAD_BYTES,
) -> DeadLetter:
    """Why, where from, and the original message (text, or base64 if binary). Its size is
    bounded whatever came in, so that publishing it cannot fail for size: the payload is
    cut to `max_payload_bytes` (and the key to `DLQ_MAX_KEY_BYTES`), with the original
    length and SHA-256 recorded so the message can still be told apart and found."""

    def text(data: bytes | None, limit: int) -> dict[str, Any]:
        if data is None:
            return {"": None, "_encoding": "none", "_bytes": 0}
        kept = data[:limit]
        try:
            out, encoding = kept.decode(), "utf-8"
        except UnicodeDecodeError:
            out, encoding = base64.b64encode(kept).decode(), "base64"
        return {
            "": out,
            "_encoding": encoding,
            "_bytes": len(data),
            "_sha256": hashlib.sha256(data).hexdigest(),
            "_truncated": len(kept) < len(data),
        }

    record: dict[str, Any] = {
        "reason_code": reason_code,
        "detail": detail[:DLQ_MAX_DETAIL_CHARS],
        "topic": topic,
        "partition": partition,
        "offset": offset,
    }
    for name, data, limit in (
        ("key", key, DLQ_MAX_KEY_BYTES),
        ("payload", value, max_payload_bytes),
    ):
        record |= {name + suffix: v for suffix, v in text(data, limit).items()}
    record["failed_at"] = failed_at
    body = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
    return DeadLetter(key=None if key is None else key[:DLQ_MAX_KEY_BYTES], value=body)


def original_bytes(record: Mapping[str, Any], name: str = "payload") -> bytes | None:
    """Decode `payload` (or `key`) of a parsed DLQ record back to the original bytes (their
    first `*_bytes` only when `*_truncated`)."""
    encoding = record[f"{name}_encoding"]
    if encoding == "none":
        return None
    data = record[name]
    return base64.b64decode(data) if encoding == "base64" else data.encode()
