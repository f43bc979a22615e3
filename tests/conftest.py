"""Shared fixtures: seeded RNGs, the real data folder, NaN-filled torch.empty."""

from __future__ import annotations

import os
import random
from pathlib import Path

# Without a GPU, Triton kernels run in its interpreter; it is chosen when they are defined,
# so before anything imports hytrec.kernels.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

SHARED_DATA = Path(
    os.environ.get(
        "HYTREC_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    )
)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _nan_filled_empty(monkeypatch):
    """Fill torch.empty with NaN so that reading uninitialised memory shows (as fla does)."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", nan_empty)
    yield


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or a skip that says why (a user's fresh clone has no ../shared)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (present in CI and dev machines)")
    return SHARED_DATA.resolve()
