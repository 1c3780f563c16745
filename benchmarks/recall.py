"""Benchmark: recall@10 of kdstore's approximate indexes against flat on real MiniLM embeddings.

Data: MiniLM embeddings of the packaged 20 Newsgroups + Reuters-R52 corpora (27,921 real
documents, 72 topics; encoded once, ~30 minutes on 2 cores, then cached on disk by
``cached_corpus_embeddings``). ``--docs N`` uses the fixed slice the tests use instead
(``tests/support/minilm_slice.py``: the first N of a seed-0 permutation). Seeded held-out
documents (``--held-out``, default 2,000, or N/10 with ``--docs``) query an index of the
rest; the truth is flat's top 10. Search times are one pass over all queries, best of
``--repeat``, on however many threads FAISS uses.

    python benchmarks/recall.py              # full corpus: table, benchmarks/results/recall.json
    python benchmarks/recall.py --docs 5000  # the test slice (a few seconds once its cache is warm)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

CORPUS = "20newsgroups+reuters-r52"
ROOT = Path(__file__).resolve().parents[1]
# (name, IndexSpec keyword arguments)
SETTINGS = (
    ("flat", dict(kind="flat")),
    ("hnsw (default)", dict(kind="hnsw")),
    ("hnsw efSearch 16", dict(kind="hnsw", ef_search=16)),
    ("ivf (default)", dict(kind="ivf")),
    ("ivfpq (default)", dict(kind="ivfpq")),
)

PARAMS = {"flat": (), "hnsw": ("hnsw_m", "ef_search"), "ivf": ("nlist", "nprobe"),
          "ivfpq": ("nlist", "nprobe", "pq_m", "pq_nbits")}


def load(docs: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings float32 [n, 384], labels int64 [n])``: the whole corpus or the test slice."""
    if docs is None:
        from kdstore.pipeline.text_teacher import cached_corpus_embeddings

        emb, labels, _ = cached_corpus_embeddings(CORPUS)
        return emb, labels
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    from minilm_slice import slice_embeddings

    emb, labels, _ = slice_embeddings(corpus_name=CORPUS, docs=docs)
    return emb, labels


def _search(index, queries: np.ndarray, k: int, repeat: int) -> tuple[np.ndarray, float]:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        _, rows = index.search(queries, k)
        best = min(best, time.perf_counter() - start)
    return rows, best


def run(emb: np.ndarray, labels: np.ndarray, *, held_out: int, repeat: int, k: int = 10) -> dict:
    from kdstore.store.index import IndexSpec, build_index

    order = np.random.default_rng(0).permutation(len(emb))
    q_rows, c_rows = order[:held_out], np.sort(order[held_out:])
    queries, corpus = emb[q_rows], emb[c_rows]
    results, truth, flat_s = [], None, None
    for name, kwargs in SETTINGS:
        index = build_index(corpus, IndexSpec(**kwargs))
        rows, seconds = _search(index, queries, k, repeat)
        if truth is None:
            truth, flat_s = rows, seconds
            precision = float(np.mean(labels[c_rows][rows] == labels[q_rows][:, None]))
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(rows, truth)]))
        params = {key: v for key, v in index.metadata()["params"].items() if key in PARAMS[kwargs["kind"]]}
        results.append({
            "index": name,
            "params": params,
            "recall_at_10": round(recall, 4),
            "build_seconds": round(index.build_seconds, 3),
            "search_seconds": round(seconds, 4),
            "speed_vs_flat": round(flat_s / seconds, 2),
        })
    return {"queries": int(held_out), "corpus_rows": int(len(c_rows)), "same_topic_precision_at_10": round(precision, 4),
            "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=None, help="the test slice of this many documents (default: all)")
    parser.add_argument("--held-out", type=int, default=None, help="query documents (default 2000, or docs/10)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recall.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    emb, labels = load(args.docs)
    held_out = args.held_out or (2000 if args.docs is None else max(1, args.docs // 10))
    report = {
        "corpus": CORPUS,
        "slice": None if args.docs is None else {"docs": args.docs, "seed": 0, "definition": "tests/support/minilm_slice.py"},
        "documents": int(len(emb)),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        **run(emb, labels, held_out=held_out, repeat=args.repeat),
    }
    print(f"{report['documents']:,} documents ({'slice' if args.docs else 'full corpus'}), "
          f"{report['queries']:,} held-out queries, k = 10; same-topic precision@10 (flat) "
          f"{report['same_topic_precision_at_10']:.3f}")
    print(f"{'index':<18} {'params':<40} {'recall@10':>9} {'build s':>8} {'search s':>9} {'vs flat':>8}")
    for r in report["results"]:
        params = ", ".join(f"{k} {v}" for k, v in r["params"].items())
        print(f"{r['index']:<18} {params:<40} {r['recall_at_10']:>9.4f} {r['build_seconds']:>8.2f} "
              f"{r['search_seconds']:>9.4f} {r['speed_vs_flat']:>7.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
