"""Teachers used by the tests; importable by Ray workers through PYTHONPATH (see conftest)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from kdstore.pipeline.zoo import fashion_cnn


class _Wrap(nn.Module):
    def __init__(self, inner: nn.Module, mode: str, delay_s: float = 0.0, marker: str | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.mode = mode
        self.delay_s = delay_s
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.marker:
            with open(self.marker, "a") as fh:
                fh.write(f"{os.getpid()} {x.shape[0]}\n")
        if self.mode == "nan":
            out = out.clone()
            out[0, 0] = float("nan")
        elif self.mode == "shape":
            out = out[:, :, None]
        elif self.mode == "short":
            out = out[:-1]
        return out


def nan_teacher() -> nn.Module:
    """Fashion CNN whose first row of every batch is NaN."""
    return _Wrap(fashion_cnn(seed=0), "nan")


def bad_shape_teacher() -> nn.Module:
    return _Wrap(fashion_cnn(seed=0), "shape")


def slow_teacher(delay_s: float = 0.2, marker: str | None = None) -> nn.Module:
    """Fashion CNN (seed 0) that sleeps per batch and logs each forward to ``marker``."""
    return _Wrap(fashion_cnn(seed=0), "ok", delay_s=delay_s, marker=marker)


def not_a_teacher():
    return object()


class RowTokenTeacher:
    """A Teacher (protocol, not a module) with a ragged per-token output: the first
    ``3 + (key number % 5)`` pixel rows of each image are its "tokens" ``[len_i, 28]``."""

    name = "rows"
    fingerprint = "test:row-tokens:v1"
    input_key = "png"

    def preprocess(self, sample: dict):
        from kdstore.pipeline.decode import decode_image

        image = decode_image(sample["png"])[0]
        return image[: 3 + int(sample["__key__"].split("_")[-1]) % 5]

    def forward(self, inputs: list):
        return {
            "embedding": torch.stack([t.mean(0) for t in inputs]),
            "tokens/rows": [t * 2.0 for t in inputs],
        }


def row_tokens() -> RowTokenTeacher:
    return RowTokenTeacher()


def rgb_cnn() -> nn.Module:
    """A tiny CNN that expects 3-channel images (given 1-channel Fashion-MNIST it fails)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


class _AttemptLog(nn.Module):
    """Logs ``pid sha1(batch)`` to ``marker`` as each forward *starts*, then sleeps ``delay_s``."""

    def __init__(self, inner: nn.Module, delay_s: float, marker: str) -> None:
        super().__init__()
        self.inner, self.delay_s, self.marker = inner, delay_s, marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import hashlib

        digest = hashlib.sha1(x.detach().cpu().numpy().tobytes()).hexdigest()[:16]
        with open(self.marker, "a") as fh:
            fh.write(f"{os.getpid()} {digest}\n")
        time.sleep(self.delay_s)
        return self.inner(x)


def attempt_logging_teacher(delay_s: float = 0.0, marker: str = "/dev/null") -> nn.Module:
    """Fashion CNN (seed 0); with one batch per shard each log line is one shard attempt started."""
    return _AttemptLog(fashion_cnn(seed=0), delay_s, marker)
