"""`kdstore mine` index options act or are refused: the saved index is used only when it matches them."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from kdstore.cli.retrieval import index_cmd, mine_cmd
from kdstore.pipeline.job import PrecomputeConfig, run_precompute
from kdstore.pipeline.worker import TeacherLoad
from kdstore.store import open_store
from kdstore.store.index import load_index
from kdstore.store.retrieval import index_path


@pytest.fixture(scope="module")
def store(tmp_path_factory, fmnist_shards, ray_session):
    """200 Fashion-MNIST images, the CNN teacher's 'embed' layer as the embedding field."""
    path = tmp_path_factory.mktemp("mineopts") / "s"
    cfg = PrecomputeConfig(
        store=path, inputs=tuple(str(s) for s in fmnist_shards),
        teacher=TeacherLoad(factory="kdstore.pipeline.zoo:fashion_cnn", name="cnn", layers=("embed",)),
        outputs=("logits", "embedding:embed"), batch_size=50, progress=False, workers=1,
    )
    run_precompute(cfg)
    return path


def _mine(store, *args):
    out = CliRunner().invoke(mine_cmd, [str(store), "--teacher", "cnn", "--num-negatives", "2", "--range-max", "10", *args])
    return out


def _index_record(store):
    return load_index(index_path(open_store(store), "cnn"))


def test_default_is_exact_and_ignores_a_saved_index(store):
    out = CliRunner().invoke(index_cmd, [str(store), "--teacher", "cnn", "--kind", "hnsw"])
    assert out.exit_code == 0, out.output
    out = _mine(store, "--name", "d")
    assert out.exit_code == 0, out.output
    assert "index: exact cosine (the default up to 50,000 rows; this store has 200)" in out.output
    meta = pq.read_metadata(store / "negatives" / "d.parquet").metadata
    assert b"exact cosine" in meta[b"kdstore.mine"]


def test_given_kind_or_params_rebuild_a_mismatched_saved_index(store):
    CliRunner().invoke(index_cmd, [str(store), "--teacher", "cnn", "--kind", "hnsw"])
    # Before the fix, --kind flat without --rebuild-index silently mined with the saved HNSW index.
    out = _mine(store, "--kind", "flat", "--name", "f")
    assert out.exit_code == 0, out.output
    assert "the saved index differs (kind hnsw→flat)" in out.output
    assert _index_record(store).spec.kind == "flat"
    # A matching saved index is used as it is.
    out = _mine(store, "--kind", "flat", "--name", "f2")
    assert out.exit_code == 0 and "saved flat cosine" in out.output, out.output
    # Metric and build parameters count; search-time parameters are set on the loaded index.
    out = _mine(store, "--kind", "flat", "--metric", "l2", "--name", "f3")
    assert "metric cosine→l2" in out.output and _index_record(store).metric == "l2", out.output
    CliRunner().invoke(index_cmd, [str(store), "--teacher", "cnn", "--kind", "ivf", "--nlist", "4"])
    out = _mine(store, "--kind", "ivf", "--nprobe", "2", "--name", "i")
    assert out.exit_code == 0 and "saved ivf" in out.output, out.output
    out = _mine(store, "--kind", "ivf", "--nlist", "2", "--name", "i2")
    assert "nlist 4→2" in out.output and _index_record(store).spec.nlist == 2, out.output
    # Exact and flat mine the same negatives.
    a = pq.read_table(store / "negatives" / "d.parquet").column("negative_rows").to_pylist()
    b = pq.read_table(store / "negatives" / "f2.parquet").column("negative_rows").to_pylist()
    assert np.mean([x == y for x, y in zip(a, b)]) > 0.99


@pytest.mark.parametrize(
    "args, match",
    [
        (["--nlist", "8"], "index kind exact (the default up to 50,000 rows; this store has 200) does not use nlist"),
        (["--kind", "hnsw", "--nprobe", "4"], "index kind hnsw does not use nprobe"),
        (["--kind", "flat", "--ef-search", "16"], "does not use ef_search"),
        (["--kind", "exact", "--pq-nbits", "4"], "does not use pq_nbits"),
        (["--rebuild-index"], "has no saved index to rebuild"),
    ],
)
def test_options_the_kind_does_not_use_are_refused(store, args, match):
    out = _mine(store, *args)
    assert out.exit_code == 2 and out.output.startswith("error: ") and match in out.output, out.output


def test_index_refuses_exact(store):
    out = CliRunner().invoke(index_cmd, [str(store), "--teacher", "cnn", "--kind", "exact"])
    assert out.exit_code == 2, out.output
