"""Small built-in teachers for the embedded default job (Fashion-MNIST), loadable with
``--teacher kdstore.pipeline.zoo:fashion_cnn --teacher-arg weights=PATH``."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdstore.pipeline.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
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
        # logit i is class_names[i]: recorded by precompute and checked against the inputs' classes.json
        self.class_names = FASHION_MNIST_CLASSES if num_classes == len(FASHION_MNIST_CLASSES) else ()

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


TEACHER_STEPS = 1500  # the quickstart teacher: ~3.2 epochs of batch 128


def train_fashion_cnn(
    out: Path, *, steps: int = TEACHER_STEPS, seconds: float | None = None, seed: int = 0, batch_size: int = 128,
    width: int = 32, lr: float = 2e-3, threads: int = 1, progress: bool = True,
    echo: Callable[[str], Any] | None = None,
) -> dict:
    """Train :class:`FashionCNN` on the train split for ``steps`` optimiser steps and save it to ``out``.

    Deterministic: the same ``steps``, ``seed``, ``batch_size``, ``width``, ``lr`` and
    ``threads`` (torch CPU threads, set for the run and restored after) give bit-identical
    weights on the same machine type, whatever its speed (AdamW, cosine schedule over
    ``steps``, seeded init and batch order). ``seconds``, when given, also stops at that
    wall time: machine-dependent, a slower machine then gets a weaker teacher. After the
    first 20 steps ``echo`` (when given) gets an estimate of the total time.

    Returns (and writes beside ``out`` as ``.json``) the test accuracy, steps and time spent.
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise InputError(f"teacher steps must be at least 1, got {steps}")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        torch.manual_seed(seed)
        images, labels = load_fashion_mnist("train")
        test_images, test_labels = load_fashion_mnist("test")
        x = torch.from_numpy(images).float().div_(255).unsqueeze(1)
        y = torch.from_numpy(labels)
        model = FashionCNN(width=width)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))
        gen = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        step = 0
        stopped_by_time = False
        model.train()
        with tqdm(total=steps, unit="step", desc="train teacher", disable=not progress) as bar:
            while step < steps and not stopped_by_time:
                for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    bar.update(1)
                    if step % 10 == 0:
                        bar.set_postfix(epoch=f"{step * batch_size / len(x):.2f}", loss=f"{loss.item():.3f}")
                    if step == 20 and echo is not None and steps > 20:
                        per = (time.perf_counter() - start) / step
                        with tqdm.external_write_mode():  # a line of its own, above the bar
                            echo(f"    {steps} steps, about {per * steps:.0f} s on this machine ({per * 1000:.0f} ms/step)")
                    if seconds is not None and time.perf_counter() - start >= seconds:
                        stopped_by_time = True
                    if step >= steps or stopped_by_time:
                        break
        train_seconds = time.perf_counter() - start
        acc = evaluate(model.eval(), test_images, test_labels)
    finally:
        torch.set_num_threads(old_threads)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(out)
    info = {"test_accuracy": acc, "steps": step, "seconds": train_seconds, "seed": seed, "batch_size": batch_size,
            "width": width, "lr": lr, "threads": int(threads), "stopped_by_time": stopped_by_time}
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return info


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` on uint8 images ``[n, 28, 28]``."""
    with torch.inference_mode():
        tx = torch.from_numpy(images).float().div_(255).unsqueeze(1)
        pred = torch.cat([model(b).argmax(1) for b in tx.split(1000)])
    return float((pred.numpy() == labels).mean())
