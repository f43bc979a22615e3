"""Where every consumed message went: the worker's accounting, per `behaviors` partition.

Every consumed offset ends as exactly one of

- applied: the engine applied the event to its user's state;
- dead-lettered: it did not parse, or the engine refused it (a DLQ record with the reason;
  counted here even when publishing the dead letter failed, which is counted apart);
- replays skipped: the engine skipped it as a replay of an offset already applied to its
  user from the same partition;

or is still in flight (waiting in a batch or being processed). An event the engine
returned in none of its three lists, or in several, is counted `unaccounted` instead (and
logged): a bug. So, at every moment,

    consumed == applied + dead_lettered + replays_skipped + in_flight + unaccounted

and a partition *balances* when nothing is unaccounted. The counters are served at
/metrics, printed by `hytrec status` and logged by the worker; the chaos benchmark checks
them over every worker it ran.

Offsets never delivered. `behaviors` is neither compacted nor written in transactions, so
from where the consumer was placed (`reading_from`: the group's commit, or 0) every offset
must reach the worker, in order. An offset the consumer jumped over is counted in
`never_delivered` and logged: its event was never applied, and Faust, which takes such a
jump for a compacted hole, would commit past it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from hytrec.stream.schemas import BehaviorEvent, EngineResult

log = logging.getLogger(__name__)


@dataclass
class PartitionAccount:
    consumed: int = 0
    applied: int = 0
    dead_lettered: int = 0
    replays_skipped: int = 0
    in_flight: int = 0
    unaccounted: int = 0
    never_delivered: int = 0  # offsets the consumer jumped over (see the module's doc)

    @property
    def balanced(self) -> bool:
        """consumed == applied + dead_lettered + replays_skipped + in_flight."""
        settled = self.applied + self.dead_lettered + self.replays_skipped + self.in_flight
        return self.consumed == settled and self.unaccounted == 0


FIELDS = tuple(PartitionAccount.__dataclass_fields__)


class Accounting:
    def __init__(self) -> None:
        self.partitions: dict[int, PartitionAccount] = defaultdict(PartitionAccount)
        self.next_offset: dict[int, int] = {}  # partition -> the offset that must come next

    def reading_from(self, partition: int, offset: int) -> None:
        """The consumer was placed at `offset` of the partition (an assignment's seek)."""
        self.next_offset[partition] = offset

    def consumed(self, partition: int, offset: int | None = None) -> None:
        account = self.partitions[partition]
        account.consumed += 1
        account.in_flight += 1
        if offset is None:
            return
        expected = self.next_offset.get(partition)
        if expected is not None and offset > expected:
            account.never_delivered += offset - expected
            log.error(
                "behaviors[%d]: offsets %d..%d were never delivered to the worker (the "
                "consumer jumped from %d to %d); their events are not applied",
                partition,
                expected,
                offset - 1,
                expected,
                offset,
            )
        self.next_offset[partition] = offset + 1

    def settle(
        self, dead_letters: Sequence[int], events: Sequence[BehaviorEvent], result: EngineResult
    ) -> None:
        """A batch is done: `dead_letters` (the partition of each message that did not
        parse), and the valid `events` the engine was given with what it made of them. An
        event the engine put in no list, or in several, is unaccounted (and logged)."""
        for partition in dead_letters:
            self._settle(partition, "dead_lettered")
        kinds: dict[tuple[int, int], list[str]] = defaultdict(list)
        for kind, settled in (
            ("applied", result.applied),
            ("dead_lettered", [event for event, _, _ in result.rejected]),
            ("replays_skipped", result.skipped),
        ):
            for event in settled:
                kinds[(event.partition, event.offset)].append(kind)
        wrong = []
        for event in events:
            found = kinds.pop((event.partition, event.offset), [])
            if len(found) == 1:
                self._settle(event.partition, found[0])
            else:
                self._settle(event.partition, "unaccounted")
                wrong.append(((event.partition, event.offset), found))
        for (partition, _), found in kinds.items():  # never given to the engine
            self.partitions[partition].unaccounted += 1
            wrong.append(((partition, _), found))
        if wrong:
            log.error(
                "the engine's account of a batch does not match its events: %d events in no "
                "list, in several, or never given (first: %s)",
                len(wrong),
                wrong[:5],
            )

    def _settle(self, partition: int, kind: str) -> None:
        account = self.partitions[partition]
        account.in_flight -= 1
        setattr(account, kind, getattr(account, kind) + 1)

    def total(self) -> PartitionAccount:
        total = PartitionAccount()
        for account in self.partitions.values():
            for name in FIELDS:
                setattr(total, name, getattr(total, name) + getattr(account, name))
        return total

    def as_dict(self) -> dict[str, Any]:
        """{"partitions": {p: counters}, "total": counters, "balanced": bool}."""
        total = self.total()
        return {
            "partitions": {p: asdict(a) for p, a in sorted(self.partitions.items())},
            "total": asdict(total),
            "balanced": all(a.balanced for a in self.partitions.values()),
        }

    def line(self) -> str:
        """One log line: the totals and whether every partition balances."""
        t = self.total()
        return (
            f"accounting: consumed {t.consumed} = applied {t.applied} + dead-lettered "
            f"{t.dead_lettered} + replays skipped {t.replays_skipped} + in flight "
            f"{t.in_flight}; unaccounted {t.unaccounted}"
            + ("" if all(a.balanced for a in self.partitions.values()) else "; NOT BALANCED")
            + (f"; {t.never_delivered} offsets never delivered" if t.never_delivered else "")
        )
