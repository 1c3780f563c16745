"""Exact nearest-neighbour search for mining: a blocked matrix product plus a partial top-k (torch).

No FAISS and no ``N × N`` matrix: the prepared rows are held once (float32 ``[n, d]``), and
queries are scored ``block`` at a time against all of them; each block's ``[block, n]`` score
matrix is reduced to its top ``k`` (``torch.topk``) before the next one is computed. The block
is sized from a memory budget, ``block = max(1, score_bytes // (4·n))`` rows, so the transient
score matrix never exceeds ``score_bytes`` (default :data:`SCORE_BLOCK_BYTES`, 16 MiB; at
least one row). Peak memory beyond the caller's vectors: the prepared copy (``4·n·d`` bytes)
plus one score block plus the ``[b, k]`` results; the copy is filled from the source
(an array or a store field) :data:`FILL_BLOCK_ROWS` rows at a time.

Threads: torch's intra-op pool (``torch.set_num_threads``).

:class:`ExactIndex` has the search contract of :class:`kdstore.store.index.VectorIndex`, so
the miner uses either; it is never saved (there is nothing to save beyond the vectors).
Mining chooses it by default for small stores (see :data:`EXACT_MAX_ROWS`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from kdstore.store.errors import InputError
from kdstore.store.index import IndexSpec, prepare_vectors

SCORE_BLOCK_BYTES = 16 * 2**20  # 5,000 × 384 rows: as fast as 64 MiB, 4 MiB is 1.8× slower
# Mining defaults to the exact path up to this many indexed rows, HNSW above: exact costs
# O(n²·d) (27.8k MiniLM rows: a few seconds on 2 cores), HNSW O(n log n) plus its build.
EXACT_MAX_ROWS = 50_000
# Rows read from the source per step while filling the prepared copy (384-d: 3 MiB a block).
FILL_BLOCK_ROWS = 2048


class ExactIndex:
    """Exact scores of queries against ``n`` prepared rows, blocked under a memory budget.

    ``row_ids[i]`` is the store row of the i-th vector; :meth:`search` returns rows.
    """

    def __init__(
        self,
        vectors: Any,
        *,
        metric: str = "cosine",
        row_ids: np.ndarray | None = None,
        score_bytes: int = SCORE_BLOCK_BYTES,
        add_batch_rows: int = 65536,
        meta: dict[str, Any] | None = None,
    ) -> None:
        import torch

        start = time.perf_counter()
        self.spec = IndexSpec(kind="exact", metric=metric)
        shape = tuple(vectors.shape)
        if len(shape) != 2 or shape[0] < 1:
            raise InputError(f"an exact index needs a non-empty 2-d array [rows, dim], got shape {shape}")
        n, self.dim = int(shape[0]), int(shape[1])
        if score_bytes < 1:
            raise InputError(f"score_bytes must be >= 1, got {score_bytes}")
        self.row_ids = np.arange(n, dtype=np.int64) if row_ids is None else np.asarray(row_ids, dtype=np.int64)
        if self.row_ids.shape != (n,):
            raise InputError(f"row_ids must have shape ({n},), got {self.row_ids.shape}")
        x = np.empty((n, self.dim), dtype=np.float32)
        step = max(1, min(add_batch_rows, FILL_BLOCK_ROWS))  # read, convert, normalise one block at a time
        for a in range(0, n, step):
            x[a : a + step] = prepare_vectors(vectors[a : a + step], metric)
        self._x = torch.from_numpy(x)
        self._sq = (self._x * self._x).sum(1) if metric == "l2" else None
        self.block_rows = max(1, score_bytes // (4 * n))
        self.on_gpu = False
        self.meta = dict(meta or {})
        self.build_seconds = time.perf_counter() - start

    @property
    def ntotal(self) -> int:
        return int(self._x.shape[0])

    @property
    def metric(self) -> str:
        return self.spec.metric

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact nearest rows of each query.

        Args:
            queries: ``[b, dim]`` float (normalised here for cosine).
            k: neighbours per query.

        Returns:
            scores: float32 ``[b, k]``, descending (larger = closer; ``-inf`` past ``n``).
            rows: int64 ``[b, k]``, store rows (``-1`` past ``n``).
        """
        import torch

        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        q = torch.from_numpy(prepare_vectors(queries, self.metric))
        if q.shape[1] != self.dim:
            raise InputError(f"queries have dimension {q.shape[1]}, the index has {self.dim}")
        b, kk = q.shape[0], min(k, self.ntotal)
        scores = np.full((b, k), -np.inf, dtype=np.float32)
        positions = np.full((b, k), -1, dtype=np.int64)
        with torch.inference_mode():
            for a in range(0, b, self.block_rows):
                block = q[a : a + self.block_rows]
                s = block @ self._x.T  # [block, n]
                if self._sq is not None:  # minus squared L2 distance
                    s.mul_(2.0).sub_(self._sq[None, :]).sub_((block * block).sum(1, keepdim=True)).clamp_(max=0.0)
                top = torch.topk(s, kk, dim=1, largest=True, sorted=True)
                del s
                scores[a : a + len(block), :kk] = top.values.numpy()
                positions[a : a + len(block), :kk] = top.indices.numpy()
        rows = np.where(positions >= 0, self.row_ids[np.maximum(positions, 0)], -1)
        return scores, rows
