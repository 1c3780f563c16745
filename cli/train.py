"""``kdstore train``: a thin click layer over :mod:`kdstore.train.recipe`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kdstore.cli.common import user_errors


@click.command("train")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Override a config field, e.g. --set optim.lr=0.01 --set loss.1.temperature=2. Repeatable.")
@click.option("--store", default=None, help="Shortcut for --set data.store=PATH.")
@click.option("--out", "out_dir", default=None, help="Shortcut for --set train.out_dir=DIR.")
@click.option("--seed", type=int, default=None, help="Shortcut for --set train.seed=N.")
@click.option("--epochs", type=int, default=None, help="Shortcut for --set train.epochs=N.")
@click.option("--resume", is_flag=True,
              help="Continue from the newest checkpoint in train.out_dir (its config must match this one).")
@click.option("--overwrite", is_flag=True,
              help="Start over in a non-empty train.out_dir: delete the files an earlier run wrote there first.")
@click.option("--resume-from", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Continue from this checkpoint file.")
@click.option("--print-config", is_flag=True, help="Print the validated config as JSON and exit.")
@click.option("--no-progress", is_flag=True)
@user_errors
def train_cmd(config, overrides, store, out_dir, seed, epochs, resume, overwrite, resume_from, print_config,
              no_progress) -> None:
    """Train a student from a store, driven by a TOML (or YAML) CONFIG file.

    \b
    Run on more processes with torchrun (DDP; gloo on CPU, nccl on CUDA):
      torchrun --nproc_per_node 2 -m kdstore.cli.main train configs/fashion_few_labels_kd.toml
    Writes OUT/config.json, OUT/metrics.jsonl, OUT/checkpoints/, OUT/student.pt, OUT/summary.json and
    OUT/training.png (the curves; also OUT/tensorboard/ when TensorBoard is installed);
    a non-empty OUT is refused unless --resume or --overwrite is given.
    """
    from kdstore.cli.plots import after_run
    from kdstore.store.lock import store_lock
    from kdstore.train.config import load_config
    from kdstore.cli.summary import print_summary
    from kdstore.train.recipe import run

    extra = list(overrides)
    for name, value in (("data.store", store), ("train.out_dir", out_dir), ("train.seed", seed), ("train.epochs", epochs)):
        if value is not None:
            extra.append(f"{name}={json.dumps(value) if isinstance(value, str) else value}")
    if no_progress:
        extra.append("train.progress=false")
    cfg = load_config(config, extra)
    if print_config:
        click.echo(json.dumps(cfg.to_dict(), indent=1))
        return
    def on_done(recipe, result) -> None:
        print_summary(recipe, result)
        after_run(recipe.out_dir, echo=click.echo)

    with store_lock(cfg.data.store, shared=True):  # precompute --overwrite is refused meanwhile
        run(cfg, resume=resume_from or resume, overwrite=overwrite, on_done=on_done)
