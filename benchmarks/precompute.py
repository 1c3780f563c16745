"""Precompute throughput: kdstore (Ray, store, checksums) vs a plain single-process loop.

Both sides read the same WebDataset shards, decode the same PNGs and run the same teacher
with the same batch size; the plain loop writes one ``.npy`` of logits per shard. kdstore's
time is end to end (Ray start, row planning, actors, Zarr writes, done records).

    python benchmarks/precompute.py                # full Fashion-MNIST, 70k images
    python benchmarks/precompute.py --limit-shards 4
Prints a table and writes benchmarks/results/precompute.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def plain_loop(urls: list[str], weights: str | None, batch_size: int, out: Path) -> float:
    """read tar → decode → teacher → write numpy, no framework; returns seconds."""
    from kdstore.pipeline.zoo import fashion_cnn

    start = time.perf_counter()
    model = fashion_cnn(weights=weights)
    out.mkdir(parents=True, exist_ok=True)
    for i, url in enumerate(urls):
        images, logits = [], []
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    img = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())), dtype=np.uint8)
                    images.append(torch.from_numpy(img.copy()).float().div_(255)[None])
                    if len(images) == batch_size:
                        with torch.inference_mode():
                            logits.append(model(torch.stack(images)).numpy().astype(np.float16))
                        images = []
        if images:
            with torch.inference_mode():
                logits.append(model(torch.stack(images)).numpy().astype(np.float16))
        np.save(out / f"{i:06d}.npy", np.concatenate(logits))
    return time.perf_counter() - start


def kdstore_run(urls: list[str], weights: str | None, batch_size: int, store: Path, workers: int, outputs) -> tuple[float, dict]:
    from kdstore.pipeline.job import PrecomputeConfig, run_precompute
    from kdstore.pipeline.teacher import TeacherLoad
    from kdstore.store import open_store
    from kdstore.store.verify import summarize

    kwargs = (("weights", weights),) if weights else ()
    cfg = PrecomputeConfig(
        store=store, inputs=tuple(urls), outputs=tuple(outputs), batch_size=batch_size, workers=workers,
        teacher=TeacherLoad(factory="kdstore.pipeline.zoo:fashion_cnn", name="cnn", kwargs=kwargs, layers=("embed",)),
        progress=False,
    )
    start = time.perf_counter()
    run_precompute(cfg)
    seconds = time.perf_counter() - start
    return seconds, summarize(open_store(store))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("KDSTORE_CACHE", "~/.cache/kdstore")).expanduser() / "fmnist-shards")
    parser.add_argument("--weights", default=None, help="teacher weights (default: seed-0 init; same compute)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit-shards", type=int, default=0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "precompute.json")
    args = parser.parse_args()

    from kdstore.pipeline.datasets import fashion_mnist_shards

    if not (args.data / "test-000004.tar").exists():
        fashion_mnist_shards(args.data, shard_size=2000)
    urls = sorted(str(p) for p in args.data.glob("*.tar"))
    if args.limit_shards:
        urls = urls[: args.limit_shards]
    rows = []
    work = Path(tempfile.mkdtemp(prefix="kdbench-"))
    try:
        plain_s = plain_loop(urls, args.weights, args.batch_size, work / "plain")
        n = sum(np.load(p).shape[0] for p in (work / "plain").glob("*.npy"))
        rows.append({"run": "plain loop (1 process, logits .npy)", "seconds": plain_s, "samples_per_s": n / plain_s, "ratio": 1.0})
        summary = None
        runs = [(w, ["logits"], "logits") for w in args.workers]
        runs.append((max(args.workers), ["logits", "topk:5", "embedding:embed", "scores"], "logits+topk5+embed+scores"))
        for workers, outputs, label in runs:
            store = work / f"store-{workers}-{len(outputs)}"
            seconds, summ = kdstore_run(urls, args.weights, args.batch_size, store, workers, outputs)
            summary = summ if len(outputs) > 1 else summary
            rows.append({"run": f"kdstore precompute, {workers} worker(s), {label}", "seconds": seconds,
                         "samples_per_s": n / seconds, "ratio": plain_s / seconds})
            shutil.rmtree(store)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fields = summary["teachers"][0]["fields"] if summary else []
    print(f"\n{n} samples, {len(urls)} shards, batch {args.batch_size}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"{'run':55s} {'seconds':>8s} {'samples/s':>10s} {'÷ plain':>8s}")
    for r in rows:
        print(f"{r['run']:55s} {r['seconds']:8.1f} {r['samples_per_s']:10.0f} {r['ratio']:8.2f}")
    print(f"\n{'field':20s} {'shape':>10s} {'dtype':>8s} {'bytes/sample':>13s}")
    for f in fields:
        print(f"{f['field']:20s} {str(f['shape']):>10s} {f['dtype']:>8s} {f['bytes_per_sample']:13.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"samples": n, "shards": len(urls), "cpus": os.cpu_count(), "runs": rows, "fields": fields}, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
