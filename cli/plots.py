"""Pictures of what happened: a training run's curves and a store's statistics (matplotlib,
Agg backend, PNG files), and a TensorBoard copy of a run's metrics when TensorBoard is installed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdstore.store.errors import InputError
from kdstore.store.writer import VALID_ARRAY

TRAINING_PNG = "training.png"
TENSORBOARD_DIR = "tensorboard"
MAX_ROWS = 200_000  # rows read per teacher for the confidence histogram (whole shards, from the first)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """``(step records, eval records)`` of ``run_dir/metrics.jsonl`` (resume events dropped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"no {path}; is {run_dir} the train.out_dir of a `kdstore train` run?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r and r.get("split") != "eval"]
    evals = [r for r in records if r.get("split") == "eval"]
    return steps, evals


def plot_training(run_dir: str | Path, out: str | Path | None = None) -> dict:
    """Draw a run's curves to ``out`` (default ``run_dir/training.png``): loss terms, eval
    accuracy (with the teacher's own), agreement with the teacher, learning rate.

    Returns ``{"path": Path, "titles": [axes titles]}``.
    """
    steps, evals = read_metrics(run_dir)
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax_loss, ax_acc, ax_agree, ax_lr = axes.flat
    x = [r["step"] for r in steps]
    log_scale = bool(steps) and min(r["loss"] for r in steps) > 0

    def shown(values):  # on a log axis a term that is 0 on a batch (e.g. CE with no labelled row) is a gap
        return [v if v > 0 or not log_scale else np.nan for v in values]

    ax_loss.plot(x, shown([r["loss"] for r in steps]), color="black", lw=2, label="total (weighted)")
    for name in sorted({k for r in steps for k in r if k.startswith("loss/")}):
        ax_loss.plot([r["step"] for r in steps if name in r], shown([r[name] for r in steps if name in r]),
                     lw=1.2, label=name.removeprefix("loss/"))
    if log_scale:
        ax_loss.set_yscale("log")
    ax_loss.set(title="loss terms", xlabel="step", ylabel="loss (the batch at each logged step)")
    ax_loss.legend(fontsize=8)
    ex = [r["step"] for r in evals]
    for name, style in (("accuracy", "o-"), ("accuracy_ce_head", "s--"), ("accuracy_kd_head", "^--")):
        ys = [r.get(name) for r in evals]
        if any(y is not None for y in ys):
            ax_acc.plot(ex, [np.nan if y is None else y for y in ys], style, label=name.replace("_", " "))
    teacher_acc = [r["teacher_accuracy"] for r in evals if r.get("teacher_accuracy") is not None]
    if teacher_acc:
        ax_acc.axhline(teacher_acc[-1], color="grey", ls=":", label=f"teacher {teacher_acc[-1]:.4f}")
    if evals and evals[-1].get("accuracy") is not None:
        ax_acc.annotate(f"{evals[-1]['accuracy']:.4f}", (ex[-1], evals[-1]["accuracy"]), textcoords="offset points",
                        xytext=(-10, -14), fontsize=9)
    ax_acc.set(title="eval accuracy", xlabel="step", ylabel="accuracy")
    if ax_acc.get_legend_handles_labels()[0]:  # no eval yet: nothing to name
        ax_acc.legend(fontsize=8)
    agree = [r.get("teacher_agreement") for r in evals]
    if any(a is not None for a in agree):
        ax_agree.plot(ex, [np.nan if a is None else a for a in agree], "o-", color="tab:purple")
    else:
        ax_agree.text(0.5, 0.5, "no teacher logits in the store", ha="center", va="center", transform=ax_agree.transAxes)
    ax_agree.set(title="agreement with the teacher (eval)", xlabel="step", ylabel="same top-1 as teacher")
    ax_lr.plot(x, [r.get("lr", np.nan) for r in steps], color="tab:green")
    ax_lr.set(title="learning rate", xlabel="step", ylabel="lr")
    if not evals:
        for ax in (ax_acc, ax_agree):
            ax.text(0.5, 0.35, "no evaluation (data.eval_shards empty)", ha="center", transform=ax.transAxes)
    fig.suptitle(f"kdstore train: {run_dir}", fontsize=10)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / TRAINING_PNG
    fig.savefig(out, dpi=100)
    titles = [ax.get_title() for ax in axes.flat]
    plt.close(fig)
    return {"path": out, "titles": titles}


def log_tensorboard(run_dir: str | Path) -> Path | None:
    """Copy ``metrics.jsonl`` into TensorBoard event files under ``run_dir/tensorboard``
    (``train/*`` per logged step, ``eval/*`` per evaluation); None when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    steps, evals = read_metrics(run_dir)
    out = Path(run_dir) / TENSORBOARD_DIR
    for old in out.glob("events.out.tfevents.*"):  # a copy of metrics.jsonl: rewritten whole (after a resume too)
        old.unlink()
    writer = SummaryWriter(log_dir=str(out))
    try:
        for prefix, records in (("train", steps), ("eval", evals)):
            for r in records:
                for key, value in r.items():
                    if key not in ("time", "step", "split") and isinstance(value, (int, float)) and value is not None:
                        writer.add_scalar(f"{prefix}/{key}", value, global_step=r["step"], walltime=r.get("time"))
    finally:
        writer.close()
    return out


def after_run(run_dir: str | Path, echo: Callable[[str], Any] = print) -> dict:
    """What ``kdstore train`` calls after a run: the curves PNG and, when installed, TensorBoard."""
    drawn = plot_training(run_dir)
    echo(f"training curves -> {drawn['path']}")
    tb = log_tensorboard(run_dir)
    if tb is not None:
        echo(f"tensorboard --logdir {tb}")
    return {**drawn, "tensorboard": tb}


def _confidence(teacher, max_rows: int) -> np.ndarray | None:
    """``[n]`` max softmax probability of a teacher's rows (stored ``scores/max_prob``, else from
    ``logits`` at T = 1), read whole shard by whole shard from the first until ``max_rows``."""
    fields = teacher.fields
    name = "scores/max_prob" if "scores/max_prob" in fields else "logits" if "logits" in fields else None
    if name is None:
        return None
    chunks, rows = [], 0
    for index in sorted(teacher.done_records()):
        block = teacher.read_shard(name, index).astype(np.float32)
        block = block[teacher.read_shard(VALID_ARRAY, index).astype(bool)]
        if name == "logits":
            z = block - block.max(-1, keepdims=True)
            p = np.exp(z)
            block = (p / p.sum(-1, keepdims=True)).max(-1)
        chunks.append(block.reshape(-1))
        rows += len(block)
        if rows >= max_rows:
            break
    return np.concatenate(chunks) if chunks else None


def plot_store(store_path: str | Path, out: str | Path, max_rows: int = MAX_ROWS) -> dict:
    """Draw a store's statistics to ``out``: bytes per sample of every stored field, the
    teachers' confidence (max softmax probability) histogram, the label distribution.

    Returns ``{"path": Path, "titles": [axes titles]}``.
    """
    from kdstore.store.reader import open_store
    from kdstore.store.verify import summarize

    store = open_store(store_path)
    summary = summarize(store)
    plt = _pyplot()
    fig, (ax_bytes, ax_conf, ax_labels) = plt.subplots(1, 3, figsize=(15, 4.8))
    names, values = [], []
    for t in summary["teachers"]:
        for f in t["fields"]:
            names.append(f"{t['name']}:{f['field']}")
            values.append(f["bytes_per_sample"])
    if names:
        ax_bytes.barh(names, values, color="tab:blue")
        for i, v in enumerate(values):
            ax_bytes.text(v, i, f" {v:.1f}", va="center", fontsize=8)
        ax_bytes.set_xlim(0, max(values) * 1.18)
        ax_bytes.invert_yaxis()
        ax_bytes.tick_params(axis="y", labelsize=8)
    ax_bytes.set(title="bytes per sample on disk, by field", xlabel="bytes / sample")
    drew = False
    for name in store.teachers:
        conf = _confidence(store.teacher(name), max_rows)
        if conf is not None and len(conf):
            ax_conf.hist(conf, bins=40, range=(0, 1), alpha=0.6, label=f"{name} (median {np.median(conf):.2f}, n={len(conf):,})")
            drew = True
    if drew:
        ax_conf.set_yscale("log")  # confident teachers pile up at 1: the tail is what matters
        ax_conf.legend(fontsize=8)
    else:
        ax_conf.text(0.5, 0.5, "no logits or scores stored", ha="center", va="center", transform=ax_conf.transAxes)
    ax_conf.set(title="teacher confidence (max softmax prob.)", xlabel="max probability", ylabel="rows (log scale)")
    labels = store.labels
    known = labels[labels >= 0]
    if len(known):
        counts = np.bincount(known)
        ax_labels.bar(np.arange(len(counts)), counts, color="tab:orange")
        ax_labels.set_xticks(np.arange(len(counts)))
    ax_labels.set(title="label distribution", ylabel="rows",
                  xlabel=f"class ({len(known):,} labelled, {int((labels < 0).sum()):,} unlabelled rows)")
    fig.suptitle(f"kdstore store {store.path}: {store.num_rows:,} rows", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    titles = [ax.get_title() for ax in (ax_bytes, ax_conf, ax_labels)]
    plt.close(fig)
    return {"path": out, "titles": titles}
