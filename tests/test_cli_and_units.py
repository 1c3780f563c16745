"""CLI behaviour (help, version, one-line errors) and the small pipeline/store units."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdstore.cli.main import main
from kdstore.pipeline.augment import AugmentSpec, apply_view, view_params
from kdstore.store.schema import OutputSpec
from kdstore.pipeline.shards import expand_urls, list_shard
from kdstore.store.errors import InputError, StoreLockedError
from kdstore.store.lock import StoreLock, check_fence


def test_every_command_has_help():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "precompute" in result.output
    for name in main.commands:
        sub = runner.invoke(main, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)
        assert len(sub.output.splitlines()) > 3


def test_version_matches_distribution():
    from importlib.metadata import version

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and version("kdstore") in result.output


def test_user_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kdstore.cli.main", "precompute", "--store", str(tmp_path / "s"), "-i", "x.tar",
         "--teacher", "kdstore.pipeline.zoo:fashion_cnn", "--output", "topk:zero"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --output 'topk:zero' not understood")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_info_on_a_folder_that_is_not_a_store(tmp_path):
    result = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert result.exit_code == 2 and "is not a kdstore store" in result.output


def test_shards_explains_missing_dataset(tmp_path, monkeypatch):
    import kdstore.pipeline.datasets as datasets

    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "none")
    result = CliRunner().invoke(main, ["shards", "fashion-mnist", str(tmp_path / "out")])
    assert result.exit_code == 2 and "apt-get install dataset-fashion-mnist" in result.output


def test_expand_urls_braces_globs_and_fsspec(fmnist_shards):
    folder = fmnist_shards[0].parent
    assert expand_urls(f"{folder}/train-{{000000..000003}}.tar") == [str(p) for p in fmnist_shards]
    assert expand_urls(f"{folder}/train-*.tar") == [str(p) for p in fmnist_shards]
    urls = expand_urls(f"file://{folder}/train-00000[12].tar")
    assert [u.rsplit("/", 1)[1] for u in urls] == ["train-000001.tar", "train-000002.tar"]
    assert list_shard(urls[0]).keys == list_shard(str(fmnist_shards[1])).keys
    with pytest.raises(InputError, match="no shard matches"):
        expand_urls(f"{folder}/nothing-*.tar")
    with pytest.raises(InputError, match="listed twice"):
        expand_urls([str(fmnist_shards[0]), str(fmnist_shards[0])])


def test_listing_reads_keys_and_labels(fmnist_shards):
    from kdstore.pipeline.datasets import load_fashion_mnist

    listing = list_shard(str(fmnist_shards[1]))
    _, labels = load_fashion_mnist("train")
    assert listing.keys[0] == "train_00050" and len(listing.keys) == 50
    assert listing.labels == labels[50:100].tolist()


def test_output_spec_round_trip():
    for text in ("logits", "topk:5", "features:embed:mean", "embedding", "embedding:embed:l2", "scores"):
        spec = OutputSpec.parse(text)
        assert OutputSpec.parse(spec.to_text()) == spec
    assert OutputSpec.parse("embedding:l2") == OutputSpec(kind="embedding", l2=True)
    for bad in ("topk", "topk:0", "features", "features:x:max", "nope"):
        with pytest.raises(InputError):
            OutputSpec.parse(bad)


def test_view_params_are_deterministic_and_in_bounds():
    spec = AugmentSpec.parse("rrc:scale=0.2-1;hflip:p=0.5")
    a = view_params(spec, seed=3, key="k1", view=0, height=28, width=20)
    assert np.array_equal(a, view_params(spec, seed=3, key="k1", view=0, height=28, width=20))
    draws = np.stack([view_params(spec, seed=3, key=f"k{i}", view=v, height=28, width=20) for i in range(50) for v in range(2)])
    top, left, h, w, flip = draws.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 20).all()
    assert 0.2 * 0.99 <= (h * w / 560).min() and set(flip) == {0, 1}
    image = torch.rand(1, 28, 20)
    assert torch.equal(apply_view(image, [0, 0, 28, 20, 1]), image.flip(-1))
    assert torch.equal(apply_view(image, [0, 0, 28, 20, 0]), image)
    crop = apply_view(image, [4, 2, 14, 10, 0])
    assert crop.shape == image.shape
    assert AugmentSpec.parse(spec.to_text()) == spec


def test_lock_and_fence(tmp_path):
    with StoreLock(tmp_path) as lock:
        check_fence(tmp_path, lock.token)
        with pytest.raises(StoreLockedError):
            with StoreLock(tmp_path):
                pass
    with StoreLock(tmp_path):
        with pytest.raises(StoreLockedError, match="held by another job"):
            check_fence(tmp_path, lock.token)


def test_shards_command_writes_a_real_text_corpus(tmp_path):
    result = CliRunner().invoke(main, ["shards", "bbc", str(tmp_path), "--shard-size", "1000"])
    assert result.exit_code == 0, result.output
    keys = [k for p in sorted(tmp_path.glob("*.tar")) for k in list_shard(str(p)).keys]
    assert len(keys) == 2225 and len(set(keys)) == 2225  # every BBC article once, train + test
    from kdstore.pipeline.shards import iter_samples

    sample = next(iter_samples(str(tmp_path / "train-000000.tar")))
    assert len(sample["txt"].decode()) > 100 and 0 <= int(sample["cls"]) < 5
    bad = CliRunner().invoke(main, ["shards", "nope", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown dataset 'nope'" in bad.output
