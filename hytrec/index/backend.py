"""Which faiss is installed, and whether to search on the CPU or a GPU.

faiss-cpu and faiss-gpu ship the same `faiss/` files: with both installed, whichever came
last has overwritten the other, and uninstalling either breaks `import faiss`. So the
distributions are checked with importlib.metadata before faiss is imported, and the
failure says what to do. GPU use is decided on `faiss.get_num_gpus()`: faiss-gpu imports
on a machine without CUDA devices, and an index moved to "all GPUs" there fails only later,
at search time.
"""

from __future__ import annotations

import logging
from importlib import metadata
from types import ModuleType

log = logging.getLogger(__name__)

CPU_DISTRIBUTIONS = ("faiss-cpu",)
GPU_DISTRIBUTIONS = ("faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12")
BACKENDS = ("auto", "cpu", "gpu")


class FaissInstallError(ImportError):
    """faiss is missing, or both a CPU and a GPU distribution of it are installed."""


class BackendError(RuntimeError):
    """The requested backend cannot be used on this machine."""


def installed_faiss() -> list[str]:
    """`name==version` of every faiss distribution installed in this environment."""
    found = []
    for name in CPU_DISTRIBUTIONS + GPU_DISTRIBUTIONS:
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return found


def import_faiss() -> ModuleType:
    """Import faiss after checking that exactly one distribution of it is installed."""
    found = installed_faiss()
    cpu = [d for d in found if d.split("==")[0] in CPU_DISTRIBUTIONS]
    gpu = [d for d in found if d.split("==")[0] in GPU_DISTRIBUTIONS]
    if cpu and gpu:
        raise FaissInstallError(
            f"both {', '.join(cpu)} and {', '.join(gpu)} are installed: they write the same "
            "faiss/ files, so one has overwritten the other, and removing either breaks "
            "`import faiss`. Fix: pip uninstall -y "
            + " ".join(d.split("==")[0] for d in found)
            + " && pip install -e '.[cpu]' (or '.[gpu]' on a CUDA 12 machine)"
        )
    try:
        import faiss
    except ImportError as err:
        hint = (
            f"installed: {', '.join(found)}, but the import failed ({err}); a removed "
            "twin distribution may have taken its files: reinstall it"
            if found
            else "no faiss distribution is installed"
        )
        raise FaissInstallError(
            f"faiss is not importable: {hint}. Install exactly one of "
            "pip install -e '.[cpu]' or -e '.[gpu]'"
        ) from err
    return faiss


def num_gpus(faiss: ModuleType) -> int:
    """CUDA devices faiss can use (0 for faiss-cpu, and for faiss-gpu without devices)."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def select_backend(requested: str = "auto") -> str:
    """'cpu' or 'gpu': auto takes the GPU when faiss sees one; a forced 'gpu' fails clearly."""
    if requested not in BACKENDS:
        raise ValueError(f"backend {requested!r}: expected one of {BACKENDS}")
    faiss = import_faiss()
    gpus = num_gpus(faiss)
    if requested == "gpu" and gpus == 0:
        raise BackendError(
            f"backend 'gpu' was requested but faiss sees no GPU (faiss.get_num_gpus() == 0, "
            f"installed: {', '.join(installed_faiss()) or 'none'}); use backend 'auto' or "
            "'cpu', or install '.[gpu]' on a machine with a CUDA 12 device"
        )
    if requested == "auto":
        chosen = "gpu" if gpus > 0 else "cpu"
        reason = f"auto: faiss {faiss.__version__} sees {gpus} GPU(s)"
    else:
        chosen, reason = requested, "forced"
    log.info("faiss backend: %s (%s)", chosen, reason)
    return chosen
