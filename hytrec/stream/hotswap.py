"""Hot swap of model and index (issue 5): a models directory the worker watches, and the
atomic way to publish a checkpoint into it.

The directory. Each subdirectory is a HyTRec checkpoint as `HyTRec.save` writes it
(`checkpoint.json`, `model.safetensors`, optionally a saved item index in `index/`). A
subdirectory counts once it is complete: its name does not start with "." (temporary
names do) and both files are there. Names sort in publish order: the newest checkpoint is
the one whose name sorts last, and `publish_model` names them `YYYYmmddTHHMMSSZ-VERSION`
(UTC), so publishing again, even an older checkpoint, makes it the newest (a roll back).

Publishing is atomic: the checkpoint is copied under a hidden temporary name in the same
directory, then renamed (one `os.rename`, atomic on a POSIX file system), so the watcher
never sees half a checkpoint. Writing into the directory by other means races the watcher.

Loading. `ModelWatcher.load_next` walks the complete checkpoints newest first, down to the
one serving: the first whose version (from its checkpoint.json) differs from the serving
model's is loaded (model, and its index built or read) by the caller's loader. One that
fails is logged with its path and reason, remembered and never tried again (publish a
fixed one under a new name), and the next older one is tried. The worker calls it off the
event loop and off the engine's thread, then swaps engines between batches
(`BatchingWorker.swap_engine`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hytrec.stream.schemas import Engine

if TYPE_CHECKING:
    from hytrec.stream.engine import EngineConfig

log = logging.getLogger(__name__)

REQUIRED_FILES = ("checkpoint.json", "model.safetensors")


@dataclass(frozen=True, slots=True)
class LoadedEngine:
    """An engine built from a checkpoint of the models directory, ready to serve."""

    engine: Engine
    path: Path
    load_seconds: float  # model load and index build


def checkpoint_version(path: Path) -> str | None:
    """The model version a checkpoint.json declares (None when it declares none)."""
    return json.loads((path / "checkpoint.json").read_text()).get("version")


class ModelWatcher:
    """The checkpoints of a models directory, newest first, and the ones that failed."""

    def __init__(self, models_dir: str | Path):
        self.models_dir = Path(models_dir)
        self.serving: str | None = None  # name of the checkpoint serving, if it came from here
        self.failed: dict[str, str] = {}  # name -> why it could not be loaded

    def complete(self) -> list[Path]:
        """Complete checkpoint directories, newest (name sorting last) first."""
        if not self.models_dir.is_dir():
            return []
        found = [
            path
            for path in self.models_dir.iterdir()
            if not path.name.startswith(".")
            and path.is_dir()
            and all((path / name).is_file() for name in REQUIRED_FILES)
        ]
        return sorted(found, key=lambda path: path.name, reverse=True)

    def load_next(
        self, loader: Callable[[Path], Engine], serving_version: str | None
    ) -> LoadedEngine | None:
        """The engine of the newest checkpoint newer than the serving one whose version
        differs from `serving_version`, or None. Blocks while it loads: run it in a thread."""
        for path in self.complete():
            if path.name == self.serving:
                return None
            if path.name in self.failed:
                continue
            started = time.perf_counter()
            try:
                if serving_version is not None and checkpoint_version(path) == serving_version:
                    self.serving = path.name  # the same weights published again
                    return None
                engine = loader(path)
            except Exception as exc:  # noqa: BLE001 - any reason: logged, skipped, kept
                self.failed[path.name] = f"{type(exc).__name__}: {exc}"
                log.error(
                    "checkpoint %s cannot be loaded (%s); skipped, and not tried again "
                    "(publish a fixed one under a new name)",
                    path,
                    self.failed[path.name],
                )
                continue
            self.serving = path.name
            return LoadedEngine(engine, path, time.perf_counter() - started)
        return None


def checkpoint_loader(engine_config: EngineConfig | None = None) -> Callable[[Path], Engine]:
    """Checkpoint directory -> model engine; the item index is read from the checkpoint's
    `index/` when it has one, else built exact."""

    def load(path: Path) -> Engine:
        from hytrec.stream.engine import build_engine  # torch and FAISS load only here

        index = path / "index"
        return build_engine(path, index_dir=index if index.is_dir() else None, config=engine_config)

    return load


def publish_model(checkpoint: str | Path, models_dir: str | Path, name: str | None = None) -> Path:
    """Copy a checkpoint into the models directory atomically (hidden temporary copy, then
    one rename); the published path. The checkpoint is loaded first, so a broken one is
    refused here rather than skipped by every worker."""
    from hytrec.model.hytrec import HyTRec  # torch only when publishing

    source, models_dir = Path(checkpoint), Path(models_dir)
    version = HyTRec.load(source).version  # raises CheckpointError with the reason
    name = name or f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{version}"
    if name.startswith(".") or "/" in name:
        raise ValueError(f"checkpoint name {name!r}: no leading '.', no '/'")
    target = models_dir / name
    if target.exists():
        raise FileExistsError(f"{target} exists already")
    models_dir.mkdir(parents=True, exist_ok=True)
    temporary = models_dir / f".{name}.tmp-{os.getpid()}"
    try:
        shutil.copytree(source, temporary)
        os.rename(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target
