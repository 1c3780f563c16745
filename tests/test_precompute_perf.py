"""Precompute speed-ups keep results exact: the reader thread (stages.prefetch) and plain ustar shards."""

from __future__ import annotations

import tarfile
import threading
import time

import pytest
from kdstore.pipeline import stages
from kdstore.pipeline.shards import iter_samples, list_shard
from kdstore.pipeline.teacher import TeacherLoad
from kdstore.pipeline.worker import ShardProcessor
from kdstore.store.errors import InputError
from kdstore.store.schema import ShardInfo, TeacherSpec

CNN = "kdstore.pipeline.zoo:fashion_cnn"


def test_prefetch_runs_ahead_in_another_thread_and_keeps_order():
    produced: list[int] = []
    threads: set[int] = set()

    def items():
        for i in range(8):
            threads.add(threading.get_ident())
            produced.append(i)
            yield i

    out = stages.prefetch(items(), depth=2)
    first = next(out)
    deadline = time.monotonic() + 20
    while len(produced) < 3 and time.monotonic() < deadline:  # the reader fills the queue while we "forward"
        time.sleep(0.01)
    assert first == 0 and len(produced) >= 3
    assert threading.get_ident() not in threads
    assert [first, *out] == list(range(8))


def test_prefetch_reraises_after_earlier_items_and_stops_when_closed():
    def failing():
        yield 1
        yield 2
        raise InputError("shard s key 'k3': bad")

    got = []
    with pytest.raises(InputError, match="key 'k3'"):
        for x in stages.prefetch(failing()):
            got.append(x)
    assert got == [1, 2]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = threading.active_count()
    out = stages.prefetch(endless(), depth=2)
    next(out)
    out.close()  # the forward raised: the reader thread must end, not block on a full queue
    assert threading.active_count() == before
    n = len(produced)
    time.sleep(0.2)
    assert len(produced) == n


class _Recording:
    """The teacher, noting which thread ran preprocess and forward."""

    def __init__(self, teacher) -> None:
        self._t, self.pre, self.fwd = teacher, set(), set()

    def __getattr__(self, name):
        return getattr(self._t, name)

    def preprocess(self, sample):
        self.pre.add(threading.get_ident())
        return self._t.preprocess(sample)

    def forward(self, inputs):
        self.fwd.add(threading.get_ident())
        return self._t.forward(inputs)


def test_threaded_shard_arrays_are_byte_identical(make_shards):
    url = str(make_shards(shards=1, per_shard=70)[0])
    keys = list_shard(url).keys
    shard = ShardInfo(index=0, url=url, row_start=0, num_rows=len(keys))
    spec = TeacherSpec(name="cnn", fingerprint="x", factory=CNN, input_key="png",
                       outputs=("logits", "topk:3", "scores"), temperature=2.0, dtype="float16")
    results = {}
    for depth in (0, 2):
        proc = ShardProcessor(TeacherLoad(factory=CNN, name="cnn"), num_threads=1, prefetch=depth)
        proc.teacher = rec = _Recording(proc.teacher)
        arrays, skipped = proc.compute(spec, shard, keys, batch_size=16, on_error="fail")
        results[depth] = arrays
        assert not skipped and arrays.valid.all()
        assert (rec.pre == rec.fwd) == (depth == 0)  # threaded: decode runs beside the forward
    assert ShardProcessor(TeacherLoad(factory=CNN, name="cnn")).prefetch == 2  # the actors' default
    assert results[0].fields.keys() == results[2].fields.keys()
    for name, value in results[0].fields.items():
        assert value.dtype == results[2].fields[name].dtype
        assert value.tobytes() == results[2].fields[name].tobytes(), name


def test_written_shards_are_plain_ustar_and_pax_shards_still_read(tmp_path, make_shards):
    url = make_shards(shards=1, per_shard=5)[0]
    raw = url.read_bytes()
    assert b"PaxHeader" not in raw
    with tarfile.open(url) as tar:
        members = tar.getmembers()
    assert members and all(not m.pax_headers and isinstance(m.mtime, int) for m in members)
    assert abs(members[0].mtime - time.time()) < 3600
    # a user's tar with a PAX header per member (webdataset's default float mtime) reads the same
    import webdataset as wds

    pax = tmp_path / "pax.tar"
    with wds.TarWriter(str(pax)) as sink:
        for s in iter_samples(str(url)):
            sink.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
    assert b"PaxHeader" in pax.read_bytes()
    strip = lambda it: [{k: v for k, v in s.items() if k != "__url__"} for s in it]
    assert strip(iter_samples(str(pax))) == strip(iter_samples(str(url)))
    assert list_shard(str(pax)).keys == list_shard(str(url)).keys
