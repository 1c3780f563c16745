"""The one splitmix64 of kdstore: cheap, stable uint64 hashes of integer arrays (numpy, broadcast)."""

from __future__ import annotations

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
C1 = np.uint64(0xBF58476D1CE4E5B9)
C2 = np.uint64(0x94D049BB133111EB)


def as_u64(x: np.ndarray | int) -> np.ndarray:
    """Integers (negative ones wrap) as uint64."""
    return np.asarray(x, dtype=np.int64).astype(np.uint64)


def splitmix64_mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 ``z`` (any shape): the bit mixer alone."""
    with np.errstate(over="ignore"):
        z = np.asarray(z, dtype=np.uint64)
        z = (z ^ (z >> np.uint64(30))) * C1
        z = (z ^ (z >> np.uint64(27))) * C2
        return z ^ (z >> np.uint64(31))


def splitmix64(x: np.ndarray | int) -> np.ndarray:
    """One splitmix64 step from state ``x``: ``mix(x + golden)``, uint64 of ``x``'s shape."""
    with np.errstate(over="ignore"):
        x = x if isinstance(x, np.ndarray) and x.dtype == np.uint64 else as_u64(x)
        return splitmix64_mix(x + GOLDEN)


def mix64(*parts: np.ndarray | int) -> np.ndarray:
    """Chain splitmix64 over ``parts`` (broadcast): ``h = splitmix64(h ^ part)`` from ``h = golden``."""
    h = GOLDEN
    for p in parts:
        h = splitmix64(np.asarray(h, dtype=np.uint64) ^ as_u64(p))
    return h
