"""kdstore.store.index: every kind builds, searches, saves and loads; flat is exact; errors are InputErrors."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from kdstore.store import index as index_mod
from kdstore.store.errors import InputError, StoreCorruptError
from kdstore.store.index import IndexSpec, build_index, load_index, read_index_metadata

KINDS = ["flat", "ivf", "hnsw", "ivfpq"]


@pytest.fixture(scope="module")
def clustered():
    """2,000 points around 20 centres in 32-d: a structure IVF and HNSW can exploit."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 32)).astype(np.float32) * 3
    x = centres[rng.integers(0, 20, 2000)] + rng.standard_normal((2000, 32)).astype(np.float32)
    return x


def _brute(x, q, metric, k):
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    if metric == "cosine":
        x64 /= np.linalg.norm(x64, axis=1, keepdims=True)
        q64 /= np.linalg.norm(q64, axis=1, keepdims=True)
    s = -((q64[:, None] - x64[None]) ** 2).sum(-1) if metric == "l2" else q64 @ x64.T
    rows = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, rows, 1), rows


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_flat_is_exact(clustered, metric):
    q = clustered[:50] + 0.01
    index = build_index(clustered, IndexSpec(kind="flat", metric=metric))
    scores, rows = index.search(q, 10)
    ref_scores, ref_rows = _brute(clustered, q, metric, 10)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-4)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    assert np.all(np.diff(scores, axis=1) <= 0), "scores are sorted, larger = closer"


def test_cosine_ignores_vector_length(clustered):
    index = build_index(clustered, IndexSpec(kind="flat"))
    _, a = index.search(clustered[:20], 5)
    _, b = index.search(clustered[:20] * 7.5, 5)
    scaled = build_index(clustered * np.linspace(0.5, 3, len(clustered))[:, None], IndexSpec(kind="flat"))
    _, c = scaled.search(clustered[:20], 5)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("kind", KINDS)
def test_kinds_find_neighbours_and_round_trip(tmp_path, clustered, kind):
    spec = IndexSpec(kind=kind, nlist=16, nprobe=8, pq_m=8)
    index = build_index(clustered, spec, meta={"teacher": "t", "field": "embedding"})
    scores, rows = index.search(clustered[:100], 10)
    flat_rows = _brute(clustered, clustered[:100], "cosine", 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, flat_rows)])
    assert recall > (0.9 if kind != "ivfpq" else 0.35), recall  # PQ on isotropic in-cluster noise is coarse

    path = index.save(tmp_path / "index" / "t.embedding.faiss")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["kind"] == kind and meta["metric"] == "cosine" and meta["ntotal"] == 2000 and meta["dim"] == 32
    assert meta["row_ids"] == {"start": 0, "stop": 2000} and meta["build_seconds"] >= 0
    assert meta["params"]["seed"] == 0 and meta["teacher"] == "t" and meta["built_on"] == "cpu"
    loaded = load_index(path)
    s2, r2 = loaded.search(clustered[:100], 10)
    np.testing.assert_array_equal(r2, rows)
    np.testing.assert_array_equal(s2, scores)
    assert loaded.spec == index.spec and loaded.meta == {"teacher": "t", "field": "embedding"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.embedding.faiss", "t.embedding.json"]


def test_row_id_map_survives_save(tmp_path, clustered):
    rows = np.arange(5, 5 + 3 * len(clustered), 3)
    index = build_index(clustered, IndexSpec(kind="flat"), row_ids=rows)
    _, got = index.search(clustered[[0, 10]], 1)
    assert got[:, 0].tolist() == [5, 35]
    path = index.save(tmp_path / "a.faiss")
    assert read_index_metadata(path)["row_ids"] == {"file": "a.rows.npy"}
    np.testing.assert_array_equal(load_index(path).row_ids, rows)


def test_batched_add_and_seeded_training_are_reproducible(clustered):
    spec = IndexSpec(kind="ivf", nlist=16, nprobe=4)
    a = build_index(clustered, spec)
    b = build_index(clustered, IndexSpec(kind="ivf", nlist=16, nprobe=4, add_batch_rows=77))
    c = build_index(clustered, IndexSpec(kind="ivf", nlist=16, nprobe=4, seed=1, train_rows=1000))
    q = clustered[::40]
    np.testing.assert_array_equal(a.search(q, 8)[1], b.search(q, 8)[1])
    centroids = [faiss.extract_index_ivf(i.index).quantizer.reconstruct_n(0, 16) for i in (a, b, c)]
    np.testing.assert_array_equal(centroids[0], centroids[1])
    assert not np.array_equal(centroids[0], centroids[2])


def test_search_params_change_results_and_persist(tmp_path, clustered):
    index = build_index(clustered, IndexSpec(kind="ivf", nlist=32, nprobe=1, codec="flat"))
    flat_rows = _brute(clustered, clustered[:200], "cosine", 10)[1]

    def recall(ix):
        rows = ix.search(clustered[:200], 10)[1]
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, flat_rows)])

    low = recall(index)
    index.set_search_params(nprobe=32)
    assert recall(index) == 1.0 > low
    assert load_index(index.save(tmp_path / "i.faiss")).spec.nprobe == 32


def test_ivf_codecs_shrink_the_index_and_persist(tmp_path, clustered):
    truth = _brute(clustered, clustered[:200], "cosine", 10)[1]
    sizes, recalls = {}, {}
    for codec in ("flat", "fp16", "sq8", "fastscan"):
        index = build_index(clustered, IndexSpec(kind="ivf", nlist=16, nprobe=16, codec=codec))
        path = index.save(tmp_path / f"{codec}.faiss")
        loaded = load_index(path)
        assert loaded.spec.codec == codec
        rows = loaded.search(clustered[:200], 10)[1]
        recalls[codec] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)])
        sizes[codec] = path.stat().st_size
    # fastscan re-ranks the best 8k of its 4-bit scores: inside these tight synthetic clusters that
    # pool misses a few true neighbours (real MiniLM vectors at 10^6 rows lose none: benchmarks/scale.py)
    assert recalls["flat"] == 1.0 and recalls["fp16"] >= 0.99 and recalls["sq8"] >= 0.9 and recalls["fastscan"] >= 0.95
    vectors = clustered.shape[0] * clustered.shape[1]  # bytes per component: 4, 2, 1 (+ ids, centroids)
    assert sizes["flat"] - sizes["fp16"] == pytest.approx(2 * vectors, rel=0.01)
    assert sizes["fp16"] - sizes["sq8"] == pytest.approx(vectors, rel=0.05)
    # fastscan: 4-bit codes (d/2 sub-quantisers: d/4 bytes a row, lists padded to blocks of 32
    # rows) and the PQ tables beside the fp16 re-ranking copy
    assert vectors / 4 <= sizes["fastscan"] - sizes["fp16"] <= vectors / 2
    assert IndexSpec(kind="ivf").resolved(10_000, 8).codec == "fastscan"  # the default on a CPU
    with pytest.raises(InputError, match="codec applies to kind ivf"):
        IndexSpec(kind="hnsw", codec="fp16")
    with pytest.raises(InputError, match="codec must be one of"):
        IndexSpec(kind="ivf", codec="int4")
    # an index written before codecs existed (no codec in its record) is IVF-Flat
    meta_path = tmp_path / "flat.json"
    meta = json.loads(meta_path.read_text())
    del meta["params"]["codec"]
    meta_path.write_text(json.dumps(meta))
    assert load_index(tmp_path / "flat.faiss").spec.codec == "flat"


def test_default_parameters_follow_row_count():
    spec = IndexSpec(kind="ivf").resolved(27_921, 384)
    assert (spec.nlist, spec.nprobe, spec.train_rows) == (512, 32, 27_921)
    small = IndexSpec(kind="ivf").resolved(1000, 384)
    assert small.nlist * 39 <= 1000 and small.nprobe == min(8, small.nlist)
    pq = IndexSpec(kind="ivfpq").resolved(100_000, 384)
    assert pq.pq_m == 48 and 384 % pq.pq_m == 0 and pq.train_rows >= 64 * 256
    assert IndexSpec(kind="hnsw").resolved(10, 4) == IndexSpec(kind="hnsw")


def test_mmap_load(tmp_path, clustered):
    path = build_index(clustered, IndexSpec(kind="ivf", nlist=16)).save(tmp_path / "m.faiss")
    assert load_index(path, mmap=True).search(clustered[:3], 1)[1][:, 0].tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "spec, match",
    [
        (dict(kind="annoy"), "kind"),
        (dict(metric="dot"), "metric"),
        (dict(kind="ivf", nlist=0), "nlist"),
        (dict(kind="ivf", nlist=5000), "exceeds"),
        (dict(kind="ivfpq", pq_m=7), "divide"),
        (dict(pq_nbits=20), "pq_nbits"),
    ],
)
def test_bad_specs_are_input_errors(clustered, spec, match):
    with pytest.raises(InputError, match=match):
        build_index(clustered, IndexSpec(**spec))


def test_bad_inputs(tmp_path, clustered):
    with pytest.raises(InputError, match="NaN"):
        build_index(np.full((10, 4), np.nan, dtype=np.float32), IndexSpec(kind="flat"))
    index = build_index(clustered, IndexSpec(kind="flat"))
    with pytest.raises(InputError, match="dimension"):
        index.search(np.zeros((1, 5), np.float32) + 1, 3)
    with pytest.raises(InputError, match="no index"):
        load_index(tmp_path / "missing.faiss")
    path = index.save(tmp_path / "x.faiss")
    meta = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**meta, "ntotal": 5}))
    with pytest.raises(StoreCorruptError, match="holds 2000"):
        load_index(path)


class _FakeGpu:
    """Stands in for faiss-gpu's entry points: records calls, keeps the CPU index."""

    def __init__(self):
        self.calls: list[str] = []

    def install(self, monkeypatch):
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
        monkeypatch.setattr(faiss, "StandardGpuResources", lambda: self.calls.append("resources") or object(), raising=False)
        monkeypatch.setattr(faiss, "GpuClonerOptions", lambda: type("Options", (), {})(), raising=False)
        monkeypatch.setattr(faiss, "GpuParameterSpace", faiss.ParameterSpace, raising=False)

        def to_gpu(_res, device, index, options):
            self.calls.append(f"to_gpu:{device}:fp16={options.useFloat16}")
            return index

        def to_cpu(index):
            self.calls.append("to_cpu")
            return index

        monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
        monkeypatch.setattr(faiss, "index_gpu_to_cpu", to_cpu, raising=False)
        monkeypatch.setattr(index_mod, "_GPU_RESOURCES", [])


def test_gpu_code_path_is_the_same_code(tmp_path, clustered, monkeypatch):
    gpu = _FakeGpu()
    gpu.install(monkeypatch)
    ivf = build_index(clustered, IndexSpec(kind="ivfpq", nlist=16, pq_m=8))
    assert ivf.on_gpu and gpu.calls == ["resources", "to_gpu:0:fp16=True"]
    path = ivf.save(tmp_path / "g.faiss")
    assert gpu.calls[-1] == "to_cpu" and read_index_metadata(path)["built_on"] == "gpu"
    assert load_index(path).on_gpu and gpu.calls[-1] == "to_gpu:0:fp16=True"
    assert not load_index(path, use_gpu=False).on_gpu
    hnsw = build_index(clustered, IndexSpec(kind="hnsw"))
    assert not hnsw.on_gpu, "FAISS has no GPU HNSW: it stays on the CPU"
    with pytest.raises(InputError, match="2048"):
        ivf.search(clustered[:1], 3000)
