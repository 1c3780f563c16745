"""Images of any size and mode through the CLI: a folder of Fashion-MNIST PNGs at 28, 32 and
40 px, L and RGB → ``kdstore shards folder`` → ``kdstore precompute --transform
'resize:28;mode:L'`` (the Fashion CNN teacher) → ``kdstore train`` replaying the recorded
transform, for the factory student ``configs/students.py:mlp_student`` (a file outside the
package). With a few labels, the stored targets must beat the labels alone (3 seeds, each its
own labelled subset). Sizes here are small; the full-size run is benchmarks/byo_images.py
(docs/TRAINING.md).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdstore.cli.main import main
from kdstore.pipeline.datasets import write_png_folder
from kdstore.pipeline.transform import TRANSFORM_HINT, TransformSpec
from kdstore.store.errors import InputError

TRANSFORM = "resize:28;mode:L"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def invoke(args: list[str]) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def build_store(tmp: Path, *, train: int, test: int, teacher_steps: int, shard_size: int,
                teacher_width: int = 32) -> Path:
    """Folders → shards (prefixes train/test) → a store with the Fashion CNN's logits under ``TRANSFORM``.

    The teacher is ``kdstore teacher fashion-mnist`` (width 32), or, for a fast test, the same
    training through the Python API at a smaller width (``train_fashion_cnn``).
    """
    from kdstore.pipeline.datasets import load_fashion_mnist
    from kdstore.pipeline.zoo import train_fashion_cnn

    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    shards = tmp / "shards"
    for split, x, y, n in (("train", x_train, y_train, train), ("test", x_test, y_test, test)):
        folder = write_png_folder(tmp / f"png_{split}", x[:n], y[:n])
        invoke(["shards", "folder", folder, shards / split, "--labels", folder / "labels.csv", "--prefix", split,
                "--shard-size", shard_size, "--no-progress"])
    weights = tmp / "teacher.pt"
    if weights.exists():
        pass  # reused (a rerun of the full-size run)
    elif teacher_width == 32:
        invoke(["teacher", "fashion-mnist", weights, "--steps", teacher_steps])
    else:
        train_fashion_cnn(weights, steps=teacher_steps, width=teacher_width, progress=False)
    store = tmp / "store"
    invoke(["precompute", "--store", store, "-i", str(shards / "train" / "*.tar"), "-i", str(shards / "test" / "*.tar"), "--teacher", "kdstore.pipeline.zoo:fashion_cnn",
            "--teacher-name", "cnn", "--teacher-arg", f"weights={weights}", "--teacher-arg", f"width={teacher_width}",
            "--transform", TRANSFORM,
            "--workers", 1, "--no-progress"])
    return store


# The configs' student: a factory in a file outside the package (named absolutely: pytest's
# working directory need not be the repository root).
FACTORY = f"model.factory={CONFIGS / 'students.py'}:mlp_student"


def train_arm(config: str, store: Path, out: Path, seed: int, extra: list[str] = ()) -> float:
    sets = ["--store", store, "--set", f"data.labels_seed={seed}", "--set", FACTORY, *extra]
    invoke(["train", CONFIGS / config, *sets, "--seed", seed, "--out", out, "--overwrite", "--no-progress"])
    return json.loads((out / "summary.json").read_text())["eval"]["accuracy"]


@pytest.fixture(scope="module")
def image_store(tmp_path_factory, ray_session):
    return build_store(tmp_path_factory.mktemp("images"), train=2000, test=500, teacher_steps=400, shard_size=500,
                       teacher_width=8)


def test_transform_parse_and_apply():
    spec = TransformSpec.parse("mode:L;center_crop:28;resize:32")
    assert spec.to_text() == "mode:L;resize:32;center_crop:28x28"
    assert TransformSpec.parse(spec.to_text()) == spec
    rgb = torch.rand(3, 40, 60)
    out = spec(rgb)
    assert out.shape == (1, 28, 28)
    assert spec(torch.rand(1, 28, 28)).shape == (1, 28, 28)
    norm = TransformSpec.parse("normalize:mean=0.5,std=0.25")
    assert torch.allclose(norm(torch.full((1, 2, 2), 0.75)), torch.ones(1, 2, 2))
    assert not TransformSpec.parse("")
    for bad in ("resize:0", "mode:CMYK", "blur:3", "normalize:mean=0.5"):
        with pytest.raises(InputError):
            TransformSpec.parse(bad)


def test_mixed_sizes_recorded_transform_replayed_and_beats_labels_only(image_store, tmp_path):
    from kdstore.store.reader import open_store
    from kdstore.train.dataset import StreamingDataset

    store = open_store(image_store)
    assert store.teacher("cnn").spec.transform == "mode:L;resize:28"
    test_rows = np.concatenate([np.arange(s.row_start, s.row_stop) for s in store.select_shards(["test-"])])
    agree = (store.teacher("cnn").read("logits", test_rows).argmax(1) == store.labels[test_rows]).mean()
    assert agree > 0.6  # the stored logits are the teacher's on the transformed images
    doc = json.loads((image_store / "teachers" / "cnn" / "teacher.json").read_text())
    assert doc["transform"] == "mode:L;resize:28"
    # The student sees what the teacher saw: the recorded transform, by default, for every size and mode.
    ds = StreamingDataset(store, shards=["train-"], fields={"cnn": ["logits"]}, shuffle=False, verify="off")
    shapes = {tuple(item["input"].shape) for _, item in zip(range(12), ds)}
    assert shapes == {(1, 28, 28)}
    assert ds.input_shape() == (1, 28, 28)
    # Without a transform the mixed sizes cannot share a batch: one error naming --transform.
    cfg = tomllib.loads((CONFIGS / "images_few_labels_kd.toml").read_text())
    result = CliRunner().invoke(main, ["train", str(CONFIGS / "images_few_labels_kd.toml"), "--store",
                                       str(image_store), "--set", "data.transform=none", "--set", FACTORY, "--no-progress",
                                       "--out", str(tmp_path / "none"), "--set", "train.steps=1"])
    assert result.exit_code != 0 and "--transform" in result.output and TRANSFORM_HINT[:40] in result.output
    assert cfg["data"]["labels"] == "per_class:100"

    small = ["--set", "data.labels=per_class:10", "--set", "train.epochs=15", "--set", "train.eval_every_epochs=0"]
    kd = [train_arm("images_few_labels_kd.toml", image_store, tmp_path / f"kd{s}", s, small) for s in range(3)]
    only = [train_arm("images_few_labels_only.toml", image_store, tmp_path / f"only{s}", s, small) for s in range(3)]
    print(f"kd {kd} only {only}")
    assert np.mean(kd) >= np.mean(only) + 0.04, (kd, only)
    # Both arms trained the factory student, and the run records it so it can be rebuilt.
    from kdstore.train import load_student

    for arm in ("kd0", "only0"):
        record = json.loads((tmp_path / arm / "student.json").read_text())
        assert record["factory_file"] == str(CONFIGS / "students.py") and record["args"] == {"hidden": 32}
    student = load_student(tmp_path / "kd0")
    assert [type(m).__name__ for m in student] == ["Flatten", "Linear", "ReLU", "Linear"]
