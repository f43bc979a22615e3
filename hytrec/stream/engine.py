"""The recommendation engine behind the stream: a micro-batch of validated events in,
one recommendation per user whose state changed out.

For each batch: group events by user (each user's events stay in arrival order), skip
replays (offset at or below the last one applied to the user from the same partition),
reject events older than the user's newest by more than `out_of_order_tolerance_s`, apply
every user's run in one `model.step` over the slot store, search the item index once for
all changed users, and build their recommendations. The model is any registered streaming
model (`hytrec.model.streaming.StreamingModel`; the checkpoint names it). Knows nothing of
Kafka: the Faust worker feeds it.

Time runs forward in a user's state. An event up to the tolerance older than the user's
newest (events sharing a timestamp included) is applied at the newest time: a late click
still counts, and one event from a client whose clock ran ahead cannot block its user's
later events. The tolerance is at least the parser's future allowance (the worker checks).

Items the model does not know (new in the shop since it trained) are applied all the same:
they embed through the item table's row 0, the padding row (never trained), plus their
category and behaviour where the model reads them, so the user's state still moves. They cannot
be recommended until a checkpoint that knows them is published (`hytrec publish-model`,
README "Hot swap"): its vocabulary and index then hold them.

A model with a repeat head (`hytrec.model.repeat`) ranks by log P(i) of its repeat/explore
mixture, exactly as offline: the copy candidates are the items in the user's recent-items
buffer (part of its state), the explore candidates the index's top K among the other items;
each candidate scores log P(i) (the exact normaliser of P_explore: one [U, N_items] product
per micro-batch), the top K are published with their `source` ("repeat": from the buffer,
"explore": from the index). A model without a head publishes the index's top K by u . e_i,
every one an "explore" item. The shop rules (`exclude_paid_hours`, `explore_only`,
`min_explore_share`) read the buffer, so they need a model with a head.

A model whose registry line says `per_category` (ULIM) ranks by its category cascade, as
offline (`ULIM.cascade_scores`): its top K categories by log P(c), one search per category
among that category's items with its interest u^c, merged by log P(c) P(i | c) (the
search's u^c . e_i plus a per-category offset, `ULIM.merge_offset`); each item
published with the category it came through (source "category:<raw id>"). With a repeat
head, the explore candidates are those searches' items, scored by the head's mixture with
the cascade's distribution (`ULIM.cascade_plan`: one read of the slots for both).

A `multi` model (HiSAC-mi) searches with each of the user's agents and merges by max score
(`index.multi_query`), its `score_agents` ranking; every item an "explore" one. Both kinds
read their queries from the state when they search, so their micro-batch applies the events
(`apply_events`) without the step's read-out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from hytrec.index import IndexConfig, ItemIndex, build_from_checkpoint
from hytrec.index.multi_query import search_max_over_queries
from hytrec.model.batch import EventBatch
from hytrec.model.compiled_step import CompiledStep
from hytrec.model.device import resolve_device
from hytrec.model.events import Behavior
from hytrec.model.registry import load_model, spec_of
from hytrec.model.repeat import RECENT_COLUMNS, serving_buffer
from hytrec.model.streaming import StreamingModel
from hytrec.stream.schemas import BehaviorEvent, EngineResult, Recommendation
from hytrec.stream.snapshots import UserSnapshot, ahead_of
from hytrec.stream.state_store import UserStateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    top_k: int = 20
    state_budget_bytes: int = 256 * 2**20  # device memory for user state slots
    # the disk tier: users beyond the host budget wait in state_dir/<model version> (LMDB,
    # emptied when the engine starts: the durable copy is the user-state topic); both or
    # neither (None: host memory holds every user the slots do not)
    host_budget_bytes: int | None = None
    state_dir: str | None = None
    exclude_recent: int = 0  # leave out the user's last N items from its recommendations
    device: str = "auto"  # "auto": CUDA when present, else CPU
    # events this much older than the user's newest are still applied (at the newest time)
    out_of_order_tolerance_s: float = 300.0
    # shop rules (models with a repeat head): leave out items the user paid for within this
    # many hours before its newest event (0: off; items still in its recent-items buffer) ...
    exclude_paid_hours: float = 0.0
    explore_only: bool = False  # ... recommend only items new to the user (not in the buffer)
    min_explore_share: float = 0.0  # ... at least this share of top_k from the explore side
    # one-event-per-user steps through torch.compile (`model.compiled_step`): about 3x less
    # per call on a CPU, for a compile of about a minute when the engine starts
    compile_step: bool = False

    def __post_init__(self) -> None:
        if self.exclude_paid_hours < 0:
            raise ValueError(f"exclude_paid_hours must be >= 0, got {self.exclude_paid_hours}")
        if not 0.0 <= self.min_explore_share <= 1.0:
            raise ValueError(f"min_explore_share must lie in [0, 1], got {self.min_explore_share}")
        if (self.host_budget_bytes is None) != (self.state_dir is None):
            raise ValueError("the disk tier needs both a host budget and a state directory")
        if self.host_budget_bytes is not None and self.host_budget_bytes <= 0:
            raise ValueError(f"host_budget_bytes must be > 0, got {self.host_budget_bytes}")

    @property
    def shop_rules(self) -> list[str]:
        """The names of the shop rules that are on."""
        on = {
            "exclude_paid_hours": self.exclude_paid_hours > 0,
            "explore_only": self.explore_only,
            "min_explore_share": self.min_explore_share > 0,
        }
        return [name for name, is_on in on.items() if is_on]


@dataclass
class EngineStats:
    events_applied: int = 0
    unknown_items: int = 0  # applied through the unknown-item row
    recommendations: int = 0
    skipped_duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    step_seconds: float = 0.0
    search_seconds: float = 0.0
    batches: int = 0


class _Step(NamedTuple):
    """An admitted event with its model inputs; `ts` runs forward within the user. (A named
    tuple: made once per event, it costs a third of a frozen dataclass.)"""

    event: BehaviorEvent
    item: int
    category: int
    behavior: int
    ts: int


class RecommendationEngine:
    def __init__(
        self, model: StreamingModel, index: ItemIndex, config: EngineConfig = EngineConfig()
    ):
        if model.items is None:
            raise ValueError("the model has no item vocabulary: load a trained checkpoint")
        if config.exclude_recent and not hasattr(model, "recent_items"):
            raise ValueError(
                f"exclude_recent needs a model that keeps its users' recent items; "
                f"{type(model).__name__} does not"
            )
        self.head = getattr(model, "repeat_head", None)
        if config.shop_rules and self.head is None:
            raise ValueError(
                f"{', '.join(config.shop_rules)} read the user's recent-items buffer, which "
                f"only a model with a repeat head keeps; {type(model).__name__} has none"
            )
        self.query = spec_of(model.cfg).query
        if self.query == "per_category" and index.categories is None:
            raise ValueError(
                f"{type(model).__name__} searches each of its top categories: build the index "
                "with item categories (`hytrec index build` from its checkpoint has them)"
            )
        self.device = resolve_device(config.device)
        self.model = model.to(self.device).eval()
        self.compiled_step = CompiledStep(self.model) if config.compile_step else None
        if self.compiled_step is not None:
            self.compiled_step.warm_up()  # now, not in the first micro-batch
        self.index = index
        self.config = config
        self.model_version = model.version
        num_slots = max(1, config.state_budget_bytes // model.state_bytes_per_user())
        disk_dir = Path(config.state_dir) / self.model_version if config.state_dir else None
        self.store = UserStateStore(
            self.model, num_slots, self.device, config.host_budget_bytes, disk_dir
        )
        self.stats = EngineStats()
        log.info(
            "engine: model %s on %s%s, %d user slots (%.1f MiB, %d B per user)%s, index %s",
            self.model_version,
            self.device,
            ", compiled one-event step" if self.compiled_step and self.compiled_step.active else "",
            num_slots,
            self.store.device_bytes / 2**20,
            self.store.bytes_per_user,
            f", host memory for {self.store.host_users} users, then disk in {disk_dir}"
            if disk_dir
            else "",
            index,
        )

    def close(self) -> None:
        """Release what outlives the object: the disk tier's files."""
        self.store.close()

    # ------------------------------------------------------------------ one micro-batch

    def process(self, events: Sequence[BehaviorEvent]) -> EngineResult:
        return self._process(events, recommend=True)

    def apply(self, events: Sequence[BehaviorEvent]) -> EngineResult:
        """`process` without the index search and the recommendations: the same admission
        (replays skipped, late events refused or moved forward in time) and the same step,
        so the states are those the stream would build. The backfill builds states with it,
        each user's history in a few long runs (the step's chunked form)."""
        return self._process(events, recommend=False)

    def _process(self, events: Sequence[BehaviorEvent], recommend: bool) -> EngineResult:
        # inference mode: no autograd bookkeeping at all (cheaper than no_grad for the many
        # small tensor operations of a step); in-place updates of the store are allowed
        with torch.inference_mode():
            runs, rejected, skipped = self._admit(events)
            self.stats.skipped_duplicates += len(skipped)
            for _, reason, _ in rejected:
                self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
            users = list(runs)
            recommendations = []
            for start in range(0, len(users), self.store.num_slots):  # never exceeds slots
                chunk = users[start : start + self.store.num_slots]
                chunk_runs = [runs[u] for u in chunk]
                slots, vectors = self._apply(chunk, chunk_runs)
                if recommend:
                    recommendations += self._recommend(chunk, chunk_runs, slots, vectors)
        applied = [step.event for u in users for step in runs[u]]
        return EngineResult(recommendations, rejected, skipped=skipped, applied=applied)

    def _admit(self, events: Sequence[BehaviorEvent]):
        """Group events into per-user runs; sort out replays and events the model refuses."""
        runs: dict[str, list[_Step]] = {}
        rejected: list[tuple[BehaviorEvent, str, str]] = []
        skipped: list[BehaviorEvent] = []
        items, categories = self.model.items, self.model.categories
        codes: dict[str, int] = {}  # raw behaviour name -> Behavior, parsed once per batch
        newest_offset: dict[tuple[str, int], int] = {}  # (user, partition) -> in this batch
        tolerance = self.config.out_of_order_tolerance_s
        store = self.store
        for event in events:
            user, partition = event.user_id, event.partition
            last_offset = newest_offset.get((user, partition))
            if last_offset is None:
                last_offset = store.offset_of(user, partition)
            if event.offset <= last_offset:
                skipped.append(event)  # at-least-once delivery replayed it: applied already
                continue
            run = runs.get(user)
            last_ts = run[-1].ts if run else store.newest_ts(user)
            if last_ts is not None and event.ts < last_ts - tolerance:
                rejected.append(
                    (
                        event,
                        "out_of_order",
                        f"ts {event.ts} is older than user {user!r}'s newest event ({last_ts}) "
                        f"by more than the {tolerance:g} s tolerance",
                    )
                )
                continue
            newest_offset[(user, partition)] = event.offset
            item = items.get(event.item_id)  # 0: unknown, applied through row 0
            self.stats.unknown_items += item == 0
            category = categories.get(event.category_id) if categories is not None else 0
            behavior = codes.get(event.behavior)
            if behavior is None:
                behavior = codes[event.behavior] = int(Behavior.parse(event.behavior))
            ts = event.ts if last_ts is None else max(event.ts, last_ts)  # time runs forward
            step = _Step(event, item, category, behavior, ts)
            if run is None:
                runs[user] = [step]
            else:
                run.append(step)
        return runs, rejected, skipped

    def _apply(
        self, users: list[str], runs: list[list]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One model step for all users' runs: their slots [U] and user vectors [U, d]
        (None for a model searched per category or by several queries)."""
        started = time.perf_counter()
        sizes = [len(r) for r in runs]
        columns = np.zeros((4, len(runs), max(sizes)), dtype=np.int64)  # item, cat., beh., ts
        flat = np.array([s[1:] for run in runs for s in run], dtype=np.int64)  # [N, 4]
        rows = np.repeat(np.arange(len(runs)), sizes)
        starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
        columns[:, rows, np.arange(len(flat)) - starts] = flat.T
        lengths = torch.tensor(sizes)
        batch = EventBatch(*torch.from_numpy(columns), lengths=lengths).to(self.device)
        slots = self.store.acquire(users)
        if self.query == "single":
            step = self.compiled_step or self.model.step
            vectors = step(self.store.state, slots.to(self.device), batch)
        else:  # searched from a fresh read of the state (`_cascade_plan`, `serving_queries`):
            # the step's read-out would go unused, so only the events are applied
            self.model.apply_events(self.store.state, slots.to(self.device), batch)
            vectors = None
        for user, run in zip(users, runs, strict=True):
            for step in run:  # offsets grow along a run within each partition
                self.store.mark_applied(user, step.event.partition, step.event.offset)
        self.stats.events_applied += int(lengths.sum())
        self.stats.step_seconds += time.perf_counter() - started
        self.stats.batches += 1
        return slots, vectors

    def _recommend(self, users, runs, slots, vectors) -> list[Recommendation]:
        started = time.perf_counter()
        slots = slots.to(self.device)
        recent = None
        if self.config.exclude_recent:
            recent = self.model.recent_items(
                self.store.state, slots, self.config.exclude_recent
            )  # [U, n] item indices, 0 = none
        if self.head is not None:
            ids, scores, sources = self._merge(slots, vectors, recent)
        elif self.query == "per_category":
            ids, scores, sources = self._cascade(slots, recent)
        else:
            exclude = None if recent is None else [sorted(set(r) - {0}) for r in recent.tolist()]
            if self.query == "multi":
                queries, present = self.model.serving_queries(self.store.state, slots)
                found = search_max_over_queries(
                    self.index,
                    queries.float().cpu().numpy(),  # [U, M, d]
                    present.cpu().numpy(),
                    self.config.top_k,
                    exclude=exclude,
                )
            else:
                found = self.index.search(
                    vectors.float().cpu().numpy(), self.config.top_k, exclude=exclude
                )
            ids, scores = found.ids.tolist(), found.scores.tolist()
            sources = [["explore"] * len(row) for row in ids]
        self.stats.search_seconds += time.perf_counter() - started
        produced_at = time.time()
        raw = self.model.items.raw
        out = []
        for user, run, row_ids, row_scores, row_sources in zip(
            users, runs, ids, scores, sources, strict=True
        ):
            newest = run[-1].event
            kept = [n for n, i in enumerate(row_ids) if i > 0]
            out.append(
                Recommendation(
                    user_id=user,
                    items=[raw(row_ids[n]) for n in kept],
                    scores=[row_scores[n] for n in kept],
                    model_version=self.model_version,
                    source_partition=newest.partition,
                    source_offset=newest.offset,
                    event_ts=newest.ts,
                    received_at=newest.received_at,
                    produced_at=produced_at,
                    sources=[row_sources[n] for n in kept],
                )
            )
        self.stats.recommendations += len(out)
        return out

    def _cascade_plan(self, slots):
        """ULIM's read-out of these users for serving (`ULIM.cascade_plan`)."""
        top = self.model.cfg.top_categories or self.model.cfg.num_categories
        return self.model.cascade_plan(self.store.state, slots, top)

    def _category_searches(self, plan, exclude):
        """ULIM's searches: for each user, one per top category of `plan`, its interest
        among the category's items, each leaving out the user's `exclude` list (None:
        nothing). Returns (categories [U, C], item ids [U, C, K], scores u^c . e_i
        [U, C, K]) as numpy arrays."""
        K = self.config.top_k
        categories, queries = plan.categories, plan.interests
        U, C = categories.shape
        found = self.index.search(
            queries.reshape(U * C, -1).float().cpu().numpy(),  # [U * C, d]
            K,
            exclude=None if exclude is None else [row for row in exclude for _ in range(C)],
            query_categories=categories.reshape(-1, 1).tolist(),
        )
        return (
            categories.cpu().numpy(),
            found.ids.reshape(U, C, K),
            found.scores.reshape(U, C, K),
        )

    def _category_names(self, categories: np.ndarray) -> list[list[str]]:
        """Sources "category:<raw id>" of category indices [U, n]."""
        raw = self.model.categories.raw if self.model.categories is not None else str
        return [[f"category:{raw(int(c))}" for c in row] for row in categories]

    def _cascade(self, slots, recent):
        """ULIM's cascade: the category searches merged by u^c . e_i + `ULIM.merge_offset`
        (log P(c) P(i | c) as `cascade_scores` ranks): (item ids, scores, sources), one list
        per user, best first."""
        K = self.config.top_k
        exclude = None
        if recent is not None:  # every search of a user leaves out the user's recent items
            exclude = [sorted(set(row) - {0}) for row in recent.tolist()]
        plan = self._cascade_plan(slots)
        offset = self.model.merge_offset(plan).cpu().numpy()  # [U, C]
        categories, found_ids, found_scores = self._category_searches(plan, exclude)
        U = len(categories)
        via = np.repeat(categories, K, axis=1)  # [U, C * K]
        score = (found_scores + offset[:, :, None]).reshape(U, -1)
        best = np.argsort(-score, axis=1, kind="stable")[:, :K]  # [U, K]
        ids = np.take_along_axis(found_ids.reshape(U, -1), best, 1)
        sources = self._category_names(np.take_along_axis(via, best, 1))
        return ids.tolist(), np.take_along_axis(score, best, 1).tolist(), sources

    def _merge(self, slots, vectors, recent):
        """The top K of the copy candidates (the users' buffers) and the explore candidates
        (the index's top K among the other items) by log P(i), under the shop rules:
        (item ids, log P, sources), one list per user, best first."""
        config, K, state = self.config, self.config.top_k, self.store.state
        buffer = serving_buffer(state.recent, state.recent_counts, slots)  # [U, N] each
        per_category = self.query == "per_category"
        if per_category:  # the head reads the cascade's distribution
            plan = self._cascade_plan(slots)
            u, explore_scores = plan.head_user, plan.explore
        else:
            u, explore_scores = vectors, self.model.score(vectors)
        log_p = self.head.serve(
            buffer, u, explore_scores, self.model.item_table(), explore_is_normalised=per_category
        )
        # copy candidates the rules leave out: all (explore only), the recently paid for,
        # the user's last `exclude_recent` items
        blocked = torch.full_like(buffer.valid, config.explore_only)
        if config.exclude_paid_hours:
            paid_ts = state.recent[slots, :, RECENT_COLUMNS.index("paid_ts")]  # [U, N]
            since = state.last_ts[slots, None] - round(config.exclude_paid_hours * 3600)
            blocked |= (paid_ts > 0) & (paid_ts > since)  # less than H hours before
        if recent is not None:
            blocked |= (buffer.item[:, :, None] == recent[:, None, :]).any(-1)
        copy = torch.where(buffer.valid & ~blocked, buffer.item, 0)  # [U, N]
        # explore: never an item of the buffer (its P(i) is on the copy side) nor a recent one
        known = buffer.item if recent is None else torch.cat([buffer.item, recent], 1)
        exclude = [sorted(set(row) - {0}) for row in known.tolist()]
        if per_category:  # each top category's top K (their union holds
            # the top K by log P: within a category both orders are u^c . e_i's)
            categories, found_ids, _ = self._category_searches(plan, exclude)
            found_ids = found_ids.reshape(len(categories), -1)  # [U, C * K]
            explore_names = self._category_names(np.repeat(categories, K, axis=1))
        else:
            found_ids = self.index.search(vectors.float().cpu().numpy(), K, exclude=exclude).ids
            explore_names = [["explore"] * found_ids.shape[1]] * len(found_ids)
        explore = torch.from_numpy(found_ids).to(self.device).clamp(min=0)  # [U, M], 0 = none
        candidates = torch.cat([copy, explore], 1)  # [U, N + M]
        score = log_p.gather(1, candidates).masked_fill(candidates == 0, float("-inf"))
        from_index = torch.zeros_like(candidates, dtype=torch.bool)
        from_index[:, copy.shape[1] :] = True
        # the best ceil(share * K) explore candidates are in whatever the copy side scores
        need = min(K, int(np.ceil(config.min_explore_share * K - 1e-9)))
        explore_rank = score.masked_fill(~from_index, float("-inf")).argsort(1, descending=True)
        forced = torch.zeros_like(from_index).scatter_(1, explore_rank[:, :need], True)
        forced &= score > float("-inf")
        chosen = torch.where(forced, float("inf"), score).topk(min(K, score.shape[1])).indices
        order = score.gather(1, chosen).argsort(1, descending=True)
        chosen = chosen.gather(1, order)  # [U, K], best log P first
        chosen_score = score.gather(1, chosen)
        ids = torch.where(chosen_score > float("-inf"), candidates.gather(1, chosen), 0)
        N = copy.shape[1]
        sources = [
            ["repeat" if c < N else names[c - N] for c in row]
            for row, names in zip(chosen.tolist(), explore_names, strict=True)
        ]
        return ids.tolist(), chosen_score.tolist(), sources

    # ------------------------------------------------------------------ snapshots (issue 5)

    def export_states(self, partition_of: Mapping[str, int], log: str = "") -> list[UserSnapshot]:
        """Snapshots of these users' states (user -> its behaviours partition), their
        offsets belonging to the behaviours log `log`; users the store does not know are
        left out."""
        now = time.time()
        with torch.no_grad():
            states = self.store.export_users(list(partition_of))
        return [
            UserSnapshot(
                user_id=user,
                partition=partition_of[user],
                applied=kept.applied,
                model_version=self.model_version,
                parts=kept.parts,
                log=log,
                written_at=now,
            )
            for user, kept in states.items()
        ]

    def import_states(self, snapshots: Sequence[UserSnapshot]) -> int:
        """Restore users from snapshots that are ahead of what the store holds (`ahead_of`);
        snapshots of another model version are refused (logged). How many users were
        restored."""
        restored = refused = 0
        with torch.no_grad():
            for snap in snapshots:
                if snap.model_version != self.model_version:
                    refused += 1
                    continue
                if ahead_of(snap, self.store):
                    self.store.import_user(snap.user_id, snap.parts, snap.applied)
                    restored += 1
        if refused:
            log.warning(
                "refused %d snapshots of another model version than %s",
                refused,
                self.model_version,
            )
        return restored

    def settle(self, users: Sequence[str]) -> None:
        """Bring the parts these users' states derive from their events up to date (ULIM's
        slot interests, otherwise formed at the reads that `apply` skips), so states built
        by `apply` equal those the stream leaves and cost no extra work at their first
        read. Nothing to do for a model without such parts, or for a user the store does
        not hold (no slot is allocated for one)."""
        refresh = getattr(self.model, "refresh_state", None)
        if refresh is None:
            return
        users = [u for u in users if u in self.store]
        with torch.inference_mode():
            for start in range(0, len(users), self.store.num_slots):
                slots = self.store.acquire(users[start : start + self.store.num_slots])
                refresh(self.store.state, slots.to(self.device))

    def drop_users(self, users: Sequence[str]) -> int:
        """Forget these users' states (their partitions moved away); how many were known."""
        return self.store.forget(users)

    def reset_offsets(self, users: Sequence[str], partition: int) -> int:
        """Keep these users' states but apply their next events of `partition` whatever
        their offsets (the worker found the partition's log replaced); how many had one."""
        return self.store.reset_offsets(users, partition)


def build_engine(
    checkpoint_dir: str | Path,
    index_dir: str | Path | None = None,
    device: str = "auto",
    config: EngineConfig | None = None,
) -> RecommendationEngine:
    """Load a checkpoint and its item index (built now, exact, when no index_dir is given)."""
    config = config or EngineConfig(device=device)
    model = load_model(checkpoint_dir)
    if index_dir is None:
        index = build_from_checkpoint(checkpoint_dir, IndexConfig())
    else:
        index = ItemIndex.load(index_dir, expect_model_version=model.version)
    return RecommendationEngine(model, index, config)
