"""The few-labels demo that ``kdstore quickstart`` runs after precompute: labels-only vs
distilled students on a Fashion-MNIST store, each finished run reused when rerun unchanged."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdstore.store.reader import open_store
from kdstore.store.schema import write_json_atomic

DEMO_FILE = "demo.json"  # in each student's out_dir: what the run was, for reuse


def _run_doc(store_path, inputs, labels, workdir, name, seed, epochs, losses, progress) -> dict:
    return {
        "data": {"store": str(store_path), "train_shards": ["train-"], "eval_shards": ["test-"], "inputs": inputs,
                 "labels": labels, "batch_size": 256, "cache": True, "verify_inputs": "quick"},
        "model": {"arch": "mlp", "hidden": 32},
        "train": {"out_dir": str(Path(workdir) / f"{name}-seed{seed}"), "epochs": epochs, "seed": seed,
                  "threads": 1, "checkpoint_every_steps": 0, "eval_every_epochs": 0, "progress": progress},
        "loss": losses,
    }


def _identity(doc: dict, store) -> dict:
    """What decides a run's result: its config (less display/check settings), the store's
    inputs and the fingerprints of the teachers it reads."""
    data = {k: v for k, v in doc["data"].items() if k not in ("verify_inputs", "cache", "inputs")}
    train = {k: v for k, v in doc["train"].items() if k not in ("progress", "out_dir")}
    teachers = sorted({t["teacher"] for t in doc["loss"] if "teacher" in t})
    return {"data": data, "model": doc["model"], "train": train, "loss": doc["loss"],
            "input_fingerprint": store.manifest.input_fingerprint,
            "teachers": {t: store.teacher(t).spec.fingerprint for t in teachers}}


def _finished(out_dir: Path, identity: dict) -> dict | None:
    """The stored result of a finished run with this identity, else None."""
    path = out_dir / DEMO_FILE
    if not path.is_file() or not (out_dir / "summary.json").is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return doc.get("result") if doc.get("identity") == identity else None


def few_labels_demo(
    store_path: str | Path,
    shards_dir: str | Path | None = None,
    teacher: str = "cnn",
    seeds: Sequence[int] = (0,),
    *,
    workdir: str | Path = "runs/few_labels",
    epochs: int = 10,
    temperature: float = 1.0,
    alpha: float = 0.9,
    labels: str = "per_class:100",
    progress: bool = False,
    echo: Callable[[str], Any] = print,
) -> dict:
    """The few-labels result on a Fashion-MNIST store: labels-only vs distilled test accuracy.

    Both students (MLP 784-32-10) stream the same training rows (shards ``train-*``) in the
    same order with the same optimiser, steps and cosine schedule; the labels-only one
    learns from the ``labels`` subset alone (CE; every other row has label -1), the
    distilled one adds KD from the stored logits of ``teacher`` on every row (weights
    ``1 - alpha`` and ``alpha``; ``alpha = 0`` is no distillation; ``temperature`` and
    ``alpha`` are the values chosen on a validation split, docs/TRAINING.md). Decoded
    inputs are cached in memory and shared by the runs; ``shards_dir`` relocates the input
    shards (matched by file name). A run whose ``WORKDIR/NAME-seedS/demo.json`` records the
    same config, store inputs and teacher fingerprint is reused, not retrained.

    Returns ``{"labels_only": [acc per seed], "distilled": [...], "labels_only_mean",
    "distilled_mean", "gain_points", "steps", "reused": [run names], "seconds"}``.
    """
    from kdstore.train.config import parse_config
    from kdstore.train.dataset import InputCache
    from kdstore.train.recipe import run

    store = open_store(store_path)
    cache = InputCache()
    inputs = [str(Path(shards_dir) / "*.tar")] if shards_dir else []
    result: dict[str, Any] = {"labels_only": [], "distilled": [], "teacher": teacher, "reused": [], "labels": labels,
                              "epochs": epochs, "temperature": temperature, "alpha": alpha, "seeds": list(seeds)}
    runs = (("labels_only", [{"kind": "ce"}]),
            ("distilled", [{"kind": "ce", "weight": 1.0 - alpha},
                           {"kind": "kd", "teacher": teacher, "temperature": temperature, "weight": alpha}]))
    first = True
    start_all = time.perf_counter()
    for seed in seeds:
        for name, losses in runs:
            doc = _run_doc(store_path, inputs, labels, workdir, name, seed, epochs, losses, progress)
            out_dir = Path(doc["train"]["out_dir"])
            identity = _identity(doc, store)
            label = f"seed {seed} {name.replace('_', '-'):12s}"
            done = _finished(out_dir, identity)
            if done is not None:
                result[name].append(done["accuracy"])
                result["steps"] = done["steps"]
                result["reused"].append(out_dir.name)
                echo(f"    {label} test accuracy {done['accuracy']:.4f}  (reused {out_dir})")
                continue
            if first:  # the first run that trains checks every input key once
                doc["data"]["verify_inputs"] = "full"
                first = False
            echo(f"    {label} training {epochs} epochs ...")
            start = time.perf_counter()
            res = run(parse_config(doc), cache=cache, overwrite=True)  # not reusable: this run starts over
            acc = res.eval["accuracy"]
            result[name].append(acc)
            result["steps"] = res.steps
            write_json_atomic(out_dir / DEMO_FILE, {"identity": identity,
                                                   "result": {"accuracy": acc, "steps": res.steps, "eval": res.eval}})
            echo(f"    {label} test accuracy {acc:.4f}  ({time.perf_counter() - start:.0f}s, {res.steps} steps)")
    lo, kd = float(np.mean(result["labels_only"])), float(np.mean(result["distilled"]))
    result.update(labels_only_mean=lo, distilled_mean=kd, gain_points=100 * (kd - lo),
                  seconds=time.perf_counter() - start_all)
    echo(f"    {labels} labels: labels-only {lo:.4f} -> distilled from the store {kd:.4f} ({100 * (kd - lo):+.1f} points)")
    return result
