"""Teachers for ``benchmarks/precompute.py``: the zoo CNN or a linear layer, each wrapped so
every forward appends ``<unix time> <batch rows>`` to a log file (the benchmark reads the
time of the first and last batch from it, in kdstore's Ray actors and in the DataLoader
loop alike). Loaded as ``--teacher bench_teachers:cnn`` with ``benchmarks/`` on PYTHONPATH.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn


class Logged(nn.Module):
    """``inner`` plus a timestamp line per forward: x ``[b, 1, 28, 28]`` → logits ``[b, 10]``."""

    def __init__(self, inner: nn.Module, log: str | None) -> None:
        super().__init__()
        self.inner = inner
        self.log = log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.log:
            with open(self.log, "a") as f:  # one short line per batch; O_APPEND keeps processes' lines whole
                f.write(f"{time.time():.6f} {len(x)} {os.getpid()}\n")
        return out


def cnn(weights: str | None = None, log: str | None = None) -> nn.Module:
    from kdstore.pipeline.zoo import fashion_cnn

    return Logged(fashion_cnn(weights=weights), log).eval()


def linear(log: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    return Logged(nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)), log).eval()
