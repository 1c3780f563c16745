"""Mined negatives for a contrastive term: ``kdstore mine``'s parquet, looked up per batch row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor



@dataclass(frozen=True)
class MinedNegatives:
    """What a contrastive term looks up per batch row: ``positive [N]`` and ``negatives [N, n]``
    store rows (-1 = none) and the teacher's stored vectors ``table [N, d]`` float32."""

    positive: Tensor
    negatives: Tensor
    table: Tensor

    @classmethod
    def load(cls, store, teacher: str, field: str, name: str) -> "MinedNegatives":
        from kdstore.store.retrieval import load_negatives

        tbl, _ = load_negatives(store, name)
        rows = tbl.column("row").to_numpy()
        lists = tbl.column("negative_rows").to_pylist()
        width = max((len(x) for x in lists), default=0)
        positive = np.full(store.num_rows, -1, dtype=np.int64)
        negatives = np.full((store.num_rows, max(1, width)), -1, dtype=np.int64)
        positive[rows] = tbl.column("positive_row").to_numpy()
        for row, negs in zip(rows, lists):
            negatives[row, : len(negs)] = negs
        table = store.teacher(teacher).read(field).astype(np.float32)
        return cls(torch.from_numpy(positive), torch.from_numpy(negatives), torch.from_numpy(table))

    def to(self, device: torch.device) -> "MinedNegatives":
        return MinedNegatives(self.positive.to(device), self.negatives.to(device), self.table.to(device))
