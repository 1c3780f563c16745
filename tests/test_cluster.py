"""A two-node Ray cluster on this machine, a store and inputs on S3 (moto on loopback), a node killed mid-job.

Two ``ray start --block`` processes (a head and a second node, each with its own temp
directory and one CPU) form the cluster; ``kdstore precompute --ray-address`` runs as its
own process with ``--workers 2 --cpus-per-worker 1`` (one worker per node). Nothing is
shared between the nodes but S3. Once the second node's worker has finished a shard and
started the next, every process of that node (its ``ray start``, raylet and workers, found
as the descendants of the ``ray start`` process we started) gets SIGKILL. The job must
finish on the head, the store must equal an uninterrupted run byte for byte, and only the
shard that was running on the lost node is computed twice (the teacher logs each forward's
start; one forward per shard).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from kdstore.store import open_store
from kdstore.store.verify import verify_store
from upath import UPath

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds a node's processes in /proc")

SHARDS = 8
TEACHER = "kd_test_teachers:attempt_logging_teacher"


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class RayNode:
    """One ``ray start --block`` process we started; :meth:`kill` SIGKILLs it and everything under it."""

    def __init__(self, args: list[str], env: dict) -> None:
        self.temp = tempfile.mkdtemp(prefix="kdc", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
        self.log = Path(self.temp) / "ray-start.log"
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus=1", "--temp-dir", self.temp,
               "--disable-usage-stats", *args]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def pids(self) -> list[int]:
        return [self.proc.pid, *_descendants(self.proc.pid)]

    def kill(self) -> None:
        for _ in range(3):  # a worker forked meanwhile is caught on the next pass
            for pid in reversed(self.pids()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        self.proc.wait()

    def wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log.read_text():
                return
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.2)
        raise AssertionError(f"ray start did not come up in {timeout}s: {self.log.read_text()[-3000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(s3):
    """``(address, head, second, env)``: a head and a second node, one CPU each, sharing only S3."""
    from ray._private.services import get_node_ip_address

    # Ray 2.60 starts a head with token authentication; every node and the driver carry the same token.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0",
           # the head declares a silent node dead after ~3 s instead of ~15-25 s (Ray's defaults)
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3"}
    address = f"{get_node_ip_address()}:{_free_port()}"
    nodes = [RayNode(["--head", f"--port={address.rsplit(':', 1)[1]}", "--include-dashboard=false"], env)]
    started = time.monotonic()
    try:
        nodes[0].wait_started(90)
        nodes.append(RayNode([f"--address={address}"], env))
        nodes[1].wait_started(90)
        print(f"\ncluster up in {time.monotonic() - started:.1f}s")
        yield address, nodes[0], nodes[1], env
    finally:
        for node in reversed(nodes):
            node.kill()
        import shutil

        for node in nodes:
            shutil.rmtree(node.temp, ignore_errors=True)


def _precompute(address: str, env: dict, store: str, inputs: str, marker: Path, *, delay_s: float, workers: int):
    cmd = [sys.executable, "-m", "kdstore.cli.main", "precompute", "--ray-address", address, "--store", store,
           "--inputs", inputs, "--teacher", TEACHER, "--teacher-name", "cnn", "--teacher-arg", f"delay_s={delay_s}",
           "--teacher-arg", f"marker={marker}", "--output", "logits", "--output", "topk:3", "--batch-size", "20",
           "--workers", str(workers), "--cpus-per-worker", "1", "--no-progress"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _attempts(marker: Path) -> list[tuple[int, str]]:
    if not marker.exists():
        return []
    return [(int(p), h) for p, h in (line.split() for line in marker.read_text().splitlines() if line.strip())]


def test_a_killed_node_loses_only_its_running_shard(cluster, s3, make_shards, tmp_path):
    address, _head, second, env = cluster
    t0 = time.monotonic()
    for path in make_shards(SHARDS, 20):
        target = UPath(s3.url("cluster", "inputs", path.name))
        target.fs.put_file(str(path), target.path)
    inputs = s3.url("cluster", "inputs", f"train-{{000000..{SHARDS - 1:06d}}}.tar")
    store, marker = s3.url("cluster", "killed"), tmp_path / "attempts.log"
    start = time.monotonic()
    job = _precompute(address, env, store, inputs, marker, delay_s=1.5, workers=2)
    # Kill the second node once its worker has finished a shard and started the next one.
    killed_running = None
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and job.poll() is None:
        node_pids = set(second.pids())
        on_second = [h for p, h in _attempts(marker) if p in node_pids]
        if len(on_second) >= 2:
            second.kill()
            killed_running, finished_there = on_second[-1], on_second[:-1]
            break
        time.sleep(0.1)
    assert killed_running is not None, f"the second node never ran two shards: {job.communicate()[0][-3000:]}"
    killed_at = time.monotonic() - start
    output, _ = job.communicate(timeout=180)
    seconds = time.monotonic() - start
    assert job.returncode == 0, output[-3000:]
    assert "worker(s) lost" in output, output
    attempts = Counter(h for _, h in _attempts(marker))
    assert len(attempts) == SHARDS  # every shard ran
    assert [h for h, n in attempts.items() if n > 1] == [killed_running]  # only the lost one ran again
    assert attempts[killed_running] == 2 and all(attempts[h] == 1 for h in finished_there)
    assert sum(attempts.values()) == SHARDS + 1
    print(f"\ntwo-node job: uploads {start - t0:.1f}s; second node killed at {killed_at:.1f}s, job done at "
          f"{seconds:.1f}s; {sum(attempts.values())} shard attempts for {SHARDS} shards")

    # The same job, uninterrupted, on the remaining node: byte-equal arrays and done records.
    reference = s3.url("cluster", "reference")
    ref_job = _precompute(address, env, reference, inputs, tmp_path / "ref.log", delay_s=0.0, workers=1)
    ref_output, _ = ref_job.communicate(timeout=180)
    assert ref_job.returncode == 0, ref_output[-3000:]
    print(f"reference job done at {time.monotonic() - start:.1f}s")
    a, b = open_store(store).teacher("cnn"), open_store(reference).teacher("cnn")
    assert a.complete and b.complete and set(a.fields) == set(b.fields)
    for name in a.fields:
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name
    assert {i: r.fields for i, r in a.done_records().items()} == {i: r.fields for i, r in b.done_records().items()}
    assert verify_store(open_store(store), check_inputs=False).ok
    np.testing.assert_array_equal(open_store(store).labels, open_store(reference).labels)


@pytest.mark.parametrize(("kw", "match"), [
    ({"cpus_per_worker": 0}, "--cpus-per-worker must be > 0"),
    ({"gpus_per_worker": -1}, "--gpus-per-worker must be >= 0"),
    ({"gpus_per_worker": 1}, "add --device cuda"),
    ({"gpus_per_worker": 0, "device": "cuda"}, "give a fraction such as 0.5"),
])
def test_worker_resources_are_checked_before_anything_runs(kw, match):
    from kdstore.pipeline.job import PrecomputeConfig
    from kdstore.pipeline.teacher import TeacherLoad
    from kdstore.store.errors import InputError

    device = kw.pop("device", "cpu")
    with pytest.raises(InputError, match=match):
        PrecomputeConfig(store="s", inputs=("a.tar",), teacher=TeacherLoad(factory="m:f", device=device), **kw)


def test_a_shard_whose_worker_keeps_dying_stops_the_job_with_one_line():
    from kdstore.pipeline.actor_pool import MAX_SHARD_LOSSES, WorkerLostError, shard_lost

    losses: dict[int, int] = {}
    for _ in range(MAX_SHARD_LOSSES - 1):
        shard_lost(losses, 4, "s3://b/train-000004.tar")
    with pytest.raises(WorkerLostError, match=r"shard s3://b/train-000004.tar: its Ray worker died 3 times"):
        shard_lost(losses, 4, "s3://b/train-000004.tar")
