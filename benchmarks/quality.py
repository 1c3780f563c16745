"""Distillation quality on Fashion-MNIST, through the real trainer (``kdstore.train.recipe``).

Student: MLP 784-32-10; teacher: the zoo CNN precomputed into the store (``cnn``; ``cnnv``
= the same weights with 4 stored augmentation views). Every run streams the store's shards
and targets; both sides of a comparison use the same optimiser, steps and schedule.

Stages (results are cached by run name in the JSON; rerun a stage to fill in what is missing):

- ``tune``: choose temperature and weights on a validation split carved from train
  (train shards 0..26 train, 27..29 evaluate; never the test split).
- ``few``: 1,000 labels (100 per class, ``labels_seed`` 0) + stored targets of all 60k rows:
  labels-only vs KD vs DHO, on test, for each seed.
- ``full``: all 60k labels: labels-only vs KD.
- ``online``: few labels, KD from stored views replayed vs online KD (teacher in the loop,
  fresh augmentation), same settings.

    python benchmarks/quality.py --store STORE --stage tune --stage few --stage full --stage online
Prints tables and writes benchmarks/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdstore.store import open_store
from kdstore.train import losses as L
from kdstore.train.config import parse_config
from kdstore.train.dataset import InputCache
from kdstore.train.recipe import Recipe

LABELS = "per_class:100"
BATCH = 256
TUNE_T = (1.0, 2.0, 4.0)
TUNE_ALPHA = (0.5, 0.9)  # KD weight; CE gets 1 - alpha
DHO_ALPHA = (0.5, 0.1)
FULL_ALPHA = (0.5, 0.1)  # with every label, KD may help only as a light regulariser  # DHO's CE weight (the paper's 0.5, and the KD-heavy mix KD preferred)
DHO_BETAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.results = json.loads(self.out.read_text()) if self.out.exists() else {}
        self.results.setdefault("runs", {})
        self.results.setdefault("tuned", {})
        self.cache = InputCache()
        self.tmp = Path(tempfile.mkdtemp(prefix="kdq-"))
        store = open_store(args.store)
        self.train_rows = sum(s.num_rows for s in store.select_shards(["train-"]))
        self.verified = False

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, sort_keys=True))
        os.replace(tmp, self.out)

    def doc(self, *, split: str, seed: int, losses: list[dict], epochs: int, labels: str = LABELS,
            only_labeled: bool = False, steps: int = 0, online: dict | None = None) -> dict:
        train, evaluate = (["0..26"], ["27..29"]) if split == "val" else (["train-"], ["test-"])
        doc = {
            "data": {"store": self.args.store, "train_shards": train, "eval_shards": evaluate, "labels": labels,
                     "labels_seed": 0, "only_labeled": only_labeled, "batch_size": BATCH, "shuffle_buffer": 4096,
                     "cache": True, "verify_inputs": "quick" if self.verified else "full"},
            "model": {"arch": "mlp", "hidden": 32},
            "optim": {"name": "adamw", "lr": self.args.lr, "weight_decay": 1e-4, "schedule": "cosine"},
            "train": {"out_dir": str(self.tmp / "run"), "epochs": epochs, "steps": steps, "seed": seed, "threads": 1,
                      "checkpoint_every_steps": 0, "eval_every_epochs": 0, "log_every_steps": 200, "progress": False},
            "loss": losses,
        }
        if online:
            doc["online"] = online
        self.verified = True
        return doc

    def steps(self, split: str, epochs: int) -> int:
        rows = self.train_rows * 27 // 30 if split == "val" else self.train_rows
        return epochs * math.ceil(rows / BATCH)

    def run(self, name: str, doc: dict, *, keep_predictions: bool = False) -> dict:
        if name in self.results["runs"] and not self.args.force:
            return self.results["runs"][name]
        shutil.rmtree(self.tmp / "run", ignore_errors=True)
        recipe = Recipe(parse_config(doc), cache=self.cache)
        start = time.perf_counter()
        try:
            recipe.setup()
            result = recipe.train()
            preds = recipe.predict() if keep_predictions else None
        finally:
            recipe.cleanup()
        record = {"eval": result.eval, "steps": result.steps, "epochs": result.epochs, "train_seconds": result.seconds,
                  "seconds": time.perf_counter() - start, "losses": doc["loss"], "data": doc["data"],
                  "online": doc.get("online", {}).get("enabled", False)}
        if preds is not None:
            record["dho_search"] = dho_search(preds)
        self.results["runs"][name] = record
        self.save()
        acc = result.eval.get("accuracy")
        print(f"{name:48s} acc {acc:.4f}  agree {result.eval.get('teacher_agreement', float('nan')):.4f}  "
              f"{record['seconds']:.0f}s", flush=True)
        return record


def dho_search(p: dict) -> dict:
    """The paper's post-hoc search of the head mix (CE-head weight alpha, KD-head temperature beta)."""
    ce, kd = torch.from_numpy(p["logits"]), torch.from_numpy(p["kd_logits"])
    best = {"accuracy": -1.0}
    for alpha in np.round(np.arange(0, 1.0001, 0.05), 2):
        for beta in DHO_BETAS:
            pred = L.dho_combine(ce, kd, float(alpha), beta).argmax(1).numpy()
            acc = float((pred == p["labels"]).mean())
            if acc > best["accuracy"]:
                best = {"accuracy": acc, "alpha": float(alpha), "beta": beta}
    return best


def kd_losses(T: float, alpha: float, teacher: str = "cnn") -> list[dict]:
    return [{"kind": "ce", "weight": 1.0 - alpha}, {"kind": "kd", "teacher": teacher, "temperature": T, "weight": alpha}]


def dho_losses(T: float, alpha: float) -> list[dict]:
    return [{"kind": "dho", "teacher": "cnn", "temperature": T, "alpha": alpha}]


# --------------------------------------------------------------------------- stages


def stage_tune(b: Bench) -> None:
    e = b.args.epochs
    lo = {}
    lo["only_labeled"] = b.run("tune/labels_only/only_labeled", b.doc(split="val", seed=0, losses=[{"kind": "ce"}], epochs=e,
                               only_labeled=True, steps=b.steps("val", e)))
    lo["masked_stream"] = b.run("tune/labels_only/masked_stream", b.doc(split="val", seed=0, losses=[{"kind": "ce"}], epochs=e))
    kd = {}
    for T in TUNE_T:
        for alpha in TUNE_ALPHA:
            kd[(T, alpha)] = b.run(f"tune/kd/T{T:g}_a{alpha:g}", b.doc(split="val", seed=0, losses=kd_losses(T, alpha), epochs=e))
    dho = {}
    for T in TUNE_T:
        for alpha in DHO_ALPHA:
            dho[(T, alpha)] = b.run(f"tune/dho/T{T:g}_a{alpha:g}", b.doc(split="val", seed=0, losses=dho_losses(T, alpha), epochs=e),
                                    keep_predictions=True)
    best_lo = max(lo, key=lambda k: lo[k]["eval"]["accuracy"])
    best_kd = max(kd, key=lambda k: kd[k]["eval"]["accuracy"])
    best_dho = max(dho, key=lambda k: dho[k]["dho_search"]["accuracy"])
    b.results["tuned"]["few"] = {
        "labels_only_protocol": best_lo,
        "kd": {"temperature": best_kd[0], "alpha": best_kd[1]},
        "dho": {"temperature": best_dho[0], "loss_alpha": best_dho[1],
                **{k: dho[best_dho]["dho_search"][k] for k in ("alpha", "beta")}},
    }
    full_lo = b.run("tune/full/labels_only", b.doc(split="val", seed=0, losses=[{"kind": "ce"}], labels="all", epochs=b.args.full_epochs))
    full = {}
    for T in TUNE_T:
        for alpha in FULL_ALPHA:
            full[(T, alpha)] = b.run(f"tune/full/kd/T{T:g}_a{alpha:g}", b.doc(split="val", seed=0, losses=kd_losses(T, alpha),
                                                                               labels="all", epochs=b.args.full_epochs))
    best_full = max(full, key=lambda k: full[k]["eval"]["accuracy"])
    b.results["tuned"]["full"] = {"kd": {"temperature": best_full[0], "alpha": best_full[1]},
                                  "labels_only_val": full_lo["eval"]["accuracy"]}
    b.save()


def tuned(b: Bench, key: str) -> dict:
    if key not in b.results["tuned"]:
        raise SystemExit(f"run --stage tune first (no tuned settings for {key})")
    return b.results["tuned"][key]


def stage_few(b: Bench) -> None:
    t = tuned(b, "few")
    e = b.args.epochs
    for seed in b.args.seeds:
        only = t["labels_only_protocol"] == "only_labeled"
        b.run(f"few/labels_only/s{seed}", b.doc(split="test", seed=seed, losses=[{"kind": "ce"}], epochs=e,
                                                only_labeled=only, steps=b.steps("test", e) if only else 0))
        b.run(f"few/kd/s{seed}", b.doc(split="test", seed=seed, losses=kd_losses(t["kd"]["temperature"], t["kd"]["alpha"]), epochs=e))
        doc = b.doc(split="test", seed=seed, losses=dho_losses(t["dho"]["temperature"], t["dho"]["loss_alpha"]), epochs=e)
        doc["model"].update(dho_alpha=t["dho"]["alpha"], dho_beta=t["dho"]["beta"])
        b.run(f"few/dho/s{seed}", doc)


def stage_full(b: Bench) -> None:
    t = tuned(b, "full")
    e = b.args.full_epochs
    for seed in b.args.seeds:
        b.run(f"full/labels_only/s{seed}", b.doc(split="test", seed=seed, losses=[{"kind": "ce"}], labels="all", epochs=e))
        b.run(f"full/kd/s{seed}", b.doc(split="test", seed=seed, losses=kd_losses(t["kd"]["temperature"], t["kd"]["alpha"]),
                                        labels="all", epochs=e))


def stage_online(b: Bench) -> None:
    t = tuned(b, "few")["kd"]
    e = b.args.online_epochs
    spec = open_store(b.args.store).teacher("cnnv").spec
    online = {"enabled": True, "teacher": "cnnv", "factory": spec.factory, "teacher_args": {"weights": b.args.teacher_weights},
              "augment": spec.augment}
    for seed in b.args.seeds:
        b.run(f"online/store_views/s{seed}", b.doc(split="test", seed=seed, losses=kd_losses(t["temperature"], t["alpha"], "cnnv"),
                                                   epochs=e))
        b.run(f"online/online/s{seed}", b.doc(split="test", seed=seed, losses=kd_losses(t["temperature"], t["alpha"], "cnnv"),
                                              epochs=e, online=online))


# --------------------------------------------------------------------------- report


def table(results: dict) -> list[dict]:
    groups: dict[str, list] = {}
    for name, r in results["runs"].items():
        if name.startswith("tune/"):
            continue
        setting = name.rsplit("/", 1)[0]
        groups.setdefault(setting, []).append(r)
    rows = []
    for setting, runs in sorted(groups.items()):
        acc = np.array([r["eval"]["accuracy"] for r in runs])
        agree = np.array([r["eval"].get("teacher_agreement", np.nan) for r in runs])
        rows.append({"setting": setting, "seeds": len(runs), "accuracy_mean": float(acc.mean()),
                     "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0, "accuracies": acc.tolist(),
                     "agreement_mean": float(np.nanmean(agree)), "steps": runs[0]["steps"],
                     "train_seconds_mean": float(np.mean([r["train_seconds"] for r in runs]))})
    return rows


def report(b: Bench) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = table(b.results)
    b.results["table"] = rows
    means = {r["setting"]: r["accuracy_mean"] for r in rows}
    deltas = {}
    for a, c in (("few/kd", "few/labels_only"), ("few/dho", "few/labels_only"), ("few/dho", "few/kd"),
                 ("full/kd", "full/labels_only"), ("online/store_views", "online/online")):
        if a in means and c in means:
            deltas[f"{a} - {c}"] = round(100 * (means[a] - means[c]), 2)
    b.results["deltas_points"] = deltas
    b.save()
    t = Table(title="Fashion-MNIST, MLP 784-32-10 student (test accuracy, mean ± std over seeds)")
    for col in ("setting", "seeds", "accuracy", "teacher agreement", "steps", "train s/run"):
        t.add_column(col, justify="left" if col == "setting" else "right")
    for r in rows:
        t.add_row(r["setting"], str(r["seeds"]), f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}",
                  f"{r['agreement_mean']:.4f}", str(r["steps"]), f"{r['train_seconds_mean']:.0f}")
    console = Console(width=120)
    console.print(t)
    tune = Table(title="Tuning on the validation split (train shards 0..26 → 27..29), seed 0")
    tune.add_column("run")
    tune.add_column("val accuracy", justify="right")
    for name, r in sorted(b.results["runs"].items()):
        if name.startswith("tune/"):
            extra = f" (heads mixed: {r['dho_search']['accuracy']:.4f})" if "dho_search" in r else ""
            tune.add_row(name, f"{r['eval']['accuracy']:.4f}{extra}")
    console.print(tune)
    console.print(f"tuned: {json.dumps(b.results['tuned'])}")
    console.print(f"differences (points): {json.dumps(deltas)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--teacher-weights", default="/tmp/kd7/cnn90.pt", help="weights of the stored teacher (online KD)")
    parser.add_argument("--stage", action="append", choices=("tune", "few", "full", "online"), default=[])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20, help="few-labels epochs over the 60k rows")
    parser.add_argument("--full-epochs", type=int, default=10)
    parser.add_argument("--online-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality.json"))
    parser.add_argument("--force", action="store_true", help="rerun runs already in the JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    b = Bench(args)
    b.results["settings"] = {"store": args.store, "epochs": args.epochs, "full_epochs": args.full_epochs,
                             "online_epochs": args.online_epochs, "lr": args.lr, "batch_size": BATCH, "labels": LABELS,
                             "student": "mlp 784-32-10", "threads": 1}
    stages = {"tune": stage_tune, "few": stage_few, "full": stage_full, "online": stage_online}
    try:
        for name in args.stage:
            stages[name](b)
    finally:
        shutil.rmtree(b.tmp, ignore_errors=True)
        report(b)


if __name__ == "__main__":
    main()
