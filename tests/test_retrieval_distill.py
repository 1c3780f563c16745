"""Mined hard negatives make a distilled text student retrieve better than the same positives alone.

A bag-of-embeddings student (mean of word vectors, then a linear map into MiniLM's 384-d
space) learns from stored MiniLM embeddings of real news documents: the fixed 5,000-document
slice of 20 Newsgroups + Reuters-R52 (``minilm_slice`` in conftest.py; 72 topics), 4,000
for training, 1,000 held out. kdstore mines the training rows (HNSW index; positive =
nearest same-topic row; 8 negatives among the 100 nearest rows of *other* topics, relative
margin 0.05). Two arms, same positives, same seeds, same steps, no labels in the loss:

- ``positives``: ``embedding_cosine`` to the document's own teacher embedding plus
  ``embedding_cosine`` to its mined positive's teacher embedding;
- ``mined``: the same, plus 0.3 × ``contrastive_distill`` (the mined positive vs the mined
  negatives' teacher embeddings, T = 0.1): the term that uses the negatives (its positive
  is the one both arms already pull towards).

The 1,000 held-out documents then query each other (student vs student, "sym") and the
stored teacher embeddings of the others (student query vs teacher corpus, "asym"); a
document of the same topic is relevant. Measured on the slice, seeds 0-4, recall@10
(teacher itself 0.617): sym positives 0.514-0.524, mined 0.517-0.535 (gain +0.002 to
+0.015, mean +0.009); asym positives 0.495-0.502, mined 0.545-0.557 (gain +0.047 to
+0.060). So the test asks for +0.03 asym (recall@10 and nDCG@10) in each of seeds 0-2 and
+0.003 sym on their mean.
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
from kdstore.store.retrieval import label_recall_ndcg

pytestmark = pytest.mark.slow
HELD_OUT = 1000
MAX_WORDS = 200
EPOCHS = 8
SEEDS = (0, 1, 2)
WEIGHT, TEMPERATURE = 0.3, 0.1
ARMS = ("positives", "mined")
# Gains of ``mined`` over ``positives`` measured on the slice, seeds 0-4 (sym recall@10, sym nDCG@10 |
# asym recall@10, asym nDCG@10): +0.013 +0.012 | +0.060 +0.057; +0.015 +0.014 | +0.053 +0.053;
# +0.002 +0.003 | +0.050 +0.049; +0.011 +0.011 | +0.047 +0.049; +0.008 +0.004 | +0.050 +0.051.
# Asym gains are large in every seed; sym gains are small and vary, so only their mean over SEEDS
# is held to a bar (seeds 0-2: +0.010 / +0.010; the worst three of the five: +0.007 / +0.006).
MIN_GAIN_ASYM = 0.03  # every seed
MIN_GAIN_SYM = 0.003  # mean over SEEDS


def prepare(emb: np.ndarray, labels: np.ndarray, texts: list[str]) -> dict:
    """Seeded split (HELD_OUT test rows), word ids over a vocabulary of the training rows."""
    order = np.random.default_rng(0).permutation(len(emb))
    test, train = np.sort(order[:HELD_OUT]), np.sort(order[HELD_OUT:])
    words = [re.findall(r"[a-z]+", t.lower())[:MAX_WORDS] for t in texts]
    counts = Counter(w for i in train for w in words[i])
    vocab = {w: i + 1 for i, (w, c) in enumerate(counts.most_common(20_000)) if c >= 3}  # 0 = unknown
    ids = [torch.tensor([vocab.get(w, 0) for w in ws] or [0]) for ws in words]
    return dict(emb=emb, labels=labels, ids=ids, train=train, test=test, vocab_size=len(vocab) + 1)


@pytest.fixture(scope="module")
def data(minilm_slice):
    return prepare(*minilm_slice)


class BagStudent(nn.Module):
    """Mean of word embeddings → linear → 384-d. Input: flat ids + offsets (``nn.EmbeddingBag``)."""

    def __init__(self, vocab_size: int, dim: int = 128, out: int = 384) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab_size, dim, mode="mean")
        self.proj = nn.Linear(dim, out)

    def forward(self, docs: list[torch.Tensor]) -> torch.Tensor:
        offsets = torch.tensor([0] + [len(d) for d in docs[:-1]]).cumsum(0)
        return self.proj(self.bag(torch.cat(docs), offsets))


def _train(data, arm: str, mined: tuple[np.ndarray, np.ndarray], *, batch: int = 128, seed: int = 0) -> BagStudent:
    """``arm``: ``positives`` (cosine to own + to mined positive) or ``mined`` (that + the contrastive term)."""
    from kdstore.train import losses

    assert arm in ARMS
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
            pos = positives[rows]
            has_pos = torch.from_numpy(pos >= 0)
            # Same supervision in both arms: the document's own and its mined positive's teacher embedding.
            loss = losses.embedding_cosine(s, teacher[rows]) + losses.embedding_cosine(
                s, teacher[np.maximum(pos, 0)], mask=has_pos
            )
            if arm == "mined":
                neg = negatives[rows]  # [b, n] rows, -1 = none
                loss = loss + WEIGHT * losses.contrastive_distill(
                    s, teacher[np.maximum(pos, 0)], teacher[np.maximum(neg, 0)], temperature=TEMPERATURE,
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
    recall, ndcg, n_rel = label_recall_ndcg(rows, labels, k)
    keep = n_rel > 0
    return float(recall[keep].mean()), float(ndcg[keep].mean())


@pytest.fixture
def one_thread():
    # A tiny model: one thread is fastest, and on a loaded 2-core machine two threads crawl.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mine_training_rows(data) -> tuple[np.ndarray, np.ndarray]:
    """kdstore's HNSW index + miner over the training rows: ``(positives [n], negatives [n, 8])``, -1 = none."""
    emb, labels, train = data["emb"], data["labels"], data["train"]
    index = build_index(emb[train], IndexSpec(kind="hnsw"), row_ids=train)
    spec = MineSpec(num_negatives=8, range_max=100, exclude_same_label=True, relative_margin=0.05)
    table = mine(index, emb, spec, labels=labels, progress=False)
    positives = np.full(len(emb), -1, dtype=np.int64)
    negatives = np.full((len(emb), spec.num_negatives), -1, dtype=np.int64)
    for row, pos, negs in zip(*(table.column(c).to_pylist() for c in ("row", "positive_row", "negative_rows"))):
        positives[row] = pos
        negatives[row, : len(negs)] = negs
    return positives, negatives


def evaluate(data, student: BagStudent) -> tuple[tuple[float, float], tuple[float, float]]:
    """Held-out ``((sym recall@10, nDCG@10), (asym recall@10, nDCG@10))``."""
    test, tl = data["test"], data["labels"][data["test"]]
    with torch.no_grad():
        vectors = student([data["ids"][r] for r in test]).numpy()
    return _retrieval(vectors, vectors, tl), _retrieval(vectors, data["emb"][test], tl)


def test_mined_negatives_improve_student_retrieval(data, one_thread):
    emb, labels, train, test = data["emb"], data["labels"], data["train"], data["test"]
    positives, negatives = mine_training_rows(data)
    assert (labels[negatives[train]] != labels[train][:, None])[negatives[train] >= 0].all()
    assert np.isin(positives[train], np.append(train, -1)).all(), "positives come from the training rows"
    assert (positives[train] >= 0).mean() > 0.99 and (negatives[train] >= 0).mean() > 0.8  # slice: 0.998, 0.869

    tl = labels[test]
    teacher = _retrieval(emb[test], emb[test], tl)
    print(f"\n  teacher: recall@10 {teacher[0]:.4f} nDCG@10 {teacher[1]:.4f}")
    gains = []  # [seed][sym recall, sym nDCG, asym recall, asym nDCG]
    for seed in SEEDS:
        results = {arm: evaluate(data, _train(data, arm, (positives, negatives), seed=seed)) for arm in ARMS}
        for arm, (s, a) in results.items():
            print(f"seed {seed} {arm:>9}: sym recall@10 {s[0]:.4f} nDCG@10 {s[1]:.4f} | "
                  f"asym recall@10 {a[0]:.4f} nDCG@10 {a[1]:.4f}")
        gains.append([results["mined"][e][m] - results["positives"][e][m] for e in (0, 1) for m in (0, 1)])
    gains = np.array(gains)
    print("gain mined - positives (sym recall, sym nDCG, asym recall, asym nDCG): per seed", gains.round(4).tolist(),
          "mean", gains.mean(0).round(4).tolist())
    assert (gains[:, 2:] >= MIN_GAIN_ASYM).all(), "mined negatives: student queries find the teacher's neighbours"
    assert (gains.mean(0)[:2] >= MIN_GAIN_SYM).all(), "mined negatives: student-to-student retrieval, mean of seeds"
