"""The micro-batcher's size and time triggers, driven by an explicit clock."""

from __future__ import annotations

import pytest

from hytrec.stream.batcher import BatchConfig, MicroBatcher


def test_size_trigger_fires_at_max_items_and_keeps_arrival_order():
    batcher = MicroBatcher(BatchConfig(max_items=3, max_wait_ms=1000))
    assert [batcher.add(i, now=0.0) for i in range(3)] == [False, False, True]
    assert batcher.due(now=0.0)
    assert batcher.take() == [0, 1, 2]
    assert len(batcher) == 0 and not batcher.due(now=100.0)


def test_time_trigger_counts_from_the_oldest_item():
    batcher = MicroBatcher(BatchConfig(max_items=100, max_wait_ms=50))
    assert batcher.time_left(now=5.0) is None
    batcher.add("a", now=10.0)
    batcher.add("b", now=10.04)  # a later item does not restart the clock
    assert batcher.time_left(now=10.02) == pytest.approx(0.03)
    assert not batcher.due(now=10.049)
    assert batcher.due(now=10.05)
    assert batcher.take() == ["a", "b"]
    batcher.add("c", now=20.0)  # a new batch opens its own window
    assert not batcher.due(now=20.01) and batcher.due(now=20.06)


def test_zero_wait_flushes_every_item():
    batcher = MicroBatcher(BatchConfig(max_items=10, max_wait_ms=0))
    batcher.add(1, now=3.0)
    assert batcher.due(now=3.0)


@pytest.mark.parametrize("config", [dict(max_items=0), dict(max_wait_ms=-1)])
def test_invalid_config_is_refused(config):
    with pytest.raises(ValueError):
        BatchConfig(**config)
