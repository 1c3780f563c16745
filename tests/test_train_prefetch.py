"""The trainer's bounded read-ahead of stored targets (kdstore.train.prefetch.read_ahead)."""

from __future__ import annotations

import threading
import time

import pytest
from kdstore.train.prefetch import read_ahead, store_prefetch


def test_the_next_items_are_read_while_one_is_consumed_and_no_more():
    started = [threading.Event() for _ in range(6)]

    def read(i: int) -> int:
        started[i].set()
        return i * 10

    it = read_ahead([(i,) for i in range(6)], read, 2)
    first = next(it)
    # while item 0 is in the consumer's hands, items 1 and 2 are read in the background ...
    assert started[0].wait(10) and started[1].wait(10) and started[2].wait(10)
    time.sleep(0.3)
    assert not started[3].is_set()  # ... and nothing beyond the depth
    assert first() == 0 and [get() for get in it] == [10, 20, 30, 40, 50]


def test_depth_zero_reads_in_the_callers_thread_in_order():
    threads = []
    out = [get() for get in read_ahead([(i,) for i in range(4)], lambda i: threads.append(threading.current_thread()) or i, 0)]
    assert out == [0, 1, 2, 3] and set(threads) == {threading.current_thread()}


def test_an_error_surfaces_at_its_item_and_an_early_close_does_not_hang():
    def read(i: int) -> int:
        if i == 2:
            raise ValueError("bad piece 2")
        return i

    it = read_ahead([(i,) for i in range(5)], read, 2)
    assert next(it)() == 0 and next(it)() == 1
    with pytest.raises(ValueError, match="bad piece 2"):
        next(it)()
    gate = threading.Event()
    slow = read_ahead([(i,) for i in range(5)], lambda i: gate.wait(5) and i, 3)
    gate.set()
    assert next(slow)() == 0
    slow.close()  # cancels what was not started


def test_the_depth_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("KDSTORE_STORE_PREFETCH", raising=False)
    assert store_prefetch() == 2
    monkeypatch.setenv("KDSTORE_STORE_PREFETCH", "0")
    assert store_prefetch() == 0
