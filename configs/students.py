"""Example student factories outside the package, for configs/fashion_factory_student.toml
(``small_convnet``) and configs/images_few_labels_*.toml (``mlp_student``).

Any function returning a ``torch.nn.Module`` works as ``[model] factory``. The trainer passes
``num_classes`` (and ``input_shape``) when the function has parameters of those names, and
``[model] args`` as keyword arguments. ``forward`` may return the logits or a dict.
"""

from __future__ import annotations

import math

from torch import Tensor, nn


class SmallConvNet(nn.Module):
    """``[b, 1, 28, 28]`` → logits ``[b, num_classes]``.

    Layer names (for ``student_layer`` / ``model.embedding``): ``stem`` (conv block,
    ``[width, 14, 14]``), ``block`` (``[2·width, 7, 7]``), ``pool`` (``[2·width]``), ``fc``
    (the ``embed_dim`` embedding, before its ReLU), ``head``.
    """

    def __init__(self, num_classes: int, width: int = 16, embed_dim: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2))
        self.block = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                                   nn.MaxPool2d(2))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * width, embed_dim)
        self.act = nn.ReLU()
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.fc(self.pool(self.block(self.stem(x))))))


def small_convnet(num_classes: int, width: int = 16, embed_dim: int = 64) -> nn.Module:
    return SmallConvNet(num_classes, width, embed_dim)


def mlp_student(input_shape, num_classes: int, hidden: int = 32) -> nn.Module:
    """``[b, *input_shape]`` → logits ``[b, num_classes]``: Flatten, Linear(prod(input_shape), hidden),
    ReLU, Linear(hidden, num_classes) (layers ``0``..``3``; the same network as the ``mlp`` preset)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(int(d) for d in input_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
