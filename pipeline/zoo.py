"""Small built-in teachers for the embedded default job (Fashion-MNIST), loadable with
``--teacher kdstore.pipeline.zoo:fashion_cnn --teacher-arg weights=PATH``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdstore.pipeline.datasets import load_fashion_mnist
from kdstore.store.errors import InputError


class FashionCNN(nn.Module):
    """``[b, 1, 28, 28]`` → logits ``[b, 10]``; ``embed`` is the 128-d penultimate layer."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 49, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(self.features(x)))


def fashion_cnn(weights: str | None = None, width: int = 32, seed: int = 0) -> FashionCNN:
    """Factory for ``--teacher``: a :class:`FashionCNN`, with trained weights when given
    (else initialised from ``seed``, so every worker builds the same teacher)."""
    torch.manual_seed(int(seed))
    model = FashionCNN(width=int(width))
    if weights is not None:
        path = Path(weights)
        if not path.exists():
            raise InputError(f"teacher weights {path} not found; train them with `kdstore teacher fashion-mnist {path}`")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def train_fashion_cnn(
    out: Path, *, seconds: float = 60.0, max_epochs: int = 5, seed: int = 0, batch_size: int = 128,
    width: int = 32, progress: bool = True,
) -> dict:
    """Train :class:`FashionCNN` on the train split for about ``seconds`` and save it to ``out``.

    Returns (and writes beside ``out`` as ``.json``) the test accuracy and the time spent.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    x = torch.from_numpy(images).float().div_(255).unsqueeze(1)
    y = torch.from_numpy(labels)
    model = FashionCNN(width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    steps = 0
    epochs = 0
    with tqdm(total=round(seconds), unit="s", desc="train teacher", disable=not progress) as bar:
        while epochs < max_epochs and time.perf_counter() - start < seconds:
            model.train()
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                elapsed = time.perf_counter() - start
                bar.n = min(round(elapsed), bar.total)
                bar.set_postfix(epoch=epochs, loss=f"{loss.item():.3f}", refresh=False)
                bar.refresh()
                if elapsed >= seconds:
                    break
            epochs += 1
    acc = evaluate(model.eval(), test_images, test_labels)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(out)
    info = {"test_accuracy": acc, "seconds": time.perf_counter() - start, "steps": steps, "seed": seed}
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return info


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` on uint8 images ``[n, 28, 28]``."""
    with torch.inference_mode():
        tx = torch.from_numpy(images).float().div_(255).unsqueeze(1)
        pred = torch.cat([model(b).argmax(1) for b in tx.split(1000)])
    return float((pred.numpy() == labels).mean())
