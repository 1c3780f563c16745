"""Precompute's first-day failures: checks before anything is made, one-line teacher errors,
input paths that survive another working directory or a moved input folder, and the two
cluster refusals (a GPU number inside Ray actors, a cluster without a shared filesystem).

Real local Ray, real tars, real Zarr; the CLI runs in a subprocess where stderr matters.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdstore.cli.main import main
from kdstore.pipeline.job import ClusterError, PrecomputeConfig, check_shared_filesystem, run_precompute
from kdstore.pipeline.teacher import TeacherLoad
from kdstore.store import open_store
from kdstore.store.errors import InputError
from kdstore.store.inputs import input_fingerprint
from kdstore.store.verify import verify_store
from kdstore.train.config import parse_config
from kdstore.train.dataset import StreamingDataset

CNN = "kdstore.pipeline.zoo:fashion_cnn"


def cfg(store, inputs, **kw) -> PrecomputeConfig:
    teacher = kw.pop("teacher", TeacherLoad(factory=CNN, name="cnn"))
    defaults = dict(outputs=("logits",), batch_size=16, progress=False, workers=1)
    defaults.update(kw)
    return PrecomputeConfig(store=Path(store), inputs=tuple(str(s) for s in inputs), teacher=teacher, **defaults)


def _ray_sessions() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "ray", "session_2*")))


# ---- item 5: nothing is made before the teacher, outputs and inputs check out -----------------
# (first in the file: Ray must not be running in this process yet)


_NO_RAY_SCRIPT = r"""
import json, sys, time
from click.testing import CliRunner
import ray
from kdstore.cli.main import main
import kdstore.pipeline.job, kdstore.pipeline.zoo  # imports are not what is timed
out = []
for args in json.loads(sys.argv[1]):
    start = time.perf_counter()
    result = CliRunner().invoke(main, args)
    out.append({"code": result.exit_code, "output": result.output, "took": time.perf_counter() - start,
                "ray": ray.is_initialized()})
print(json.dumps(out))
"""


def test_bad_teacher_or_inputs_create_nothing_and_start_no_ray(tmp_path, make_shards):
    # In a fresh process: the test session's own Ray must not hide a Ray started by the command.
    shards = make_shards(1, 5)
    sessions = _ray_sessions()
    cases = [
        (["--teacher", "kdstore.pipeline.zooo:fashion_cnn", "-i", str(shards[0])], "cannot import 'kdstore.pipeline.zooo'"),
        (["--teacher", "kdstore.pipeline.zoo:fashion_cnnn", "-i", str(shards[0])], "has no 'fashion_cnnn'"),
        (["--teacher", CNN, "-i", str(tmp_path / "nope-000000.tar")], "nope-000000.tar: not found"),
        (["--teacher", CNN, "-i", str(tmp_path / "none-*.tar")], "no shard matches"),
        (["--teacher", CNN, "-i", str(shards[0]), "--output", "topk:x"], "--output 'topk:x' not understood"),
    ]
    argv = [["precompute", "--store", str(tmp_path / "store"), "--no-progress", *args] for args, _ in cases]
    proc = subprocess.run([sys.executable, "-c", _NO_RAY_SCRIPT, json.dumps(argv)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for (args, message), got in zip(cases, json.loads(proc.stdout.strip().splitlines()[-1])):
        assert got["code"] == 2, (args, got["output"])
        assert message in got["output"] and got["output"].startswith("error: "), got["output"]
        assert got["took"] < 3.0, (args, got["took"])  # a local Ray takes ~8 s to start
        assert not got["ray"], args
        assert not (tmp_path / "store").exists(), args
    assert _ray_sessions() == sessions


# ---- issue 11: refusals up front ---------------------------------------------------------------


def test_gpu_number_is_refused_with_the_way_to_choose_gpus(tmp_path):
    with pytest.raises(InputError, match=r"--device cuda.*CUDA_VISIBLE_DEVICES=1 kdstore precompute"):
        cfg(tmp_path / "s", ["x.tar"], teacher=TeacherLoad(factory=CNN, device="cuda:1"))
    with pytest.raises(InputError, match="--device must be cpu, cuda or mps, got 'gpu'"):
        cfg(tmp_path / "s", ["x.tar"], teacher=TeacherLoad(factory=CNN, device="gpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_a_cluster_without_gpu_is_refused_and_leaves_no_store(tmp_path, make_shards, ray_session):
    shards = make_shards(1, 5)
    with pytest.raises(ClusterError, match="the Ray cluster has no GPU"):
        run_precompute(cfg(tmp_path / "s", shards, teacher=TeacherLoad(factory=CNN, device="cuda")))
    assert not (tmp_path / "s").exists()


def test_shared_filesystem_probe_runs_on_every_node(tmp_path, make_shards, ray_session):
    shards = make_shards(1, 5)
    (tmp_path / "s").mkdir()
    check_shared_filesystem(tmp_path / "s", [str(shards[0])])  # one local node sees everything
    assert list((tmp_path / "s").iterdir()) == []  # the probe file is gone
    with pytest.raises(ClusterError, match=r"does not see the store .*gone-000000.tar does not exist there.*same path on every"):
        check_shared_filesystem(tmp_path / "s", [str(tmp_path / "gone-000000.tar")])


# ---- item 4: teacher errors are one line -------------------------------------------------------


def _write_images(path: Path, sizes: list[tuple[int, int]]) -> Path:
    import webdataset as wds

    from kdstore.pipeline.datasets import _png

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path)) as writer:
        for i, (h, w) in enumerate(sizes):
            image = rng.integers(0, 255, (h, w), dtype=np.uint8)
            writer.write({"__key__": f"img_{i:03d}", "png": _png(image), "cls": b"1"})
    return path


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([sys.executable, "-m", "kdstore.cli.main", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_mixed_sizes_and_wrong_channels_are_one_line(tmp_path):
    mixed = _write_images(tmp_path / "mixed" / "m-000000.tar", [(28, 28)] * 3 + [(32, 32)] * 2)
    _write_images(tmp_path / "mixed" / "m-000001.tar", [(28, 28)] * 3 + [(32, 32)] * 2)  # a second failing shard in flight
    common = ["--no-progress", "--workers", "1", "--batch-size", "8"]
    line = _one_line(_cli("precompute", "--store", str(tmp_path / "a"), "-i", str(tmp_path / "mixed" / "m-*.tar"),
                          "--teacher", CNN, *common))
    assert line.startswith(f"error: images in shard {mixed} have sizes 28x28 (key 'img_000') and 32x32 (key 'img_003')")
    assert "give them one size and mode with --transform" in line
    gray = _write_images(tmp_path / "gray" / "g-000000.tar", [(28, 28)] * 4)
    line = _one_line(_cli("precompute", "--store", str(tmp_path / "b"), "-i", str(gray),
                          "--teacher", "kd_test_teachers:rgb_cnn", *common))
    assert line.startswith(f"error: shard {gray} keys 'img_000'..'img_003': the teacher's forward failed "
                           "(its inputs are 1x28x28 tensors): RuntimeError:"), line
    assert "3 channels" in line
    # the embedded local Ray says nothing about token authentication
    ok = _cli("precompute", "--store", str(tmp_path / "c"), "-i", str(gray), "--teacher", CNN, *common)
    assert ok.returncode == 0, ok.stderr
    assert "Token authentication" not in ok.stderr and "Traceback" not in ok.stderr, ok.stderr


def test_factory_that_raises_is_one_line(tmp_path, make_shards, ray_session):
    shards = make_shards(1, 5)
    bad = TeacherLoad(factory=CNN, kwargs=(("width", "wide"),))
    with pytest.raises(InputError, match=r"--teacher kdstore.pipeline.zoo:fashion_cnn: building the teacher failed: ValueError: invalid literal"):
        run_precompute(cfg(tmp_path / "s", shards, teacher=bad))


# ---- item 3: input paths ---------------------------------------------------------------------


def test_store_works_from_another_directory_and_after_the_inputs_move(tmp_path, make_shards, ray_session, monkeypatch):
    make_shards(2, 8, name="work/data")
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    run_precompute(cfg("store", ["data/train-{000000..000001}.tar"]))
    doc = json.loads((work / "store" / "store.json").read_text())
    assert doc["shards"][0]["url"] == str(work / "data" / "train-000000.tar")
    assert doc["paths_relative_to"] == "store"
    # the same shards named through '..' are the same shards
    again = run_precompute(cfg("store", ["data/../data/train-{000000..000001}.tar"]))
    assert again.shards_already_done == 2
    # from another working directory: verify and training find the shards
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(main, ["verify", str(work / "store")])
    assert result.exit_code == 0 and result.output.startswith("ok:"), result.output
    ds = StreamingDataset(work / "store", shards=None, fields={"cnn": ["logits"]}, shuffle=False)
    assert sum(1 for item in ds if not item["pad"]) == 16
    # the input folder moves: the error names --inputs-root, and --inputs-root fixes it
    shutil.move(str(work / "data"), str(tmp_path / "moved"))
    result = CliRunner().invoke(main, ["verify", str(work / "store")])
    assert result.exit_code == 1 and "FAILED" in result.output
    assert (f"input shard {work / 'data' / 'train-000000.tar'} of store {work / 'store'} not found; if the input "
            f"shards moved, pass --inputs-root DIR, DIR being the folder that now holds what was in {work / 'data'}"
            ) in result.output
    result = CliRunner().invoke(main, ["verify", str(work / "store"), "--inputs-root", str(tmp_path / "moved")])
    assert result.exit_code == 0, result.output
    with pytest.raises(InputError, match=r"not found; if the input shards moved, set data.inputs_root = DIR in the config \(or kdstore train --set data.inputs_root=DIR\)"):
        StreamingDataset(work / "store", fields={"cnn": ["logits"]}, verify="off")
    config = parse_config({"data": {"store": str(work / "store")}}, [f"data.inputs_root={tmp_path / 'moved'}"])
    ds = StreamingDataset(work / "store", fields={"cnn": ["logits"]}, inputs_root=config.data.inputs_root, shuffle=False)
    assert sum(1 for item in ds if not item["pad"]) == 16


def test_old_store_with_cwd_relative_paths_and_inputs_inside_the_store(tmp_path, make_shards, ray_session, monkeypatch):
    work = tmp_path / "work"
    make_shards(1, 6, name="work/store/inputs")  # inputs inside the store folder
    monkeypatch.chdir(work)
    run_precompute(cfg("store", ["store/inputs/train-000000.tar"]))
    doc = json.loads((work / "store" / "store.json").read_text())
    assert doc["shards"][0]["url"] == "inputs/train-000000.tar"  # relative to the store
    shutil.move(str(work / "store"), str(tmp_path / "carried"))  # store and inputs move together
    assert verify_store(open_store(tmp_path / "carried")).ok
    # a store planned before absolute paths: relative to where precompute ran
    doc = json.loads((tmp_path / "carried" / "store.json").read_text())
    doc.pop("paths_relative_to")
    doc["shards"][0]["url"] = doc["input_urls"][0] = "carried/inputs/train-000000.tar"
    doc["input_fingerprint"] = input_fingerprint([doc["shards"][0]["url"]], [list(open_store(tmp_path / "carried").keys)])
    (tmp_path / "carried" / "store.json").write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path)
    assert verify_store(open_store("carried")).ok
    monkeypatch.chdir(work)
    problems = verify_store(open_store(tmp_path / "carried")).problems
    assert "pass --inputs-root DIR" in problems[0]
    assert verify_store(open_store(tmp_path / "carried"), inputs_root=str(tmp_path / "carried" / "inputs")).ok
