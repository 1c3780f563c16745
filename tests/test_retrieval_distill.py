"""Mined hard negatives make a distilled text student retrieve better.

A bag-of-embeddings student (mean of word vectors, then a linear map into MiniLM's 384-d
space) learns from stored MiniLM embeddings of real news documents (20 Newsgroups +
Reuters-R52; the cached embeddings, the numbers a store holds). kdstore mines the training
rows (HNSW index; positive = nearest same-topic row; 8 negatives among the 100 nearest rows
of *other* topics, relative margin 0.05). Three runs, same seed, same steps:

- ``none``: ``embedding_cosine`` to the document's own teacher embedding;
- ``positives``: that, plus ``embedding_cosine`` to the mined positive's teacher embedding
  (the mined positives without their negatives: an ablation);
- ``mined``: ``none`` plus 0.3 × ``contrastive_distill`` (positive vs the mined negatives'
  teacher embeddings, T = 0.1).

3,000 held-out documents then query each other (student vs student, "sym") and the stored
teacher embeddings of the others (student query vs teacher corpus, "asym"); a document of
the same topic is relevant. ``mined`` must beat ``none`` on recall@10 and nDCG@10 in both.
Measured here (sym recall@10 / nDCG@10 | asym): teacher 0.680 / 0.703; none 0.686 / 0.700 |
0.653 / 0.664; positives 0.704 / 0.717 | 0.661 / 0.672; mined 0.725 / 0.740 | 0.712 / 0.725.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from kdstore.store.index import IndexSpec, build_index
from kdstore.store.mine import MineSpec, mine

pytestmark = pytest.mark.slow
HELD_OUT = 3000
MAX_WORDS = 200
EPOCHS = 8


@pytest.fixture(scope="module")
def data(minilm_corpus):
    emb, labels, texts = minilm_corpus
    order = np.random.default_rng(0).permutation(len(emb))
    test, train = np.sort(order[:HELD_OUT]), np.sort(order[HELD_OUT:])
    words = [re.findall(r"[a-z]+", t.lower())[:MAX_WORDS] for t in texts]
    counts = Counter(w for i in train for w in words[i])
    vocab = {w: i + 1 for i, (w, c) in enumerate(counts.most_common(20_000)) if c >= 3}  # 0 = unknown
    ids = [torch.tensor([vocab.get(w, 0) for w in ws] or [0]) for ws in words]
    return dict(emb=emb, labels=labels, ids=ids, train=train, test=test, vocab_size=len(vocab) + 1)


class BagStudent(nn.Module):
    """Mean of word embeddings → linear → 384-d. Input: flat ids + offsets (``nn.EmbeddingBag``)."""

    def __init__(self, vocab_size: int, dim: int = 128, out: int = 384) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab_size, dim, mode="mean")
        self.proj = nn.Linear(dim, out)

    def forward(self, docs: list[torch.Tensor]) -> torch.Tensor:
        offsets = torch.tensor([0] + [len(d) for d in docs[:-1]]).cumsum(0)
        return self.proj(self.bag(torch.cat(docs), offsets))


def _train(data, variant: str, mined: tuple[np.ndarray, np.ndarray], *, batch: int = 256, seed: int = 0) -> BagStudent:
    from kdstore.train import losses

    torch.manual_seed(seed)
    student = BagStudent(data["vocab_size"])
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    teacher = torch.from_numpy(data["emb"])
    positives, negatives = mined
    train = data["train"]
    rng = np.random.default_rng(seed)
    for _ in range(EPOCHS):
        perm = rng.permutation(len(train))
        for a in range(0, len(train), batch):
            rows = train[perm[a : a + batch]]
            s = student([data["ids"][r] for r in rows])
            loss = losses.embedding_cosine(s, teacher[rows])
            pos = positives[rows]
            has_pos = torch.from_numpy(pos >= 0)
            if variant == "positives":
                loss = loss + losses.embedding_cosine(s, teacher[np.maximum(pos, 0)], mask=has_pos)
            elif variant == "mined":
                neg = negatives[rows]  # [b, n] rows, -1 = none
                loss = loss + 0.3 * losses.contrastive_distill(
                    s, teacher[np.maximum(pos, 0)], teacher[np.maximum(neg, 0)], temperature=0.1,
                    neg_mask=torch.from_numpy(neg >= 0), mask=has_pos,
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
    return student


def _retrieval(queries: np.ndarray, corpus: np.ndarray, labels: np.ndarray, k: int = 10) -> tuple[float, float]:
    """recall@k (relevant found / min(k, relevant)) and nDCG@k; query i searches corpus rows j != i."""
    index = build_index(corpus, IndexSpec(kind="flat"))
    _, found = index.search(queries, k + 1)
    rows = np.array([[r for r in f if r != i][:k] for i, f in enumerate(found)])
    rel = labels[rows] == labels[:, None]
    n_rel = np.bincount(labels, minlength=labels.max() + 1)[labels] - 1
    recall = rel.sum(1) / np.maximum(1, np.minimum(k, n_rel))
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.array([discount[: min(k, n)].sum() for n in n_rel])
    ndcg = (rel * discount).sum(1) / np.maximum(ideal, 1e-9)
    keep = n_rel > 0
    return float(recall[keep].mean()), float(ndcg[keep].mean())


@pytest.fixture
def one_thread():
    # A tiny model: one thread is fastest, and on a loaded 2-core machine two threads crawl.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_mined_negatives_improve_student_retrieval(data, one_thread):
    emb, labels, train, test = data["emb"], data["labels"], data["train"], data["test"]
    index = build_index(emb[train], IndexSpec(kind="hnsw"), row_ids=train)
    spec = MineSpec(num_negatives=8, range_max=100, exclude_same_label=True, relative_margin=0.05)
    table = mine(index, emb, spec, labels=labels, progress=False)
    positives = np.full(len(emb), -1, dtype=np.int64)
    negatives = np.full((len(emb), spec.num_negatives), -1, dtype=np.int64)
    for row, pos, negs in zip(*(table.column(c).to_pylist() for c in ("row", "positive_row", "negative_rows"))):
        positives[row] = pos
        negatives[row, : len(negs)] = negs
    assert (labels[negatives[train]] != labels[train][:, None])[negatives[train] >= 0].all()
    assert np.isin(positives[train], np.append(train, -1)).all(), "positives come from the training rows"

    tl = labels[test]
    results = {"teacher": (_retrieval(emb[test], emb[test], tl), _retrieval(emb[test], emb[test], tl))}
    for variant in ("none", "positives", "mined"):
        student = _train(data, variant, (positives, negatives))
        with torch.no_grad():
            vectors = student([data["ids"][r] for r in test]).numpy()
        results[variant] = (_retrieval(vectors, vectors, tl), _retrieval(vectors, emb[test], tl))
    print("\n" + "\n".join(
        f"{k:>9}: sym recall@10 {s[0]:.4f} nDCG@10 {s[1]:.4f} | asym recall@10 {a[0]:.4f} nDCG@10 {a[1]:.4f}"
        for k, (s, a) in results.items()
    ))
    for evaluation in (0, 1):  # sym, asym
        for metric in (0, 1):  # recall@10, nDCG@10
            assert results["mined"][evaluation][metric] > results["none"][evaluation][metric]
    assert results["mined"][0][1] > results["positives"][0][1], "the negatives, not only the positives, help"
