"""kdstore's exact mining picks the same negatives as sentence-transformers' own ``mine_hard_negatives``.

The reference runs through sentence-transformers' public API with a SentenceTransformer built
from one module that returns a fixed vector per text (no download, no encoder). Queries and
corpus are disjoint rows here, as in sentence-transformers (kdstore's own queries are corpus
rows, left out by row id: see ``kdstore.store.mine``). 24 queries, 60 corpus rows, 8-d
Gaussian vectors: no two scores tie.
"""

from __future__ import annotations

import datasets  # the dev extra; sentence-transformers comes with the text extra (CI installs both)
import numpy as np
import pytest
import sentence_transformers as st
import torch
from torch import nn

from kdstore.store.index import IndexSpec, build_index
from kdstore.store.mine import MineSpec, mine

NQ, NC, D, LABELS = 24, 60, 8, 4


class FixedVectors(nn.Module):
    """A SentenceTransformer module: text ``"r<row>"`` → ``vectors[row]`` (float32 ``[D]``)."""

    def __init__(self, vectors: np.ndarray) -> None:
        super().__init__()
        self.vectors = torch.from_numpy(vectors)

    def tokenize(self, texts, **_kw):
        return {"ids": torch.tensor([int(t[1:]) for t in texts])}

    def forward(self, features):
        features["sentence_embedding"] = self.vectors[features["ids"]]
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return int(self.vectors.shape[1])


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((NQ + NC, D)).astype(np.float32)
    labels = rng.integers(0, LABELS, NQ + NC).astype(np.int64)
    corpus_rows = np.arange(NQ, NQ + NC)
    pairs = np.full(NQ + NC, -1, dtype=np.int64)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    # Each query's positive: its 3rd-nearest corpus row, so margins drop some candidates, not all.
    pairs[:NQ] = corpus_rows[np.argsort(-(xn[:NQ] @ xn[corpus_rows].T), axis=1)[:, 2]]
    model = st.SentenceTransformer(modules=[FixedVectors(x)], device="cpu")
    index = build_index(x[corpus_rows], IndexSpec(kind="exact"), row_ids=corpus_rows)
    return x, labels, pairs, corpus_rows, model, index


def _st_negatives(model, anchors, positives, corpus_rows, **kwargs) -> dict[int, list[int]]:
    from sentence_transformers.util import mine_hard_negatives

    ds = datasets.Dataset.from_dict({"anchor": [f"r{a}" for a in anchors], "positive": [f"r{p}" for p in positives]})
    out = mine_hard_negatives(ds, model, corpus=[f"r{c}" for c in corpus_rows], output_format="triplet",
                              verbose=False, **kwargs)
    got: dict[int, list[int]] = {}
    seen = set()
    for a, p, n in zip(out["anchor"], out["positive"], out["negative"]):
        if (a, p) not in seen and a in got and got[a][0] != p:
            continue  # with several positives the negatives repeat per positive: keep the first's
        seen.add((a, p))
        got.setdefault(a, [p]).append(int(n[1:]))
    return {int(a[1:]): v[1:] for a, v in got.items()}


CASES = {
    "top": dict(num_negatives=3, range_max=10),
    "range": dict(num_negatives=4, range_min=3, range_max=12),
    "absolute_margin": dict(num_negatives=3, range_max=15, absolute_margin=0.1),
    "relative_margin": dict(num_negatives=3, range_min=1, range_max=15, relative_margin=0.05),
    "scores": dict(num_negatives=5, range_max=20, max_score=0.6, min_score=-0.2),
    "many": dict(num_negatives=8, range_min=2, range_max=20, absolute_margin=0.0),
    "whole_window": dict(num_negatives=6, range_max=6),  # the pool's room for the positive matters
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_pairs_match_sentence_transformers(setup, name):
    x, labels, pairs, corpus_rows, model, index = setup
    kw = CASES[name]
    queries = np.arange(NQ)
    ref = _st_negatives(model, queries, pairs[queries], corpus_rows, sampling_strategy="top", **kw)
    table = mine(index, x, MineSpec(positive="pairs", **kw), positive_rows=pairs, query_rows=queries, progress=False)
    got = dict(zip(table.column("row").to_pylist(), table.column("negative_rows").to_pylist()))
    assert {q: ref.get(q, []) for q in queries.tolist()} == got
    assert sum(map(len, got.values())) >= 2 * NQ  # not vacuous
    if name not in ("top", "whole_window"):  # the option changes the answer
        plain = mine(index, x, MineSpec(positive="pairs", num_negatives=kw["num_negatives"], range_max=kw["range_max"]),
                     positive_rows=pairs, query_rows=queries, progress=False)
        assert plain.column("negative_rows").to_pylist() != table.column("negative_rows").to_pylist()


def test_label_exclusion_matches_all_same_label_rows_as_positives(setup):
    """kdstore's label positive + exclude_same_label == sentence-transformers given every
    same-label corpus row as a positive (pool = the whole corpus, so pools agree; no margin,
    since sentence-transformers' margin uses the hardest of several positives)."""
    x, labels, pairs, corpus_rows, model, index = setup
    queries = np.arange(NQ)
    anchors, positives = [], []
    for q in queries:
        for c in corpus_rows[labels[corpus_rows] == labels[q]]:
            anchors.append(q)
            positives.append(c)
    kw = dict(num_negatives=4, range_min=2, range_max=NC)
    ref = _st_negatives(model, anchors, positives, corpus_rows, sampling_strategy="top", **kw)
    table = mine(index, x, MineSpec(positive="label", exclude_same_label=True, **kw), labels=labels,
                 query_rows=queries, progress=False)
    got = dict(zip(table.column("row").to_pylist(), table.column("negative_rows").to_pylist()))
    assert {q: ref.get(q, []) for q in queries.tolist()} == got
    assert all(labels[n] != labels[q] for q, negs in got.items() for n in negs)
    assert sum(map(len, got.values())) == 4 * NQ
