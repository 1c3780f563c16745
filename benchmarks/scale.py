"""Benchmark: index build, search and mining at 10^5-10^6 rows, read from a real store.

Data: MiniLM (all-MiniLM-L6-v2) embeddings of the fixed 5,000-document slice of
20 Newsgroups + Reuters-R52 (``tests/support/minilm_slice.py``; with
``KDSTORE_CACHE=/tmp/citests_cache`` the cached vectors load in seconds). A seeded
permutation splits it: 500 documents are the reported queries, 500 others the validation
queries (for tuning defaults; never the reported figure), the other 4,000 the base set.
**Extension** to ``--rows`` rows: row ``i`` is base document ``i mod 4000`` in copy
``c = i div 4000``; copy 0 is the real vectors, copy ``c > 0`` is the base set rotated by a
seeded random orthogonal matrix ``R_c`` (QR of a Gaussian matrix, seed ``c``); every row then
gets Gaussian noise of norm ~0.1 (per coordinate ``0.1/sqrt(384)``) and is L2-normalised. A
rotation keeps every distance of the real set, so each copy is a real-shaped neighbourhood
structure, and the noise keeps copies of one document apart. Queries (both sets): each
document in a seeded random copy (its rotation, fresh noise), so its true neighbours are
real neighbours in that copy.

The vectors are written into a real kdstore store (``write_plan`` + ``write_shard``: Zarr,
``--shard-rows`` rows per shard, teacher ``minilm``, field ``embedding``, labels = topics),
generated one shard at a time. Each step then runs in its own process, so its peak RSS
(``VmHWM``) is its own:

- ``exact``: FAISS flat built from the store (the truth, top-10 of both query sets);
- per index (``--kinds``, default parameters unless given as ``ivf:nlist=2048,nprobe=64``):
  ``build`` (``build_store_index`` streamed from the store, saved), ``search`` (load the
  saved index; recall@10 against exact for a sweep of nprobe / efSearch on both query sets;
  then the flat index is loaded too and the reported queries are timed on both, alternating,
  ``--rounds`` times: speed vs exact = flat's time / the index's, median and range; the
  step's peak RSS is taken before the flat index is loaded), ``mine`` (load the index,
  ``iter_negatives`` over ``--mine-queries`` seeded anchor rows read from the store against
  the whole index: rows/s, and the time for all rows *extrapolated* from it).

Each step writes ``WORK/<step>.json`` when it ends; a rerun with the same ``--work`` skips the
finished steps (the store is kept once ``WORK/store.done`` exists; indexes are kept under
``WORK/indexes/``).

    KDSTORE_CACHE=/tmp/citests_cache python benchmarks/scale.py --rows 100000
    KDSTORE_CACHE=/tmp/citests_cache nice python benchmarks/scale.py --rows 1000000 --work /tmp/kdscale-1e6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIM = 384
HELD_OUT = 500  # reported queries
VALIDATION = 500  # tuning queries (other documents, never reported as the result)
NOISE = 0.1
TEACHER = "minilm"
# Search-time sweeps per kind (the first value of each is the built default).
SWEEPS = {"hnsw": ("ef_search", (16, 32, 64, 128)), "ivf": ("nprobe", (16, 32, 64, 128, 256)),
          "ivfpq": ("nprobe", (64,))}


def base_vectors() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(base [4000, 384], base labels, held-out [500, 384], validation [500, 384])``, real MiniLM vectors."""
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    from minilm_slice import slice_embeddings

    emb, labels, _ = slice_embeddings()
    order = np.random.default_rng(0).permutation(len(emb))
    q, v = np.sort(order[:HELD_OUT]), np.sort(order[HELD_OUT : HELD_OUT + VALIDATION])
    b = np.sort(order[HELD_OUT + VALIDATION :])
    emb = emb.astype(np.float32)
    return emb[b], labels[b], emb[q], emb[v]


def rotation(copy: int, dim: int = DIM) -> np.ndarray:
    """Seeded random orthogonal ``[dim, dim]`` (identity for copy 0)."""
    if copy == 0:
        return np.eye(dim, dtype=np.float32)
    g = np.random.default_rng(1_000_003 + copy).standard_normal((dim, dim))
    q, r = np.linalg.qr(g)
    return (q * np.sign(np.diag(r))).astype(np.float32)


def _noisy(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(NOISE / np.sqrt(x.shape[1]))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def extended_rows(base: np.ndarray, start: int, stop: int, seed: int = 0) -> np.ndarray:
    """Rows ``start..stop-1`` of the extended set (float32 ``[stop-start, d]``; see the module docstring)."""
    nb = len(base)
    out = np.empty((stop - start, base.shape[1]), dtype=np.float32)
    i = start
    while i < stop:
        copy, j = divmod(i, nb)
        take = min(stop - i, nb - j)
        rng = np.random.default_rng([seed, copy, j])
        out[i - start : i - start + take] = _noisy(base[j : j + take] @ rotation(copy), rng)
        i += take
    return out


def queries(held: np.ndarray, num_rows: int, nb: int, seed: int = 1) -> np.ndarray:
    """Each held-out vector in a seeded random copy among those the rows reach."""
    copies = max(1, -(-num_rows // nb))
    which = np.random.default_rng(seed).integers(0, copies, size=len(held))
    out = np.empty_like(held)
    for c in np.unique(which):
        sel = which == c
        out[sel] = held[sel] @ rotation(int(c))
    return _noisy(out, np.random.default_rng([seed, 7]))


def write_vector_store(root: Path, num_rows: int, shard_rows: int, make_rows, labels_of) -> None:
    """A kdstore store of ``num_rows`` vectors, teacher ``minilm`` field ``embedding`` (float32).

    ``make_rows(a, b)`` → ``[b-a, d]`` float32, ``labels_of(a, b)`` → int64 ``[b-a]``; one shard in memory at a time.
    """
    from kdstore.store.schema import ShardInfo, TeacherSpec
    from kdstore.store.writer import write_plan, write_shard, write_teacher_spec

    bounds = [(a, min(a + shard_rows, num_rows)) for a in range(0, num_rows, shard_rows)]
    urls = [f"synthetic-{i:05d}.tar" for i in range(len(bounds))]
    keys = [[f"r{r:08d}" for r in range(a, b)] for a, b in bounds]
    manifest = write_plan(root, urls=urls, keys_per_shard=keys,
                          labels_per_shard=[labels_of(a, b).tolist() for a, b in bounds])
    spec = TeacherSpec(name=TEACHER, fingerprint=f"sha256:synthetic-{num_rows}", factory="", input_key="txt",
                       outputs=("embedding",), temperature=1.0, dtype="float32")
    write_teacher_spec(root, spec)
    for shard, (a, b) in zip(manifest.shards, bounds):
        write_shard(root, spec, ShardInfo(index=shard.index, url=shard.url, row_start=a, num_rows=b - a),
                    {"embedding": make_rows(a, b)}, valid=np.ones(b - a, dtype=bool))


def peak_rss_mib() -> float:
    """This process's peak RSS in MiB: Linux ``VmHWM`` (``ru_maxrss`` would include the parent's
    peak, which a child started by fork + exec inherits)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, repeat: int = 3):
    """``(result, median seconds)`` of ``repeat`` runs."""
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


def _recall(rows: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(rows, truth)]))


def parse_kind(text: str) -> tuple[str, dict]:
    """``"ivf:nlist=2048,nprobe=64"`` → ``("ivf", {"nlist": 2048, "nprobe": 64})``."""
    kind, _, rest = text.partition(":")
    params = {k: int(v) for k, v in (item.split("=") for item in rest.split(",") if item)}
    return kind, params


def _tag(text: str) -> str:
    return text.replace(":", "-").replace(",", "-").replace("=", "")


def _move_index(src: Path, dst: Path) -> Path:
    """Move ``src`` (``.faiss`` + ``.json`` + optional ``.rows.npy``) to ``dst``; the ``.json`` last."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".faiss", ".rows.npy", ".json"):
        if src.with_suffix(suffix).exists():
            os.replace(src.with_suffix(suffix), dst.with_suffix(suffix))
    return dst


def phase_exact(work: Path) -> dict:
    """FAISS flat over the store (streamed adds): truth top-10 of both query sets, saved as ``WORK/indexes/flat``."""
    from kdstore.store.index import IndexSpec
    from kdstore.store.retrieval import build_store_index

    index, path = build_store_index(work / "store", TEACHER, "embedding", IndexSpec(kind="flat"), progress=False)
    q, v = np.load(work / "queries.npy"), np.load(work / "validation.npy")
    (_, rows), seconds = _timed(lambda: index.search(q, 10))
    np.save(work / "truth.npy", rows)
    np.save(work / "truth_validation.npy", index.search(v, 10)[1])
    _move_index(path, work / "indexes" / "flat.faiss")
    return {"build_s": index.build_seconds, "search_s": seconds, "peak_rss_mib": peak_rss_mib()}


def phase_build(work: Path, kind_text: str) -> dict:
    from kdstore.store.index import OPTION_KINDS, IndexSpec
    from kdstore.store.retrieval import build_store_index

    kind, params = parse_kind(kind_text)
    index, path = build_store_index(work / "store", TEACHER, "embedding", IndexSpec(kind=kind, **params),
                                    progress=False)
    size = path.stat().st_size
    meta = index.metadata()["params"]
    _move_index(path, work / "indexes" / f"{_tag(kind_text)}.faiss")
    return {"kind": kind, "given": params, "ntotal": index.ntotal,
            "params": {k: v for k, v in meta.items() if kind in OPTION_KINDS.get(k, ()) and k != "add_batch_rows"},
            "build_s": index.build_seconds, "index_bytes": size, "peak_rss_mib": peak_rss_mib()}


def _load(path: Path):
    from kdstore.store.index import load_index

    start = time.perf_counter()
    index = load_index(path)
    return index, time.perf_counter() - start


def phase_search(work: Path, kind_text: str, rounds: int) -> dict:
    kind, _ = parse_kind(kind_text)
    index, load_s = _load(work / "indexes" / f"{_tag(kind_text)}.faiss")
    rss_load = peak_rss_mib()
    q, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    v, truth_v = np.load(work / "validation.npy"), np.load(work / "truth_validation.npy")
    name, values = SWEEPS[kind]
    default = getattr(index.spec, name)
    searches = []
    for value in [default, *sorted({x for x in values if x is not None} - {default})]:
        index.set_search_params(**{name: value})
        (_, rows), seconds = _timed(lambda: index.search(q, 10))
        (_, rows_v), seconds_v = _timed(lambda: index.search(v, 10), repeat=1)
        searches.append({name: getattr(index.spec, name), "default": value == default,
                         "recall_at_10": _recall(rows, truth), "search_s": seconds,
                         "validation_recall_at_10": _recall(rows_v, truth_v), "validation_search_s": seconds_v})
    index.set_search_params(**{name: default})
    rss_search = peak_rss_mib()
    flat, flat_load_s = _load(work / "indexes" / "flat.faiss")
    exact_s, index_s = [], []
    for _ in range(rounds):  # alternating sides, same process, same queries
        start = time.perf_counter()
        flat.search(q, 10)
        exact_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        index.search(q, 10)
        index_s.append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(exact_s, index_s)]
    exact_med = float(np.median(exact_s))
    for s in searches:
        s["speed_vs_exact"] = exact_med / s["search_s"]
        s["validation_speed_vs_exact"] = exact_med * len(v) / len(q) / s["validation_search_s"]
    return {"load_s": load_s, "peak_rss_load_mib": rss_load, "peak_rss_mib": rss_search, "searches": searches,
            "alternating": {"rounds": rounds, "exact_s": exact_s, "index_s": index_s,
                            "speed_vs_exact_median": float(np.median(ratios)),
                            "speed_vs_exact_min": min(ratios), "speed_vs_exact_max": max(ratios)},
            "flat_load_s": flat_load_s, "load_avg": [round(x, 1) for x in os.getloadavg()]}


def phase_mine(work: Path, kind_text: str, mine_queries: int) -> dict:
    from kdstore.store import open_store
    from kdstore.store.mine import MineSpec, MineStats, iter_negatives
    from kdstore.store.retrieval import StoreField

    index, load_s = _load(work / "indexes" / f"{_tag(kind_text)}.faiss")
    store = open_store(work / "store")
    field = StoreField(store.teacher(TEACHER), "embedding")
    sample = np.sort(np.random.default_rng(3).choice(store.num_rows, size=min(mine_queries, store.num_rows),
                                                     replace=False))
    stats = MineStats()
    spec = MineSpec(num_negatives=5, range_min=0, range_max=20)
    start = time.perf_counter()
    for _ in iter_negatives(index, field, spec, labels=store.labels, query_rows=sample, stats=stats, progress=False):
        pass
    mine_s = time.perf_counter() - start
    nprobe = getattr(index.spec, "nprobe", None)
    return {"load_s": load_s, "anchors": len(sample), "mine_s": mine_s, "rows_per_s": len(sample) / mine_s,
            "extrapolated_all_rows_s": mine_s * store.num_rows / len(sample),
            "spec": {"num_negatives": 5, "range_min": 0, "range_max": 20, "positive": "label",
                     "batch_rows": spec.batch_rows},
            "search_param": {"nprobe": nprobe} if index.spec.kind in ("ivf", "ivfpq") else
            {"ef_search": index.spec.ef_search},
            "positive_index_searches": stats.positive_index_searches,
            "positive_fallback_scans": stats.positive_fallback_scans, "without_positive": stats.without_positive,
            "peak_rss_mib": peak_rss_mib(), "load_avg": [round(x, 1) for x in os.getloadavg()]}


def _step(work: Path, name: str, args: list[str], log) -> dict:
    """Run one step in its own process unless ``WORK/<name>.json`` holds its result already."""
    done = work / f"{name}.json"
    if done.exists():
        log(f"{name}: done before, kept ({done})")
        return json.loads(done.read_text())
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, *args, "--work", str(work)], check=True, capture_output=True,
                         text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["step_wall_s"] = time.perf_counter() - start
    done.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--kinds", default="ivf", help="comma-free list joined by ';' e.g. 'ivf;hnsw;ivf:nlist=2048'")
    p.add_argument("--shard-rows", type=int, default=50_000)
    p.add_argument("--mine-queries", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=5, help="alternating exact / index timing rounds")
    p.add_argument("--no-mine", action="store_true", help="skip the mining step (tuning runs)")
    p.add_argument("--work", type=Path, default=None, help="work folder, kept (default: a temp folder, removed)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    p.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        fn = {"exact": lambda: phase_exact(a.work), "build": lambda: phase_build(a.work, a.kind),
              "search": lambda: phase_search(a.work, a.kind, a.rounds),
              "mine": lambda: phase_mine(a.work, a.kind, a.mine_queries)}[a.phase]
        print(json.dumps(fn()))
        return

    import tempfile

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    work = a.work or Path(tempfile.mkdtemp(prefix="kdscale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base, base_labels, held, val = base_vectors()
        marker = work / "store.done"
        if not marker.exists():
            shutil.rmtree(work / "store", ignore_errors=True)
            start = time.perf_counter()
            write_vector_store(work / "store", a.rows, a.shard_rows, lambda s, e: extended_rows(base, s, e),
                               lambda s, e: base_labels[np.arange(s, e) % len(base)])
            marker.write_text(json.dumps({"rows": a.rows, "store_write_s": time.perf_counter() - start}))
        written = json.loads(marker.read_text())
        if written["rows"] != a.rows:
            raise SystemExit(f"{work} holds a store of {written['rows']} rows, not {a.rows}: use another --work")
        store_bytes = sum(f.stat().st_size for f in (work / "store").rglob("*") if f.is_file())
        if not (work / "validation.npy").exists():  # deterministic; minutes on a loaded machine at 10^6
            np.save(work / "queries.npy", queries(held, a.rows, len(base)))
            np.save(work / "validation.npy", queries(val, a.rows, len(base), seed=2))
        log(f"store: {a.rows:,} x {DIM} float32, {store_bytes / 2**20:,.0f} MiB on disk, written in "
            f"{written['store_write_s']:.0f} s ({work / 'store'})")
        exact = _step(work, "exact", ["--phase", "exact"], log)
        log(f"exact (flat): build {exact['build_s']:.0f} s, search {exact['search_s']:.2f} s for {HELD_OUT} queries, "
            f"peak RSS {exact['peak_rss_mib']:,.0f} MiB")
        results = []
        for kind_text in a.kinds.split(";"):
            tag = _tag(kind_text)
            r = {"spec": kind_text}
            r["build"] = b = _step(work, f"build-{tag}", ["--phase", "build", "--kind", kind_text], log)
            goal = 2 * b["index_bytes"] / 2**20 + 1024
            log(f"{kind_text} {b['params']}: build {b['build_s']:.0f} s, index {b['index_bytes'] / 2**20:,.0f} MiB, "
                f"peak RSS {b['peak_rss_mib']:,.0f} MiB (goal <= {goal:,.0f})")
            r["search"] = s = _step(work, f"search-{tag}", ["--phase", "search", "--kind", kind_text,
                                                            "--rounds", str(a.rounds)], log)
            alt = s["alternating"]
            log(f"   load {s['load_s']:.1f} s, search peak RSS {s['peak_rss_mib']:,.0f} MiB; default vs exact, "
                f"{alt['rounds']} alternating rounds: {alt['speed_vs_exact_median']:.1f}x "
                f"[{alt['speed_vs_exact_min']:.1f}-{alt['speed_vs_exact_max']:.1f}]")
            for x in s["searches"]:
                name = "ef_search" if "ef_search" in x else "nprobe"
                log(f"   {name} {x[name]}{' (default)' if x['default'] else ''}: recall@10 {x['recall_at_10']:.4f} "
                    f"at {x['speed_vs_exact']:.1f}x exact (validation {x['validation_recall_at_10']:.4f} at "
                    f"{x['validation_speed_vs_exact']:.1f}x)")
            if not a.no_mine:
                r["mine"] = m = _step(work, f"mine-{tag}", ["--phase", "mine", "--kind", kind_text,
                                                            "--mine-queries", str(a.mine_queries)], log)
                log(f"   mine {m['anchors']:,} anchors in {m['mine_s']:.0f} s = {m['rows_per_s']:.0f} rows/s "
                    f"(all {a.rows:,} rows extrapolated: ~{m['extrapolated_all_rows_s']:,.0f} s), "
                    f"peak RSS {m['peak_rss_mib']:,.0f} MiB")
            steps = [r["build"]["peak_rss_mib"], s["peak_rss_mib"]] + ([r["mine"]["peak_rss_mib"]] if "mine" in r else [])
            default = next(x for x in s["searches"] if x["default"])
            r["goals"] = {"rss_limit_mib": goal, "rss_met": max(steps) <= goal,
                          "recall_met": default["recall_at_10"] >= 0.98,
                          "speed_met": alt["speed_vs_exact_median"] >= 15}
            log(f"   goals: RSS {'met' if r['goals']['rss_met'] else 'MISSED'}, recall@10 >= 0.98 "
                f"{'met' if r['goals']['recall_met'] else 'MISSED'}, >= 15x exact "
                f"{'met' if r['goals']['speed_met'] else 'MISSED'}")
            results.append(r)
        load = os.getloadavg()
        doc = {"rows": a.rows, "dim": DIM, "shard_rows": a.shard_rows, "queries": HELD_OUT,
               "validation_queries": VALIDATION, "base_documents": len(base), "noise": NOISE,
               "store_write_s": written["store_write_s"], "store_bytes": store_bytes, "exact": exact,
               "indexes": results, "cpus": os.cpu_count(), "load_avg_end": [round(x, 1) for x in load]}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        runs = json.loads(a.out.read_text()) if a.out.exists() else {}
        before = runs.get(str(a.rows), {})
        if before.get("store_write_s") == doc["store_write_s"]:  # same store: keep its other indexes' results
            doc["indexes"] = [r for r in before.get("indexes", []) if r.get("spec") not in a.kinds.split(";")] + results
        runs[str(a.rows)] = doc
        a.out.write_text(json.dumps(runs, indent=1) + "\n")
        log(f"wrote {a.out} (load average {load[0]:.1f} on {os.cpu_count()} cores)")
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
