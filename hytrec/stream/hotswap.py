"""Hot swap of model and index (issue 5): a models directory the worker watches, and the
atomic way to publish a checkpoint into it.

The directory. Each subdirectory is a checkpoint of a registered model as its `save` writes it
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
fixed one under a new name), and the next older one is tried. `ModelSwaps` calls it off
the event loop and off the engine's thread, then swaps engines between batches.

The swap. Under the worker's flush lock, the old engine's waiting batch runs and its states
are checkpointed and acknowledged; then the engine reference changes. So a batch runs
wholly on one engine (asserted), no search is in flight (searches run inside batches), and
every event is applied by exactly one engine. User states of the old model mean nothing
under the new weights: they are reset (logged with their count).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hytrec.stream.schemas import Engine

if TYPE_CHECKING:
    from hytrec.stream.engine import EngineConfig
    from hytrec.stream.worker import BatchingWorker

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


class ModelSwaps:
    """The worker's hot swap: watch the models directory, load in a thread, swap between
    batches."""

    def __init__(self, worker: BatchingWorker, watcher: ModelWatcher | None):
        self.worker = worker
        self.watcher = watcher
        self.loader_thread = ThreadPoolExecutor(1, thread_name_prefix="hytrec-model-load")

    async def watch(self) -> None:
        """Every `models_poll_s`: load the models directory's newest checkpoint when its
        version differs from the serving one (in a thread of its own: neither the event
        loop nor the engine's thread waits for it), then swap it in between batches."""
        worker = self.worker
        await worker.ready.wait()
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(worker.config.models_poll_s)
            try:
                loaded = await loop.run_in_executor(
                    self.loader_thread,
                    self.watcher.load_next,
                    worker.engine_loader,
                    worker.engine.model_version,
                )
            except OSError:  # the directory is unreadable now; the next poll tries again
                log.exception("cannot look at models directory %s", self.watcher.models_dir)
                continue
            if loaded is not None:
                await self.swap(loaded)

    async def swap(self, loaded: LoadedEngine) -> None:
        """Serve `loaded.engine` from the next batch on (see the module's docstring)."""
        worker = self.worker
        started = time.perf_counter()
        async with worker.flush_lock:
            await worker.flush_locked(checkpoint=True)
            if worker.failed is not None:
                return  # stopping: nothing is swapped
            assert not worker.checkpoints.unacked, "the old engine's batches all checkpointed"
            old, worker.engine = worker.engine, loaded.engine
            swap_s = time.perf_counter() - started
        reset = len(getattr(old, "store", ()))
        stats = worker.stats
        stats.model_swaps += 1
        stats.model_load_seconds += loaded.load_seconds
        stats.model_swap_seconds += swap_s
        log.info(
            "model swapped %s -> %s (%s): %d user states reset (the new model starts them "
            "empty; snapshots of %s are refused from now on); load and index %.2f s, "
            "batches held %.3f s",
            old.model_version,
            loaded.engine.model_version,
            loaded.path,
            reset,
            old.model_version,
            loaded.load_seconds,
            swap_s,
        )


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
    from hytrec.model.base import CheckpointError  # torch only when publishing
    from hytrec.model.registry import load_model

    source, models_dir = Path(checkpoint), Path(models_dir)
    try:
        version = load_model(source).version
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors' own error for broken weights, and the like
        raise CheckpointError(f"{source} cannot be loaded: {type(exc).__name__}: {exc}") from exc
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
