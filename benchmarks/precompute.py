"""Precompute: kdstore (``kdstore precompute``, Ray actors) vs a plain PyTorch DataLoader loop.

Every side is a fresh process started by this script (so imports count), reads the same
WebDataset tars, decodes the same PNGs (``kdstore.pipeline.decode.decode_image``), runs the
same teacher at the same batch size and writes float16 logits per shard (kdstore: its Zarr
store and done records; the loops: one ``.npy`` per shard).

- ``dataloader``: ``torch.utils.data.DataLoader`` over an ``IterableDataset`` that gives each
  worker whole shards; as many worker processes as kdstore has actors; the teacher runs in
  the main process (all torch threads).
- ``plain``: the same loop in one process (no workers).
- ``kdstore``: ``kdstore precompute --workers W`` (W actors, each decodes and runs the teacher).
- ``kdstore-serial`` (``--sides``): the same with ``KDSTORE_PREFETCH=0``: no reader thread in the actors.

Teachers: the zoo CNN (``kdstore teacher fashion-mnist``) and a linear layer (start-up
dominates). Both are wrapped (``bench_teachers.py``) to log the time of each forward, which
gives, for every run: ``startup_s`` = command start → first teacher batch; ``first_shard_s``
= command start → first shard stored; ``steady_sps`` = samples/s between the first and the
last teacher batch; ``tail_s`` = last batch → process exit (last write, shutdown).
``limit``: the teacher's forward alone on pre-decoded tensors (1 thread, and all threads).

Sides alternate within each repeat (``--repeats``, default 3); median and min are reported.

    python benchmarks/precompute.py --data DIR --weights teacher.pt [--shards 10] [--repeats 3]
    python benchmarks/precompute.py --data DIR --investigate      # start-up breakdown only
Prints a table and writes benchmarks/results/precompute.json.

One read of the inputs (``--one-read --before-ref REF``): this tree's ``kdstore precompute``
(``kdstore``) against the kdstore of git commit REF (``kdstore-before``: ``git archive`` of it,
run through PYTHONPATH), sides alternating, fresh commands, same teacher and shards. Reports
``first_shard_s`` (command start → first done record) and input bytes read ÷ input size:
workers' bytes from the done records (``extra.input_bytes``, counted on the shard stream)
plus the driver's, counted here on the same stream by running each version's planning step
in this process (this tree: ``plan_store``; REF's: ``list_shard`` of every shard, which is
what its planner ran). Writes benchmarks/results/precompute_oneread.json.

``--first-shard-inputs M`` also times the first stored shard with M input shards given (each
run stopped with Ctrl-C once a shard is stored): the planner read every input before the first
forward, so its wait grew with the input; now it does not.

    python benchmarks/precompute.py --data DIR --weights teacher.pt --one-read --before-ref 2ca09ee --shards 4 \
        --first-shard-inputs 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# --------------------------------------------------------------------------- the loops (run in a child process)


def _loop_main(argv: list[str]) -> None:
    """``_loop URLS_FILE OUT TEACHER WEIGHTS LOG BATCH WORKERS``: the DataLoader (or plain) loop."""
    urls_file, out, teacher, weights, log, batch, workers = argv
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    sys.path.insert(0, str(HERE))
    import bench_teachers
    from kdstore.pipeline.decode import decode_image
    from kdstore.pipeline.shards import iter_samples

    urls = Path(urls_file).read_text().split()
    out, batch, workers = Path(out), int(batch), int(workers)
    out.mkdir(parents=True, exist_ok=True)

    class Shards(IterableDataset):
        """Samples ``(shard, row, last, image [1, 28, 28])``; each worker takes every W-th whole shard."""

        def __iter__(self):
            info = get_worker_info()
            wid, nw = (info.id, info.num_workers) if info else (0, 1)
            for s in range(wid, len(urls), nw):
                prev = None
                for row, sample in enumerate(iter_samples(urls[s])):
                    if prev is not None:
                        yield prev
                    prev = (s, row, False, decode_image(sample["png"]))
                if prev is not None:
                    yield (*prev[:2], True, prev[3])

    def collate(items):
        return ([i[0] for i in items], [i[1] for i in items], [i[2] for i in items], torch.stack([i[3] for i in items]))

    model = bench_teachers.cnn(weights=weights or None, log=log) if teacher == "cnn" else bench_teachers.linear(log=log)
    loader = DataLoader(Shards(), batch_size=batch, num_workers=workers, collate_fn=collate,
                        prefetch_factor=4 if workers else None)
    parts: dict[int, list] = {}
    with torch.inference_mode():
        for shards, _rows, lasts, x in loader:
            logits = model(x).numpy().astype(np.float16)
            for s, last, value in zip(shards, lasts, logits):
                parts.setdefault(s, []).append(value)
                if last:  # one worker serves a shard in order, so every row of it has arrived
                    np.save(out / f"{s:06d}.npy", np.stack(parts.pop(s)))


# --------------------------------------------------------------------------- measuring one run


def _env() -> dict:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    return env


def run_side(side: str, urls: list[str], teacher: str, weights: str | None, batch: int, workers: int, work: Path,
             before: Path | None = None) -> dict:
    """Start one side as a fresh command; returns its timeline (seconds from the command start).

    ``kdstore-before`` runs the kdstore under ``before`` (:func:`old_tree`) instead of this one."""
    log = work / "forward.log"
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    log.unlink(missing_ok=True)
    urls_file = work / "urls.txt"
    urls_file.write_text("\n".join(urls))
    env = _env()
    if side == "kdstore-before":
        env["PYTHONPATH"] = os.pathsep.join([str(before), env["PYTHONPATH"]])
    if side.startswith("kdstore"):
        if side == "kdstore-serial":  # as before the reader thread: read+decode, then forward, in turn
            env["KDSTORE_PREFETCH"] = "0"
        cmd = ["kdstore", "precompute", "--store", str(out), "--teacher", f"bench_teachers:{teacher}", "--teacher-name", teacher,
               "--teacher-arg", f"log={log}", "--batch-size", str(batch), "--workers", str(workers), "--no-progress"]
        if teacher == "cnn" and weights:
            cmd += ["--teacher-arg", f"weights={weights}"]
        for u in urls:
            cmd += ["-i", u]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "_loop", str(urls_file), str(out), teacher, weights or "", str(log),
               str(batch), str(workers if side == "dataloader" else 0)]
    t0 = time.time()
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    t_end = time.time()
    if proc.returncode:
        raise SystemExit(f"{side} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [line.split() for line in log.read_text().splitlines()]
    times = sorted(float(x[0]) for x in lines)
    rows = sum(int(x[1]) for x in lines)
    first_rows = int(min(lines, key=lambda x: float(x[0]))[1])
    stored = _stored_times(out, side)
    per_proc = {}  # each teacher process's own steady rate; their sum is the rate while all of them run
    for pid in {x[2] for x in lines}:
        mine = sorted((float(x[0]), int(x[1])) for x in lines if x[2] == pid)
        if len(mine) > 1 and mine[-1][0] > mine[0][0]:
            per_proc[pid] = (sum(n for _, n in mine) - mine[0][1]) / (mine[-1][0] - mine[0][0])
    firsts = [min(float(x[0]) for x in lines if x[2] == pid) for pid in {x[2] for x in lines}]
    records = [json.loads(p.read_text()) for p in out.glob("teachers/*/done/*.json")] if side.startswith("kdstore") else []
    counted = [r.get("extra", {}).get("input_bytes") for r in records]
    return {
        "input_bytes_workers": sum(counted) if counted and None not in counted else None,
        "side": side, "teacher": teacher, "workers": workers if side != "plain" else 1, "samples": rows,
        "wall_s": t_end - t0, "startup_s": times[0] - t0, "first_shard_s": min(stored) - t0 if stored else None,
        "steady_sps": (rows - first_rows) / (times[-1] - times[0]) if times[-1] > times[0] else None,
        "steady_sum_sps": sum(per_proc.values()) if per_proc else None, "first_batch_spread_s": max(firsts) - min(firsts),
        "tail_s": t_end - times[-1], "processes": len({x[2] for x in lines}),
        "loadavg_1min_before": round(load, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2),
    }


def _stored_times(out: Path, side: str) -> list[float]:
    if side.startswith("kdstore"):  # done records, one per stored shard
        files = [p for p in out.glob("teachers/*/done/*.json")]
    else:
        files = list(out.glob("*.npy"))
    return [p.stat().st_mtime for p in files]


# --------------------------------------------------------------------------- limits and start-up breakdown


def forward_limit(urls: list[str], teacher: str, weights: str | None, batch: int) -> dict:
    """The teacher's forward alone on pre-decoded tensors, and decode alone, in this process."""
    import torch

    sys.path.insert(0, str(HERE))
    import bench_teachers
    from kdstore.pipeline.decode import decode_image
    from kdstore.pipeline.shards import iter_samples

    start = time.perf_counter()
    images = [decode_image(s["png"]) for u in urls[:2] for s in iter_samples(u)]
    decode_sps = len(images) / (time.perf_counter() - start)
    x = torch.stack(images)
    model = bench_teachers.cnn(weights=weights) if teacher == "cnn" else bench_teachers.linear()
    out = {"decode_sps_1proc": decode_sps}
    threads = torch.get_num_threads()
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        with torch.inference_mode():
            model(x[:batch])
            start = time.perf_counter()
            for _ in range(2):
                for i in range(0, len(x), batch):
                    model(x[i : i + batch])
            out[f"forward_sps_{n}thread"] = 2 * len(x) / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return out


_STARTUP_SCRIPT = r"""
import os, sys, time, json
t = {"python_start": time.time()}
import torch; t["import_torch"] = time.time()
import ray; t["import_ray"] = time.time()
from kdstore.pipeline import job; from kdstore.pipeline.worker import ShardProcessor; from kdstore.pipeline.teacher import TeacherLoad
t["import_kdstore"] = time.time()
job._ensure_ray(None); t["ray_init"] = time.time()
urls = sys.argv[1].split(","); teacher = sys.argv[2]; kwargs = tuple(json.loads(sys.argv[3]).items())
load = TeacherLoad(factory="bench_teachers:" + teacher, name=teacher, kwargs=kwargs)
Actor = ray.remote(num_cpus=0.5)(ShardProcessor)
actors = [Actor.remote(load, num_threads=1) for _ in range(int(sys.argv[4]))]
refs = [a.describe.remote() for a in actors]
t["actors_created"] = time.time()
from concurrent.futures import ThreadPoolExecutor
with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
    from kdstore.store.shards import list_shard
    listings = list(pool.map(list_shard, urls))
t["plan_listing_all_shards"] = time.time()
ray.get(refs); t["actors_ready_teacher_loaded"] = time.time()
ray.get([a.describe.remote() for a in actors]); t["actor_call_roundtrip"] = time.time()
# (plan_listing_all_shards: what the format 1 planner did before the teacher; precompute no longer does it)
for a in actors: ray.kill(a)
ray.shutdown(); t["ray_shutdown"] = time.time()
print(json.dumps(t))
"""


def startup_breakdown(urls: list[str], teacher: str, weights: str | None, workers: int) -> dict:
    """Where kdstore's start-up goes, stage by stage (a child process; seconds from the command start)."""
    kwargs = {"weights": weights} if teacher == "cnn" and weights else {}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", _STARTUP_SCRIPT, ",".join(urls), teacher, json.dumps(kwargs), str(workers)],
                          env=_env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    t = json.loads(proc.stdout.strip().splitlines()[-1])
    marks, prev, out = list(t.items()), t0, {}
    for name, value in marks:
        out[name] = {"at_s": round(value - t0, 3), "step_s": round(value - prev, 3)}
        prev = value
    return out


# --------------------------------------------------------------------------- one read of the inputs


def old_tree(ref: str, work: Path) -> Path:
    """``git archive REF`` as an importable ``kdstore`` namespace (put the result first on PYTHONPATH)."""
    src, ns = work / "src", work / "ns" / "kdstore"
    src.mkdir(parents=True)
    ns.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    for package in ("pipeline", "store", "train", "cli"):
        (ns / package).symlink_to(src / package)
    return ns.parent


def driver_reads(urls: list[str], work: Path) -> dict:
    """What each version's driver reads from the inputs before the first teacher batch, counted on
    the shard stream in this process, and how long that step takes (seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    from kdstore.pipeline import job
    from kdstore.pipeline.teacher import TeacherLoad
    from kdstore.store import shards

    real_open, total = shards._open, shards.ReadStats()
    shards._open = lambda url: shards.CountingReader(real_open(url), total)
    try:
        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:  # the format 1 planner, as it ran
            list(pool.map(shards.list_shard, urls))
        before_s, before = time.perf_counter() - t, total.bytes_read
        total.bytes_read = 0
        store = work / f"plan-{uuid.uuid4().hex[:8]}"
        cfg = job.PrecomputeConfig(store=store, inputs=tuple(urls), progress=False,
                                   teacher=TeacherLoad(factory="kdstore.pipeline.zoo:fashion_cnn", name="cnn"))
        t = time.perf_counter()
        job.plan_store(cfg, urls)
        after_s, after = time.perf_counter() - t, total.bytes_read
        shutil.rmtree(store, ignore_errors=True)
    finally:
        shards._open = real_open
    return {"kdstore-before": {"bytes": before, "seconds": before_s}, "kdstore": {"bytes": after, "seconds": after_s}}


def first_shard_only(side: str, urls: list[str], teacher: str, weights: str | None, batch: int, workers: int,
                     work: Path, before: Path | None) -> dict:
    """``kdstore precompute`` until its first done record appears, then Ctrl-C (the job stops its Ray)."""
    import signal

    out = work / "out-first"
    shutil.rmtree(out, ignore_errors=True)
    env = _env()
    if side == "kdstore-before":
        env["PYTHONPATH"] = os.pathsep.join([str(before), env["PYTHONPATH"]])
    cmd = ["kdstore", "precompute", "--store", str(out), "--teacher", f"bench_teachers:{teacher}", "--teacher-name", teacher,
           "--batch-size", str(batch), "--workers", str(workers), "--no-progress"]
    if teacher == "cnn" and weights:
        cmd += ["--teacher-arg", f"weights={weights}"]
    for u in urls:
        cmd += ["-i", u]
    load = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    first = None
    while proc.poll() is None and first is None:
        if list(out.glob("teachers/*/done/*.json")):
            first = time.time() - t0
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    elif first is None:
        raise SystemExit(f"{side} ended before storing a shard:\n{proc.stderr.read().decode()[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return {"side": side, "shards": len(urls), "first_shard_s": first, "loadavg_1min_before": round(load, 2)}


def one_read(args, urls: list[str], workers: int) -> None:
    import torch

    if not args.before_ref:
        raise SystemExit("--one-read needs --before-ref REF (the commit to compare with, e.g. the branch point)")
    size = sum(os.path.getsize(u) for u in urls)
    work = Path(tempfile.mkdtemp(prefix="kdbench-oneread-"))
    runs: list[dict] = []
    sides = ("kdstore-before", "kdstore")
    try:
        before = old_tree(args.before_ref, work / "old")
        driver = {side: v["bytes"] for side, v in driver_reads(urls, work).items()}
        many = sorted(str(p) for p in args.data.glob("*.tar"))[: args.first_shard_inputs] if args.first_shard_inputs else []
        planning = []  # the driver's step before the first forward, in this process, sides alternating
        for rep in range(args.repeats):
            for u in ([urls] + ([many] if many else [])):
                planning.append({"repeat": rep, "inputs": len(u), **{f"{side}_{k}": v for side, d in driver_reads(u, work).items()
                                                                      for k, v in d.items()}})
        for rep in range(args.repeats):
            for side in (sides if rep % 2 == 0 else sides[::-1]):
                r = run_side(side, urls, args.teachers[0], args.weights, args.batch_size, workers, work, before=before)
                r["repeat"] = rep
                r["input_bytes_driver"] = driver[side]
                runs.append(r)
                print(f"rep {rep} {side:15s} 1st shard {r['first_shard_s']:6.2f}s wall {r['wall_s']:6.1f}s "
                      f"load {r['loadavg_1min_before']:.1f}", flush=True)
        first_runs = []
        for rep in range(args.repeats if many else 0):
            for side in (sides if rep % 2 == 0 else sides[::-1]):
                r = first_shard_only(side, many, args.teachers[0], args.weights, args.batch_size, workers, work, before)
                r["repeat"] = rep
                first_runs.append(r)
                print(f"rep {rep} {side:15s} {len(many)} inputs: 1st shard {r['first_shard_s']:6.2f}s "
                      f"load {r['loadavg_1min_before']:.1f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # The worker read path (read each shard to its end-of-archive block, once) is the same code in
    # both versions; REF's done records do not count it, so its workers' bytes are this tree's.
    workers_bytes = next(r["input_bytes_workers"] for r in runs if r["side"] == "kdstore")
    rows = []
    for side in sides:
        rs = [r for r in runs if r["side"] == side]
        read = driver[side] + workers_bytes
        rows.append({"side": side, "first_shard_s": _stats([r["first_shard_s"] for r in rs]),
                     "wall_s": _stats([r["wall_s"] for r in rs]), "input_bytes_driver": driver[side],
                     "input_bytes_workers": workers_bytes, "input_bytes_read": read, "read_ratio": read / size})
    base = rows[0]["first_shard_s"]["median"]
    print(f"\none read of the inputs: {len(urls)} shards ({size / 2**20:.1f} MiB), teacher {args.teachers[0]}, "
          f"{workers} actors, {args.repeats} repeats, load {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs, shared)")
    print(f"{'side':15s} {'bytes read / input':>19s} {'1st shard s (median / min / max)':>33s} {'÷ before':>9s} {'wall s':>8s}")
    for r in rows:
        fs = r["first_shard_s"]
        print(f"{r['side']:15s} {r['read_ratio']:19.3f} {fs['median']:13.2f} / {fs['min']:6.2f} / {fs['max']:6.2f} "
              f"{fs['median'] / base:9.2f} {r['wall_s']['median']:8.1f}")
    plan_rows = []
    print("\nthe driver's step before the first teacher batch (this process; before: list_shard of every shard in "
          "16 threads, now: plan_store), median / min / max")
    for n in sorted({p["inputs"] for p in planning}):
        ps = [p for p in planning if p["inputs"] == n]
        row = {"inputs": n, "input_bytes": sum(os.path.getsize(u) for u in (urls if n == len(urls) else many))}
        for side in sides:
            row[side] = {"seconds": _stats([p[f"{side}_seconds"] for p in ps]), "bytes": ps[0][f"{side}_bytes"]}
        plan_rows.append(row)
        print(f"{n:3d} shards ({row['input_bytes'] / 2**20:5.0f} MiB): before {row['kdstore-before']['seconds']['median']:6.2f} s "
              f"/ {row['kdstore-before']['seconds']['min']:5.2f} / {row['kdstore-before']['seconds']['max']:5.2f} "
              f"({row['kdstore-before']['bytes'] / row['input_bytes']:.2f} of the input read), now "
              f"{row['kdstore']['seconds']['median']:6.3f} s ({row['kdstore']['bytes']} bytes read)")
    first_rows = []
    if first_runs:
        many_bytes = sum(os.path.getsize(u) for u in many)
        print(f"\ntime to the first stored shard with {len(many)} input shards ({many_bytes / 2**20:.0f} MiB; "
              "each run stopped with Ctrl-C once a shard is stored)")
        for side in sides:
            st = _stats([r["first_shard_s"] for r in first_runs if r["side"] == side])
            first_rows.append({"side": side, "inputs": len(many), "input_bytes": many_bytes, "first_shard_s": st})
        for r in first_rows:
            st = r["first_shard_s"]
            print(f"{r['side']:15s} 1st shard s {st['median']:7.2f} / {st['min']:6.2f} / {st['max']:6.2f} "
                  f"÷ before {st['median'] / first_rows[0]['first_shard_s']['median']:5.2f}")
    result = {
        "what": "one read of the inputs: input bytes read / input size and command start -> first stored shard, "
                f"this tree vs kdstore at {args.before_ref}",
        "command": " ".join(sys.argv),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "shared": "yes: ~6 engineers on 2 cores",
                    "loadavg_1min_end": round(os.getloadavg()[0], 2), "torch": torch.__version__},
        "before_ref": args.before_ref, "shards": [Path(u).name for u in urls], "input_bytes": size,
        "workers": workers, "batch_size": args.batch_size, "teacher": args.teachers[0], "repeats": args.repeats,
        "definitions": {
            "read_ratio": "(driver bytes + workers' bytes) / sum of shard file sizes; bytes counted on the shard stream",
            "input_bytes_driver": "counted in this process running each version's planning step (before: list_shard of "
                                  "every shard, as its planner did; now: plan_store)",
            "input_bytes_workers": "sum of the done records' extra.input_bytes of a kdstore run (same worker read in both)",
            "first_shard_s": "command start -> first done record (median, min, max over repeats)"},
        "table": rows, "runs": runs,
        "planning_step": {"table": plan_rows, "runs": planning,
                          "what": "the driver's step before the first teacher batch, timed in this process: before = the "
                                  "format 1 planner's list_shard of every shard (16 threads), now = plan_store"},
        "first_shard_many_inputs": {"table": first_rows, "runs": first_runs,
                                    "what": "command start -> first done record with --first-shard-inputs shards given "
                                            "(the run is stopped with Ctrl-C then); median / min / max"},
    }
    path = args.json if args.json != HERE / "results" / "precompute.json" else HERE / "results" / "precompute_oneread.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")


# --------------------------------------------------------------------------- main


def _stats(values: list[float | None]) -> dict:
    v = [x for x in values if x is not None]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v} if v else {}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_loop":
        _loop_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder of Fashion-MNIST shards (kdstore shards fashion-mnist DIR)")
    parser.add_argument("--weights", default=None, help="CNN teacher weights (kdstore teacher fashion-mnist FILE)")
    parser.add_argument("--shards", type=int, default=10, help="first N train shards (fixed subset)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="kdstore actors = DataLoader workers (0: kdstore's auto, min(4, CPUs))")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--teachers", nargs="+", default=["cnn", "linear"], choices=("cnn", "linear"))
    parser.add_argument("--sides", nargs="+", default=["dataloader", "kdstore", "plain"],
                        choices=("dataloader", "kdstore", "kdstore-serial", "plain"),
                        help="kdstore-serial: kdstore without the reader thread (KDSTORE_PREFETCH=0), the state before it")
    parser.add_argument("--investigate", action="store_true", help="only the start-up breakdown")
    parser.add_argument("--one-read", action="store_true",
                        help="only the one-read comparison: this tree vs --before-ref (bytes read / input size, time to first shard)")
    parser.add_argument("--before-ref", default=None, help="git commit of the kdstore to compare with (--one-read)")
    parser.add_argument("--first-shard-inputs", type=int, default=0,
                        help="--one-read: also time the first stored shard with this many input shards (each run stopped then)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "precompute.json")
    args = parser.parse_args()

    import torch

    urls = sorted(str(p) for p in args.data.glob("train-*.tar"))[: args.shards]
    all_urls = sorted(str(p) for p in args.data.glob("*.tar"))
    if len(urls) < args.shards:
        raise SystemExit(f"{args.data}: fewer than {args.shards} train shards; run `kdstore shards fashion-mnist {args.data}`")
    workers = args.workers or int(max(1, min(4, os.cpu_count() or 1)))
    if args.one_read:
        one_read(args, urls, workers)
        return
    lists = ((urls, len(urls)), (all_urls, len(all_urls))) if args.investigate else ((urls, len(urls)),)
    teachers = args.teachers if args.investigate else args.teachers[:1]
    breakdown = {f"{t}, {workers} actors, {n} shards listed": startup_breakdown(u, t, args.weights, workers)
                 for t in teachers for u, n in lists}
    for name, marks in breakdown.items():
        print(f"\nstart-up breakdown ({name}):")
        for step, m in marks.items():
            print(f"  {step:30s} at {m['at_s']:6.2f} s  (+{m['step_s']:.2f})")
    if args.investigate:
        return
    limits = {t: forward_limit(urls, t, args.weights, args.batch_size) for t in args.teachers}
    runs: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="kdbench-"))
    sides = tuple(args.sides)
    try:
        for rep in range(args.repeats):
            for teacher in args.teachers:
                order = sides if rep % 2 == 0 else sides[::-1]  # alternate which side goes first
                for side in order:
                    r = run_side(side, urls, teacher, args.weights, args.batch_size, workers, work)
                    r["repeat"] = rep
                    runs.append(r)
                    print(f"rep {rep} {teacher:6s} {side:10s} wall {r['wall_s']:6.1f}s start-up {r['startup_s']:5.2f}s "
                          f"steady {r['steady_sps']:7.0f}/s Σ {r['steady_sum_sps']:7.0f}/s spread {r['first_batch_spread_s']:4.1f}s tail {r['tail_s']:4.1f}s load {r['loadavg_1min_before']:.0f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for teacher in args.teachers:
        base = _stats([r["steady_sps"] for r in runs if r["teacher"] == teacher and r["side"] == "dataloader"])["median"]
        base_sum = _stats([r["steady_sum_sps"] for r in runs if r["teacher"] == teacher and r["side"] == "dataloader"])["median"]
        for side in sides:
            rs = [r for r in runs if r["teacher"] == teacher and r["side"] == side]
            row = {"teacher": teacher, "side": side, "workers": rs[0]["workers"], "samples": rs[0]["samples"]}
            for k in ("wall_s", "startup_s", "first_shard_s", "steady_sps", "steady_sum_sps", "first_batch_spread_s", "tail_s"):
                row[k] = _stats([r[k] for r in rs])
            row["steady_vs_dataloader"] = row["steady_sps"]["median"] / base
            row["steady_sum_vs_dataloader"] = row["steady_sum_sps"]["median"] / base_sum
            rows.append(row)
    print(f"\n{len(urls)} train shards ({rows[0]['samples']} samples), batch {args.batch_size}, {workers} workers/actors, "
          f"{os.cpu_count()} CPUs, {args.repeats} repeats (median / min)")
    print(f"{'teacher':7s} {'side':11s} {'wall s':>13s} {'start-up s':>13s} {'1st shard s':>13s} {'steady /s':>13s} {'÷ DL':>5s} "
          f"{'Σ per proc /s':>13s} {'÷ DL':>5s} {'spread s':>8s} {'tail s':>6s}")
    for r in rows:
        print(f"{r['teacher']:7s} {r['side']:11s} {r['wall_s']['median']:6.1f} /{r['wall_s']['min']:5.1f} "
              f"{r['startup_s']['median']:6.2f} /{r['startup_s']['min']:5.2f} {r['first_shard_s']['median']:6.2f} /{r['first_shard_s']['min']:5.2f} "
              f"{r['steady_sps']['median']:6.0f} /{r['steady_sps']['max']:5.0f} {r['steady_vs_dataloader']:5.2f} "
              f"{r['steady_sum_sps']['median']:6.0f} /{r['steady_sum_sps']['max']:5.0f} {r['steady_sum_vs_dataloader']:5.2f} "
              f"{r['first_batch_spread_s']['median']:8.1f} {r['tail_s']['median']:6.1f}")
    for t, lim in limits.items():
        print(f"limit {t}: " + ", ".join(f"{k} {v:.0f}" for k, v in lim.items()))
    result = {
        "what": "kdstore precompute vs a torch DataLoader loop (same tars, PNG decode, teacher, batch; float16 logits per shard)",
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "shared": "yes: ~6 engineers on 2 cores",
                    "python": platform.python_version(), "torch": torch.__version__, "torch_threads_main": torch.get_num_threads()},
        "subset": {"shards": [Path(u).name for u in urls], "samples": rows[0]["samples"]},
        "batch_size": args.batch_size, "workers": workers, "kdstore_actor_threads": max(1, (os.cpu_count() or 1) // workers),
        "repeats": args.repeats, "teacher_weights": args.weights,
        "definitions": {"startup_s": "command start -> first teacher batch done", "first_shard_s": "command start -> first shard stored",
                        "steady_sps": "samples/s between the first and the last teacher batch (any process)",
                        "steady_sum_sps": "sum over teacher processes of each one's samples/s between its own first and last batch "
                                          "(kdstore: per actor; the loops: one process)",
                        "first_batch_spread_s": "first batch of the last teacher process to start - of the first", "tail_s": "last batch -> exit",
                        "stats": "median, min, max over repeats (steady: max is the best)"},
        "table": rows, "limits": limits, "startup_breakdown": breakdown, "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
