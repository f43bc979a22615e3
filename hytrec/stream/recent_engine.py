"""A model-free engine: each user's most recent distinct items, newest first.

It does everything the worker asks of an engine except the model and the index (replays
skipped, one recommendation per user whose history changed), so a worker running it
measures the pipeline around the model: Faust, parsing, batching, publishing. That is what
`hytrec benchmark stream` uses it for; it is also the "user's recent items" baseline of the
demo's hit rates, served live:

    hytrec worker --engine hytrec.stream.recent_engine:RecentItemsEngine

It keeps no snapshots (no `export_states`): the worker acknowledges its events right after
publishing, and a restarted worker starts its users empty.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from hytrec.stream.schemas import BehaviorEvent, EngineResult, Recommendation


class RecentItemsEngine:
    model_version = "recent-items"

    def __init__(self, top_k: int = 20):
        self.top_k = top_k
        self.recent: dict[str, list[str]] = {}  # user -> distinct items, newest last
        self.applied: dict[tuple[str, int], int] = {}  # (user, partition) -> newest offset

    def process(self, events: Sequence[BehaviorEvent]) -> EngineResult:
        newest: dict[str, BehaviorEvent] = {}
        skipped, applied = [], []
        for event in events:
            user = event.user_id
            if event.offset <= self.applied.get((user, event.partition), -1):
                skipped.append(event)  # a replay: applied already
                continue
            self.applied[(user, event.partition)] = event.offset
            applied.append(event)
            items = self.recent.setdefault(user, [])
            if event.item_id in items:
                items.remove(event.item_id)
            items.append(event.item_id)
            del items[: -self.top_k]
            newest[user] = event
        now = time.time()
        recommendations = [
            Recommendation(
                user_id=user,
                items=self.recent[user][::-1],
                scores=[1.0 / rank for rank in range(1, len(self.recent[user]) + 1)],
                model_version=self.model_version,
                source_partition=event.partition,
                source_offset=event.offset,
                event_ts=event.ts,
                received_at=event.received_at,
                produced_at=now,
                sources=["repeat"] * len(self.recent[user]),
            )
            for user, event in newest.items()
        ]
        return EngineResult(recommendations, rejected=[], skipped=skipped, applied=applied)
