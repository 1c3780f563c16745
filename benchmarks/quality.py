"""Distillation quality on Fashion-MNIST, through the real trainer (``kdstore.train.recipe``).

Student: MLP 784-32-10; teacher: the zoo CNN (trained on all 60,000 training labels)
precomputed into the store as ``cnn`` (``cnnv`` = the same weights with 4 stored
augmentation views, for the ``online`` stage). Every run streams the store's shards and
targets through ``Recipe`` built from a config document, like ``kdstore train``.

Fair comparison (issue 11):

- Equal tuning budgets: labels-only gets its own search over learning rate, weight decay
  and epochs with as many trainings as KD's temperature × weight search (``--grid``); DHO
  gets as many trainings, plus the paper's post-hoc head-mix search on the validation
  predictions, which is counted and reported as extra tuning.
- Each seed draws its own labelled subset (``labels_seed = seed``): model init, shard
  order, shuffle and the 1,000 labelled images all change with the seed.
- Every gain is reported as mean ± sample std per side, the difference, a Welch t, its
  p-value and a 95% interval (Welch–Satterthwaite degrees of freedom).

Stages (results are cached by run name in the JSON while the settings stay the same):

- ``tune`` (few labels) and ``tune-full`` (all labels): choose each method's settings on a
  validation split carved from train (train shards 0..26 train, 27..29 evaluate; never the
  test split), seed 0.
- ``few``: 1,000 labels (100 per class) + stored targets of all 60k rows: labels-only vs
  KD vs DHO, on test, for each seed.
- ``full``: all 60k labels: labels-only vs KD.
- ``online``: few labels, KD from stored views replayed vs online KD (slow; optional).

    python benchmarks/quality.py --store STORE --teacher-weights W --stage tune --stage few --stage tune-full --stage full
    python benchmarks/quality.py ... --grid small --seeds 0 1 2 --epochs 5 --full-epochs 3   # what fits ~25 min
Prints tables and writes benchmarks/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from kdstore.store import open_store
from kdstore.train.config import parse_config
from kdstore.train.recipe import Recipe

LABELS = "per_class:100"
BATCH = 256
BASE_LR, BASE_WD = 3e-3, 1e-4
# Each method's search; "small" and "full" give every method the same number of trainings.
GRIDS = {
    "small": {
        "kd": [(T, a) for T in (1.0, 4.0) for a in (0.5, 0.9)],
        "dho": [(T, w) for T in (1.0, 4.0) for w in (0.5, 0.1)],  # w = DHO's CE weight
        # labels-only: (lr, weight decay, epochs × base epochs), one factor at a time around the default
        "labels_only": [(3e-3, 1e-4, 1), (1e-2, 1e-4, 1), (3e-3, 1e-2, 1), (3e-3, 1e-4, 2)],
        "full_kd": [(T, a) for T in (1.0, 4.0) for a in (0.5, 0.1)],
        "full_labels_only": [(3e-3, 1e-4, 1), (1e-2, 1e-4, 1), (3e-3, 1e-2, 1), (3e-3, 1e-4, 2)],
    },
    "full": {
        "kd": [(T, a) for T in (1.0, 2.0, 4.0) for a in (0.5, 0.9)],
        "dho": [(T, w) for T in (1.0, 2.0, 4.0) for w in (0.5, 0.1)],
        "labels_only": [(1e-3, 1e-4, 1), (3e-3, 1e-4, 1), (1e-2, 1e-4, 1), (3e-3, 1e-2, 1)]
        + [(3e-3, 1e-4, 2), (1e-2, 1e-4, 2)],
        "full_kd": [(T, a) for T in (1.0, 2.0, 4.0) for a in (0.5, 0.1)],
        "full_labels_only": [(1e-3, 1e-4, 1), (3e-3, 1e-4, 1), (1e-2, 1e-4, 1), (3e-3, 1e-2, 1)]
        + [(3e-3, 1e-4, 2), (1e-2, 1e-4, 2)],
    },
}
DHO_MIX_ALPHAS = tuple(float(a) for a in np.round(np.arange(0, 1.0001, 0.05), 2))
DHO_BETAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)


class Bench:
    def __init__(self, args: argparse.Namespace, settings: dict) -> None:
        self.args = args
        self.out = Path(args.out)
        old = json.loads(self.out.read_text()) if self.out.exists() else {}
        # Cached runs are reused only when they were made with the same settings.
        settings = json.loads(json.dumps(settings))  # tuples → lists, as read back from the JSON
        self.results = old if old.get("settings") == settings else {}
        self.results["settings"] = settings
        self.results.setdefault("runs", {})
        self.results.setdefault("tuned", {})
        self.cache = _input_cache()
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
            lr: float = BASE_LR, wd: float = BASE_WD, online: dict | None = None) -> dict:
        train, evaluate = (["0..26"], ["27..29"]) if split == "val" else (["train-"], ["test-"])
        doc = {
            "data": {"store": self.args.store, "train_shards": train, "eval_shards": evaluate, "labels": labels,
                     "labels_seed": seed, "only_labeled": False, "batch_size": BATCH, "shuffle_buffer": 4096,
                     "cache": True, "verify_inputs": "quick" if self.verified else "full"},
            "model": {"arch": "mlp", "hidden": 32},
            "optim": {"name": "adamw", "lr": lr, "weight_decay": wd, "schedule": "cosine"},
            "train": {"out_dir": str(self.tmp / "run"), "epochs": epochs, "seed": seed, "threads": 1,
                      "checkpoint_every_steps": 0, "eval_every_epochs": 0, "log_every_steps": 1000, "progress": False},
            "loss": losses,
        }
        if online:
            doc["online"] = online
        self.verified = True
        return doc

    def run(self, name: str, doc: dict, *, keep_predictions: bool = False) -> dict:
        if name in self.results["runs"] and not self.args.force:
            return self.results["runs"][name]
        shutil.rmtree(self.tmp / "run", ignore_errors=True)
        recipe = Recipe(parse_config(doc), cache=self.cache) if self.cache is not None else Recipe(parse_config(doc))
        start = time.perf_counter()
        try:
            recipe.setup()
            result = recipe.train()
            preds = recipe.predict() if keep_predictions else None
        finally:
            recipe.cleanup()
        record = {"eval": result.eval, "steps": result.steps, "epochs": result.epochs, "train_seconds": result.seconds,
                  "seconds": time.perf_counter() - start, "losses": doc["loss"], "data": doc["data"],
                  "optim": doc["optim"], "model": doc["model"], "online": doc.get("online", {}).get("enabled", False)}
        if preds is not None:
            record["dho_search"] = dho_search(preds)
        self.results["runs"][name] = record
        self.save()
        acc = result.eval.get("accuracy")
        print(f"{name:48s} acc {acc:.4f}  agree {result.eval.get('teacher_agreement', float('nan')):.4f}  "
              f"{record['seconds']:.0f}s", flush=True)
        return record


def _input_cache():
    """The trainer's in-memory input cache when this version has one (saves re-decoding PNGs per run)."""
    try:
        from kdstore.train.dataset import InputCache
    except ImportError:
        return None
    return InputCache()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def dho_search(p: dict) -> dict:
    """The DHO paper's post-hoc head mix, searched on these (validation) predictions:
    ``alpha · softmax(ce_head) + (1 − alpha) · softmax(kd_head / beta)``, alpha in 0..1 by 0.05,
    beta in DHO_BETAS (147 evaluations of one trained model; counted as tuning)."""
    ce, kd, labels = p["logits"].astype(np.float64), p["kd_logits"].astype(np.float64), p["labels"]
    has = labels >= 0
    p_ce = _softmax(ce)
    best = {"accuracy": -1.0, "evaluations": len(DHO_MIX_ALPHAS) * len(DHO_BETAS)}
    for beta in DHO_BETAS:
        p_kd = _softmax(kd / beta)
        for alpha in DHO_MIX_ALPHAS:
            pred = (alpha * p_ce + (1 - alpha) * p_kd).argmax(1)
            acc = float((pred[has] == labels[has]).mean())
            if acc > best["accuracy"]:
                best.update(accuracy=acc, alpha=alpha, beta=beta)
    return best


def kd_losses(T: float, alpha: float, teacher: str = "cnn") -> list[dict]:
    return [{"kind": "ce", "weight": round(1.0 - alpha, 6)}, {"kind": "kd", "teacher": teacher, "temperature": T, "weight": alpha}]


def dho_losses(T: float, alpha: float) -> list[dict]:
    return [{"kind": "dho", "teacher": "cnn", "temperature": T, "alpha": alpha}]


# --------------------------------------------------------------------------- stages


def _lo_name(lr: float, wd: float, mult: int) -> str:
    return f"lr{lr:g}_wd{wd:g}_x{mult}"


def _best(runs: dict, score) -> tuple:
    return max(runs, key=lambda k: score(runs[k]))


def stage_tune(b: Bench) -> None:
    g, e = GRIDS[b.args.grid], b.args.epochs
    acc = lambda r: r["eval"]["accuracy"]  # noqa: E731
    lo = {k: b.run(f"tune/labels_only/{_lo_name(*k)}", b.doc(split="val", seed=0, losses=[{"kind": "ce"}], epochs=e * k[2],
                                                         lr=k[0], wd=k[1])) for k in g["labels_only"]}
    kd = {(T, a): b.run(f"tune/kd/T{T:g}_a{a:g}", b.doc(split="val", seed=0, losses=kd_losses(T, a), epochs=e)) for T, a in g["kd"]}
    dho = {(T, w): b.run(f"tune/dho/T{T:g}_w{w:g}", b.doc(split="val", seed=0, losses=dho_losses(T, w), epochs=e),
                         keep_predictions=True) for T, w in g["dho"]}
    best_lo, best_kd = _best(lo, acc), _best(kd, acc)
    best_dho = _best(dho, lambda r: r["dho_search"]["accuracy"])
    mix = dho[best_dho]["dho_search"]
    b.results["tuned"]["few"] = {
        "labels_only": {"lr": best_lo[0], "weight_decay": best_lo[1], "epochs": e * best_lo[2], "val_accuracy": acc(lo[best_lo])},
        "kd": {"temperature": best_kd[0], "alpha": best_kd[1], "lr": BASE_LR, "weight_decay": BASE_WD, "epochs": e,
               "val_accuracy": acc(kd[best_kd])},
        "dho": {"temperature": best_dho[0], "loss_alpha": best_dho[1], "alpha": mix["alpha"], "beta": mix["beta"],
                "lr": BASE_LR, "weight_decay": BASE_WD, "epochs": e, "val_accuracy": mix["accuracy"]},
    }
    b.results["tuning_budget"] = {
        "few": {"labels_only_trainings": len(lo), "kd_trainings": len(kd), "dho_trainings": len(dho),
                "dho_head_mix_evaluations": mix["evaluations"] * len(dho),
                "note": "DHO's head mix is searched post hoc on each DHO run's validation predictions "
                        f"({mix['evaluations']} (alpha, beta) pairs per run): extra tuning the other methods do not get"},
    }
    b.save()


def stage_tune_full(b: Bench) -> None:
    g, fe = GRIDS[b.args.grid], b.args.full_epochs
    acc = lambda r: r["eval"]["accuracy"]  # noqa: E731
    flo = {k: b.run(f"tune/full/labels_only/{_lo_name(*k)}", b.doc(split="val", seed=0, losses=[{"kind": "ce"}], labels="all",
                                                               epochs=fe * k[2], lr=k[0], wd=k[1])) for k in g["full_labels_only"]}
    fkd = {(T, a): b.run(f"tune/full/kd/T{T:g}_a{a:g}", b.doc(split="val", seed=0, losses=kd_losses(T, a), labels="all", epochs=fe))
           for T, a in g["full_kd"]}
    best_flo, best_fkd = _best(flo, acc), _best(fkd, acc)
    b.results["tuned"]["full"] = {
        "labels_only": {"lr": best_flo[0], "weight_decay": best_flo[1], "epochs": fe * best_flo[2], "val_accuracy": acc(flo[best_flo])},
        "kd": {"temperature": best_fkd[0], "alpha": best_fkd[1], "lr": BASE_LR, "weight_decay": BASE_WD, "epochs": fe,
               "val_accuracy": acc(fkd[best_fkd])},
    }
    b.results.setdefault("tuning_budget", {})["full"] = {"labels_only_trainings": len(flo), "kd_trainings": len(fkd)}
    b.save()


def tuned(b: Bench, key: str) -> dict:
    if key not in b.results["tuned"]:
        raise SystemExit(f"run --stage tune first (no tuned settings for {key})")
    return b.results["tuned"][key]


def stage_few(b: Bench) -> None:
    t = tuned(b, "few")
    lo, kd, dh = t["labels_only"], t["kd"], t["dho"]
    for seed in b.args.seeds:
        b.run(f"few/labels_only/s{seed}", b.doc(split="test", seed=seed, losses=[{"kind": "ce"}], epochs=lo["epochs"],
                                                lr=lo["lr"], wd=lo["weight_decay"]))
        b.run(f"few/kd/s{seed}", b.doc(split="test", seed=seed, losses=kd_losses(kd["temperature"], kd["alpha"]), epochs=kd["epochs"]))
        doc = b.doc(split="test", seed=seed, losses=dho_losses(dh["temperature"], dh["loss_alpha"]), epochs=dh["epochs"])
        doc["model"].update(dho_alpha=dh["alpha"], dho_beta=dh["beta"])
        b.run(f"few/dho/s{seed}", doc)


def stage_full(b: Bench) -> None:
    t = tuned(b, "full")
    lo, kd = t["labels_only"], t["kd"]
    for seed in b.args.seeds:
        b.run(f"full/labels_only/s{seed}", b.doc(split="test", seed=seed, losses=[{"kind": "ce"}], labels="all",
                                                 epochs=lo["epochs"], lr=lo["lr"], wd=lo["weight_decay"]))
        b.run(f"full/kd/s{seed}", b.doc(split="test", seed=seed, losses=kd_losses(kd["temperature"], kd["alpha"]),
                                        labels="all", epochs=kd["epochs"]))


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


# --------------------------------------------------------------------------- statistics

# two-sided 97.5% quantiles of Student's t for df 1..30 (used when scipy is missing)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def welch(a: list[float], c: list[float]) -> dict:
    """Welch's t for mean(a) − mean(c): t, Welch–Satterthwaite df, two-sided p (scipy only), 95% interval."""
    a, c = np.asarray(a, float), np.asarray(c, float)
    diff = float(a.mean() - c.mean())
    out: dict = {"diff": diff, "n": [len(a), len(c)]}
    if len(a) < 2 or len(c) < 2:
        return out
    va, vc = a.var(ddof=1) / len(a), c.var(ddof=1) / len(c)
    se = math.sqrt(va + vc)
    if se == 0:
        return out
    df = (va + vc) ** 2 / (va**2 / (len(a) - 1) + vc**2 / (len(c) - 1))
    try:
        from scipy import stats

        q, p = float(stats.t.ppf(0.975, df)), float(2 * stats.t.sf(abs(diff / se), df))
    except ImportError:
        q, p = _T975[min(len(_T975), max(1, int(df))) - 1], None  # floor(df): a slightly wider interval
    out.update(t=float(diff / se), df=float(df), p=p, ci95=[float(diff - q * se), float(diff + q * se)])
    return out


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
        teacher = [r["eval"].get("teacher_accuracy") for r in runs]
        rows.append({"setting": setting, "seeds": len(runs), "accuracy_mean": float(acc.mean()),
                     "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0, "accuracies": acc.tolist(),
                     "agreement_mean": float(np.nanmean(agree)), "steps": runs[0]["steps"], "epochs": runs[0]["epochs"],
                     "optim": runs[0].get("optim"), "teacher_test_accuracy": teacher[0],
                     "train_seconds_mean": float(np.mean([r["train_seconds"] for r in runs]))})
    return rows


COMPARISONS = (("few/kd", "few/labels_only"), ("few/dho", "few/labels_only"), ("few/dho", "few/kd"),
               ("full/kd", "full/labels_only"), ("online/store_views", "online/online"))


def report(b: Bench) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = table(b.results)
    b.results["table"] = rows
    accs = {r["setting"]: r["accuracies"] for r in rows}
    gains = {}
    for a, c in COMPARISONS:
        if a in accs and c in accs:
            w = welch(accs[a], accs[c])
            gains[f"{a} - {c}"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in w.items()}
    b.results["gains"] = gains
    # exactly what ran, read from the runs themselves (a stage cut short shows as fewer runs)
    b.results["ran"] = {
        "tuning_runs": sorted(n for n in b.results["runs"] if n.startswith("tune/")),
        "test_runs": {r["setting"]: [int(n.rsplit("/s", 1)[1]) for n in b.results["runs"] if n.rsplit("/", 1)[0] == r["setting"]]
                      for r in rows},
        "train_seconds_total": round(sum(r["seconds"] for r in b.results["runs"].values()), 1),
    }
    teacher = next((r["teacher_test_accuracy"] for r in rows if r["setting"].startswith(("few", "full"))), None)
    if teacher is not None:
        b.results["teacher"]["test_accuracy"] = teacher
    b.save()
    t = Table(title="Fashion-MNIST, MLP 784-32-10 student (test accuracy, mean ± std over seeds)")
    for col in ("setting", "seeds", "lr / wd / epochs", "accuracy", "teacher agreement", "steps", "train s/run"):
        t.add_column(col, justify="left" if col == "setting" else "right")
    for r in rows:
        o = r["optim"] or {}
        t.add_row(r["setting"], str(r["seeds"]), f"{o.get('lr', 0):g} / {o.get('weight_decay', 0):g} / {r['epochs']:g}",
                  f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}", f"{r['agreement_mean']:.4f}", str(r["steps"]),
                  f"{r['train_seconds_mean']:.0f}")
    console = Console(width=130)
    console.print(t)
    g = Table(title="Gains (points of test accuracy; Welch t, 95% interval)")
    for col in ("comparison", "diff", "t", "df", "p", "95% interval"):
        g.add_column(col, justify="left" if col == "comparison" else "right")
    for name, w in gains.items():
        ci = w.get("ci95")
        g.add_row(name, f"{100 * w['diff']:+.2f}", f"{w.get('t', float('nan')):.2f}", f"{w.get('df', float('nan')):.1f}",
                  "-" if w.get("p") is None else f"{w['p']:.2g}", f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci else "-")
    console.print(g)
    tune = Table(title="Tuning on the validation split (train shards 0..26 → 27..29), seed 0")
    tune.add_column("run")
    tune.add_column("val accuracy", justify="right")
    for name, r in sorted(b.results["runs"].items()):
        if name.startswith("tune/"):
            extra = f" (heads mixed: {r['dho_search']['accuracy']:.4f})" if "dho_search" in r else ""
            tune.add_row(name, f"{r['eval']['accuracy']:.4f}{extra}")
    console.print(tune)
    console.print(f"tuned: {json.dumps(b.results['tuned'])}")
    console.print(f"tuning budget: {json.dumps(b.results.get('tuning_budget', {}))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--teacher-weights", required=True, help="weights of the stored teacher (recorded; online KD)")
    parser.add_argument("--teacher-trained-on", default="all 60,000 Fashion-MNIST training labels (kdstore teacher fashion-mnist)")
    parser.add_argument("--stage", action="append", choices=("tune", "few", "tune-full", "full", "online"), default=[])
    parser.add_argument("--grid", choices=tuple(GRIDS), default="full", help="size of every method's tuning search")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20, help="few-labels base epochs over the 60k rows")
    parser.add_argument("--full-epochs", type=int, default=10)
    parser.add_argument("--online-epochs", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality.json"))
    parser.add_argument("--force", action="store_true", help="rerun runs already in the JSON")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    settings = {"store": args.store, "grid": args.grid, "grids": GRIDS[args.grid], "epochs": args.epochs,
                "full_epochs": args.full_epochs, "online_epochs": args.online_epochs, "base_lr": BASE_LR,
                "base_weight_decay": BASE_WD, "batch_size": BATCH, "labels": LABELS, "labels_seed": "= seed",
                "student": "mlp 784-32-10", "threads": 1}
    b = Bench(args, settings)
    b.results["teacher"] = {"weights": args.teacher_weights, "trained_on": args.teacher_trained_on}
    b.results["machine"] = {"host": f"{platform.node()} {platform.machine()}", "cpus": os.cpu_count(),
                            "shared": "~6 engineers on these cores", "torch": torch.__version__,
                            "loadavg_at_start": [round(x, 1) for x in os.getloadavg()]}
    stages = {"tune": stage_tune, "few": stage_few, "tune-full": stage_tune_full, "full": stage_full, "online": stage_online}
    start = time.perf_counter()
    try:
        for name in args.stage:
            stages[name](b)
    finally:
        shutil.rmtree(b.tmp, ignore_errors=True)
        b.results["machine"]["last_invocation_seconds"] = round(time.perf_counter() - start, 1)
        report(b)


if __name__ == "__main__":
    main()
