"""Benchmark: index build, search and mining at 10^5-10^6 rows, read from a real store.

Data: MiniLM (all-MiniLM-L6-v2) embeddings of the fixed 5,000-document slice of
20 Newsgroups + Reuters-R52 (``tests/support/minilm_slice.py``; with
``KDSTORE_CACHE=/tmp/citests_cache`` the cached vectors load in seconds). 500 seeded documents
are held out as queries; the other 4,500 are the base set. **Extension** to ``--rows`` rows:
row ``i`` is base document ``i mod 4500`` in copy ``c = i div 4500``; copy 0 is the real
vectors, copy ``c > 0`` is the base set rotated by a seeded random orthogonal matrix ``R_c``
(QR of a Gaussian matrix, seed ``c``); every row then gets Gaussian noise of norm ~0.1
(per coordinate ``0.1/sqrt(384)``) and is L2-normalised. A rotation keeps every distance of
the real set, so each copy is a real-shaped neighbourhood structure, and the noise keeps
copies of one document apart. Queries: each held-out document in a seeded random copy
(its rotation, fresh noise), so its true neighbours are real neighbours in that copy.

The vectors are written into a real kdstore store (``write_plan`` + ``write_shard``: Zarr,
``--shard-rows`` rows per shard, teacher ``minilm``, field ``embedding``, labels = topics),
generated one shard at a time. Each measurement then runs in its own process (so its peak
RSS, ``ru_maxrss``, is its own): ``exact`` (FAISS flat over the store, the truth and the
speed reference), then one per index kind: ``build_store_index`` streamed from the store,
search sweeps (recall@10 vs exact, speed vs exact on the same queries, FAISS threads as
available), and mining (``iter_negatives`` over ``--mine-queries`` seeded query rows read
from the store; seconds for all rows extrapolated linearly).

    KDSTORE_CACHE=/tmp/citests_cache python benchmarks/scale.py --rows 100000
    KDSTORE_CACHE=/tmp/citests_cache python benchmarks/scale.py --rows 1000000 --kinds ivf
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
HELD_OUT = 500
NOISE = 0.1
TEACHER = "minilm"
# Search-time sweeps per kind (the first value of each is the built default).
SWEEPS = {"hnsw": ("ef_search", (None, 16, 32, 128)), "ivf": ("nprobe", (None, 16, 32, 64, 128)),
          "ivfpq": ("nprobe", (None, 64))}


def base_vectors() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(base [4500, 384], base labels, held-out [500, 384], held-out labels)``, real MiniLM vectors."""
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    from minilm_slice import slice_embeddings

    emb, labels, _ = slice_embeddings()
    order = np.random.default_rng(0).permutation(len(emb))
    q, b = np.sort(order[:HELD_OUT]), np.sort(order[HELD_OUT:])
    return emb[b].astype(np.float32), labels[b], emb[q].astype(np.float32), labels[q]


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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, repeat: int = 3):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def phase_exact(work: Path) -> dict:
    """FAISS flat over the store (streamed adds): truth top-10 and its search time."""
    from kdstore.store.index import IndexSpec
    from kdstore.store.retrieval import build_store_index

    index, _ = build_store_index(work / "store", TEACHER, "embedding", IndexSpec(kind="flat"), progress=False)
    q = np.load(work / "queries.npy")
    (_, rows), seconds = _timed(lambda: index.search(q, 10))
    np.save(work / "truth.npy", rows)
    return {"search_s": seconds, "peak_rss_mib": peak_rss_mib()}


def phase_index(work: Path, kind: str, mine_queries: int) -> dict:
    from kdstore.store import open_store
    from kdstore.store.index import IndexSpec
    from kdstore.store.mine import MineSpec, MineStats, iter_negatives
    from kdstore.store.retrieval import StoreField, build_store_index

    store = open_store(work / "store")
    index, path = build_store_index(store, TEACHER, "embedding", IndexSpec(kind=kind), progress=False)
    rss_build = peak_rss_mib()
    size = path.stat().st_size
    q, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    name, values = SWEEPS[kind]
    searches = []
    default = getattr(index.spec, name)
    for value in values:
        index.set_search_params(**{name: value if value is not None else default})
        (_, rows), seconds = _timed(lambda: index.search(q, 10))
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)]))
        searches.append({name: getattr(index.spec, name), "default": value is None, "recall_at_10": recall,
                         "search_s": seconds})
    index.set_search_params(**{name: default})
    field = StoreField(store.teacher(TEACHER), "embedding")
    sample = np.sort(np.random.default_rng(3).choice(store.num_rows, size=min(mine_queries, store.num_rows),
                                                     replace=False))
    stats = MineStats()
    start = time.perf_counter()
    for _ in iter_negatives(index, field, MineSpec(num_negatives=5, range_min=0, range_max=20), labels=store.labels,
                            query_rows=sample, stats=stats, progress=False):
        pass
    mine_s = time.perf_counter() - start
    from kdstore.store.index import OPTION_KINDS

    params = {k: v for k, v in index.metadata()["params"].items() if kind in OPTION_KINDS.get(k, ()) and k != "add_batch_rows"}
    return {"kind": kind, "params": params,
            "build_s": index.build_seconds, "index_bytes": size, "searches": searches,
            "mine_queries": len(sample), "mine_s": mine_s, "mine_s_all_rows": mine_s * store.num_rows / len(sample),
            "peak_rss_build_mib": rss_build, "peak_rss_mib": peak_rss_mib(), "index_path": str(path.name)}


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--kinds", default="ivf,hnsw")
    p.add_argument("--shard-rows", type=int, default=50_000)
    p.add_argument("--mine-queries", type=int, default=20_000)
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temp folder, removed)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase == "exact":
        print(json.dumps(phase_exact(a.work)))
        return
    if a.phase:
        print(json.dumps(phase_index(a.work, a.phase, a.mine_queries)))
        return

    import tempfile

    work = a.work or Path(tempfile.mkdtemp(prefix="kdscale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base, base_labels, held, _ = base_vectors()
        start = time.perf_counter()
        if not (work / "store" / "store.json").exists():
            write_vector_store(work / "store", a.rows, a.shard_rows, lambda s, e: extended_rows(base, s, e),
                               lambda s, e: base_labels[np.arange(s, e) % len(base)])
        np.save(work / "queries.npy", queries(held, a.rows, len(base)))
        write_s = time.perf_counter() - start
        print(f"store: {a.rows:,} x {DIM} float32 in {write_s:.0f} s ({work / 'store'})", flush=True)
        exact = _child(["--phase", "exact", "--work", str(work)])
        print(f"exact (flat): search {exact['search_s']:.3f} s for {HELD_OUT} queries", flush=True)
        results = []
        for kind in a.kinds.split(","):
            r = _child(["--phase", kind, "--work", str(work), "--mine-queries", str(a.mine_queries)])
            for s in r["searches"]:
                s["speed_vs_exact"] = exact["search_s"] / s["search_s"]
            results.append(r)
            print(f"{kind} {r['params']}: build {r['build_s']:.1f} s, index {r['index_bytes'] / 2**20:.0f} MiB, "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB, mine {r['mine_s']:.1f} s / {r['mine_queries']:,} queries "
                  f"(all rows ~{r['mine_s_all_rows']:.0f} s)", flush=True)
            for s in r["searches"]:
                name = "ef_search" if "ef_search" in s else "nprobe"
                print(f"   {name} {s[name]}{' (default)' if s['default'] else ''}: recall@10 {s['recall_at_10']:.4f}, "
                      f"{s['speed_vs_exact']:.1f}x exact", flush=True)
        load = os.getloadavg()
        doc = {"rows": a.rows, "dim": DIM, "shard_rows": a.shard_rows, "queries": HELD_OUT, "noise": NOISE,
               "store_write_s": write_s, "exact": exact, "indexes": results, "cpus": os.cpu_count(),
               "load_avg": [round(x, 1) for x in load]}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        runs = json.loads(a.out.read_text()) if a.out.exists() else {}
        runs[str(a.rows)] = doc
        a.out.write_text(json.dumps(runs, indent=1) + "\n")
        print(f"wrote {a.out} (load average {load[0]:.1f} on {os.cpu_count()} cores)")
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
