"""``kdstore index``, ``kdstore mine``, ``kdstore query``: click over kdstore.store.retrieval.

Each command holds the store's shared readers' lock (``kdstore.store.lock.store_lock``)
while it runs, so ``precompute --overwrite`` cannot delete what it reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from kdstore.cli.common import StoreLocationType, user_errors

STORE_ARG = click.argument("store", type=StoreLocationType(exists=True))  # a folder, or s3://bucket/prefix
TEACHER_OPT = click.option("--teacher", "teacher", required=True, help="Teacher name in the store.")
FIELD_OPT = click.option("--field", default="embedding", show_default=True, help="Stored vector field ([D] per row): the one indexed (index, mine) or searched (query).")


def _index_options(fn=None, *, mine: bool = False):
    """The index options; for ``mine`` every default is None (= not given: see get_or_build_index)."""
    if fn is None:
        return lambda f: _index_options(f, mine=mine)

    def d(value):
        return None if mine else value

    kinds = ["exact", "flat", "ivf", "hnsw", "ivfpq"] if mine else ["flat", "ivf", "hnsw", "ivfpq"]
    show = not mine
    options = [
        click.option("--kind", type=click.Choice(kinds), default=d("hnsw"), show_default=show,
                     help="[default: exact up to 50,000 rows, above: the saved index, else hnsw]" if mine else None),
        click.option("--metric", type=click.Choice(["cosine", "ip", "l2"]), default=d("cosine"), show_default=show,
                     help="[default: cosine]" if mine else None),
        click.option("--nlist", type=int, default=None, help="IVF lists [default: power of two nearest 8*sqrt(rows), at most rows/39]."),
        click.option("--nprobe", type=int, default=None, help="IVF lists searched [default: max(8, min(nlist/16, 32), nlist/64)]."),
        click.option("--hnsw-m", type=int, default=d(32), show_default=show, help="HNSW links per node" + (" [default: 32]." if mine else ".")),
        click.option("--ef-construction", type=int, default=d(40), show_default=show, help="[default: 40]" if mine else None),
        click.option("--ef-search", type=int, default=d(64), show_default=show, help="[default: 64]" if mine else None),
        click.option("--pq-m", type=int, default=None, help="IVF-PQ sub-quantisers (divides dim) [default: dim/8]."),
        click.option("--pq-nbits", type=int, default=d(8), show_default=show, help="[default: 8]" if mine else None),
        click.option("--codec", type=click.Choice(["flat", "fp16", "sq8", "fastscan"]), default=None,
                     help="How IVF stores vectors: flat (float32), fp16 (half the memory), sq8 (8-bit scalar "
                          "quantiser), fastscan (4-bit PQ codes scanned with SIMD, top candidates re-ranked on fp16 "
                          "vectors; CPU only) [default: fastscan; fp16 when FAISS sees a GPU]."),
        click.option("--train-rows", type=int, default=None, help="Rows sampled to train IVF [default: min(256*nlist, 2^18), at least 39*nlist]."),
        click.option("--index-seed", type=int, default=d(0), show_default=show,
                     help="Seed of the training sample and k-means" + (" [default: 0]." if mine else ".")),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


_OPTION_NAMES = ("kind", "metric", "nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search", "pq_m", "pq_nbits",
                 "codec", "train_rows", "index_seed")


def _given_index_options(kw: dict) -> dict:
    """Pop the index options from ``kw``; keep those given (not None), named as IndexSpec fields."""
    values = {name: kw.pop(name) for name in _OPTION_NAMES}
    return {("seed" if k == "index_seed" else k): v for k, v in values.items() if v is not None}


def _index_spec(kw: dict):
    from kdstore.store.index import IndexSpec

    return IndexSpec(
        kind=kw.pop("kind"), metric=kw.pop("metric"), nlist=kw.pop("nlist"), nprobe=kw.pop("nprobe"),
        hnsw_m=kw.pop("hnsw_m"), ef_construction=kw.pop("ef_construction"), ef_search=kw.pop("ef_search"),
        pq_m=kw.pop("pq_m"), pq_nbits=kw.pop("pq_nbits"), codec=kw.pop("codec"), train_rows=kw.pop("train_rows"),
        seed=kw.pop("index_seed"),
    )


@click.command("index")
@STORE_ARG
@TEACHER_OPT
@FIELD_OPT
@_index_options
@click.option("--stream", is_flag=True, help="Read the field shard block by shard block instead of whole.")
@user_errors
def index_cmd(store: Path, teacher: str, field: str, stream: bool, **kw) -> None:
    """Build a FAISS index over a teacher's stored vectors: STORE/index/TEACHER.FIELD.faiss (+ .json).

    Uses the GPU when FAISS sees one (not for hnsw). Recall@10 against flat stays above 0.95
    with the defaults on real sentence embeddings; see docs for the measured figures.
    """
    from kdstore.store.lock import store_lock
    from kdstore.store.retrieval import build_store_index

    with store_lock(store, shared=True):
        index, path = build_store_index(store, teacher, field, _index_spec(kw), in_memory=not stream)
    params = {k: v for k, v in index.metadata()["params"].items() if v is not None}
    click.echo(
        f"{index.spec.kind} ({index.metric}) index of {index.ntotal} rows x {index.dim} in {index.build_seconds:.2f} s "
        f"on {'gpu' if index.on_gpu else 'cpu'}, {path.stat().st_size / 2**20:.1f} MiB -> {path}"
    )
    click.echo("params: " + " ".join(f"{k}={v}" for k, v in params.items()))


@click.command("mine")
@STORE_ARG
@TEACHER_OPT
@FIELD_OPT
@click.option("--name", default=None, help="Output STORE/negatives/NAME.parquet [default: the teacher name].")
@click.option("--num-negatives", type=int, default=3, show_default=True)
@click.option("--range-min", type=int, default=0, show_default=True, help="Skip the first N surviving candidates.")
@click.option("--range-max", type=int, default=None, help="Candidates considered [default: range-min + 10*num-negatives with filters, else + num-negatives].")
@click.option("--max-score", type=float, default=None, help="Drop candidates scoring above this.")
@click.option("--min-score", type=float, default=None, help="Drop candidates scoring below this.")
@click.option("--absolute-margin", type=float, default=None, help="Drop candidates with score + margin > positive score.")
@click.option("--relative-margin", type=float, default=None, help="Drop candidates with score > positive - |positive| * margin.")
@click.option("--exclude-same-label", is_flag=True, help="Never pick a row with the query's label.")
@click.option("--positive", type=click.Choice(["label", "pairs", "none"]), default="label", show_default=True,
              help="label: nearest row with the same label; pairs: from --pairs; none.")
@click.option("--pairs", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Parquet/CSV with columns anchor, positive (keys or rows).")
@click.option("--sampling", type=click.Choice(["top", "random"]), default="top", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --sampling random.")
@click.option("--batch-rows", type=int, default=4096, show_default=True, help="Queries per index search.")
@click.option("--rebuild-index", is_flag=True, help="Build (and save) the FAISS index again with the options below first.")
@_index_options(mine=True)
@user_errors
def mine_cmd(store: Path, teacher: str, field: str, name: str | None, rebuild_index: bool, pairs: Path | None, **kw) -> None:
    """Mine hard negatives for every indexed row: STORE/negatives/NAME.parquet.

    Options follow sentence-transformers' mine_hard_negatives. Without --kind: exact search
    (blocked matrix product, no FAISS) up to 50,000 rows; above, the saved index, else HNSW.
    A saved index is used only when it matches the index options given; otherwise the
    requested one is built and saved; options the kind does not use are refused.
    Columns: row, key, positive_row, positive_score, negative_rows, negative_scores.
    """
    from kdstore.store.lock import store_lock
    from kdstore.store.mine import MineSpec
    from kdstore.store.retrieval import mine_store

    index_options = _given_index_options(kw)
    spec = MineSpec(**kw)
    with store_lock(store, shared=True):
        path, stats = mine_store(
            store, teacher, field, spec, name=name, pairs=pairs, index_options=index_options, rebuild_index=rebuild_index
        )
    click.echo(f"index: {stats.index}")
    click.echo(f"mined {stats.negatives} negatives for {stats.queries} rows in {stats.seconds:.2f} s -> {path}")
    click.echo(f"candidates {stats.candidates}; skipped " + (", ".join(f"{k} {v}" for k, v in stats.skipped.items()) or "none"))
    if stats.short_rows:
        click.echo(f"{stats.short_rows} rows got fewer than {spec.num_negatives} negatives "
                   "(widen --range-max or loosen the margins / scores)")
    if stats.without_positive:
        click.echo(f"{stats.without_positive} rows have no positive (margins were not applied to them)")


@click.command("query")
@STORE_ARG
@TEACHER_OPT
@FIELD_OPT
@click.option("--key", default=None, help="A stored sample's key.")
@click.option("--row", type=int, default=None, help="A stored row.")
@click.option("--vector", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="A .npy vector [D].")
@click.option("--text", default=None, help="Raw text, embedded with the store's teacher.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="An image file, embedded with the store's teacher.")
@click.option("--teacher-factory", default=None, metavar="MODULE:FN",
              help="With --text/--image: the factory that rebuilds the store's teacher; must equal the one "
                   "teacher.json records (a store never runs code you did not name).")
@click.option("--trust-store", is_flag=True,
              help="With --text/--image: run whatever factory the store's teacher.json records.")
@click.option("--device", default="cpu", show_default=True, help="Where a --text/--image teacher runs.")
@click.option("-k", "k", type=int, default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
@user_errors
def query_cmd(store: Path, teacher: str, field: str, k: int, as_json: bool, **kw) -> None:
    """Print the K stored rows nearest to one query (by key, row, vector, text or image).

    A query by --key or --row leaves that row itself out of the results; a --vector, --text
    or --image query keeps every row (an exact copy of a stored sample comes back first).
    Keys and rows: `kdstore keys STORE`.

    --text and --image rebuild the store's teacher to embed the query: name its factory with
    --teacher-factory (checked against the store's record) or pass --trust-store.
    """
    from kdstore.pipeline.embed import query
    from kdstore.store.lock import store_lock
    from kdstore.store.reader import open_store

    with store_lock(store, shared=True):
        hits = query(store, teacher, field, k=k, **kw)
    if as_json:
        for hit in hits:
            click.echo(json.dumps(hit._asdict()))
        return
    given = {name: value for name, value in kw.items() if value is not None and name in ("key", "row", "vector", "text", "image")}
    if "key" in given or "row" in given:
        s = open_store(store)
        row = s.key_to_row[given["key"]] if "key" in given else given["row"]
        click.echo(f"query: row {row}, key {s.keys[row]}, label {s.labels[row]} (left out of the results)")
    else:
        click.echo("query: " + ", ".join(f"{name} {value}" for name, value in given.items()))
    click.echo(f"{'rank':>4}  {'row':>8}  {'score':>8}  {'label':>5}  key")
    for rank, hit in enumerate(hits):
        click.echo(f"{rank:>4}  {hit.row:>8}  {hit.score:>8.4f}  {hit.label:>5}  {hit.key}")
