"""A store is data, never code; its metadata follows the umask; chunks are durable before a
shard's done record; readers and ``precompute --overwrite`` exclude each other. Real Ray,
real Zarr, real processes holding real flocks."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kdstore.cli.main import main
from kdstore.pipeline.job import PrecomputeConfig, run_precompute
from kdstore.pipeline.teacher import TeacherLoad
from kdstore.store import layout, open_store
from kdstore.store.atomic import write_json_atomic
from kdstore.store.errors import StoreLockedError
from kdstore.store.lock import store_lock
from kdstore.store.retrieval import build_store_index
from kdstore.store.schema import ShardInfo, TeacherSpec
from kdstore.store.verify import summarize, verify_store
from kdstore.store.writer import write_shard

CNN = "kdstore.pipeline.zoo:fashion_cnn"
KDSTORE = str(Path(sys.executable).with_name("kdstore"))


def _cfg(store: Path, shards, **kw) -> PrecomputeConfig:
    return PrecomputeConfig(
        store=store, inputs=tuple(str(s) for s in shards[:2]), outputs=("logits", "embedding:embed"),
        teacher=TeacherLoad(factory=CNN, name="cnn", layers=("embed",)), batch_size=25, progress=False, workers=1,
        **kw,
    )


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, fmnist_shards, ray_session) -> Path:
    """100 Fashion-MNIST rows in 2 shards: logits and an 'embed' embedding, written under umask 022."""
    old = os.umask(0o022)
    try:
        root = tmp_path_factory.mktemp("safety") / "store"
        run_precompute(_cfg(root, fmnist_shards))
    finally:
        os.umask(old)
    return root


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------ umask (issue 15 item 2)


def test_precompute_metadata_follows_umask(small_store):
    files = [layout.store_file(small_store), layout.teacher_file(small_store, "cnn"),
             *sorted(layout.done_dir(small_store, "cnn").glob("*.json")), layout.samples_path(small_store)]
    assert len(files) == 5
    assert {str(f.relative_to(small_store)): oct(_mode(f)) for f in files} == {
        str(f.relative_to(small_store)): oct(0o644) for f in files
    }


def test_atomic_json_follows_other_umasks(tmp_path):
    old = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / "summary.json", {"a": 1})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "summary.json") == 0o640
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 1}


# ------------------------------------------------------------------ durability (issue 11 item 5)


def test_chunks_are_fsynced_before_the_done_record(tmp_path, monkeypatch):
    """Every chunk file and folder of a shard is fsynced, and the rename into place is made
    durable, before the done record is fsynced: a done record never outlives its chunks."""
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def observed_fsync(fd):  # the real fsync runs; we only note which inode it flushed, in order
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", observed_fsync)
    spec = TeacherSpec(name="t", fingerprint="sha256:x", factory="", input_key="png", outputs=("logits",),
                       temperature=1.0, dtype="float32")
    shard = ShardInfo(index=0, url="in.tar", row_start=0, num_rows=6)
    write_shard(tmp_path, spec, shard, {"logits": np.arange(18, dtype=np.float32).reshape(6, 3)},
                valid=np.ones(6, dtype=bool))
    done = layout.done_path(tmp_path, "t", 0)
    done_id = (done.stat().st_dev, done.stat().st_ino)
    assert done_id in synced
    before = set(synced[: synced.index(done_id)])
    final = layout.shard_array_path(tmp_path, "t", 0)
    entries = [final, *final.rglob("*"), layout.shards_dir(tmp_path, "t")]
    chunk_files = [p for p in entries if p.is_file()]
    assert chunk_files, "the shard group holds no files"
    missing = [str(p) for p in entries if (p.stat().st_dev, p.stat().st_ino) not in before]
    assert not missing, f"not fsynced before the done record: {missing}"


# ------------------------------------------------------------------ locks (issue 11 item 5)


def _hold(store: Path, shared: bool, tmp_path: Path) -> subprocess.Popen:
    """Another process holding the readers' lock until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from kdstore.store.lock import store_lock
        with store_lock({str(store)!r}, shared={shared}, what="test holder"):
            print("held", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def test_overwrite_is_refused_while_a_reader_holds_the_store(tmp_path, fmnist_shards):
    store = tmp_path / "s"
    store.mkdir()
    reader = _hold(store, True, tmp_path)
    try:
        with pytest.raises(StoreLockedError, match="in use by a reader"):
            run_precompute(_cfg(store, fmnist_shards, overwrite=True))
    finally:
        _release(reader)
    # Readers share: two threads hold it at once, and a reader in another process too.
    inside = threading.Barrier(2, timeout=30)

    def read() -> None:
        with store_lock(store, shared=True):
            inside.wait()

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not inside.broken
    # Once no reader is left, the exclusive lock is free.
    with store_lock(store, shared=False):
        pass


@pytest.mark.parametrize("command", [
    ["query", "{store}", "--teacher", "cnn", "--row", "0"],
    ["index", "{store}", "--teacher", "cnn", "--kind", "flat"],
    ["mine", "{store}", "--teacher", "cnn"],
    ["train", "configs/fashion_few_labels_kd.toml", "--store", "{store}", "--out", "{out}"],
])
def test_readers_are_refused_while_an_overwrite_runs(small_store, tmp_path, command):
    holder = _hold(small_store, False, tmp_path)
    try:
        args = [a.format(store=small_store, out=tmp_path / "out") for a in command]
        proc = subprocess.run([KDSTORE, *args], capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).parent.parent)
    finally:
        _release(holder)
    lines = proc.stderr.strip().splitlines() + proc.stdout.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "is being overwritten (test holder" in lines[0], lines


# ------------------------------------------------------------------ index metadata (issue 11 item 5)


def test_unreadable_index_metadata_is_reported(small_store, tmp_path):
    store_path = tmp_path / "copy"
    shutil.copytree(small_store, store_path)
    build_store_index(store_path, "cnn", "embedding", progress=False)
    record = layout.index_path(store_path, "cnn", "embedding").with_suffix(".json")
    record.write_bytes(b"\xff{ not json")
    store = open_store(store_path)
    problems = verify_store(store, check_inputs=False).problems
    assert len(problems) == 1 and "cnn.embedding" in problems[0] and "unreadable" in problems[0]
    assert "unreadable" in summarize(store)["indexes"][0]["error"]
    out = CliRunner().invoke(main, ["info", str(store_path)])
    assert out.exit_code == 0 and "unreadable" in out.output
    out = CliRunner().invoke(main, ["verify", str(store_path), "--skip-inputs"])
    assert out.exit_code == 1 and "unreadable" in out.output


# ------------------------------------------------------------------ a store never runs code (issue 11 item 4)


@pytest.fixture
def evil_store(small_store, tmp_path) -> tuple[Path, Path]:
    """A copy of the store whose teacher 'evil' (the cnn's outputs, an index over them) records
    ``os:system`` with a command that would create a marker file."""
    root = tmp_path / "evil_store"
    shutil.copytree(small_store, root)
    shutil.copytree(layout.teacher_dir(root, "cnn"), layout.teacher_dir(root, "evil"))
    marker = tmp_path / "MARKER"
    doc = json.loads(layout.teacher_file(root, "evil").read_text())
    doc.update(name="evil", factory="os:system", factory_args={"command": f"touch {marker}"})
    layout.teacher_file(root, "evil").write_text(json.dumps(doc))
    build_store_index(root, "evil", "embedding", progress=False)
    return root, marker


def test_query_text_never_runs_the_stores_factory(evil_store):
    root, marker = evil_store
    proc = subprocess.run([KDSTORE, "query", str(root), "--teacher", "evil", "--text", "hi"],
                          capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    assert proc.returncode != 0
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "--teacher-factory os:system" in lines[0] and "--trust-store" in lines[0]
    # Naming another factory is refused naming both; nothing runs either.
    proc = subprocess.run([KDSTORE, "query", str(root), "--teacher", "evil", "--text", "hi",
                           "--teacher-factory", CNN], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and not marker.exists()
    assert CNN in proc.stderr and "os:system" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_query_vector_and_row_need_no_factory(evil_store):
    root, marker = evil_store
    vec = open_store(root).teacher("evil").read("embedding", [3])[0].astype(np.float32)
    np.save(root.parent / "q.npy", vec)
    out = CliRunner().invoke(main, ["query", str(root), "--teacher", "evil", "--vector", str(root.parent / "q.npy"),
                                    "-k", "1", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output.splitlines()[0])["row"] == 3 and not marker.exists()


# ------------------------------------------------------------------ the store's vocabulary (issue 10 item 1)


def test_teacher_spec_holds_parsed_outputs():
    from kdstore.store.errors import InputError, StoreCorruptError
    from kdstore.store.schema import TOPK_RESIDUAL, TOPK_VALUES, OutputSpec

    doc = {"name": "t", "fingerprint": "sha256:x", "outputs": ["logits", "topk:5", "features:embed:mean"],
           "temperature": 4.0, "dtype": "float16"}
    spec = TeacherSpec.from_json(doc)
    assert all(isinstance(o, OutputSpec) for o in spec.outputs)
    topk = spec.output("topk")
    assert topk == OutputSpec(kind="topk", k=5) and topk.temperature == 4.0
    assert spec.output(TOPK_RESIDUAL) is topk and topk.fields()[0] == TOPK_VALUES
    assert spec.fields() == ["logits", "topk/values", "topk/indices", "topk/residual", "features/embed"]
    assert TeacherSpec.from_json(spec.to_json()) == spec and spec.to_json()["outputs"] == [
        "logits", "topk:5", "features:embed:mean"]
    with pytest.raises(InputError, match="no output 'embedding'"):
        spec.output("embedding")
    with pytest.raises(StoreCorruptError, match="teacher.json"):
        TeacherSpec.from_json({**doc, "outputs": ["topk:zero"]})
