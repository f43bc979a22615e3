"""The model registry: one line per model, read by training, evaluation, the index builder,
the stream engine, snapshots and hot swap, which never name a concrete model class.

A line says the model's name (the `"model"` field of its checkpoints), its config and model
classes, whether it streams (has `new_state`/`step`, see `streaming.py`), the shape of its
index query, and how its implementation relates to the published method:

    single        one vector per user, searched in the item index
    multi         several vectors per user, searched each, merged by max score
    per_category  vectors with category filters (a category cascade)

(a multi or per_category model reads its queries from the state when it is searched, so
it also gives `apply_events(state, slots, batch)`: the step without the read-out, which
the engine runs instead of `step`)

    fidelity  "paper"    built from the paper (equations and text)
              "code"     checked against the authors' public code
              "reading"  built from the abstract and the prior work it names
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from hytrec.model.base import CheckpointError, SequentialModel, read_checkpoint_meta
from hytrec.model.data import (
    has_categories,
    require_categories,
    require_timestamps,
    timestamps_are_positions,
)
from hytrec.model.events import EventLog
from hytrec.model.hisac import HiSAC, HiSACConfig, HiSACMulti, HiSACMultiConfig
from hytrec.model.hpgr import HPGR, HPGRConfig
from hytrec.model.hstu import HSTU, HSTUConfig
from hytrec.model.hytrec import HyTRec, HyTRecConfig
from hytrec.model.recgrela import RecGRELA, RecGRELAConfig
from hytrec.model.sasrec import SASRec, SASRecConfig
from hytrec.model.ulim import ULIM, ULIMConfig

QUERY_KINDS = ("single", "multi", "per_category")
FIDELITIES = ("paper", "code", "reading")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: type
    model: type[SequentialModel]
    streams: bool = True
    query: str = "single"
    fidelity: str = "paper"

    def __post_init__(self) -> None:
        if self.model.NAME != self.name or self.model.CONFIG is not self.config:
            raise ValueError(f"{self.model.__name__} does not name itself {self.name!r}")
        if self.query not in QUERY_KINDS or self.fidelity not in FIDELITIES:
            raise ValueError(f"{self.name}: query in {QUERY_KINDS}, fidelity in {FIDELITIES}")
        if self.streams and self.query != "single" and not hasattr(self.model, "apply_events"):
            raise ValueError(f"{self.name}: a {self.query} query needs apply_events")


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("hytrec", HyTRecConfig, HyTRec),
        ModelSpec("sasrec", SASRecConfig, SASRec),
        ModelSpec("recgrela", RecGRELAConfig, RecGRELA, fidelity="code"),
        ModelSpec("hstu", HSTUConfig, HSTU, fidelity="code"),
        ModelSpec("ulim", ULIMConfig, ULIM, query="per_category", fidelity="reading"),
        ModelSpec("hpgr", HPGRConfig, HPGR, fidelity="reading"),
        ModelSpec("hisac", HiSACConfig, HiSAC, fidelity="reading"),
        ModelSpec("hisacmulti", HiSACMultiConfig, HiSACMulti, query="multi", fidelity="reading"),
    )
}


def spec(name: str) -> ModelSpec:
    """The registry line of a model name; the error lists the registered ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(MODELS)}") from None


def spec_of(config) -> ModelSpec:
    """The registry line of a config instance."""
    for line in MODELS.values():
        if type(config) is line.config:
            return line
    raise TypeError(f"{type(config).__name__} is not a registered model config")


def most_frequent_category(log: EventLog) -> np.ndarray:
    """int64 [num_items]: each item's most frequent category in the log (0 if never seen)."""
    out = np.zeros(len(log.items), dtype=np.int64)
    if not len(log):
        return out
    pairs, counts = np.unique(np.stack([log.item, log.category], 1), axis=0, return_counts=True)
    # sort by (item, count): the last row of each item holds its most frequent category
    order = np.lexsort((counts, pairs[:, 0]))
    pairs = pairs[order]
    last = np.r_[pairs[1:, 0] != pairs[:-1, 0], True]
    out[pairs[last, 0]] = pairs[last, 1]
    return out


def missing_input(config, log: EventLog) -> str | None:
    """Why a model of `config`'s kind cannot run on `log` (None: it can): models that cut
    sessions need times (`NEEDS_TIMESTAMPS`), models that predict categories need them
    (`NEEDS_CATEGORIES`)."""
    model = spec_of(config).model
    if getattr(model, "NEEDS_TIMESTAMPS", False) and timestamps_are_positions(log):
        return "no timestamps (positions): no sessions"
    if getattr(model, "NEEDS_CATEGORIES", False) and not has_categories(log):
        return "no item categories"
    return None


def require_inputs(config, log: EventLog) -> None:
    """`missing_input`'s refusal as the data's error, which says what to use instead."""
    model = spec_of(config).model
    if getattr(model, "NEEDS_TIMESTAMPS", False):
        require_timestamps(log, model.__name__)
    if getattr(model, "NEEDS_CATEGORIES", False):
        require_categories(log, model.__name__)


def build_model(config, log: EventLog) -> SequentialModel:
    """A fresh model of `config`'s kind sized to the log's vocabularies (the config's sizes
    are replaced), its item -> category table filled from the log; refused (`DataError`)
    on a log without what the model needs (`require_inputs`)."""
    line = spec_of(config)
    require_inputs(config, log)
    sizes = {"num_items": len(log.items)}
    if "num_categories" in {f.name for f in fields(config)}:
        sizes["num_categories"] = len(log.categories)
    model = line.model(replace(config, **sizes), log.items, log.categories)
    model.item_category.copy_(torch.from_numpy(most_frequent_category(log)))
    return model


def checkpoint_model_name(directory: str | Path) -> str:
    """The registered name a checkpoint directory was saved under."""
    name = read_checkpoint_meta(directory).get("model")
    if name not in MODELS:
        raise CheckpointError(
            f"{Path(directory) / 'checkpoint.json'}: model {name!r} is not registered "
            f"({sorted(MODELS)})"
        )
    return name


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> SequentialModel:
    """Load any registered model's checkpoint, whichever `checkpoint.json` names."""
    return MODELS[checkpoint_model_name(directory)].model.load(directory, map_location)


def describe() -> list[dict]:
    """The registry as plain data (for `hytrec models` and reports)."""
    return [
        {
            "name": line.name,
            "config": line.config.__name__,
            "model": line.model.__name__,
            "streams": line.streams,
            "query": line.query,
            "fidelity": line.fidelity,
        }
        for line in MODELS.values()
    ]


__all__ = [
    "MODELS",
    "ModelSpec",
    "build_model",
    "checkpoint_model_name",
    "describe",
    "load_model",
    "missing_input",
    "most_frequent_category",
    "require_inputs",
    "spec",
    "spec_of",
]
