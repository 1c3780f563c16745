"""Mined negatives for a contrastive term: ``kdstore mine``'s parquet, looked up per batch row.

The teacher's vectors stay in the store: :class:`StoreRows` reads the rows a batch asks for
(its positives and negatives) through the store's chunk reader, keeping the most recently
used ``cache_rows`` of them, so memory is the ``[N]`` / ``[N, n]`` row maps plus the cache,
never ``[N, d]``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

CACHE_ROWS = 65536  # 384-d float32: 96 MiB


class StoreRows:
    """A stored ``[N, d]`` field indexed like a tensor: ``rows[idx]`` → float32 ``[*idx.shape, d]``.

    ``idx`` is an int64 tensor of store rows (any shape); the result is on :attr:`device`.
    Rows come from ``StoreField`` (Zarr chunk reads) through an LRU cache of ``cache_rows``
    rows (at least the rows of one call). Values equal ``field.read()[idx].astype(float32)``.
    """

    def __init__(self, field, *, cache_rows: int = CACHE_ROWS, device: torch.device | str = "cpu") -> None:
        self.field = field
        self.shape = (int(field.shape[0]), int(field.shape[1]))
        self.cache_rows = int(cache_rows)
        self.device = torch.device(device)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.reads = 0  # rows read from the store (cache misses)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Tensor) -> Tensor:
        flat = torch.as_tensor(idx).reshape(-1).to("cpu", torch.int64).numpy()
        uniq, inverse = np.unique(flat, return_inverse=True)
        missing = np.asarray([r for r in uniq.tolist() if r not in self._cache], dtype=np.int64)
        if missing.size:
            block = np.asarray(self.field[missing], dtype=np.float32)
            self.reads += len(missing)
            for r, v in zip(missing.tolist(), block):
                self._cache[r] = v
        out = np.empty((len(uniq), self.shape[1]), dtype=np.float32)
        for i, r in enumerate(uniq.tolist()):
            out[i] = self._cache[r]
            self._cache.move_to_end(r)
        while len(self._cache) > max(self.cache_rows, len(uniq)):
            self._cache.popitem(last=False)
        result = torch.from_numpy(out[inverse]).reshape(*tuple(torch.as_tensor(idx).shape), self.shape[1])
        return result.to(self.device)

    def to(self, device: torch.device | str) -> "StoreRows":
        moved = StoreRows(self.field, cache_rows=self.cache_rows, device=device)
        moved._cache, moved.reads = self._cache, self.reads
        return moved


@dataclass(frozen=True)
class MinedNegatives:
    """What a contrastive term looks up per batch row: ``positive [N]`` and ``negatives [N, n]``
    store rows (-1 = none) and the teacher's stored vectors ``table`` (``table[rows]`` →
    float32 ``[*rows.shape, d]``; a :class:`StoreRows` reading from the store)."""

    positive: Tensor
    negatives: Tensor
    table: StoreRows

    @classmethod
    def load(cls, store, teacher: str, field: str, name: str, *, cache_rows: int = CACHE_ROWS) -> "MinedNegatives":
        from kdstore.store.retrieval import StoreField, load_negatives

        tbl, _ = load_negatives(store, name)
        rows = tbl.column("row").to_numpy()
        neg = tbl.column("negative_rows").combine_chunks()
        offsets = neg.offsets.to_numpy().astype(np.int64)
        offsets = offsets - offsets[0]
        values = neg.flatten().to_numpy()
        counts = np.diff(offsets)
        width = int(counts.max(initial=0))
        positive = np.full(store.num_rows, -1, dtype=np.int64)
        negatives = np.full((store.num_rows, max(1, width)), -1, dtype=np.int64)
        positive[rows] = tbl.column("positive_row").to_numpy()
        if values.size:
            row_of = np.repeat(rows, counts)
            col = np.arange(values.size) - np.repeat(offsets[:-1], counts)
            negatives[row_of, col] = values
        table = StoreRows(StoreField(store.teacher(teacher), field), cache_rows=cache_rows)
        return cls(torch.from_numpy(positive), torch.from_numpy(negatives), table)

    def to(self, device: torch.device) -> "MinedNegatives":
        return MinedNegatives(self.positive.to(device), self.negatives.to(device), self.table.to(device))
