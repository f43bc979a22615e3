"""FAISS item index: build, persist, search, hot swap (CPU, or GPU where faiss sees one)."""

from hytrec.index.backend import (
    BackendError,
    FaissInstallError,
    import_faiss,
    installed_faiss,
    select_backend,
)
from hytrec.index.holder import IndexHolder
from hytrec.index.item_index import (
    IndexConfig,
    IndexFileError,
    ItemIndex,
    SearchResult,
    build_from_checkpoint,
    build_index,
    exact_top_k,
    read_metadata,
    recall_at_k,
)

__all__ = [
    "BackendError",
    "FaissInstallError",
    "IndexConfig",
    "IndexFileError",
    "IndexHolder",
    "ItemIndex",
    "SearchResult",
    "build_from_checkpoint",
    "build_index",
    "exact_top_k",
    "import_faiss",
    "installed_faiss",
    "read_metadata",
    "recall_at_k",
    "select_backend",
]
