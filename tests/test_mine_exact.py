"""The exact (FAISS-free) search: blocked under its memory budget, same answers as FAISS flat."""

from __future__ import annotations

import numpy as np
import pytest

from kdstore.store.errors import InputError
from kdstore.store.index import IndexSpec, build_index
from kdstore.store.mine_exact import ExactIndex


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
@pytest.mark.parametrize("score_bytes", [1, 4 * 300 * 7, 16 * 2**20])
def test_blocked_search_equals_faiss_flat(x, metric, score_bytes):
    rows = np.arange(1000, 1300)
    exact = ExactIndex(x, metric=metric, row_ids=rows, score_bytes=score_bytes)
    assert exact.block_rows == max(1, score_bytes // (4 * 300))  # the score block stays within the budget
    flat = build_index(x, IndexSpec(kind="flat", metric=metric), row_ids=rows)
    q = x[:50] * 3.0
    s_e, r_e = exact.search(q, 12)
    s_f, r_f = flat.search(q, 12)
    np.testing.assert_array_equal(r_e, r_f)
    np.testing.assert_allclose(s_e, s_f, rtol=1e-5, atol=1e-4)


def test_k_past_the_rows_pads_like_faiss(x):
    exact = ExactIndex(x[:5])
    scores, rows = exact.search(x[:2], 8)
    assert (rows[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all() and (rows[:, :5] >= 0).all()


def test_exact_spec_builds_in_memory_and_is_checked(x):
    index = build_index(x, IndexSpec(kind="exact", metric="l2"))
    assert isinstance(index, ExactIndex) and index.metric == "l2" and index.ntotal == 300
    with pytest.raises(InputError, match="dimension"):
        index.search(np.zeros((1, 3), np.float32), 2)
    with pytest.raises(InputError, match="NaN"):
        index.search(np.full((1, 16), np.nan, np.float32), 2)
