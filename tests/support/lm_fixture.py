"""A tiny GPT teacher, its token shards and a precomputed store, through the real CLI (shared by tests/test_lm_*.py)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from kdstore.cli.main import main

TINY = ["--steps", "4", "--batch-size", "4", "--context", "32", "--depth", "1", "--width", "32", "--heads", "2",
        "--vocab-size", "512", "--limit", "60"]
FACTORY = "kdstore.pipeline.lm_teacher:gpt"


def build_lm(root: Path, *, shards: int = 3) -> tuple[Path, list[Path]]:
    """``(teacher folder, held-out token shards)``: 24-token samples, 7 per shard."""
    teacher = root / "teacher"
    result = CliRunner().invoke(main, ["lm-teacher", str(teacher), *TINY])
    assert result.exit_code == 0, result.output
    out = root / "shards"
    result = CliRunner().invoke(main, ["lm-shards", str(out), "--tokenizer", str(teacher / "tokenizer.json"),
                                       "--seq-len", "24", "--samples-per-shard", "7", "--limit", "6",
                                       "--split", "heldout"])
    assert result.exit_code == 0, result.output
    tars = sorted(out.glob("heldout-*.tar"))
    assert len(tars) >= shards
    return teacher, tars[:shards]


def precompute(store: Path, teacher: Path, tars, outputs, *, temperature: float, seed: int = 0) -> None:
    args = ["precompute", "--store", str(store), "--teacher", FACTORY, "--teacher-arg", f"path={teacher}",
            "--teacher-name", "gpt", "--temperature", str(temperature), "--seed", str(seed), "--batch-size", "3",
            "--workers", "1", "--no-progress"]
    for o in outputs:
        args += ["--output", o]
    for t in tars:
        args += ["--inputs", str(t)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
