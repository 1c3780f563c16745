"""Bring-your-own images at full size, through the CLI only (issue 12's image acceptance line).

Fashion-MNIST written as a flat folder of PNG files at mixed sizes and modes (28, 32, 40 px;
L and RGB; ``kdstore.pipeline.datasets.write_png_folder``) → ``kdstore shards folder`` →
``kdstore teacher fashion-mnist`` (or ``--teacher-weights``) → ``kdstore precompute
--transform 'resize:28;mode:L'`` (the Fashion CNN, transform recorded in the store) →
``kdstore train configs/images_few_labels_{only,kd}.toml`` (a subprocess per run) with the
factory student ``configs/students.py:mlp_student`` (a file outside the package; the trainer
replays the recorded transform), 1,000 labels (100 per class) + the stored logits of every
training image.

Fair comparison (as benchmarks/quality.py):

- Equal tuning budgets: labels-only searches lr × weight decay × epochs with as many trainings
  as KD's temperature × weight search (``GRID``), both on a validation split carved from the
  training PNGs (the last ``--val-shards`` train shards evaluate, the rest train; seed 0);
  never on test.
- Each seed draws its own labelled subset (``data.labels_seed = seed``).
- Test-split accuracy per seed; mean ± sample std per side, the difference, Welch t, its p
  and a 95% interval.

Stages (cached in the JSON by run name while the settings stay the same): ``data`` (PNGs,
shards, teacher, precompute; each step skipped when its output is there), ``tune``, ``test``.

    python benchmarks/byo_images.py --workdir runs/byo --teacher-steps 5000
    python benchmarks/byo_images.py --train 12000 --test 2000 --epochs 5     # smaller

Prints tables and writes benchmarks/results/byo_images.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from kdstore.pipeline.datasets import MIXED_SIZES, load_fashion_mnist, write_png_folder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import welch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TRANSFORM = "resize:28;mode:L"
FACTORY = f"{CONFIGS / 'students.py'}:mlp_student"
BASE_LR, BASE_WD = 3e-3, 1e-4
# Each side's search has the same number of trainings (quality.py's "small" grid).
GRID = {
    "kd": [(T, a) for T in (1.0, 4.0) for a in (0.5, 0.9)],  # (temperature, KD weight; CE weight = 1 - a)
    "labels_only": [(3e-3, 1e-4, 1), (1e-2, 1e-4, 1), (3e-3, 1e-2, 1), (3e-3, 1e-4, 2)],  # (lr, wd, epochs ×)
}


def kdstore(*args) -> subprocess.CompletedProcess:
    exe = shutil.which("kdstore") or None
    cmd = [exe] if exe else [sys.executable, "-m", "kdstore.cli.main"]
    cmd += [str(a) for a in args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"  $ kdstore {' '.join(str(a) for a in args)[:150]}  ({time.perf_counter() - start:.0f}s)", flush=True)
    return proc


class Bench:
    def __init__(self, args: argparse.Namespace, settings: dict) -> None:
        self.args = args
        self.work = Path(args.workdir).resolve()
        self.store = self.work / "store"
        self.out = Path(args.out)
        old = json.loads(self.out.read_text()) if self.out.exists() else {}
        settings = json.loads(json.dumps(settings))
        self.results = old if old.get("settings") == settings else {}
        self.results["settings"] = settings
        self.results.setdefault("runs", {})
        self.results.setdefault("tuned", {})
        self.results.setdefault("data", {})
        self.lock = threading.Lock()

    def save(self) -> None:
        with self.lock:
            self._save()

    def _save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, sort_keys=True))
        os.replace(tmp, self.out)

    # ------------------------------------------------------------------ data
    def data(self) -> None:

        a, info = self.args, self.results["data"]
        for split, n in (("train", a.train), ("test", a.test)):
            folder = self.work / f"png_{split}"
            shards = self.work / "shards" / split
            if not (folder / "labels.csv").exists():
                x, y = load_fashion_mnist(split)
                if n > len(x):
                    raise SystemExit(f"--{split} {n}: Fashion-MNIST {split} has {len(x)} images")
                start = time.perf_counter()
                write_png_folder(folder, x[:n], y[:n])
                info[f"png_{split}_seconds"] = round(time.perf_counter() - start, 1)
                print(f"  wrote {n} PNGs to {folder} ({info[f'png_{split}_seconds']:.0f}s)", flush=True)
            if not (shards / "done").exists():
                start = time.perf_counter()
                kdstore("shards", "folder", folder, shards, "--labels", folder / "labels.csv", "--prefix", split,
                        "--shard-size", a.shard_size, "--no-progress")
                (shards / "done").write_text("")
                info[f"shards_{split}_seconds"] = round(time.perf_counter() - start, 1)
            info[f"{split}_images"] = n
        info["png_bytes"] = sum(p.stat().st_size for s in ("train", "test") for p in (self.work / f"png_{s}").glob("*.png"))
        weights = Path(a.teacher_weights).resolve() if a.teacher_weights else self.work / "teacher.pt"
        if not weights.exists():
            start = time.perf_counter()
            kdstore("teacher", "fashion-mnist", weights, "--steps", a.teacher_steps)
            info["teacher_seconds"] = round(time.perf_counter() - start, 1)
        meta = weights.with_suffix(".json")
        info["teacher"] = {"weights": str(weights), **(json.loads(meta.read_text()) if meta.exists() else {})}
        if not (self.work / "precompute.done").exists():
            start = time.perf_counter()
            kdstore("precompute", "--store", self.store, "-i", str(self.work / "shards" / "train" / "*.tar"),
                    "-i", str(self.work / "shards" / "test" / "*.tar"), "--teacher", "kdstore.pipeline.zoo:fashion_cnn",
                    "--teacher-name", "cnn", "--teacher-arg", f"weights={weights}", "--transform", TRANSFORM,
                    "--workers", a.workers, "--no-progress")
            (self.work / "precompute.done").write_text("")
            info["precompute_seconds"] = round(time.perf_counter() - start, 1)
        from kdstore.store import open_store

        store = open_store(self.store)
        teacher = store.teacher("cnn")
        info["recorded_transform"] = teacher.spec.transform
        for split in ("train", "test"):
            rows = np.concatenate([np.arange(s.row_start, s.row_stop) for s in store.select_shards([f"{split}-"])])
            agree = teacher.read("logits", rows).argmax(1) == store.labels[rows]
            info[f"teacher_accuracy_{split}_pngs"] = float(agree.mean())
            i = np.arange(len(rows))  # row i is PNG i: size MIXED_SIZES[i % 3], RGB when (i // 3) is odd
            info[f"teacher_accuracy_{split}_pngs_by_size"] = {f"{size}px": float(agree[i % 3 == k].mean())
                                                              for k, size in enumerate(MIXED_SIZES)}
            info[f"teacher_accuracy_{split}_pngs_by_mode"] = {m: float(agree[(i // 3) % 2 == k].mean())
                                                              for k, m in enumerate(("L", "RGB"))}
        names = [s.url.rstrip("/").rsplit("/", 1)[-1] for s in store.select_shards(["train-"])]
        self.val_train, self.val_eval = names[: -a.val_shards], names[-a.val_shards:]
        info["val_split"] = {"train_shards": len(self.val_train), "eval_shards": self.val_eval,
                             "eval_rows": sum(s.num_rows for s in store.select_shards(self.val_eval))}
        self.save()
        print(f"teacher: {info['teacher'].get('steps')} steps, test accuracy {info['teacher'].get('test_accuracy')} "
              f"(28 px originals), {info['teacher_accuracy_test_pngs']:.4f} on the test PNGs under {TRANSFORM!r}", flush=True)

    # ------------------------------------------------------------------ runs
    def run(self, name: str, config: str, *, split: str, seed: int, epochs: int, sets: list[str]) -> dict:
        if name in self.results["runs"] and not self.args.force:
            return self.results["runs"][name]
        out = self.work / "runs" / name.replace("/", "_")
        shards = ([f"data.train_shards={json.dumps(self.val_train)}", f"data.eval_shards={json.dumps(self.val_eval)}"]
                  if split == "val" else [])
        verify = "quick" if self.results["runs"] else "full"  # the first run(s) check every input hash
        all_sets = [f"model.factory={FACTORY}", f"model.args.hidden={self.args.hidden}", f"data.labels_seed={seed}",
                    "train.eval_every_epochs=0", "train.checkpoint_every_steps=0", "train.threads=1",
                    f"data.verify_inputs={verify}", *shards, *sets]
        args = ["train", CONFIGS / config, "--store", self.store, "--seed", seed, "--epochs", epochs, "--out", out,
                "--overwrite", "--no-progress"]
        for s in all_sets:
            args += ["--set", s]
        start = time.perf_counter()
        kdstore(*args)
        summary = json.loads((out / "summary.json").read_text())
        record = {"eval": summary["eval"], "steps": summary.get("steps"), "epochs": epochs, "config": config,
                  "sets": all_sets, "seed": seed, "split": split, "seconds": round(time.perf_counter() - start, 1),
                  "train_seconds": summary.get("seconds")}
        with self.lock:
            self.results["runs"][name] = record
        self.save()
        print(f"{name:40s} acc {record['eval']['accuracy']:.4f}  {record['seconds']:.0f}s", flush=True)
        return record

    def parallel(self, jobs: dict) -> dict:
        """``{key: (name, config, kwargs)}`` → ``{key: record}``, ``--jobs`` trainings at a time."""
        with ThreadPoolExecutor(max_workers=self.args.jobs) as pool:
            futures = {k: pool.submit(self.run, name, config, **kw) for k, (name, config, kw) in jobs.items()}
            return {k: f.result() for k, f in futures.items()}

    def tune(self) -> None:
        e = self.args.epochs
        acc = lambda r: r["eval"]["accuracy"]
        jobs = {}
        for lo, kd in zip(GRID["labels_only"], GRID["kd"]):  # alternating sides
            jobs[("labels_only", lo)] = (f"tune/labels_only/lr{lo[0]:g}_wd{lo[1]:g}_x{lo[2]}", "images_few_labels_only.toml",
                                         {"split": "val", "seed": 0, "epochs": e * lo[2],
                                              "sets": [f"optim.lr={lo[0]}", f"optim.weight_decay={lo[1]}"]})
            jobs[("kd", kd)] = (f"tune/kd/T{kd[0]:g}_a{kd[1]:g}", "images_few_labels_kd.toml",
                                {"split": "val", "seed": 0, "epochs": e, "sets": kd_sets(*kd)})
        done = self.parallel(jobs)
        lo = {k[1]: r for k, r in done.items() if k[0] == "labels_only"}
        kd = {k[1]: r for k, r in done.items() if k[0] == "kd"}
        best_lo, best_kd = max(lo, key=lambda k: acc(lo[k])), max(kd, key=lambda k: acc(kd[k]))
        self.results["tuned"] = {
            "labels_only": {"lr": best_lo[0], "weight_decay": best_lo[1], "epochs": e * best_lo[2],
                            "val_accuracy": acc(lo[best_lo])},
            "kd": {"temperature": best_kd[0], "alpha": best_kd[1], "lr": BASE_LR, "weight_decay": BASE_WD, "epochs": e,
                   "val_accuracy": acc(kd[best_kd])},
        }
        self.results["tuning_budget"] = {"labels_only_trainings": len(lo), "kd_trainings": len(kd)}
        self.save()

    def test(self) -> None:
        lo, kd = self.results["tuned"]["labels_only"], self.results["tuned"]["kd"]
        jobs = {}
        for seed in self.args.seeds:  # alternating sides
            jobs[("labels_only", seed)] = (f"test/labels_only/s{seed}", "images_few_labels_only.toml",
                                           {"split": "test", "seed": seed, "epochs": lo["epochs"],
                                                "sets": [f"optim.lr={lo['lr']}", f"optim.weight_decay={lo['weight_decay']}"]})
            jobs[("kd", seed)] = (f"test/kd/s{seed}", "images_few_labels_kd.toml",
                                  {"split": "test", "seed": seed, "epochs": kd["epochs"], "sets": kd_sets(kd["temperature"], kd["alpha"])})
        self.parallel(jobs)


def kd_sets(T: float, alpha: float) -> list[str]:
    return [f"optim.lr={BASE_LR}", f"optim.weight_decay={BASE_WD}", f"loss.0.weight={round(1 - alpha, 6)}",
            f"loss.1.temperature={T}", f"loss.1.weight={alpha}"]


def report(b: Bench) -> None:
    from rich.console import Console
    from rich.table import Table

    runs = b.results["runs"]
    rows = []
    for side in ("labels_only", "kd"):
        rs = [r for n, r in sorted(runs.items()) if n.startswith(f"test/{side}/")]
        if not rs:
            continue
        acc = np.array([r["eval"]["accuracy"] for r in rs])
        rows.append({"setting": side, "seeds": [r["seed"] for r in rs], "accuracies": acc.tolist(),
                     "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                     "agreement_mean": float(np.mean([r["eval"].get("teacher_agreement", np.nan) for r in rs])),
                     "epochs": rs[0]["epochs"], "steps": rs[0]["steps"],
                     "seconds_mean": float(np.mean([r["seconds"] for r in rs]))})
    b.results["table"] = rows
    accs = {r["setting"]: r["accuracies"] for r in rows}
    if "kd" in accs and "labels_only" in accs:
        w = welch(accs["kd"], accs["labels_only"])
        b.results["gain"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in w.items()}
    b.results["runs_seconds_total"] = round(sum(r["seconds"] for r in runs.values()), 1)
    b.save()
    console = Console(width=130)
    d = b.results["data"]
    console.print(f"data: {d.get('train_images')} train / {d.get('test_images')} test PNGs (28/32/40 px, L/RGB), "
                  f"transform {d.get('recorded_transform')!r}; teacher {d.get('teacher', {}).get('steps')} steps: "
                  f"test accuracy {d.get('teacher', {}).get('test_accuracy')} (28 px originals), "
                  f"{d.get('teacher_accuracy_test_pngs', float('nan')):.4f} (test PNGs, stored logits)")
    t = Table(title=f"1,000 labels, factory student mlp_student(hidden={b.args.hidden}), test accuracy per seed")
    for col in ("setting", "seeds", "accuracies", "mean ± std", "teacher agreement", "epochs", "steps", "s/run"):
        t.add_column(col, justify="left" if col == "setting" else "right")
    for r in rows:
        t.add_row(r["setting"], str(r["seeds"]), ", ".join(f"{x:.4f}" for x in r["accuracies"]),
                  f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}", f"{r['agreement_mean']:.4f}", str(r["epochs"]),
                  str(r["steps"]), f"{r['seconds_mean']:.0f}")
    console.print(t)
    if "gain" in b.results:
        g = b.results["gain"]
        ci = g.get("ci95")
        console.print(f"gain kd - labels_only: {100 * g['diff']:+.2f} points, Welch t {g.get('t', float('nan')):.2f} "
                      f"(df {g.get('df', float('nan')):.1f}, p {g.get('p')}), 95% CI "
                      + (f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci else "-"))
    tune = Table(title="Tuning on the validation split (seed 0)")
    tune.add_column("run")
    tune.add_column("val accuracy", justify="right")
    for name, r in sorted(runs.items()):
        if name.startswith("tune/"):
            tune.add_row(name, f"{r['eval']['accuracy']:.4f}")
    console.print(tune)
    console.print(f"tuned: {json.dumps(b.results.get('tuned'))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "byo"))
    parser.add_argument("--train", type=int, default=60000, help="training PNGs (the first N of Fashion-MNIST train)")
    parser.add_argument("--test", type=int, default=10000, help="test PNGs")
    parser.add_argument("--shard-size", type=int, default=2000)
    parser.add_argument("--val-shards", type=int, default=3, help="last train shards that evaluate during tuning")
    parser.add_argument("--teacher-steps", type=int, default=5000)
    parser.add_argument("--teacher-weights", default=None, help="reuse these FashionCNN weights (width 32)")
    parser.add_argument("--workers", type=int, default=2, help="precompute Ray actors")
    parser.add_argument("--hidden", type=int, default=32, help="mlp_student hidden width")
    parser.add_argument("--epochs", type=int, default=5, help="base epochs over the training PNGs")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at a time (each one torch thread)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stage", action="append", choices=("data", "tune", "test"), default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "byo_images.json"))
    parser.add_argument("--force", action="store_true", help="rerun runs already in the JSON")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = {"train": args.train, "test": args.test, "shard_size": args.shard_size, "val_shards": args.val_shards,
                "teacher_steps": args.teacher_steps, "teacher_weights": args.teacher_weights, "hidden": args.hidden,
                "epochs": args.epochs, "grid": GRID, "transform": TRANSFORM, "factory": "configs/students.py:mlp_student",
                "labels": "per_class:100", "labels_seed": "= seed", "base_lr": BASE_LR, "base_weight_decay": BASE_WD}
    b = Bench(args, settings)
    b.results["machine"] = {"host": f"{platform.node()} {platform.machine()}", "cpus": os.cpu_count(),
                            "shared": "~6 engineers on these cores"}
    invocation = {"stages": args.stage or ["data", "tune", "test"], "jobs": args.jobs,
                  "loadavg_at_start": [round(x, 1) for x in os.getloadavg()]}
    b.results.setdefault("invocations", []).append(invocation)
    start = time.perf_counter()
    try:
        for stage in args.stage or ["data", "tune", "test"]:
            if stage != "data" and not hasattr(b, "val_train"):
                b.data()
            getattr(b, stage)()
    finally:
        invocation["loadavg_at_end"] = [round(x, 1) for x in os.getloadavg()]
        invocation["seconds"] = round(time.perf_counter() - start, 1)
        report(b)


if __name__ == "__main__":
    main()
