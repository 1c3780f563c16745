"""``kdstore quickstart``: the embedded default job, end to end on a real dataset.

Fashion-MNIST shards → a small CNN teacher (a fixed number of steps, trained once, reused)
→ precompute on a local Ray into a local store → ``info`` and ``verify`` → a student
trained from the store with few labels, compared with the same student on those labels
alone. Each step reuses what a previous run left (shards, teacher, stored shards, finished
student runs with the same settings), so a rerun is quick. The figures go to
``WORKDIR/results.json``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import click

from kdstore.cli.common import user_errors

RESULTS_FILE = "results.json"


@click.command("quickstart")
@click.option("--workdir", default="runs/quickstart", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--teacher-steps", default=None, type=int,
              help="Optimiser steps to train the teacher (first run only)  [default: 1500].")
@click.option("--workers", default=2, show_default=True, help="Ray actors for precompute.")
@click.option("--skip-student", is_flag=True, help="Stop after precompute (no student training).")
@click.option("--seeds", default=1, show_default=True, help="Student seeds for the few-labels comparison.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.pass_context
@user_errors
def quickstart_cmd(ctx: click.Context, workdir: Path, teacher_steps: int | None, workers: int, skip_student: bool,
                   seeds: int, no_progress: bool) -> None:
    """Run the whole flow on Fashion-MNIST with a local Ray and a local store under WORKDIR.

    Writes WORKDIR/results.json: teacher steps and accuracy, precompute time, student accuracies, gain.
    """
    import torch

    from kdstore.cli.demo import few_labels_demo
    from kdstore.cli.main import info_cmd
    from kdstore.pipeline.datasets import fashion_mnist_shards
    from kdstore.pipeline.job import PrecomputeConfig, run_precompute
    from kdstore.pipeline.teacher import TeacherLoad
    from kdstore.pipeline.zoo import TEACHER_STEPS, train_fashion_cnn
    from kdstore.store.reader import open_store
    from kdstore.store.schema import write_json_atomic
    from kdstore.store.verify import verify_store

    start = time.perf_counter()
    progress = not no_progress
    data, weights, store = workdir / "shards", workdir / "teacher.pt", workdir / "store"
    results_path = workdir / RESULTS_FILE
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}}
    click.secho("1/5 input shards", bold=True)
    if not (data / "test-000004.tar").exists():
        fashion_mnist_shards(data, shard_size=2000, progress=progress)
    click.echo(f"    {len(list(data.glob('*.tar')))} WebDataset shards in {data}")
    click.secho("2/5 teacher", bold=True)
    if weights.exists():
        meta = weights.with_suffix(".json")
        info = json.loads(meta.read_text()) if meta.is_file() else {}
        click.echo(f"    reusing {weights} ({info.get('steps', '?')} steps, test accuracy {info.get('test_accuracy', '?')})")
        results["teacher"] = {**info, "reused": True}
    else:
        steps = teacher_steps or TEACHER_STEPS
        info = train_fashion_cnn(weights, steps=steps, progress=progress, echo=click.echo)
        click.echo(f"    {info['steps']} steps in {info['seconds']:.0f}s: test accuracy {info['test_accuracy']:.4f} -> {weights}")
        results["teacher"] = {**info, "reused": False}
    click.secho("3/5 precompute (local Ray)", bold=True)
    cfg = PrecomputeConfig(
        store=store,
        inputs=(str(data / "train-{000000..000029}.tar"), str(data / "test-{000000..000004}.tar")),
        teacher=TeacherLoad(factory="kdstore.pipeline.zoo:fashion_cnn", name="cnn",
                            kwargs=(("weights", str(weights)),), layers=("embed",)),
        outputs=("logits", "topk:5", "embedding:embed", "scores"),
        temperature=1.0,
        workers=workers,
        progress=progress,
    )
    result = run_precompute(cfg)
    click.echo(f"    {result.shards_run} shards run, {result.shards_already_done} already done, {result.seconds:.1f}s")
    results["precompute"] = {"rows": result.rows, "rows_run": result.rows_run, "shards_run": result.shards_run,
                             "shards_already_done": result.shards_already_done, "seconds": result.seconds,
                             "samples_per_s": result.samples_per_s, "workers": workers}
    # The time of the run that computed every row (a rerun finds them done and takes seconds).
    first = results["precompute"] if result.rows_run == result.rows else previous.get("precompute_first_run")
    if first:
        results["precompute_first_run"] = first
    click.secho("4/5 store", bold=True)
    ctx.invoke(info_cmd, store_path=store, as_json=False)
    report = verify_store(open_store(store), check_inputs=False)
    click.echo(f"    verify: {'ok' if report.ok else report.problems[0]}")
    results["verify_ok"] = report.ok
    if not skip_student:
        click.secho("5/5 student from the store: 1,000 labels + teacher targets on 60,000 images", bold=True)
        results["students"] = few_labels_demo(store, workdir=workdir / "students", seeds=tuple(range(seeds)),
                                              progress=progress, echo=click.echo)
    results["seconds"] = time.perf_counter() - start
    write_json_atomic(results_path, results)
    click.echo(f"figures -> {results_path}")
