"""Student factories for the tests, outside the package: ``students:NAME`` (tests/support is on
PYTHONPATH, see conftest) or ``tests/support/students.py:NAME`` (the file form)."""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """``x [b, 1, 28, 28]`` → logits ``[b, k]`` (a plain tensor); layers ``body.0`` … ``body.5``, ``head``."""

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),  # [w, 7, 7]
            nn.Flatten(), nn.Linear(width * 49, 24), nn.ReLU(),  # body.4: [24]
        )
        self.head = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def conv_logits(num_classes: int, width: int = 8) -> nn.Module:
    """A tensor-returning student; ``num_classes`` is filled in by the trainer."""
    return ConvNet(num_classes, width)


class DictMLP(nn.Module):
    """``x`` → ``{"logits": [b, k], "feat": [b, hidden], "extra": [b, 2]}``."""

    def __init__(self, input_shape, num_classes: int, hidden: int = 12) -> None:
        super().__init__()
        size = 1
        for d in input_shape:
            size *= int(d)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(size, hidden), nn.Tanh())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> dict:
        z = self.encoder(x)
        return {"logits": self.classifier(z), "feat": z, "extra": z[:, :2]}


def dict_mlp(input_shape, num_classes: int, hidden: int = 12) -> nn.Module:
    return DictMLP(input_shape, num_classes, hidden)


def embedding_only(input_shape) -> nn.Module:
    """No logits at all: ``{"embedding": [b, 8]}``."""
    size = 1
    for d in input_shape:
        size *= int(d)

    class Enc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(size, 8)

        def forward(self, x):
            return {"embedding": self.fc(x.flatten(1))}

    return Enc()


def not_a_module(num_classes: int):
    return [num_classes]
