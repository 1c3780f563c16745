"""Indexes, mining and the contrastive term read vectors from the store in bounded memory.

A real store (Zarr, 6 shards, ``benchmarks/scale.py``'s ``write_vector_store``) of 60,000
random 384-d float32 rows (88 MiB). Reading from the store has a fixed cost of a few Zarr
chunks (4,096 rows, 6 MiB each) decoded at a time, ~35 MiB whatever the row count. Python-side peak memory (tracemalloc: numpy and
Zarr buffers; FAISS' own C++ storage is not counted and is the same on both paths) is
compared with one full float32 copy of the field, and every result with the in-memory path.
"""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from kdstore.store import open_store
from kdstore.store.index import IndexSpec, build_index
from kdstore.store.mine import MineSpec, mine
from kdstore.store.retrieval import StoreField, build_store_index, load_negatives, mine_store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from scale import TEACHER, write_vector_store  # noqa: E402

ROWS, DIM = 60_000, 384
FULL = ROWS * DIM * 4  # bytes of one float32 copy


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale") / "store"

    def rows(a, b):
        x = np.random.default_rng(a).standard_normal((b - a, DIM)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    write_vector_store(root, ROWS, 10_000, rows, lambda a, b: np.arange(a, b) % 20)
    s = open_store(root)
    return s, s.teacher(TEACHER).read("embedding")


def _peak(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak


def test_store_field_gathers_rows_in_any_order(store):
    s, full = store
    field = StoreField(s.teacher(TEACHER), "embedding")
    rows = np.array([59_999, 3, 3, 12_345, 10_000, 9_999, 0])
    np.testing.assert_array_equal(field[rows], full[rows])
    np.testing.assert_array_equal(field[9_990:10_010], full[9_990:10_010])


def test_streamed_index_build_is_bounded_and_equals_the_in_memory_build(store):
    s, full = store
    spec = IndexSpec(kind="ivf", nlist=64, add_batch_rows=2048, train_rows=4096)
    streamed, peak = _peak(lambda: build_store_index(s, TEACHER, "embedding", spec, progress=False)[0])
    _, peak_in_memory = _peak(lambda: build_store_index(s, TEACHER, "embedding", spec, in_memory=True, progress=False))
    reference = build_index(full, spec)
    assert peak < 0.5 * FULL, f"streamed build peaked at {peak / 2**20:.1f} MiB, a full copy is {FULL / 2**20:.1f}"
    assert peak_in_memory >= FULL  # the measure sees a full copy when there is one
    q = full[:200] + 0.01
    for a, b in zip(streamed.search(q, 10), reference.search(q, 10)):
        np.testing.assert_array_equal(a, b)


def test_index_mining_reads_the_store_in_bounded_memory_and_equals_the_in_memory_path(store):
    s, full = store
    spec = MineSpec(num_negatives=3, positive="none", batch_rows=1024)
    index_spec = IndexSpec(kind="ivf", nlist=64, add_batch_rows=2048, train_rows=4096)
    (path, _), peak = _peak(lambda: mine_store(s, TEACHER, "embedding", spec, name="m", index_spec=index_spec,
                                                progress=False))
    assert peak < 0.6 * FULL, f"mining peaked at {peak / 2**20:.1f} MiB (one copy: {FULL / 2**20:.1f})"
    got, _ = load_negatives(s, "m")
    want = mine(build_index(full, index_spec), full, spec, progress=False)
    for column in ("row", "positive_row", "negative_rows", "negative_scores"):
        assert got.column(column).to_pylist() == want.column(column).to_pylist(), column


def test_contrastive_table_reads_rows_from_the_store(store):
    from kdstore.train.mined import MinedNegatives

    s, full = store
    mine_store(s, TEACHER, "embedding", MineSpec(num_negatives=4, positive="label"), name="c",
               index_spec=IndexSpec(kind="ivf", nlist=64), progress=False)
    mined, peak = _peak(lambda: MinedNegatives.load(s, TEACHER, "embedding", "c", cache_rows=1000))
    assert peak < 0.3 * FULL, f"loading mined negatives peaked at {peak / 2**20:.1f} MiB"
    assert mined.table.shape == (ROWS, DIM)
    for rows in (torch.tensor([5, 59_000, 7, 5]), mined.negatives[torch.arange(100, 900)].clamp(min=0)):
        torch.testing.assert_close(mined.table[rows], torch.from_numpy(full[rows.numpy()]), rtol=0, atol=0)
    assert len(mined.table._cache) <= 3200  # the cache is bounded (by cache_rows or one call's rows)
