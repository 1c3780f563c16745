"""FAISS indexes over stored float arrays: build, search, save, load.

Kinds: ``flat`` (exact, the reference), ``ivf`` (IVF-Flat), ``hnsw`` (HNSW-Flat) and
``ivfpq`` (IVF with product-quantised codes, for stores too big for float vectors).
Metrics: ``cosine`` (rows and queries L2-normalised, inner product), ``ip`` and ``l2``.
Every search returns *scores*, larger = closer: the inner product for cosine/ip, minus the
squared L2 distance for l2.

One code path for CPU and GPU: when ``faiss.get_num_gpus() > 0`` the CPU index is cloned
to GPU 0 (``index_cpu_to_gpu``) before training and adding, and cloned back to CPU to be
saved. FAISS has no GPU HNSW outside cuVS builds, so ``hnsw`` always runs on the CPU.

Defaults, and recall@10 against ``flat`` measured with them (2,000 held-out MiniLM
embeddings of real news documents querying 25,921 others, see ``tests/test_recall.py``;
2 shared CPU cores): ``hnsw`` M=32, efSearch=64: 0.994 at 6.6× flat's speed (efSearch 16:
0.967, 16×); ``ivf`` (IVF-Flat then) nlist 512, nprobe 32: 0.985 at 5.7× (nprobe 64: 0.995,
3.2×). ``ivfpq`` with its defaults (48×8-bit codes) reaches only 0.73: use it when vectors no
longer fit, and let mining rescore candidates.

``ivf`` defaults (``IndexSpec``): nlist the power of two nearest 8·√n, nprobe nlist/64 from
2,048 lists, and the ``fastscan`` codec on a CPU. ``benchmarks/scale.py`` at 10^6 rows × 384
(idle 2-core machine, 7 alternating rounds against FAISS flat): nlist 8,192, nprobe 128,
recall@10 0.986 at 20.5× exact (a second run 22.3×), index 855 MiB; the same lists as fp16:
0.981 at 14.4× with nprobe 64; the former IVF-Flat nlist 4,096 / nprobe 128: 0.984 (9.7×
measured under load, not comparable).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kdstore.store.errors import InputError, StoreCorruptError
from kdstore.store.fs import file_sha256, is_remote, location

KINDS = ("flat", "ivf", "hnsw", "ivfpq")
# "exact": no FAISS index, a blocked matrix product (kdstore.store.mine_exact); never saved.
SPEC_KINDS = ("exact", *KINDS)
METRICS = ("cosine", "ip", "l2")
INDEX_FORMAT = "kdstore-faiss-index"
INDEX_FORMAT_VERSION = 1
GPU_MAX_K = 2048  # FAISS GPU k-selection limit
# Default ivf/ivfpq training sample cap: 2^18 rows (384-d float32: 384 MiB). It only acts
# above ~260k rows (nlist 2048+), where 64+ points per centroid still train k-means well.
TRAIN_ROWS_CAP = 2**18

Kind = Literal["exact", "flat", "ivf", "hnsw", "ivfpq"]
# How ``ivf`` stores vectors in its lists: float32 (IndexIVFFlat), float16 or 8-bit scalar
# quantised (IndexIVFScalarQuantizer, not by residual), or ``fastscan``: 4-bit product codes
# (two dimensions per sub-quantiser) scanned with SIMD lookup tables (IndexIVFPQFastScan),
# then the best k·REFINE_K_FACTOR candidates re-ranked on float16 vectors (IndexRefine) —
# at 10^6 rows the same recall@10 as fp16 lists at ~2x their speed (benchmarks/scale.py).
# FAISS has no GPU fast-scan: on a GPU the default is fp16 and fastscan stays on the CPU.
CODECS = ("flat", "fp16", "sq8", "fastscan")
Codec = Literal["flat", "fp16", "sq8", "fastscan"]
REFINE_K_FACTOR = 8
Metric = Literal["cosine", "ip", "l2"]


_CHECKED_DISTRIBUTIONS = False


def check_faiss_distributions() -> list[str]:
    """The installed FAISS distributions that ship the ``faiss`` module; warns once when several are.

    faiss-cpu (kdstore's dependency) and faiss-gpu write the same files: with both installed
    the module is whichever was installed last, half-overwritten. docs/GPU.md gives the swap.
    """
    import warnings
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11"):
        try:
            found.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pass
    if len(found) > 1:
        warnings.warn(
            f"several FAISS distributions are installed ({', '.join(found)}) and share the `faiss` module's files; "
            "keep one: `pip uninstall -y " + " ".join(f.split("==")[0] for f in found)
            + " && pip install faiss-gpu==1.15.1` for GPU (or faiss-cpu==1.15.1 for CPU), see docs/GPU.md",
            RuntimeWarning, stacklevel=3,
        )
    return found


def _faiss() -> Any:
    global _CHECKED_DISTRIBUTIONS
    import faiss

    if not _CHECKED_DISTRIBUTIONS:
        _CHECKED_DISTRIBUTIONS = True
        check_faiss_distributions()
    return faiss


@dataclass(frozen=True, kw_only=True)
class IndexSpec:
    """How to build (and search) one index. ``None`` parameters are chosen from the row count.

    - ``nlist`` (ivf, ivfpq): inverted lists; default the power of two nearest 8·√n, kept
      at or below n/39 so k-means has 39 training points per centroid.
    - ``nprobe`` (ivf, ivfpq): lists searched; default ``max(8, min(nlist/16, 32), nlist/64)``
      (at most nlist): nlist/16 up to 512 lists, 32 up to 2,048, nlist/64 above
      (benchmarks/scale.py, fastscan: 10^5 rows, nlist 2,048, nprobe 32: recall@10 0.987 at
      8.7x exact; 10^6, nlist 8,192, nprobe 128: 0.986 at 20.5x).
    - ``codec`` (ivf): ``flat``, ``fp16``, ``sq8`` or ``fastscan`` (see :data:`CODECS`);
      default ``fastscan``, ``fp16`` when FAISS sees a GPU.
    - ``hnsw_m``, ``ef_construction``, ``ef_search`` (hnsw).
    - ``pq_m`` (ivfpq): sub-quantisers, must divide the dimension; default dim/8 (rounded to
      a divisor). ``pq_nbits``: bits per code.
    - ``train_rows``: rows sampled (seeded, without replacement) to train ivf/ivfpq;
      default ``min(n, 256·nlist, TRAIN_ROWS_CAP)``, at least ``64·2**pq_nbits`` for ivfpq.
    - ``add_batch_rows``: rows read, converted and added per step (bounds memory).
    """

    kind: Kind = "hnsw"
    metric: Metric = "cosine"
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    pq_m: int | None = None
    pq_nbits: int = 8
    codec: Codec | None = None
    train_rows: int | None = None
    seed: int = 0
    add_batch_rows: int = 65536

    def __post_init__(self) -> None:
        if self.kind not in SPEC_KINDS:
            raise InputError(f"index kind must be one of {', '.join(SPEC_KINDS)}, got {self.kind!r}")
        if self.metric not in METRICS:
            raise InputError(f"index metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        for name in ("nlist", "nprobe", "pq_m", "train_rows"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"index {name} must be a positive integer, got {value!r}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "add_batch_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"index {name} must be a positive integer, got {value!r}")
        if self.codec is not None and self.codec not in CODECS:
            raise InputError(f"index codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.codec is not None and self.kind != "ivf":
            raise InputError(f"index codec applies to kind ivf, not {self.kind}")
        if not 1 <= self.pq_nbits <= 16:
            raise InputError(f"index pq_nbits must be in 1..16, got {self.pq_nbits}")

    def resolved(self, num_rows: int, dim: int) -> IndexSpec:
        """This spec with every ``None`` replaced by the value used for ``num_rows`` rows of ``dim``."""
        if num_rows < 1:
            raise InputError("cannot build an index over 0 rows")
        spec = self
        if spec.kind in ("ivf", "ivfpq"):
            nlist = spec.nlist
            if nlist is None:
                target = 8.0 * math.sqrt(num_rows)
                nlist = 2 ** max(0, round(math.log2(target)))
                while nlist > 1 and nlist * 39 > num_rows:
                    nlist //= 2
            if nlist > num_rows:
                raise InputError(f"index nlist={nlist} exceeds the {num_rows} rows to index")
            nprobe = spec.nprobe if spec.nprobe is not None else max(8, min(nlist // 16, 32), nlist // 64)
            pq_m = spec.pq_m
            if spec.kind == "ivfpq":
                if pq_m is None:
                    pq_m = max(d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0)
                if dim % pq_m:
                    raise InputError(f"index pq_m={pq_m} must divide the dimension {dim}")
            train_rows = spec.train_rows
            if train_rows is None:
                train_rows = max(min(256 * nlist, TRAIN_ROWS_CAP), 39 * nlist)
                if spec.kind == "ivfpq":
                    train_rows = max(train_rows, 64 * 2**spec.pq_nbits)
            codec = (spec.codec or ("fp16" if gpu_available() else "fastscan")) if spec.kind == "ivf" else None
            spec = replace(spec, nlist=nlist, nprobe=min(nprobe, nlist), pq_m=pq_m, codec=codec,
                           train_rows=min(train_rows, num_rows))
        return spec


def prepare_vectors(block: Any, metric: str) -> np.ndarray:
    """``[b, d]`` any float dtype → contiguous float32 (L2-normalised rows for cosine; a copy)."""
    x = np.array(block, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2:
        raise InputError(f"expected a 2-d array of vectors, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError("vectors contain NaN or inf")
    if metric == "cosine":
        _faiss().normalize_L2(x)
    return x


def _metric_type(metric: str) -> int:
    faiss = _faiss()
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _new_cpu_index(spec: IndexSpec, dim: int) -> Any:
    faiss = _faiss()
    mt = _metric_type(spec.metric)
    if spec.kind == "flat":
        return faiss.IndexFlatL2(dim) if spec.metric == "l2" else faiss.IndexFlatIP(dim)
    if spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, mt)
        index.hnsw.efConstruction = spec.ef_construction
        return index
    quantizer = faiss.IndexFlatL2(dim) if spec.metric == "l2" else faiss.IndexFlatIP(dim)
    if spec.kind == "ivf" and spec.codec in (None, "flat"):
        index = faiss.IndexIVFFlat(quantizer, dim, spec.nlist, mt)
    elif spec.kind == "ivf" and spec.codec == "fastscan":
        base = faiss.IndexIVFPQFastScan(quantizer, dim, spec.nlist, dim // 2 if dim % 2 == 0 else dim, 4, mt)
        base.by_residual = False
        base.cp.seed = base.pq.cp.seed = spec.seed
        # k_factor is set by _apply_search_params, after a build and on every load
        return faiss.IndexRefine(base, faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, mt))
    elif spec.kind == "ivf":
        qtype = faiss.ScalarQuantizer.QT_fp16 if spec.codec == "fp16" else faiss.ScalarQuantizer.QT_8bit
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, spec.nlist, qtype, mt, False)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, spec.nlist, spec.pq_m, spec.pq_nbits, mt)
        index.pq.cp.seed = spec.seed
    index.cp.seed = spec.seed
    return index  # faiss' Python layer keeps the quantizer alive with the index


def gpu_available() -> bool:
    """True when this FAISS build sees a GPU (always False with faiss-cpu)."""
    faiss = _faiss()
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


_GPU_RESOURCES: list[Any] = []


def _to_gpu(index: Any, spec: IndexSpec) -> Any:
    faiss = _faiss()
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    options = faiss.GpuClonerOptions()
    # IVFPQ lookup tables with many sub-quantisers overflow shared memory in float32.
    options.useFloat16 = spec.kind == "ivfpq"
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES[0], 0, index, options)


def cpu_only(spec: IndexSpec) -> bool:
    """Kinds FAISS cannot run on a GPU: hnsw, and the fast-scan IVF codec."""
    return spec.kind == "hnsw" or spec.codec == "fastscan"


def _apply_search_params(index: Any, spec: IndexSpec, on_gpu: bool) -> None:
    faiss = _faiss()
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    if spec.codec == "fastscan":
        faiss.downcast_index(index).k_factor = REFINE_K_FACTOR
    if spec.kind in ("ivf", "ivfpq"):
        space.set_index_parameter(index, "nprobe", int(spec.nprobe))  # reaches an IndexRefine's base
    elif spec.kind == "hnsw":
        space.set_index_parameter(index, "efSearch", int(spec.ef_search))


class VectorIndex:
    """A built or loaded FAISS index plus what it was built from.

    ``row_ids[i]`` is the store row of the index's i-th vector; :meth:`search` returns rows.
    """

    def __init__(
        self,
        index: Any,
        *,
        spec: IndexSpec,
        dim: int,
        row_ids: np.ndarray,
        on_gpu: bool,
        build_seconds: float,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.index = index
        self.spec = spec
        self.dim = dim
        self.row_ids = np.asarray(row_ids, dtype=np.int64)
        self.on_gpu = on_gpu
        self.build_seconds = build_seconds
        self.meta = dict(meta or {})

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def metric(self) -> str:
        return self.spec.metric

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change nprobe (ivf, ivfpq) or efSearch (hnsw) for later searches."""
        changes = {k: v for k, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}
        if changes:
            spec = replace(self.spec, **changes)
            if spec.nprobe is not None and spec.nlist is not None:
                spec = replace(spec, nprobe=min(spec.nprobe, spec.nlist))
            self.spec = spec
            _apply_search_params(self.index, self.spec, self.on_gpu)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest rows of each query.

        Args:
            queries: ``[b, dim]`` float (any float dtype; normalised here for cosine).
            k: neighbours per query.

        Returns:
            scores: float32 ``[b, k]``, descending (larger = closer; ``-inf`` where fewer than k).
            rows: int64 ``[b, k]``, store rows (``-1`` where fewer than k).
        """
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        if self.on_gpu and k > GPU_MAX_K:
            raise InputError(f"FAISS on GPU returns at most {GPU_MAX_K} neighbours per query, asked for k={k}")
        x = prepare_vectors(queries, self.metric)
        if x.shape[1] != self.dim:
            raise InputError(f"queries have dimension {x.shape[1]}, the index has {self.dim}")
        distances, positions = self.index.search(x, k)
        return self._rows_and_scores(distances, positions)

    def search_among(self, queries: Any, k: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """:meth:`search` restricted to the index positions ``positions`` (FAISS ``IDSelectorBitmap``).

        Exact among them for ``flat``; as approximate as :meth:`search` for ivf/ivfpq (the same
        nprobe lists) and hnsw (the same efSearch; a narrow subset may return fewer than k).
        None on GPU, where FAISS has no selectors: callers fall back to their own scan.
        """
        if self.on_gpu:
            return None
        faiss = _faiss()
        bits = np.zeros(self.ntotal, dtype=bool)
        bits[np.asarray(positions, dtype=np.int64)] = True
        bitmap = np.packbits(bits, bitorder="little")
        sel = faiss.IDSelectorBitmap(self.ntotal, faiss.swig_ptr(bitmap))
        if self.spec.codec == "fastscan":
            params = faiss.IndexRefineSearchParameters(
                k_factor=REFINE_K_FACTOR, base_index_params=faiss.SearchParametersIVF(sel=sel, nprobe=int(self.spec.nprobe)))
        elif self.spec.kind in ("ivf", "ivfpq"):
            params = faiss.SearchParametersIVF(sel=sel, nprobe=int(self.spec.nprobe))
        elif self.spec.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=int(self.spec.ef_search))
        else:
            params = faiss.SearchParameters(sel=sel)
        x = prepare_vectors(queries, self.metric)
        distances, found = self.index.search(x, k, params=params)
        del bitmap  # the selector points into it until the search returns
        return self._rows_and_scores(distances, found)

    def _rows_and_scores(self, distances: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        missing = positions < 0
        scores = -distances if self.metric == "l2" else distances
        scores = np.where(missing, -np.inf, scores).astype(np.float32, copy=False)
        rows = np.where(missing, -1, self.row_ids[np.where(missing, 0, positions)])
        return scores, rows

    def metadata(self) -> dict[str, Any]:
        """What the ``.json`` beside the ``.faiss`` file holds."""
        import faiss

        params = {k: v for k, v in asdict(self.spec).items() if k not in ("kind", "metric")}
        return {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "kind": self.spec.kind,
            "metric": self.spec.metric,
            "params": params,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "build_seconds": round(self.build_seconds, 3),
            "built_on": "gpu" if self.on_gpu else "cpu",
            "faiss_version": faiss.__version__,
            **self.meta,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``PATH`` (``.faiss``), the row id map, then ``PATH`` with ``.json`` last.

        Each file goes to a temp name and is renamed into place; the ``.json`` is the commit
        record: a reader that finds it finds a complete index.
        """
        faiss = _faiss()
        if location(path).suffix != ".faiss":
            raise InputError(f"index path must end in .faiss, got {path}")
        if is_remote(location(path)):  # written locally, then uploaded with the .json last
            from kdstore.store.index_remote import save_remote

            return save_remote(self, location(path))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cpu_index = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        faiss.write_index(cpu_index, str(tmp))
        meta = {**self.metadata(), "faiss_sha256": file_sha256(tmp)}  # a remote copy's cache checks it
        os.replace(tmp, path)
        n = len(self.row_ids)
        if n and np.array_equal(self.row_ids, np.arange(self.row_ids[0], self.row_ids[0] + n)):
            meta["row_ids"] = {"start": int(self.row_ids[0]), "stop": int(self.row_ids[0] + n)}
        else:
            rows_path = path.with_suffix(".rows.npy")
            tmp_rows = rows_path.with_name(f"{rows_path.name}.{os.getpid()}.tmp")
            with open(tmp_rows, "wb") as f:
                np.save(f, self.row_ids)
            os.replace(tmp_rows, rows_path)
            meta["row_ids"] = {"file": rows_path.name}
        json_path = path.with_suffix(".json")
        tmp_json = json_path.with_name(f"{json_path.name}.{os.getpid()}.tmp")
        tmp_json.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_json, json_path)
        return path


def build_index(
    vectors: Any,
    spec: IndexSpec | None = None,
    *,
    row_ids: np.ndarray | None = None,
    progress: bool = False,
    meta: dict[str, Any] | None = None,
) -> VectorIndex:
    """Build an index over ``vectors`` (``kind="exact"``: an in-memory :class:`~kdstore.store.mine_exact.ExactIndex`).

    Args:
        vectors: ``[n, dim]`` float array-like supporting ``vectors[a:b]`` and
            ``vectors[int_array]`` (numpy, memmap, zarr); read ``add_batch_rows`` at a time.
        spec: what to build; default HNSW, cosine.
        row_ids: int64 ``[n]``, the store row of each vector (default ``0..n-1``).
        progress: show a tqdm bar while adding.
        meta: extra JSON-able fields saved with the index (source store, teacher, field).
    """
    from tqdm import tqdm

    spec = spec or IndexSpec()
    shape = tuple(vectors.shape)
    if len(shape) != 2:
        raise InputError(f"an index needs a 2-d array [rows, dim], got shape {shape}")
    n, dim = int(shape[0]), int(shape[1])
    if spec.kind == "exact":
        from kdstore.store.mine_exact import ExactIndex

        return ExactIndex(vectors, metric=spec.metric, row_ids=row_ids, add_batch_rows=spec.add_batch_rows, meta=meta)
    spec = spec.resolved(n, dim)
    if row_ids is None:
        row_ids = np.arange(n, dtype=np.int64)
    row_ids = np.asarray(row_ids, dtype=np.int64)
    if row_ids.shape != (n,):
        raise InputError(f"row_ids must have shape ({n},), got {row_ids.shape}")

    start = time.perf_counter()
    index = _new_cpu_index(spec, dim)
    on_gpu = gpu_available() and not cpu_only(spec)
    if on_gpu:
        index = _to_gpu(index, spec)
    if spec.kind in ("ivf", "ivfpq"):
        rng = np.random.default_rng(spec.seed)
        sample = np.sort(rng.choice(n, size=spec.train_rows, replace=False))
        index.train(prepare_vectors(vectors[sample], spec.metric))
    for a in tqdm(range(0, n, spec.add_batch_rows), desc=f"index {spec.kind}", disable=not progress, unit="batch"):
        block = prepare_vectors(vectors[a : a + spec.add_batch_rows], spec.metric)
        if block.shape[1] != dim:
            raise InputError(f"rows {a}.. have dimension {block.shape[1]}, expected {dim}")
        index.add(block)
    _apply_search_params(index, spec, on_gpu)
    seconds = time.perf_counter() - start
    if index.ntotal != n:
        raise StoreCorruptError(f"index holds {index.ntotal} vectors after adding {n}")
    return VectorIndex(index, spec=spec, dim=dim, row_ids=row_ids, on_gpu=on_gpu, build_seconds=seconds, meta=meta)


def read_index_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``.json`` of the index at ``PATH.faiss``; StoreCorruptError when missing or foreign."""
    json_path = location(path).with_suffix(".json")
    try:
        meta = json.loads(json_path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"no index at {path} ({json_path.name} is missing): build it with `kdstore index`") from None
    except json.JSONDecodeError as err:
        raise StoreCorruptError(f"{json_path} is not valid JSON ({err})") from None
    if meta.get("format") != INDEX_FORMAT or meta.get("format_version") != INDEX_FORMAT_VERSION:
        raise StoreCorruptError(f"{json_path} is not a kdstore index record (format {meta.get('format')!r})")
    return meta


def load_index(path: str | os.PathLike[str], *, mmap: bool = False, use_gpu: bool | None = None) -> VectorIndex:
    """Load an index written by :meth:`VectorIndex.save`.

    ``mmap`` maps the file instead of reading it (flat / IVF kinds). ``use_gpu`` defaults to
    "when FAISS sees a GPU" (never for hnsw).
    """
    faiss = _faiss()
    if is_remote(location(path)):  # downloaded once into a local cache keyed by the index's record
        from kdstore.store.index_remote import fetch

        path = fetch(location(path))
    path = Path(path)
    meta = read_index_metadata(path)
    if not path.is_file():
        raise StoreCorruptError(f"{path} is missing although {path.with_suffix('.json').name} records it")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    index = faiss.read_index(str(path), flags)
    if int(index.ntotal) != int(meta["ntotal"]) or int(index.d) != int(meta["dim"]):
        raise StoreCorruptError(
            f"{path} holds {index.ntotal} vectors of dim {index.d}, its record says {meta['ntotal']} of {meta['dim']}"
        )
    ids = meta.get("row_ids", {})
    if "file" in ids:
        row_ids = np.load(path.parent / ids["file"])
    else:
        row_ids = np.arange(int(ids.get("start", 0)), int(ids.get("stop", meta["ntotal"])), dtype=np.int64)
    if len(row_ids) != int(meta["ntotal"]):
        raise StoreCorruptError(f"{path}: row id map has {len(row_ids)} entries for {meta['ntotal']} vectors")
    params = dict(meta["params"])
    if meta["kind"] == "ivf" and params.get("codec") is None:
        params["codec"] = "flat"  # written before codecs existed: IndexIVFFlat
    spec = IndexSpec(kind=meta["kind"], metric=meta["metric"], **params)
    on_gpu = (gpu_available() if use_gpu is None else use_gpu) and not cpu_only(spec)
    if on_gpu:
        index = _to_gpu(index, spec)
    _apply_search_params(index, spec, on_gpu)
    known = {"format", "format_version", "kind", "metric", "params", "dim", "ntotal", "build_seconds",
             "built_on", "faiss_version", "row_ids", "faiss_sha256"}
    extra = {k: v for k, v in meta.items() if k not in known}
    return VectorIndex(
        index, spec=spec, dim=int(meta["dim"]), row_ids=row_ids, on_gpu=on_gpu,
        build_seconds=float(meta.get("build_seconds", 0.0)), meta=extra,
    )


# Which kinds each IndexSpec parameter acts on; nprobe / ef_search are search-time (no rebuild).
OPTION_KINDS: dict[str, tuple[str, ...]] = {
    "nlist": ("ivf", "ivfpq"), "nprobe": ("ivf", "ivfpq"), "train_rows": ("ivf", "ivfpq"), "seed": ("ivf", "ivfpq"),
    "hnsw_m": ("hnsw",), "ef_construction": ("hnsw",), "ef_search": ("hnsw",),
    "pq_m": ("ivfpq",), "pq_nbits": ("ivfpq",), "codec": ("ivf",), "add_batch_rows": KINDS,
}
SEARCH_OPTIONS = ("nprobe", "ef_search")


def check_options_apply(kind: str, options: dict[str, Any], *, why: str = "") -> None:
    """InputError naming every given parameter that ``kind`` would ignore (``options``: only given ones)."""
    unknown = sorted(set(options) - set(OPTION_KINDS) - {"kind", "metric"})
    if unknown:
        raise InputError(f"unknown index option(s) {', '.join(unknown)}")
    idle = [name for name in OPTION_KINDS if name in options and kind not in OPTION_KINDS[name]]
    if idle:
        detail = "; ".join(f"{n} applies to {'/'.join(OPTION_KINDS[n])}" for n in idle)
        raise InputError(f"index kind {kind}{why} does not use {', '.join(idle)} ({detail}): drop it or give --kind")


def option_mismatches(spec: IndexSpec, options: dict[str, Any]) -> list[str]:
    """``name saved→given`` for each given build-time option (kind, metric, parameters) ``spec`` differs in.

    Search-time options (:data:`SEARCH_OPTIONS`) are not mismatches: they are set on the loaded index.
    """
    out = []
    for name, value in options.items():
        if name in SEARCH_OPTIONS or name == "add_batch_rows":
            continue
        if getattr(spec, name) != value:
            out.append(f"{name} {getattr(spec, name)}→{value}")
    return out
