"""Stores and input shards on object storage, against a real S3-protocol server (moto) on loopback.

The same precompute into a local folder and into ``s3://`` must give the same store; the
lease (the job lock where there is no ``flock``) refuses a second holder, is taken over once
expired, and fences a late writer; input shards are read from ``s3://``; ``kdstore train``
reads an ``s3://`` store.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from kdstore.cli.main import main
from kdstore.pipeline.job import PrecomputeConfig, run_precompute
from kdstore.pipeline.teacher import TeacherLoad
from kdstore.store import layout, open_store
from kdstore.store.errors import InputError, StoreLockedError
from kdstore.store.lease import Lease, current
from kdstore.store.lock import StoreLock, check_fence
from kdstore.store.schema import TeacherSpec
from kdstore.store.verify import summarize, verify_store
from kdstore.store.writer import write_shard
from upath import UPath

CNN = "kdstore.pipeline.zoo:fashion_cnn"
OUTPUTS = ("logits", "topk:3", "embedding:embed:l2", "scores")


@pytest.fixture(scope="module")
def ray_s3(s3, ray_session):
    """Ray whose workers see the S3 environment (a Ray started before it is restarted once)."""
    ray = ray_session

    @ray.remote
    def endpoint():
        return os.environ.get("AWS_ENDPOINT_URL")

    if ray.get(endpoint.remote()) != s3.endpoint:
        ray.shutdown()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    assert ray.get(endpoint.remote()) == s3.endpoint
    return ray


@pytest.fixture(scope="module")
def s3_shards(s3, fmnist_shards) -> list[str]:
    """The 4 Fashion-MNIST shards uploaded to ``s3://BUCKET/inputs/``."""
    urls = []
    for path in fmnist_shards:
        url = s3.url("inputs", Path(path).name)
        target = UPath(url)
        target.fs.put_file(str(path), target.path)
        urls.append(url)
    return urls


def _cfg(store, inputs, **kw) -> PrecomputeConfig:
    teacher = TeacherLoad(factory=CNN, name="cnn", layers=("embed",))
    return PrecomputeConfig(store=store, inputs=tuple(inputs), teacher=teacher, outputs=OUTPUTS, batch_size=25,
                            progress=False, workers=1, **kw)


@pytest.fixture(scope="module")
def stores(s3, ray_s3, fmnist_shards, s3_shards, tmp_path_factory):
    """One precompute into a local folder from local tars, the same into s3:// from s3:// tars."""
    local = tmp_path_factory.mktemp("objstore") / "store"
    run_precompute(_cfg(local, [str(p) for p in fmnist_shards]))
    remote = s3.url("stores", "conformance")
    result = run_precompute(_cfg(remote, s3_shards))
    assert result.shards_run == 4 and result.rows == 200
    return local, remote


def test_store_location_is_parsed_once(tmp_path):
    root = layout.root_of("s3://bucket/some/prefix/")
    assert isinstance(root, UPath) and root.protocol == "s3" and root.path == "bucket/some/prefix"
    assert str(layout.store_file(root)) == "s3://bucket/some/prefix/store.json"
    assert layout.root_of(root) is root  # a UPath is kept, not re-read from its .path
    assert layout.root_of(f"file://{tmp_path}/s") == tmp_path / "s"
    assert layout.root_of(str(tmp_path / "s")) == tmp_path / "s"
    assert layout.lease_path("s3://bucket/p", 7).path == "bucket/p/.lease/0000000007.json"


def test_precompute_into_s3_equals_local(stores, s3):
    local, remote = stores
    a, b = open_store(local), open_store(remote)
    assert isinstance(b.path, UPath)
    assert list(a.keys) == list(b.keys) and (a.labels == b.labels).all()
    assert [s.url for s in b.shards] == [s3.url("inputs", Path(s.url).name) for s in a.shards]
    ta, tb = a.teacher("cnn"), b.teacher("cnn")
    assert ta.fields == tb.fields and set(tb.fields) == {"logits", "topk/values", "topk/indices", "topk/residual",
                                                          "embedding", "scores/entropy", "scores/max_prob"}
    for field in ta.fields:
        np.testing.assert_array_equal(ta.read(field), tb.read(field))
    ra, rb = ta.done_records(), tb.done_records()
    assert {i: r.fields for i, r in ra.items()} == {i: r.fields for i, r in rb.items()}  # sha256 and bytes per array
    sa, sb = summarize(a), summarize(b)
    assert sb["path"] == remote
    assert {**sa, "path": None} == {**sb, "path": None}
    report = verify_store(b)  # re-reads every array from s3:// and re-lists the s3:// input tars
    assert report.ok, report.problems
    assert report.shards_checked == 4
    # the objects of a store on s3 are exactly the local files, less the lock files and temp names
    fs = b.path.fs
    remote_files = {p[len(b.path.path) + 1 :] for p in fs.find(b.path.path)}
    local_files = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    assert {f for f in remote_files if not f.startswith(".lease/")} == local_files - {".lock"}


def test_cli_info_and_verify_read_an_s3_store(stores):
    _, remote = stores
    runner = CliRunner()
    info = runner.invoke(main, ["info", remote, "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["rows"] == 200
    verify = runner.invoke(main, ["verify", remote])
    assert verify.exit_code == 0, verify.output
    keys = runner.invoke(main, ["keys", remote, "--limit", "3", "--json"])
    assert keys.exit_code == 0, keys.output


def test_rerun_on_s3_resumes_and_a_flipped_object_is_reported(stores, s3, s3_shards):
    _, remote = stores
    root = layout.root_of(remote)
    result = run_precompute(_cfg(remote, s3_shards))  # every shard has its done record: nothing runs
    assert result.shards_run == 0 and result.shards_already_done == 4
    chunk = layout.shard_array_path(root, "cnn", 2) / "logits" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    original = chunk.read_bytes()
    chunk.write_bytes(bytes(data))
    try:
        problems = verify_store(open_store(remote), check_inputs=False).problems
        assert problems and all("field logits shard 2" in p for p in problems)
    finally:
        chunk.write_bytes(original)
    assert verify_store(open_store(remote), check_inputs=False).ok


def test_cli_precompute_into_s3_then_a_second_job_is_refused(s3, ray_s3, s3_shards):
    store = s3.url("stores", "cli")
    args = ["precompute", "--store", store, "--inputs", s3.url("inputs", "train-00000{0..1}.tar"),
            "--teacher", CNN, "--output", "logits", "--workers", "1", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "2 shards run" in result.output
    assert open_store(store).teacher("fashion_cnn").complete
    with StoreLock(store) as holder:
        again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and f"job {holder.token}" in again.output, again.output


def test_missing_credentials_are_one_line_saying_what_to_set(stores, fmnist_shards):
    import subprocess
    import sys

    _, remote = stores
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent")
    for args in (["info", remote],
                 ["precompute", "--store", remote, "--inputs", str(fmnist_shards[0]), "--teacher", CNN, "--no-progress"]):
        proc = subprocess.run([sys.executable, "-m", "kdstore.cli.main", *args], check=False, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: store {remote}: Unable to locate credentials")
        assert "AWS_ACCESS_KEY_ID" in lines[0]


def test_overwrite_on_s3_is_refused(s3, s3_shards):
    with pytest.raises(InputError, match="object storage"):
        run_precompute(_cfg(s3.url("stores", "overwrite"), s3_shards, overwrite=True))


# --------------------------------------------------------------------------- the lease


def test_a_second_lease_holder_is_refused_with_the_holder_named(s3):
    root = s3.url("leases", "second")
    with StoreLock(root) as first:
        with pytest.raises(StoreLockedError, match=f"leased by .* job {first.token}"), StoreLock(root):
            pass
        check_fence(root, first.token)  # the holder's own workers may write
    with StoreLock(root) as second:  # released: the next job need not wait for expiry
        assert current(root)["token"] == second.token and current(root)["generation"] == 1


def test_racing_jobs_get_exactly_one_lease(s3):
    root = s3.url("leases", "race")
    won, refused = [], []
    barrier = threading.Barrier(6)

    def take(i: int) -> None:
        lease = Lease(root, f"token{i}", f"thread {i}", ttl=30)
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease)
        except StoreLockedError:
            refused.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(won) == 1 and len(refused) == 5
        assert current(root)["token"] == won[0].token
    finally:
        for lease in won:
            lease.release()


def test_an_expired_lease_is_taken_over_and_its_late_writer_is_fenced(s3):
    root = layout.root_of(s3.url("leases", "expired"))
    dead = Lease(root, "dead-job", "pid 1 on gone", ttl=1.0).acquire()
    dead._stop.set()  # the holder dies: nobody renews
    dead._thread.join()
    with pytest.raises(StoreLockedError, match="leased by pid 1 on gone"):
        Lease(root, "early", "too early", ttl=1.0).acquire()
    time.sleep(1.2)
    new = Lease(root, "new-job", "pid 2 here", ttl=30).acquire()
    try:
        assert current(root)["token"] == "new-job" and current(root)["generation"] == 1
        assert not dead.renew() and dead.lost  # the old holder learns it lost the lease
        assert [p.name for p in layout.lease_dir(root).iterdir()] == ["0000000001.json"]
        with pytest.raises(StoreLockedError, match="now held by another job"):
            check_fence(root, "dead-job")
        spec = TeacherSpec.from_json(
            {"name": "t", "fingerprint": "f", "factory": "m:f", "input_key": "png", "outputs": ["logits"],
             "temperature": 1.0, "dtype": "float16", "views": 0, "augment": "", "seed": 0, "layers": []}
        )
        from kdstore.store.schema import ShardInfo

        shard = ShardInfo(index=0, url="x.tar", row_start=0, num_rows=2)
        with pytest.raises(StoreLockedError):
            write_shard(root, spec, shard, {"logits": np.zeros((2, 3), np.float16)}, valid=np.ones(2, bool),
                        fence_token="dead-job")
        assert not layout.shard_array_path(root, "t", 0).exists() and not layout.done_path(root, "t", 0).exists()
        write_shard(root, spec, shard, {"logits": np.zeros((2, 3), np.float16)}, valid=np.ones(2, bool),
                    fence_token="new-job")
        assert layout.done_path(root, "t", 0).exists()
    finally:
        new.release()
    assert current(root)["released"]


def test_the_fence_reads_the_lease_while_its_holder_renews_it(s3):
    # Workers read the lease while the driver re-PUTs it; a read must never trip over a renewal.
    root = s3.url("leases", "busy")
    with Lease(root, "busy-job", "here", ttl=0.06) as lease:  # renewed every 20 ms
        deadline = time.monotonic() + 3
        reads = 0
        while time.monotonic() < deadline:
            check_fence(root, lease.token)
            reads += 1
    assert reads > 20


# --------------------------------------------------------------------------- training


def test_cli_train_reads_an_s3_store_for_one_epoch(stores, tmp_path):
    _, remote = stores
    config = tmp_path / "c.toml"
    config.write_text(
        '[data]\ntrain_shards = ["0..2"]\neval_shards = ["3"]\nbatch_size = 25\nshuffle_buffer = 16\n'
        'verify_inputs = "quick"\n\n[model]\narch = "mlp"\nhidden = 16\n\n'
        '[train]\nepochs = 1\nthreads = 1\n\n[[loss]]\nkind = "kd"\nteacher = "cnn"\n'
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["train", str(config), "--store", remote, "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log) == 6  # 150 training rows from s3:// in batches of 25
    assert json.loads((out / "config.json").read_text())["data"]["store"] == remote
    assert (out / "student.pt").is_file()


# --------------------------------------------------------------------------- index, mine, query


def test_cli_index_mine_query_on_an_s3_store_equal_local(stores, tmp_path, monkeypatch):
    """index, mine and query with ``s3://`` give what they give on the local copy of the same store."""
    from kdstore.store.retrieval import load_negatives

    local, remote = stores
    monkeypatch.setenv("KDSTORE_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    for store in (str(local), remote):
        index = runner.invoke(main, ["index", store, "--teacher", "cnn", "--kind", "flat"])
        assert index.exit_code == 0, index.output
        mine = runner.invoke(main, ["mine", store, "--teacher", "cnn", "--kind", "flat", "--num-negatives", "2"])
        assert mine.exit_code == 0, mine.output
        assert "saved flat cosine index cnn.embedding.faiss" in mine.output  # mine used the index just built
    root = layout.root_of(remote)
    assert layout.index_path(root, "cnn", "embedding").exists()
    assert not [p for p in root.fs.find(root.path) if p.endswith(".tmp")]
    # the index files themselves: the same .faiss bytes, the record carries their sha256
    faiss_local, faiss_remote = layout.index_path(local, "cnn", "embedding"), layout.index_path(root, "cnn", "embedding")
    assert faiss_local.read_bytes() == faiss_remote.read_bytes()
    record = json.loads(faiss_remote.with_suffix(".json").read_bytes())
    import hashlib

    assert record["faiss_sha256"] == hashlib.sha256(faiss_remote.read_bytes()).hexdigest()
    # mined negatives: the same table from s3:// as locally
    (ta, ma), (tb, mb) = load_negatives(local, "cnn"), load_negatives(remote, "cnn")
    assert ta.equals(tb) and ma["spec"] == mb["spec"]
    assert {k: v for k, v in ma["stats"].items() if k != "seconds"} == {k: v for k, v in mb["stats"].items() if k != "seconds"}
    # query: the same hits; the index was downloaded once into the cache and reused
    hits = []
    for store in (str(local), remote, remote):
        q = runner.invoke(main, ["query", store, "--teacher", "cnn", "--row", "7", "-k", "5", "--json"])
        assert q.exit_code == 0, q.output
        hits.append([json.loads(line) for line in q.output.splitlines()])
    assert hits[0] == hits[1] == hits[2] and len(hits[0]) == 5
    cached = list((tmp_path / "cache" / "index").glob("*/cnn.embedding.faiss"))
    assert len(cached) == 1 and cached[0].read_bytes() == faiss_local.read_bytes()


def test_a_changed_remote_index_is_fetched_again_and_a_torn_one_refused(stores, tmp_path, monkeypatch):
    from kdstore.store.errors import StoreCorruptError
    from kdstore.store.index import IndexSpec
    from kdstore.store.retrieval import build_store_index, open_store_index

    _, remote = stores
    monkeypatch.setenv("KDSTORE_CACHE", str(tmp_path / "cache"))
    flat, path = build_store_index(remote, "cnn", "embedding", IndexSpec(kind="flat"), progress=False)
    assert isinstance(path, UPath) and open_store_index(remote, "cnn").spec.kind == "flat"
    hnsw, _ = build_store_index(remote, "cnn", "embedding", IndexSpec(kind="hnsw"), progress=False)
    assert open_store_index(remote, "cnn").spec.kind == "hnsw"  # a new record: not the cached flat copy
    cached = list((tmp_path / "cache" / "index").iterdir())
    assert len(cached) == 1 and (cached[0] / "cnn.embedding.faiss").is_file()  # the flat copy was removed
    assert (cached[0] / "source.txt").read_text().endswith("cnn.embedding.faiss")
    # a .faiss replaced under its record (a rebuild caught half way) is refused, not served
    other = layout.index_path(layout.root_of(remote), "cnn", "embedding")
    other.fs.pipe_file(other.path, b"not the indexed file")
    monkeypatch.setenv("KDSTORE_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(StoreCorruptError, match="sha256"):
        open_store_index(remote, "cnn")
    build_store_index(remote, "cnn", "embedding", IndexSpec(kind="flat"), progress=False)  # leave a good one


def test_an_epoch_from_s3_equals_local_with_and_without_read_ahead(stores, fmnist_shards, monkeypatch):
    from kdstore.train.dataset import StreamingDataset

    local, remote = stores
    epochs = []
    for store, depth in ((local, "0"), (remote, "0"), (remote, "2"), (remote, "1")):
        monkeypatch.setenv("KDSTORE_STORE_PREFETCH", depth)
        ds = StreamingDataset(store, fields={"cnn": ["logits", "embedding"]}, inputs=[str(p) for p in fmnist_shards],
                              shuffle=True, shuffle_buffer=16, seed=3, verify="quick")
        ds.set_epoch(1)
        epochs.append([(item["row"], item["label"], item["input"].numpy().tobytes(), item["targets"]["cnn"]["logits"].tobytes(),
                        item["targets"]["cnn"]["embedding"].tobytes()) for item in ds])
    assert len(epochs[0]) == 200 and len({r for r, *_ in epochs[0]}) == 200
    assert epochs[0] == epochs[1] == epochs[2] == epochs[3]
