"""SIGKILL the precompute process part-way; the rerun completes without redoing finished shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kdstore.store import open_store
from kdstore.store.verify import verify_store


def _cmd(store: Path, shards: list[Path], marker: Path, delay_s: float) -> list[str]:
    return [
        sys.executable, "-m", "kdstore.cli.main", "precompute", "--store", str(store),
        "--inputs", str(shards[0].parent / "train-{000000..000005}.tar"),
        "--teacher", "kd_test_teachers:slow_teacher", "--teacher-name", "cnn",
        "--teacher-arg", f"delay_s={delay_s}", "--teacher-arg", f"marker={marker}",
        "--output", "logits", "--output", "topk:3", "--batch-size", "10", "--no-progress",
    ]


def _forward_rows(marker: Path) -> int:
    return sum(int(line.split()[1]) for line in marker.read_text().splitlines()) if marker.exists() else 0


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, make_shards):
    shards = make_shards(6, 20)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    store, marker = tmp_path / "killed", tmp_path / "killed.log"
    proc = subprocess.Popen(_cmd(store, shards, marker, 0.25), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_dir = store / "teachers/cnn/done"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if done_dir.is_dir() and len(list(done_dir.glob("*.json"))) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"precompute ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group we started: driver and its Ray
    proc.wait()
    # Ray puts actor workers in process groups of their own: a shard already in flight may
    # still land (atomically) before they notice the dead raylet and exit. Wait for quiet.
    count, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < 3:
        now = len(list(done_dir.glob("*.json")))
        if now != count:
            count, quiet_since = now, time.monotonic()
        time.sleep(0.2)
    finished = {p.name: p.read_bytes() for p in done_dir.glob("*.json")}
    assert 2 <= len(finished) < 6
    rows_before = _forward_rows(marker)

    rerun = subprocess.run(_cmd(store, shards, marker, 0.0), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(finished)} already done" in rerun.stdout
    # finished shards were not recomputed: their done records are untouched, and the rerun
    # ran the teacher over the unfinished shards' rows only
    for name, data in finished.items():
        assert (done_dir / name).read_bytes() == data
    assert _forward_rows(marker) - rows_before == 20 * (6 - len(finished))
    assert not list((store / "teachers/cnn/shards").glob(".tmp-*"))

    clean = tmp_path / "clean"
    full = subprocess.run(_cmd(clean, shards, tmp_path / "clean.log", 0.0), env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    a, b = open_store(store), open_store(clean)
    assert list(a.keys) == list(b.keys)
    for field in ("logits", "topk/values", "topk/indices", "topk/residual", "_valid"):
        np.testing.assert_array_equal(a.teacher("cnn").read(field), b.teacher("cnn").read(field))
    assert verify_store(a).ok
