"""Pure planning of one epoch of the streaming join (see :mod:`kdstore.train.dataset`):
shard order, contiguous slots, simulated shuffle buffer, per-row hash. Depends on the seed only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kdstore.store.schema import ShardInfo


@dataclass(frozen=True)
class Segment:
    """Rows ``rows`` (local indices, ascending) of one store shard, read in one pass."""

    shard: ShardInfo
    url: str
    rows: np.ndarray


@dataclass(frozen=True)
class SlotPlan:
    """What one (rank, worker) slot yields in one epoch: ``order`` indexes the concatenated
    segment rows; ``pads`` blank items follow them."""

    segments: tuple[Segment, ...]
    order: np.ndarray
    pads: int

    @property
    def num_items(self) -> int:
        return len(self.order) + self.pads


def shard_order(num_shards: int, seed: int, epoch: int | None) -> np.ndarray:
    """``[num_shards]`` int64: the seeded shard permutation of ``epoch`` (natural order when None)."""
    if epoch is None:
        return np.arange(num_shards)
    return np.random.default_rng([int(seed), int(epoch), 0x5A4D]).permutation(num_shards)


def split_contiguous(lengths: Sequence[int], slots: int) -> list[list[tuple[int, int, int]]]:
    """Cut the concatenation of ``lengths`` into ``slots`` contiguous parts of near-equal size.

    Returns per slot a list of ``(segment_index, start, stop)`` pieces.
    """
    total = int(sum(lengths))
    bounds = [total * s // slots for s in range(slots + 1)]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    parts: list[list[tuple[int, int, int]]] = []
    for s in range(slots):
        lo, hi = bounds[s], bounds[s + 1]
        pieces = []
        for i, length in enumerate(lengths):
            a, b = max(lo, starts[i]), min(hi, starts[i] + length)
            if a < b:
                pieces.append((i, int(a - starts[i]), int(b - starts[i])))
        parts.append(pieces)
    return parts


def shuffle_order(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """``[n]`` int64: the order a shuffle buffer of ``buffer_size`` yields items ``0..n-1`` in.

    Item ``t`` of the output was read at most ``buffer_size`` items earlier, so a reader
    holds at most ``buffer_size + 1`` items at once.
    """
    out = np.empty(n, dtype=np.int64)
    if buffer_size <= 1 or n <= 1:
        out[:] = np.arange(n)
        return out
    buf = list(range(min(buffer_size, n)))
    picks = rng.integers(0, len(buf), size=max(0, n - len(buf)))
    for t, item in enumerate(range(len(buf), n)):
        j = picks[t]
        out[t] = buf[j]
        buf[j] = item
    tail = n - len(buf)
    out[tail:] = np.asarray(buf, dtype=np.int64)[rng.permutation(len(buf))]
    return out
