"""Epoch time of the trainer with the store on S3 (moto's server on loopback) vs the same store on local disk.

One store is precomputed locally (Fashion-MNIST shards, the zoo CNN at seed 0: logits and a
64-d embedding), then copied object by object to ``s3://BUCKET/store`` on a moto server run
as its own process (``python -m moto.server`` on 127.0.0.1, so serving requests takes no time
from the trainer's process). The same config (MLP student, KD on the stored logits, input
tars on local disk for both, one DataLoader worker) trains one epoch from each store.
Rounds alternate the order (local, s3 / s3, local); each round's ratio ``s3 / local`` compares
two epochs run back to back, and the median over rounds is the headline (goal <= 1.2),
with the spread (min..max) and the best-epoch ratio beside it.

    python benchmarks/s3_train.py [--shards 8] [--per-shard 1000] [--rounds 4] [--work /tmp/kds3]

Prints a table and writes benchmarks/results/s3_train.json. ``KDSTORE_STORE_PREFETCH`` (shards read ahead by the
trainer's dataset, default 2; 0 = none) is recorded, so a run with 0 gives the figure without read-ahead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    import boto3

    deadline = time.monotonic() + 60
    while True:
        try:
            boto3.client("s3").create_bucket(Bucket="bench")
            return proc, endpoint
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.3)


def build_store(work: Path, shards: int, per_shard: int) -> tuple[Path, list[Path]]:
    """Local Fashion-MNIST shards and a store precomputed from them (reused when ``work`` has them)."""
    from kdstore.pipeline.datasets import _png, load_fashion_mnist, write_shards
    from kdstore.pipeline.job import PrecomputeConfig, run_precompute
    from kdstore.pipeline.teacher import TeacherLoad
    from kdstore.store import open_store

    tars = sorted((work / "shards").glob("train-*.tar"))
    if len(tars) != shards:
        shutil.rmtree(work / "shards", ignore_errors=True)
        images, labels = load_fashion_mnist("train")
        n = shards * per_shard
        samples = ({"__key__": f"train_{i:05d}", "png": _png(images[i]), "cls": str(int(labels[i])).encode()}
                   for i in range(n))
        tars = write_shards(samples, work / "shards", "train", per_shard, n, progress=False)
    store = work / "store"
    try:
        complete = open_store(store).teacher("cnn").complete and open_store(store).num_rows == shards * per_shard
    except Exception:  # noqa: BLE001  no store yet
        complete = False
    if not complete:
        shutil.rmtree(store, ignore_errors=True)
        run_precompute(PrecomputeConfig(
            store=store, inputs=tuple(str(t) for t in tars), progress=False, batch_size=250, workers=1,
            teacher=TeacherLoad(factory="kdstore.pipeline.zoo:fashion_cnn", name="cnn", layers=("embed",)),
            outputs=("logits", "embedding:embed:l2")))
    return store, tars


def upload(store: Path, url: str) -> None:
    from upath import UPath

    target = UPath(url)
    for path in sorted(store.rglob("*")):
        if path.is_file() and path.name not in (".lock", ".readers.lock"):
            target.fs.put_file(str(path), f"{target.path}/{path.relative_to(store)}")


def epoch_seconds(store: str, args: argparse.Namespace, out: Path) -> dict:
    from kdstore.train.config import parse_config
    from kdstore.train.recipe import Recipe

    doc = {
        "data": {"store": store, "train_shards": ["train-"], "batch_size": args.batch_size, "workers": args.workers,
                 "verify_inputs": "quick", "cache": False},
        "model": {"arch": "mlp"},
        "train": {"out_dir": str(out), "epochs": 1, "threads": 1, "checkpoint_every_steps": 0,
                  "eval_every_epochs": 0, "log_every_steps": 10_000, "progress": False},
        "loss": [{"kind": "ce"}, {"kind": "kd", "teacher": "cnn", "temperature": 2.0}],
    }
    recipe = Recipe(parse_config(doc))
    try:
        recipe.setup(overwrite=True)
        result = recipe.train()
    finally:
        recipe.cleanup()
    return {"seconds": result.seconds, "steps": result.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--work", default=None, help="folder for the shards and the local store (kept; default: a temp folder)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "s3_train.json"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kds3-"))
    work.mkdir(parents=True, exist_ok=True)
    store, _ = build_store(work, args.shards, args.per_shard)
    moto, endpoint = start_moto()
    tmp = Path(tempfile.mkdtemp(prefix="kds3run-"))
    times: dict[str, list[float]] = {"local": [], "s3": []}
    try:
        url = "s3://bench/store"
        upload(store, url)
        where = {"local": str(store), "s3": url}
        for r in range(args.rounds):
            order = ("local", "s3") if r % 2 == 0 else ("s3", "local")
            for name in order:
                t = epoch_seconds(where[name], args, tmp / name)
                times[name].append(t["seconds"])
                steps = t["steps"]
                print(f"round {r} {name:6s} {t['seconds']:7.2f} s", flush=True)
    finally:
        moto.terminate()
        moto.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    per_round = [s / loc for s, loc in zip(times["s3"], times["local"])]
    doc = {
        "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "rows": args.shards * args.per_shard,
                     "steps": steps, "store_prefetch": int(os.environ.get("KDSTORE_STORE_PREFETCH", "2")),
                     "server": "moto.server subprocess on 127.0.0.1", "inputs": "local tars (both)"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_avg_at_end": os.getloadavg()},
        "epoch_seconds": times,
        "ratio_s3_over_local_per_round": per_round,
        "ratio_median": float(np.median(per_round)),
        "ratio_spread": [min(per_round), max(per_round)],
        "ratio_of_best_epochs": min(times["s3"]) / min(times["local"]),
        "goal": "s3 / local <= 1.2",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"\none epoch, {steps} steps of {args.batch_size}, {args.rounds} rounds (load {os.getloadavg()[0]:.1f})")
    print(f"{'store':8s} {'best s':>8s} {'median s':>9s}")
    for name, ts in times.items():
        print(f"{name:8s} {min(ts):8.2f} {float(np.median(ts)):9.2f}")
    print(f"s3 / local: median {doc['ratio_median']:.3f} (spread {min(per_round):.3f}..{max(per_round):.3f}), "
          f"of best epochs {doc['ratio_of_best_epochs']:.3f}; per round " + " ".join(f"{x:.3f}" for x in per_round))


if __name__ == "__main__":
    main()
