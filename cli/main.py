"""The ``kdstore`` command: a thin click layer over kdstore.pipeline, .store and .train."""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

import click

from kdstore.cli.common import StoreLocationType, user_errors

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(version("kdstore"), prog_name="kdstore")
def main() -> None:
    """kdstore: run teachers once, store what they say, train students many times.

    \b
    Typical flow:
      kdstore shards fashion-mnist data/           # real input shards (WebDataset tars)
      kdstore teacher fashion-mnist runs/cnn.pt    # a small built-in teacher, 1500 steps (optional)
      kdstore precompute --store runs/store --inputs 'data/train-{000000..000029}.tar' \\
          --teacher kdstore.pipeline.zoo:fashion_cnn --teacher-arg weights=runs/cnn.pt \\
          --output logits --output topk:5
      kdstore info runs/store
      kdstore verify runs/store
    Or all of it at once: kdstore quickstart
    """


@main.command("teacher")
@click.argument("dataset", type=click.Choice(["fashion-mnist"]))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--steps", default=None, type=int, help="Optimiser steps (batch 128)  [default: 1500, about 3 epochs].")
@click.option("--seconds", default=None, type=float,
              help="Also stop after this wall time. Machine-dependent: a slower machine gets a weaker teacher.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=1, show_default=True,
              help="torch CPU threads; the same steps, seed and threads give the same weights on any machine speed.")
@click.option("--force", is_flag=True, help="Retrain even when OUT exists.")
@user_errors
def teacher_cmd(dataset: str, out: Path, steps: int | None, seconds: float | None, seed: int, threads: int, force: bool) -> None:
    """Train the built-in Fashion-MNIST CNN teacher for a fixed number of steps and save it to OUT (reused when present)."""
    from kdstore.pipeline.zoo import TEACHER_STEPS, train_fashion_cnn

    if out.exists() and not force:
        info = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
        click.echo(f"teacher {out} exists ({info.get('steps', '?')} steps, test accuracy {info.get('test_accuracy', '?')}); "
                   "--force to retrain")
        return
    info = train_fashion_cnn(out, steps=steps or TEACHER_STEPS, seconds=seconds, seed=seed, threads=threads, echo=click.echo)
    click.echo(f"teacher saved to {out}: test accuracy {info['test_accuracy']:.4f} after {info['steps']} steps "
               f"({info['seconds']:.0f}s" + (", stopped by --seconds" if info["stopped_by_time"] else "") + ")")


def _parse_teacher_args(items: tuple[str, ...]) -> tuple[tuple[str, object], ...]:
    from kdstore.store.errors import InputError

    parsed = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--teacher-arg must look like name=value, got {item!r}")
        try:
            parsed.append((key, json.loads(value)))
        except json.JSONDecodeError:
            parsed.append((key, value))
    return tuple(parsed)


@main.command("precompute")
@click.option("--store", "store_path", required=True, type=StoreLocationType(exists=False),
              help="Store folder (created if missing), or an fsspec URL such as s3://bucket/prefix.")
@click.option("--inputs", "-i", multiple=True, required=True, help="Input shards: paths, brace patterns ('data/train-{000000..000029}.tar'), globs or fsspec URLs. Repeatable.")
@click.option("--teacher", "factory", required=True, help="package.module:factory returning a kdstore Teacher or a torch.nn.Module.")
@click.option("--teacher-name", default=None, help="Name in the store (default: the factory's name).")
@click.option("--teacher-arg", multiple=True, help="name=value passed to the factory (JSON values parsed). Repeatable.")
@click.option("--input-key", default=None, help="Sample field the teacher reads (plain modules: default png).")
@click.option("--layer", "layers", multiple=True, help="Module layer to capture with a forward hook (for features:/embedding:). Repeatable.")
@click.option("--output", "-o", "outputs", multiple=True, default=("logits",), show_default=True,
              help="logits | topk:K | features:LAYER[:none|mean|flatten] | embedding[:LAYER][:l2] | scores | tokens:NAME (a teacher's per-token output) | tokens:topk:K | tokens:sample:S (per-token top-k / RS-KD draws of tokens/logits at --temperature, draws seeded by --seed). Repeatable.")
@click.option("--temperature", default=1.0, show_default=True, help="Temperature for the top-k residual mass and the per-token reduce ops (recorded).")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]))
@click.option("--views", default=0, show_default=True, help="Augmented views per sample (0 = un-augmented input).")
@click.option("--augment", default="", help="View transforms, e.g. 'rrc:scale=0.5-1,ratio=0.75-1.333;hflip:p=0.5'.")
@click.option("--transform", default="", help="Image preprocessing before the teacher, recorded and replayed for the student: "
              "'resize:32;center_crop:28;mode:L' (also normalize:mean=M,std=S). Needed when images differ in size.")
@click.option("--seed", default=0, show_default=True, help="Seed of the view parameters and of the tokens:sample draws.")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--workers", default=0, show_default=True, help="Ray actors, each loading the teacher once (0 = auto: one per GPU with --device cuda, else min(4, CPUs)).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda (one GPU per worker; pick GPUs with CUDA_VISIBLE_DEVICES) or mps.")
@click.option("--amp", is_flag=True, help="Autocast the teacher forward (useful on cuda).")
@click.option("--ray-address", default=None,
              help="Join this Ray cluster instead of starting a local one. With a local --store every node must see it "
                   "and the input shards at the same path (checked before the run); a store and inputs in object storage "
                   "(s3://...) need no shared filesystem (docs/CLUSTER.md).")
@click.option("--cpus-per-worker", type=float, default=None,
              help="Ray CPUs each worker reserves (and torch threads it uses)  [default: min(1, CPUs/(workers+1))].")
@click.option("--gpus-per-worker", type=float, default=None,
              help="Ray GPUs each worker reserves with --device cuda (0.5: two workers share a GPU)  [default: 1].")
@click.option("--on-error", default="fail", show_default=True, type=click.Choice(["fail", "skip"]),
              help="fail: stop at the first bad shard/sample. skip: record it in the store and go on.")
@click.option("--overwrite", is_flag=True, help="Discard this teacher's stored outputs (or the whole store if the inputs changed) and start over.")
@click.option("--no-progress", is_flag=True)
@user_errors
def precompute_cmd(store_path, inputs, factory, teacher_name, teacher_arg, input_key, layers, outputs, temperature,
                   dtype, views, augment, transform, seed, batch_size, workers, device, amp, ray_address, cpus_per_worker,
                   gpus_per_worker, on_error, overwrite, no_progress) -> None:
    """Run a teacher once over WebDataset shards and store its outputs (resumes when rerun)."""
    from kdstore.pipeline.job import PrecomputeConfig, run_precompute
    from kdstore.pipeline.teacher import TeacherLoad

    cfg = PrecomputeConfig(
        store=store_path,
        inputs=tuple(inputs),
        teacher=TeacherLoad(factory=factory, name=teacher_name, input_key=input_key, layers=tuple(layers),
                            kwargs=_parse_teacher_args(teacher_arg), device=device),
        outputs=tuple(outputs), temperature=temperature, dtype=dtype, views=views, augment=augment, transform=transform, seed=seed,
        batch_size=batch_size, workers=workers, ray_address=ray_address, cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker, on_error=on_error, overwrite=overwrite,
        amp=amp, progress=not no_progress,
    )
    result = run_precompute(cfg)
    click.echo(
        f"teacher {result.teacher}: {result.shards_run} shards run, {result.shards_already_done} already done, "
        f"{result.rows} rows, {result.samples_skipped} samples skipped, {result.seconds:.1f}s"
        + (f" ({result.samples_per_s:.0f} samples/s)" if result.rows_run else "")
    )
    if result.workers_lost:
        click.echo(f"{result.workers_lost} worker(s) lost (a node or process died); shard(s) {result.shards_lost} "
                   "were handed to another worker")
    for skipped in result.skipped_shards:
        click.echo(f"skipped shard {skipped['url']}: {skipped['reason']}", err=True)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes:.0f} B"
        nbytes /= 1024
    return str(nbytes)


@main.command("info")
@click.argument("store_path", type=StoreLocationType(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw per-field bytes, the teachers' confidence histogram and the label distribution to this PNG.")
@click.option("--keys", "show_keys", is_flag=True, help="Also list the first stored keys (see `kdstore keys`).")
@user_errors
def info_cmd(store_path: Path, as_json: bool, plot_path: Path | None = None, show_keys: bool = False) -> None:
    """Rows, shards done/missing, teachers and their fields (shape, dtype, bytes on disk, bytes/sample)."""
    from rich.console import Console
    from rich.table import Table

    from kdstore.store.reader import open_store
    from kdstore.store.verify import summarize

    summary = summarize(open_store(store_path))
    if plot_path is not None:
        from kdstore.cli.plots import plot_store

        drawn = plot_store(store_path, plot_path)
        click.echo(f"store statistics -> {drawn['path']}", err=as_json)
    if show_keys:
        _print_keys(store_path, limit=20, shard=None, as_json=False)
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    console = Console()
    console.print(
        f"[bold]{summary['path']}[/]  format v{summary['format_version']}  rows {summary['rows']:,} "
        f"({summary['labeled_rows']:,} labeled)  shards {summary['shards']}"
        + (f"  [yellow]+ {summary['pending_shards']} pending[/] (not listed yet: precompute unfinished; "
           "rows so far are final)" if summary.get("pending_shards") else "")
    )
    for skipped in summary["skipped_shards"]:
        console.print(f"[yellow]skipped input shard[/] {skipped['url']}: {skipped['reason']}")
    for t in summary["teachers"]:
        table = Table(title=f"teacher {t['name']}  shards done {t['shards_done']}/{t['shards_done'] + t['shards_missing']}"
                      f"  skipped samples {t['samples_skipped']}  T={t['temperature']}  views={t['views']}")
        for col in ("field", "shape", "dtype", "bytes on disk", "bytes/sample"):
            table.add_column(col, justify="right" if "bytes" in col else "left")
        for f in t["fields"]:
            lead = "N×tokens" if f.get("ragged") else "N"
            shape = f"[{lead}, " + ", ".join(map(str, f["shape"])) + "]" if f["shape"] else f"[{lead}]"
            table.add_row(f["field"], shape, f["dtype"], _human(f["bytes_on_disk"]), f"{f['bytes_per_sample']:.1f}")
        console.print(table)
        for f in t["fields"]:
            if f.get("ragged"):
                console.print(f"  {f['field']}: {f['bytes_per_token']:.2f} bytes/token on disk "
                              f"({f['raw_bytes_per_token']} raw) over {f['tokens']:,} tokens")
        for s in t["skipped_examples"]:
            where = f"row {s['row']}" if s.get("row") is not None else f"shard {s['shard']} sample {s['index_in_shard']}"
            console.print(f"  [yellow]skipped[/] {where} key {s['key']}: {s['reason']}")
    for idx in summary["indexes"]:
        if "error" in idx:
            console.print(f"[red]{idx['error']}[/]")
            continue
        console.print(f"index {idx['name']}: {idx.get('kind', '?')} {idx.get('metric', '')} "
                      f"ntotal={idx.get('ntotal', '?')} dim={idx.get('dim', '?')} {_human(idx['bytes_on_disk'])}")


def _print_keys(store_path: Path, *, limit: int, shard: int | None, as_json: bool, offset: int = 0) -> None:
    import numpy as np

    from kdstore.store.errors import InputError
    from kdstore.store.reader import open_store

    store = open_store(store_path)
    table = store.samples()
    rows = np.arange(store.num_rows)
    if shard is not None:
        if shard not in store.numbered:
            indices = [s.index for s in store.shards]
            raise InputError(f"--shard must be one of the store's shards ({indices[0]}..{indices[-1]}), got {shard}"
                             if indices else f"store {store.path} has no shard with rows yet")
        rows = rows[table.column("shard").to_numpy() == shard]
    total = len(rows)
    rows = rows[offset:] if not limit else rows[offset : offset + limit]
    keys, labels, shards = store.keys, store.labels, table.column("shard").to_numpy()
    if not as_json:
        click.echo(f"{'row':>8}  {'shard':>5}  {'label':>5}  key")
    for row in rows:
        if as_json:
            click.echo(json.dumps({"row": int(row), "key": keys[row], "shard": int(shards[row]), "label": int(labels[row])}))
        else:
            click.echo(f"{row:>8}  {shards[row]:>5}  {labels[row]:>5}  {keys[row]}")
    if not as_json and len(rows) < total:
        click.echo(f"... {len(rows)} of {total:,} rows shown (--limit 0 lists all; --offset, --shard select)")


@main.command("keys")
@click.argument("store_path", type=StoreLocationType(exists=True))
@click.option("--limit", default=20, show_default=True, help="Rows to list (0 = all).")
@click.option("--offset", default=0, show_default=True, help="Skip this many rows first.")
@click.option("--shard", type=int, default=None, help="Only this shard's rows (its index, as in `kdstore info`).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines: row, key, shard, label.")
@user_errors
def keys_cmd(store_path: Path, limit: int, offset: int, shard: int | None, as_json: bool) -> None:
    """List stored samples: row, shard, label (-1 = none) and key (for `kdstore query --key`)."""
    _print_keys(store_path, limit=limit, shard=shard, as_json=as_json, offset=offset)


@main.command("verify")
@click.argument("store_path", type=StoreLocationType(exists=True))
@click.option("--shards", multiple=True, help="Only these shards (index, URL or URL substring). Repeatable.")
@click.option("--skip-inputs", is_flag=True, help="Do not re-read the input shards to compare keys.")
@click.option("--inputs-root", default=None,
              help="The input shards moved: read them under this folder (it replaces their recorded common folder).")
@user_errors
def verify_cmd(store_path: Path, shards: tuple[str, ...], skip_inputs: bool, inputs_root: str | None) -> None:
    """Re-check checksums, row coverage and input keys; exit 1 naming the first problem."""
    from kdstore.store.reader import open_store
    from kdstore.store.verify import verify_store

    report = verify_store(open_store(store_path), shards=shards or None, check_inputs=not skip_inputs,
                          inputs_root=inputs_root)
    if report.ok:
        click.echo(f"ok: {report.shards_checked} shard checks, {report.fields_checked} field checksums")
        return
    click.echo(f"FAILED: {report.problems[0]}", err=True)
    if len(report.problems) > 1:
        click.echo(f"... and {len(report.problems) - 1} more problem(s)", err=True)
    sys.exit(1)


# The subcommands that live in their own modules (imported after info_cmd, which quickstart reuses).
from kdstore.cli.lm import lm_shards_cmd, lm_teacher_cmd  # noqa: E402
from kdstore.cli.quickstart import quickstart_cmd  # noqa: E402
from kdstore.cli.retrieval import index_cmd, mine_cmd, query_cmd  # noqa: E402
from kdstore.cli.shards import shards_cmd  # noqa: E402
from kdstore.cli.train import train_cmd  # noqa: E402

for _cmd in (index_cmd, mine_cmd, query_cmd, shards_cmd, train_cmd, quickstart_cmd, lm_teacher_cmd, lm_shards_cmd):
    main.add_command(_cmd)

if __name__ == "__main__":
    main()
