"""``benchmarks/gpu_check.sh``: refuses cleanly without CUDA; its steps run end to end on the CPU.

The GPU run itself needs a CUDA machine (docs/GPU.md); here the same script runs with
``--cpu-dry-run`` (CPU against CPU: real shards, two real precomputes, FAISS index, mining
through the CLI, training with a contrastive term through the CLI) and every check passes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _env():
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the refusal path does not apply")
def test_without_cuda_it_says_so_and_exits_2():
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 2
    assert "torch.cuda.is_available() is False" in out.stderr and "--cpu-dry-run" in out.stderr


def test_unknown_argument_is_refused():
    out = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 2 and "unknown argument --fast" in out.stderr


@pytest.mark.slow  # two real precomputes (Ray) and a training run: minutes on 2 shared cores
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_cpu_dry_run_passes_every_check():
    import tempfile

    # A short TMPDIR: Ray puts its AF_UNIX sockets under it, and those paths must stay under 108 bytes.
    short = tempfile.mkdtemp(prefix="kdg-", dir="/tmp")
    try:
        out = subprocess.run(["bash", str(SCRIPT), "--cpu-dry-run"], capture_output=True, text=True,
                             env=dict(_env(), TMPDIR=short), timeout=1500)
        left = list(Path(short).glob("kdstore-gpucheck-*"))
    finally:
        shutil.rmtree(short, ignore_errors=True)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    for check in ("stored logits", "faiss index", "mined negatives", "training loss t_dev"):
        assert f"PASS {check}" in text, text[-4000:]
    assert "FAIL" not in text
    assert "all checks passed (cpu)" in text
    assert not left, "the work dir is removed"
