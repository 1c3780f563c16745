"""Reading the store ahead of the trainer: a bounded background reader.

A training slot reads its shards in order; for each piece of a shard the dataset first
reads the stored targets (one contiguous range per field), then decodes the inputs from
the tar. On object storage the target reads are round trips (tens of requests per piece):
:func:`read_ahead` issues the next pieces' reads in a background thread while the current
piece is decoded, so an epoch from ``s3://`` costs about what it costs from local disk
(``benchmarks/s3_train.py``). ``$KDSTORE_STORE_PREFETCH`` sets how many pieces ahead
(default 2; 0 reads in the caller's thread); memory: that many pieces' targets.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import TypeVar

T = TypeVar("T")

STORE_PREFETCH_ENV = "KDSTORE_STORE_PREFETCH"


def store_prefetch() -> int:
    """Pieces of shards whose store rows are read ahead (``$KDSTORE_STORE_PREFETCH``, default 2; 0: none)."""
    return max(0, int(os.environ.get(STORE_PREFETCH_ENV, "2")))


def read_ahead(items: Sequence[tuple], read: Callable[..., T], depth: int) -> Iterator[Callable[[], T]]:
    """For each item in order, a getter of ``read(*item)``, read up to ``depth`` items ahead in one background thread.

    A getter waits for its read when called (so the caller can start on the item's other work, such
    as decoding its inputs, before it needs the read). Bounded: when the getter of item ``i`` is
    handed out, the reads of items up to ``i + depth`` are queued, no further. An error is raised
    by its item's getter. Closing the iterator early cancels what was not started (a read in
    progress finishes in the background and is dropped). ``depth`` 0: the getter reads.
    """
    if depth <= 0:
        for item in items:
            yield functools.partial(read, *item)
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdstore-read-ahead")
    it = iter(items)
    futures = deque(pool.submit(read, *item) for item in islice(it, depth + 1))
    try:
        while futures:
            future = futures.popleft()
            yield future.result
            nxt = next(it, None)
            if nxt is not None:
                futures.append(pool.submit(read, *nxt))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
