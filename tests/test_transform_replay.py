"""The store's recorded ``--transform`` reaches every place a teacher runs after precompute:
``kdstore query --image`` (``pipeline/embed.py``) and online KD (``train/online.py``).

A folder of Fashion-MNIST PNGs at 28/32/40 px, L and RGB → ``kdstore shards folder`` →
``kdstore precompute --transform 'resize:28;mode:L'`` with the Fashion CNN (seeded weights,
width 8: only the preprocessing is under test). Re-running the teacher on a raw stored image
must give back the stored output.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from kdstore.cli.main import main
from kdstore.store import open_store

TRANSFORM = "resize:28;mode:L"
FACTORY = "kdstore.pipeline.zoo:fashion_cnn"


def _cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def sized_store(tmp_path_factory, ray_session):
    from kdstore.pipeline.datasets import load_fashion_mnist

    tmp = tmp_path_factory.mktemp("sized")
    images, labels = load_fashion_mnist("test")
    folder = tmp / "png"
    folder.mkdir()
    files = []
    with open(folder / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label"])
        for i in range(24):
            img = Image.fromarray(images[i], mode="L").resize(((28, 32, 40)[i % 3],) * 2, Image.BILINEAR)
            if (i // 3) % 2:
                img = img.convert("RGB")
            img.save(folder / f"{i:03d}.png")
            writer.writerow([f"{i:03d}.png", int(labels[i])])
            files.append(folder / f"{i:03d}.png")
    _cli("shards", "folder", folder, tmp / "shards", "--labels", folder / "labels.csv", "--shard-size", 12,
         "--no-progress")
    store = tmp / "store"
    _cli("precompute", "--store", store, "-i", str(tmp / "shards" / "*.tar"), "--teacher", FACTORY,
         "--teacher-name", "cnn", "--teacher-arg", "width=8", "--layer", "embed", "-o", "logits", "-o",
         "embedding:embed", "--dtype", "float32", "--transform", TRANSFORM, "--workers", 1, "--no-progress")
    _cli("index", store, "--teacher", "cnn", "--kind", "flat")
    return {"store": store, "files": files, "tmp": tmp}


def test_query_image_applies_the_recorded_transform(sized_store):
    from kdstore.pipeline.embed import embed_samples, query_sample

    store = open_store(sized_store["store"])
    assert store.teacher("cnn").spec.transform == "mode:L;resize:28"
    stored = store.teacher("cnn").read("embedding")
    keys = list(store.keys)
    for i in (1, 5, 2):  # 32 px L, 40 px RGB, 40 px L: none is what the CNN reads without the transform
        path = sized_store["files"][i]
        got = embed_samples(store, "cnn", "embedding", [query_sample(store, "cnn", image=path)],
                            teacher_factory=FACTORY)
        row = keys.index(path.stem)
        np.testing.assert_allclose(got[0], stored[row], rtol=1e-4, atol=1e-5)
    out = _cli("query", sized_store["store"], "--teacher", "cnn", "--image", sized_store["files"][5],
               "--teacher-factory", FACTORY, "-k", 1, "--json")
    hits = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert hits[0]["key"] == sized_store["files"][5].stem and hits[0]["score"] > 0.9999


def test_online_kd_feeds_the_teacher_its_recorded_transform(sized_store):
    """The student reads 20x20 RGB (``data.transform``); the live teacher must still see
    ``resize:28;mode:L`` images and so reproduce the stored logits (no augmentation here)."""
    from kdstore.train.config import parse_config
    from kdstore.train.recipe import Recipe, _to_device

    doc = {
        "data": {"store": str(sized_store["store"]), "train_shards": ["0..1"], "labels": "all", "batch_size": 8,
                 "transform": "resize:20x20;mode:RGB"},
        "model": {"arch": "mlp", "hidden": 8},
        "train": {"out_dir": str(sized_store["tmp"] / "online"), "epochs": 1, "threads": 1, "progress": False,
                  "checkpoint_every_steps": 0},
        "loss": [{"kind": "ce"}, {"kind": "kd", "teacher": "cnn"}],
        "online": {"enabled": True, "teacher": "cnn", "factory": FACTORY, "teacher_args": {"width": 8}},
    }
    recipe = Recipe(parse_config(doc))
    try:
        recipe.setup()
        assert recipe.input_shape == (3, 20, 20)
        store = open_store(sized_store["store"])
        stored = store.teacher("cnn").read("logits")
        seen = 0
        for batch in recipe.loader:
            assert tuple(batch["input"].shape[1:]) == (3, 20, 20)
            targets = recipe.targets_fn(_to_device(batch, recipe.device))["cnn"]
            real = ~batch["pad"]
            rows = batch["row"][real].numpy()
            np.testing.assert_allclose(targets["logits"][real].numpy(), stored[rows], rtol=1e-4, atol=1e-4)
            seen += int(real.sum())
        assert seen == 24
        result = recipe.train()
        assert result.steps == 3 and np.isfinite(result.history[-1]["loss"] if result.history else 0.0)
    finally:
        recipe.cleanup()
    assert torch.load(Path(doc["train"]["out_dir"]) / "student.pt", weights_only=True)
