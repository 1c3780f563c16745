"""One read of the inputs (format 2): precompute lists each shard while the teacher reads it.

Real tars, real Zarr, a real local Ray (the ratio test) and the real worker without Ray (the
rest): no input byte is read before the teacher, a partly listed store reads shard by shard,
teachers must agree on a shard's keys, format 1 stores are read but not precomputed into.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdstore.cli.main import main
from kdstore.pipeline.job import PrecomputeConfig, plan_store, run_precompute
from kdstore.pipeline.shards import iter_samples
from kdstore.pipeline.teacher import TeacherLoad
from kdstore.pipeline.worker import ShardProcessor
from kdstore.store import layout, open_store, shards as shards_module
from kdstore.store.errors import InputError, StoreCorruptError, StoreMismatchError
from kdstore.store.listing import seal, start_plan
from kdstore.store.schema import ShardInfo, TeacherSpec
from kdstore.store.verify import summarize, verify_store

CNN = "kdstore.pipeline.zoo:fashion_cnn"


def _cfg(store: Path, shards, **kw) -> PrecomputeConfig:
    defaults = dict(outputs=("logits",), batch_size=16, progress=False, workers=1,
                    teacher=TeacherLoad(factory=CNN, name="cnn"))
    defaults.update(kw)
    return PrecomputeConfig(store=store, inputs=tuple(str(s) for s in shards), **defaults)


    def close(self) -> None:
        self.raw.close()


def _through_end_block(path: Path) -> int:
    """Bytes of a tar up to and with its first end-of-archive block (the rest is record padding)."""
    import tarfile

    with tarfile.open(path) as tar:
        tar.getmembers()
        return tar.offset + tarfile.BLOCKSIZE


def test_precompute_reads_each_input_byte_once(tmp_path, make_shards, ray_session, monkeypatch):
    """Input bytes read (the driver's, counted here, plus each worker's, from its done record)
    ÷ input size ≤ 1.05. Listing the shards in the driver first (format 1) made it ~2."""
    shards = make_shards(4, 25)
    driver = shards_module.ReadStats()
    real_open = shards_module._open
    monkeypatch.setattr(shards_module, "_open", lambda url: shards_module.CountingReader(real_open(url), driver))
    result = run_precompute(_cfg(tmp_path / "s", shards))
    assert result.rows == 100 and result.shards_run == 4
    records = open_store(tmp_path / "s").teacher("cnn").done_records()
    assert sorted(records) == [0, 1, 2, 3]
    workers = sum(r.extra["input_bytes"] for r in records.values())
    size = sum(p.stat().st_size for p in shards)
    assert workers == sum(_through_end_block(p) for p in shards)  # each worker read its whole shard, once
    ratio = (driver.bytes_read + workers) / size
    assert ratio <= 1.05, f"read {driver.bytes_read} bytes in the driver and {workers} in workers for {size} bytes of input"


def _spec(name: str = "cnn", fingerprint: str = "sha256:t") -> TeacherSpec:
    return TeacherSpec(name=name, fingerprint=fingerprint, factory=CNN, input_key="png", outputs=("logits",),
                       temperature=1.0, dtype="float16")


def _run(proc: ShardProcessor, root: Path, spec: TeacherSpec, index: int, url: Path, keys=None, on_error="fail"):
    shard = ShardInfo(index=index, url=str(url), row_start=None, num_rows=0)
    return proc.run_shard(str(root), spec, shard, keys, batch_size=8, on_error=on_error)


def test_a_partly_listed_store_reads_shard_by_shard_then_seals(tmp_path, make_shards):
    shards = make_shards(3, 10)
    root = tmp_path / "s"
    start_plan(root, [str(p) for p in shards])
    layout.teacher_dir(root, "cnn").mkdir(parents=True)
    (layout.teacher_file(root, "cnn")).write_text(json.dumps(_spec().to_json()))
    proc = ShardProcessor(TeacherLoad(factory=CNN, name="cnn"), num_threads=1)
    record = _run(proc, root, _spec(), 2, shards[2])  # the last shard first: rows 20..29 are not numbered yet
    assert record.row_start is None and record.num_rows == 10
    assert record.extra["input_bytes"] == _through_end_block(shards[2])

    store = open_store(root)
    assert (store.num_rows, list(store.shards), store.pending_shards, store.sealed) == (0, [], (0, 1, 2), False)
    t = store.teacher("cnn")
    assert t.read_shard("logits", 2).shape == (10, 10) and t.missing_shards() == [0, 1]
    keys, labels = store.shard_listing(2)
    assert list(keys) == [s["__key__"] for s in iter_samples(str(shards[2]))] and labels.min() >= 0
    with pytest.raises(InputError, match="have no rows yet.*Finish `kdstore precompute`"):
        store.select_shards(None)  # a trainer must not take the numbered part for the whole store
    with pytest.raises(InputError, match="shard 2"):
        store.select_shards(["2"])
    summary = summarize(store)
    assert (summary["shards"], summary["pending_shards"], summary["teachers"][0]["shards_done"]) == (0, 3, 1)
    info = CliRunner().invoke(main, ["info", str(root)])
    assert info.exit_code == 0 and "+ 3 pending" in info.output and "shards done 1/3" in info.output, info.output
    assert any("not listed yet" in p for p in verify_store(store).problems)

    _run(proc, root, _spec(), 0, shards[0])  # shard 0 listed: its rows are numbered, shard 2's still not
    store = open_store(root)
    assert [s.index for s in store.shards] == [0] and store.pending_shards == (1, 2) and store.num_rows == 10
    assert store.select_shards(["0..0"])[0].row_start == 0 and store.shard(0).num_rows == 10
    assert seal(root) is None  # shard 1 is not listed
    _run(proc, root, _spec(), 1, shards[1])
    manifest = seal(root)
    assert manifest is not None and [(s.row_start, s.num_rows) for s in manifest.shards] == [(0, 10), (10, 10), (20, 10)]
    store = open_store(root)
    assert store.sealed and store.planned and store.num_rows == 30
    assert list(store.keys) == [s["__key__"] for p in shards for s in iter_samples(str(p))]
    assert verify_store(store).ok, verify_store(store).problems
    assert store.manifest.input_fingerprint.startswith("sha256:")
    # a number selects that shard index only, never the file names containing its digits
    assert all("0" in p.name and "1" in p.name for p in shards[1:2])
    assert [s.index for s in store.select_shards(["0"])] == [0]
    assert [s.index for s in store.select_shards([1, "2"])] == [1, 2]
    with pytest.raises(InputError, match="no shard of store"):
        store.select_shards(["7"])


def test_teachers_must_agree_on_a_shards_keys(tmp_path, make_shards):
    shards = make_shards(2, 10)
    root = tmp_path / "s"
    start_plan(root, [str(p) for p in shards])
    proc = ShardProcessor(TeacherLoad(factory=CNN, name="cnn"), num_threads=1)
    _run(proc, root, _spec("a"), 1, shards[1])
    listed = open_store(root).shard_listing(1)[0]
    # the shard changes under the store (other samples, same name): the next teacher refuses it
    other = make_shards(1, 10, name="other")[0]
    shutil.copy(other, shards[1])
    with pytest.raises(StoreMismatchError, match=r"changed since the store listed its keys \(store shard 1\).*another --store"):
        _run(proc, root, _spec("b"), 1, shards[1], keys=list(listed))
    assert not layout.done_path(root, "b", 1).exists()
    # a worker sent without the keys (the listing appeared after it was sent) checks at write time
    with pytest.raises(StoreMismatchError, match=r"changed since the store listed its keys \(store shard 1\): sample 0 is"):
        _run(proc, root, _spec("b"), 1, shards[1])
    assert not layout.done_path(root, "b", 1).exists()
    assert list(open_store(root).shard_listing(1)[0]) == list(listed)  # the first listing stays


def test_an_unreadable_shard_found_by_a_worker_is_skipped_for_the_store(tmp_path, make_shards):
    shards = make_shards(2, 10)
    shards[0].write_bytes(shards[0].read_bytes()[:3000])
    root = tmp_path / "s"
    start_plan(root, [str(p) for p in shards])
    proc = ShardProcessor(TeacherLoad(factory=CNN, name="cnn"), num_threads=1)
    with pytest.raises(InputError, match="truncated tar"):
        _run(proc, root, _spec(), 0, shards[0])
    skipped = _run(proc, root, _spec(), 0, shards[0], on_error="skip")
    assert skipped["index"] == 0 and "truncated tar" in skipped["reason"]
    _run(proc, root, _spec(), 1, shards[1], on_error="skip")
    store = open_store(root)
    assert [s.index for s in store.shards] == [1] and store.shards[0].row_start == 0 and store.planned
    assert store.manifest.skipped_shards[0]["url"] == str(shards[0])


def test_format_1_stores_are_read_and_not_precomputed_into(tmp_path, make_shards):
    shards = make_shards(2, 10)
    root = tmp_path / "s"
    start_plan(root, [str(p) for p in shards])
    proc = ShardProcessor(TeacherLoad(factory=CNN, name="cnn"), num_threads=1)
    layout.teacher_dir(root, "cnn").mkdir(parents=True)
    layout.teacher_file(root, "cnn").write_text(json.dumps(_spec().to_json()))
    for i, p in enumerate(shards):
        _run(proc, root, _spec(), i, p)
    seal(root)
    # the same store as format 1 wrote it: store.json + samples.parquet, no per-shard listings
    doc = json.loads(layout.store_file(root).read_text())
    doc["format_version"] = 1
    layout.store_file(root).write_text(json.dumps(doc))
    shutil.rmtree(layout.listings_dir(root))
    store = open_store(root)
    assert store.num_rows == 20 and store.teacher("cnn").read("logits").shape == (20, 10)
    assert verify_store(store).ok
    with pytest.raises(StoreMismatchError, match="format 1 .*reads it but precomputes into format 2 stores only"):
        plan_store(_cfg(root, shards), [str(p) for p in shards])
    fresh = plan_store(_cfg(root, shards, overwrite=True), [str(p) for p in shards])
    assert fresh.manifest.format_version == 2 and fresh.pending_shards == (0, 1) and fresh.teachers == []
    doc["format_version"] = 3
    layout.store_file(root).write_text(json.dumps(doc))
    with pytest.raises(StoreCorruptError, match="format_version 3 is not supported by this kdstore \\(reads 1, 2\\)"):
        open_store(root)
