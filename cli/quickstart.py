"""``kdstore quickstart``: the embedded default job, end to end on a real dataset.

Fashion-MNIST shards → a small CNN teacher (trained once, reused) → precompute on a local
Ray into a local store → ``info`` and ``verify`` → a student trained from the store with
few labels, compared with the same student on those labels alone. Each step reuses what a
previous run left, so a rerun is quick.
"""

from __future__ import annotations

from pathlib import Path

import click

from kdstore.cli.common import user_errors


@click.command("quickstart")
@click.option("--workdir", default="runs/quickstart", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--teacher-seconds", default=60.0, show_default=True, help="Time budget to train the teacher (first run only).")
@click.option("--workers", default=2, show_default=True, help="Ray actors for precompute.")
@click.option("--skip-student", is_flag=True, help="Stop after precompute (no student training).")
@click.option("--seeds", default=1, show_default=True, help="Student seeds for the few-labels comparison.")
@click.pass_context
@user_errors
def quickstart_cmd(ctx: click.Context, workdir: Path, teacher_seconds: float, workers: int, skip_student: bool, seeds: int) -> None:
    """Run the whole flow on Fashion-MNIST with a local Ray and a local store under WORKDIR."""
    from kdstore.cli.main import info_cmd
    from kdstore.pipeline.datasets import fashion_mnist_shards
    from kdstore.pipeline.job import PrecomputeConfig, run_precompute
    from kdstore.pipeline.teacher import TeacherLoad
    from kdstore.pipeline.zoo import train_fashion_cnn
    from kdstore.store.reader import open_store
    from kdstore.store.verify import verify_store

    data, weights, store = workdir / "shards", workdir / "teacher.pt", workdir / "store"
    click.secho("1/5 input shards", bold=True)
    if not (data / "test-000004.tar").exists():
        fashion_mnist_shards(data, shard_size=2000)
    click.echo(f"    {len(list(data.glob('*.tar')))} WebDataset shards in {data}")
    click.secho("2/5 teacher", bold=True)
    if weights.exists():
        click.echo(f"    reusing {weights}")
    else:
        info = train_fashion_cnn(weights, seconds=teacher_seconds)
        click.echo(f"    trained in {info['seconds']:.0f}s: test accuracy {info['test_accuracy']:.4f} -> {weights}")
    click.secho("3/5 precompute (local Ray)", bold=True)
    cfg = PrecomputeConfig(
        store=store,
        inputs=(str(data / "train-{000000..000029}.tar"), str(data / "test-{000000..000004}.tar")),
        teacher=TeacherLoad(factory="kdstore.pipeline.zoo:fashion_cnn", name="cnn",
                            kwargs=(("weights", str(weights)),), layers=("embed",)),
        outputs=("logits", "topk:5", "embedding:embed", "scores"),
        temperature=1.0,
        workers=workers,
    )
    result = run_precompute(cfg)
    click.echo(f"    {result.shards_run} shards run, {result.shards_already_done} already done, {result.seconds:.1f}s")
    click.secho("4/5 store", bold=True)
    ctx.invoke(info_cmd, store_path=store, as_json=False)
    report = verify_store(open_store(store), check_inputs=False)
    click.echo(f"    verify: {'ok' if report.ok else report.problems[0]}")
    if skip_student:
        return
    click.secho("5/5 student from the store: 1,000 labels + teacher targets on 60,000 images", bold=True)
    from kdstore.train import recipe

    demo = getattr(recipe, "few_labels_demo", None)
    if demo is None:
        click.echo("    (this build has no student demo)")
        return
    demo(store, workdir=workdir / "students", seeds=tuple(range(seeds)), echo=click.echo)
