"""Epoch time of the streaming trainer: labels-only vs training from the store vs online KD.

All variants stream the same shards (tar read + PNG decode every epoch, no input cache),
train the same MLP student with the same batch size and DataLoader workers, and differ
only in where targets come from:

- ``labels_only``: cross-entropy, no store read;
- ``store_kd``: + KD on the stored teacher logits (one contiguous store read per shard);
- ``store_kd_views``: the same from stored augmentation views, replayed on the input;
- ``online_kd``: the teacher runs in the loop on the same (un-augmented) input;
- ``online_kd_aug``: the teacher runs in the loop on fresh augmentations.

Each variant runs one epoch per round; rounds interleave the variants. On a shared
machine the load changes between epochs, so each ratio is computed within a round (the two
epochs ran back to back) and the median over rounds is the headline; the ratio of the
best-of-rounds epochs is reported too. Ratios: ``store_kd / labels_only`` (goal <= 1.1)
and ``online_kd / store_kd``.

    python benchmarks/train.py --store STORE --teacher-weights cnn.pt [--shards 0..9] [--rounds 3]
Prints a table and writes benchmarks/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from kdstore.store import open_store
from kdstore.train.config import parse_config
from kdstore.train.recipe import Recipe


def variants(store: str, weights: str) -> dict[str, tuple[list[dict], dict | None]]:
    spec = open_store(store).teacher("cnn").spec
    views = open_store(store).teacher("cnnv").spec
    online = {"enabled": True, "teacher": "cnn", "factory": spec.factory, "teacher_args": {"weights": weights}}
    kd = [{"kind": "ce"}, {"kind": "kd", "teacher": "cnn", "temperature": 2.0}]
    return {
        "labels_only": ([{"kind": "ce"}], None),
        "store_kd": (kd, None),
        "store_kd_views": ([{"kind": "ce"}, {"kind": "kd", "teacher": "cnnv", "temperature": 2.0}], None),
        "online_kd": (kd, online),
        "online_kd_aug": (kd, {**online, "augment": views.augment}),
    }


def epoch_seconds(args: argparse.Namespace, losses: list[dict], online: dict | None, out: Path) -> dict:
    doc = {
        "data": {"store": args.store, "train_shards": args.shards, "batch_size": args.batch_size, "workers": args.workers,
                 "verify_inputs": "quick", "cache": False},
        "model": {"arch": args.arch},
        "train": {"out_dir": str(out), "epochs": 1, "threads": args.threads, "checkpoint_every_steps": 0,
                  "eval_every_epochs": 0, "log_every_steps": 10_000, "progress": False},
        "loss": losses,
    }
    if online:
        doc["online"] = online
    recipe = Recipe(parse_config(doc))
    try:
        recipe.setup(overwrite=True)  # every round reuses the folder of its run
        result = recipe.train()
    finally:
        recipe.cleanup()
    return {"seconds": result.seconds, "samples_per_s": result.samples_per_s, "steps": result.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--teacher-weights", required=True, help="weights of the stored teacher (for online KD)")
    parser.add_argument("--shards", nargs="+", default=["train-"], help="train shard selectors (default: all train-)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arch", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--only", nargs="+", default=None, help="run only these variants")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = variants(args.store, args.teacher_weights)
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only}
    tmp = Path(tempfile.mkdtemp(prefix="kdbench-"))
    times: dict[str, list[dict]] = {name: [] for name in runs}
    try:
        for r in range(args.rounds):
            for name, (losses, online) in runs.items():
                times[name].append(epoch_seconds(args, losses, online, tmp / name))
                print(f"round {r} {name:16s} {times[name][-1]['seconds']:7.1f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = {name: min(t, key=lambda x: x["seconds"]) for name, t in times.items()}
    ratios, per_round, of_best = {}, {}, {}
    for a, b in (("store_kd", "labels_only"), ("store_kd_views", "labels_only"), ("online_kd", "store_kd"),
                 ("online_kd_aug", "store_kd_views")):
        if a in best and b in best:
            name = f"{a} / {b}"
            per_round[name] = [x["seconds"] / y["seconds"] for x, y in zip(times[a], times[b])]
            ratios[name] = float(np.median(per_round[name]))
            of_best[name] = best[a]["seconds"] / best[b]["seconds"]
    doc = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_avg_at_end": os.getloadavg()},
        "epoch_seconds": {name: [t["seconds"] for t in ts] for name, ts in times.items()},
        "best": best,
        "ratios": ratios,
        "ratios_per_round": per_round,
        "ratios_of_best_epochs": of_best,
        "goal": {"store_kd / labels_only": "<= 1.1"},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"one epoch, {best[next(iter(best))]['steps']} steps of {args.batch_size}, best of {args.rounds}")
    for col in ("variant", "epoch s", "samples/s"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, t in best.items():
        table.add_row(name, f"{t['seconds']:.1f}", f"{t['samples_per_s']:,.0f}")
    Console().print(table)
    print(f"{'ratio':36s} {'median of rounds':>16s} {'of best epochs':>15s}  per round")
    for name, value in ratios.items():
        rounds = " ".join(f"{r:.3f}" for r in per_round[name])
        print(f"{name:36s} {value:16.3f} {of_best[name]:15.3f}  {rounds}")


if __name__ == "__main__":
    main()
