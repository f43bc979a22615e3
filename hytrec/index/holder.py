"""Safe hot swap: serve searches from one index while the next is built in the background.

The holder keeps a single reference to the current ItemIndex. A search reads that
reference once and runs to the end on that index, so a swap never touches a search in
flight; the new index is assigned only after it is fully built, and assigning a Python
attribute is atomic, so no search ever sees a half-built index.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from hytrec.index.item_index import ItemIndex, SearchResult

log = logging.getLogger(__name__)


class IndexHolder:
    """Holds the serving ItemIndex; `search` always uses the reference current at its start."""

    def __init__(self, index: ItemIndex | None = None):
        self._index = index
        self._swap_lock = threading.Lock()  # one swap at a time; searches never take it

    @property
    def current(self) -> ItemIndex:
        index = self._index
        if index is None:
            raise RuntimeError("IndexHolder: no index yet (swap one in first)")
        return index

    def search(self, queries: np.ndarray, k: int, **kwargs) -> SearchResult:
        """ItemIndex.search on the current index: queries float32 [Q, d] -> [Q, k]."""
        return self.current.search(queries, k, **kwargs)

    def swap(self, new: ItemIndex) -> ItemIndex | None:
        """Serve `new` from now on; returns the old index (searches on it may still run)."""
        with self._swap_lock:
            old = self._index
            if old is not None and new.d != old.d:
                raise ValueError(f"swap refused: new index has d={new.d}, serving d={old.d}")
            self._index = new
        log.info("index swapped: %s -> %s", old, new)
        return old

    def swap_in_background(self, build_fn: Callable[[], ItemIndex]) -> Future:
        """Run build_fn in a thread and swap its result in. The future gives the new index,
        or the build's exception (then the old index keeps serving)."""
        future: Future = Future()

        def run() -> None:
            try:
                new = build_fn()
                self.swap(new)
            except BaseException as err:  # reported through the future, old index kept
                log.exception("background index build failed; keeping %s", self._index)
                future.set_exception(err)
            else:
                future.set_result(new)

        future.set_running_or_notify_cancel()
        threading.Thread(target=run, name="index-build", daemon=True).start()
        return future
