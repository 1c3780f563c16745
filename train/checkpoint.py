"""What a run writes in ``train.out_dir``, and checkpoint I/O.

``OUT/config.json``, ``OUT/metrics.jsonl``, ``OUT/checkpoints/step-NNNNNNNNN.pt``,
``OUT/student.pt`` (the student's ``state_dict``), ``OUT/student.json`` (how to rebuild it:
preset or factory and its args, input shape, classes; :func:`kdstore.train.load_student`)
and ``OUT/summary.json``. A non-empty ``out_dir`` is refused unless the
run resumes (the checkpoint's config must match, :data:`RESUME_MAY_CHANGE` aside) or
overwrites (the files above are deleted first; nothing else is touched).

Checkpoints hold only tensors and plain Python values (the RNG states too), so they load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdstore.store.errors import InputError

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
STUDENT_FILE = "student.pt"
SUMMARY_FILE = "summary.json"
STUDENT_RECORD_FILE = "student.json"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, STUDENT_FILE, STUDENT_RECORD_FILE, SUMMARY_FILE)
# Settings a resume may change: none of them alters the stream, the model or the schedule.
# (data.store / data.inputs may move: the input fingerprint and the keys are still checked.)
RESUME_MAY_CHANGE = (
    "train.out_dir", "train.device", "train.threads", "train.amp", "train.checkpoint_every_steps",
    "train.keep_checkpoints", "train.log_every_steps", "train.eval_every_epochs", "train.deterministic",
    "train.progress", "data.store", "data.inputs", "data.verify_inputs", "data.cache",
)


def flatten(doc: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (``teacher_args`` and ``model.args`` stay one value)."""
    flat = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("teacher_args", "args"):
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _with_defaults(doc: dict) -> dict:
    """A saved config with the settings added since it was written filled in at their defaults
    (so a checkpoint from before a new setting existed still resumes); as saved if it no longer parses."""
    from kdstore.train.config import parse_config

    try:
        return parse_config(doc).to_dict()
    except InputError:
        return doc


def config_differences(saved: dict, new: dict, allowed: tuple[str, ...] = RESUME_MAY_CHANGE) -> list[str]:
    """``["optim.lr: 0.003 → 0.01", ...]``: settings that differ, outside ``allowed`` (settings
    newer than ``saved`` count at their defaults)."""
    old, cur = flatten(_with_defaults(saved)), flatten(new)
    return [f"{k}: {old.get(k, '(unset)')!r} → {cur.get(k, '(unset)')!r}"
            for k in sorted(set(old) | set(cur)) if k not in allowed and old.get(k) != cur.get(k)]


def checkpoint_paths(out_dir: Path) -> list[Path]:
    """The checkpoints in ``out_dir``, oldest step first."""
    return sorted((Path(out_dir) / CHECKPOINT_DIR).glob("step-*.pt"))


def _ours(out_dir: Path) -> list[Path]:
    ckpt = out_dir / CHECKPOINT_DIR
    files = [out_dir / name for name in RUN_FILES if (out_dir / name).is_file()]
    if ckpt.is_dir():
        files += sorted(ckpt.glob("step-*.pt")) + sorted(ckpt.glob(".step-*.pt.tmp"))
    return files


def check_out_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds one (read-only: every rank may call it)."""
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other: continue the run in train.out_dir, or clear it")
    if resume or overwrite or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"train.out_dir {out_dir} is a file; choose a folder")
    present = sorted(p.name for p in out_dir.iterdir())
    if present:
        shown = ", ".join(present[:5]) + (", …" if len(present) > 5 else "")
        raise InputError(
            f"train.out_dir {out_dir} is not empty ({shown}): a second run there would mix with the first. "
            "Pass --resume to continue that run, --overwrite to delete what kdstore wrote there first, "
            "or choose another train.out_dir"
        )


def clear_run(out_dir: Path) -> list[Path]:
    """Delete the files a run writes (config, metrics, checkpoints, student, summary); others stay."""
    removed = _ours(out_dir)
    for path in removed:
        path.unlink(missing_ok=True)
    ckpt = out_dir / CHECKPOINT_DIR
    if ckpt.is_dir() and not any(ckpt.iterdir()):
        ckpt.rmdir()
    return removed


# --------------------------------------------------------------------------- RNG state as tensors


def rng_state(cuda: bool) -> dict:
    """torch / numpy / python / cuda RNG states as tensors and plain values (``weights_only``-safe)."""
    algo, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"algorithm": str(algo), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": None if py_gauss is None else float(py_gauss)},
        "cuda": torch.cuda.get_rng_state_all() if cuda else None,
    }


def set_rng_state(state: dict, cuda: bool) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["algorithm"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if state["cuda"] is not None and cuda:
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- files


def write_checkpoint(out_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write ``state`` atomically as ``checkpoints/step-<step>.pt``; keep the newest ``keep``."""
    path = Path(out_dir) / CHECKPOINT_DIR / f"step-{step:09d}.pt"
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # a reader (or a resume after SIGKILL) never sees half a checkpoint
    for old in checkpoint_paths(out_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's state (tensors and plain values only: ``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def save_student(out_dir: Path, model) -> None:
    """Write ``student.json`` (``model.record``: how the student was built) then ``student.pt``
    (the student's ``state_dict``) for :func:`kdstore.train.load_student`. ``model``: a ``DistillModel``."""
    from kdstore.store.atomic import write_json_atomic

    write_json_atomic(Path(out_dir) / STUDENT_RECORD_FILE, model.record)
    torch.save(model.student.state_dict(), Path(out_dir) / STUDENT_FILE)
