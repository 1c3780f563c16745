"""Per-shard listings (format 2): each input shard's keys and labels, written by the worker that
reads the shard first, and the row numbers that follow from them.

::

    STORE/store.json                  {format_version: 2, input_urls, ...}: written before any teacher
    STORE/samples/SHARD.parquet       key (string), label (int64, null = none), in tar order
    STORE/samples/SHARD.skipped.json  {index, url, reason}: an unreadable shard left out (--on-error skip)

``SHARD`` is the shard's position in ``input_urls``. Rows are numbered in input order: a
shard's rows start after every row of the listed shards before it, so a shard after one
not yet listed has no row numbers yet (it is *pending*; its arrays are still readable by
shard index). When every input shard is listed or skipped, the job *seals* the store:
``samples.parquet`` (every row) and then ``store.json`` with ``num_rows``, ``shards`` and
``input_fingerprint``, so a reader of a finished store reads two files, as in format 1.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdstore.store import layout
from kdstore.store.atomic import fsync_dir, fsync_tree, read_json, write_json_atomic
from kdstore.store.errors import StoreCorruptError
from kdstore.store.fs import is_remote, read_parquet, write_parquet
from kdstore.store.inputs import input_fingerprint, record_url
from kdstore.store.lock import check_fence
from kdstore.store.schema import FORMAT_VERSION, ShardInfo, StoreManifest


def kdstore_version() -> str:
    try:
        return version("kdstore")
    except PackageNotFoundError:
        return "0+unknown"


def start_plan(root: Path, urls: Sequence[str]) -> dict:
    """Write the unsealed ``store.json`` (the input shards only; no input byte is read).

    Local paths are recorded absolute, or relative to the store when inside it (:func:`record_url`).
    """
    if not is_remote(root):
        Path(root).mkdir(parents=True, exist_ok=True)
    doc = {
        "format_version": FORMAT_VERSION,
        "kdstore_version": kdstore_version(),
        "input_urls": [record_url(u, root) for u in urls],
        "paths_relative_to": "store",
    }
    write_json_atomic(layout.store_file(root), doc)
    return doc


def is_sealed(doc: dict) -> bool:
    """True for a format 1 ``store.json`` and a sealed format 2 one (they hold the row plan)."""
    return "shards" in doc


def _put_table(table: pa.Table, path: Path) -> None:
    """One atomic write of a Parquet file: a PUT remotely, temp + fsync + rename + fsync locally."""
    if is_remote(path):
        write_parquet(table, path)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp)
        fsync_tree(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def listing_table(keys: Sequence[str], labels: Sequence[int | None]) -> pa.Table:
    return pa.table({"key": pa.array(list(keys), pa.string()), "label": pa.array(list(labels), pa.int64())})


def write_listing(
    root: Path, index: int, keys: Sequence[str], labels: Sequence[int | None], *, fence_token: str | None = None
) -> None:
    """``samples/SHARD.parquet``: the shard's keys and labels ``[n]``, written once, atomically."""
    check_fence(root, fence_token)
    _put_table(listing_table(keys, labels), layout.listing_path(root, index))


def write_skipped(root: Path, index: int, url: str, reason: str, *, fence_token: str | None = None) -> dict:
    """``samples/SHARD.skipped.json``: the shard is left out of the store's rows for good."""
    check_fence(root, fence_token)
    doc = {"index": index, "url": url, "reason": reason}
    write_json_atomic(layout.skipped_listing_path(root, index), doc)
    return doc


def read_listing(root: Path, index: int) -> pa.Table | None:
    """The shard's ``key``/``label`` table, or None when no worker listed it yet."""
    path = layout.listing_path(root, index)
    try:
        return read_parquet(path)
    except FileNotFoundError:
        return None


def _num_rows(path: Path) -> int:
    if is_remote(path):
        with path.fs.open(path.path, "rb") as fh:
            return pq.ParquetFile(fh).metadata.num_rows
    return pq.ParquetFile(path).metadata.num_rows


@dataclass(frozen=True)
class Listings:
    """What the workers found so far: rows per listed shard, and the skipped shards."""

    counts: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, dict] = field(default_factory=dict)


def scan(root: Path) -> Listings:
    """Every listing under ``samples/`` (row counts from Parquet metadata; no keys read)."""
    folder = layout.listings_dir(root)
    counts, skipped = {}, {}
    if not folder.is_dir():
        return Listings()
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith("."):
            continue  # a temporary file of a write in progress
        stem = name.split(".", 1)[0]
        if not stem.isdigit():
            continue
        if name.endswith(layout.SKIPPED_SUFFIX):
            skipped[int(stem)] = read_json(path, "skipped shard record")
        elif name.endswith(".parquet"):
            counts[int(stem)] = _num_rows(path)
    return Listings(counts=counts, skipped=skipped)


def number_rows(input_urls: Sequence[str], listings: Listings) -> tuple[list[ShardInfo], list[int]]:
    """``(numbered shards, pending shard indices)``: rows follow from input order and counts.

    Skipped shards own no rows. The numbered shards are the listed ones before the first shard
    not yet listed; that one and every later unskipped shard are pending.
    """
    shards: list[ShardInfo] = []
    rows = 0
    for i, url in enumerate(input_urls):
        if i in listings.skipped:
            continue
        if i not in listings.counts:
            return shards, [j for j in range(i, len(input_urls)) if j not in listings.skipped]
        shards.append(ShardInfo(index=i, url=url, row_start=rows, num_rows=listings.counts[i]))
        rows += listings.counts[i]
    return shards, []


def assemble(root: Path, doc: dict, listings: Listings | None = None) -> tuple[StoreManifest, list[int]]:
    """An unsealed store's manifest (its numbered shards) and its pending shards."""
    listings = scan(root) if listings is None else listings
    urls = tuple(doc["input_urls"])
    shards, pending = number_rows(urls, listings)
    fingerprint = ""
    if not pending:
        fingerprint = input_fingerprint([s.url for s in shards], [_keys(root, s.index) for s in shards])
    manifest = StoreManifest(
        format_version=int(doc["format_version"]),
        kdstore_version=doc.get("kdstore_version", "?"),
        num_rows=sum(s.num_rows for s in shards),
        input_fingerprint=fingerprint,
        input_urls=urls,
        shards=tuple(shards),
        skipped_shards=tuple(listings.skipped[i] for i in sorted(listings.skipped)),
        paths_relative_to=doc.get("paths_relative_to", "store"),
    )
    return manifest, pending


def _keys(root: Path, index: int) -> list[str]:
    table = read_listing(root, index)
    if table is None:
        raise StoreCorruptError(f"store {root}: the listing of shard {index} disappeared ({layout.listing_path(root, index)})")
    return table.column("key").to_pylist()


def samples_table(root: Path, shards: Sequence[ShardInfo]) -> pa.Table:
    """``row, key, shard, index_in_shard, label`` of the numbered ``shards`` (the ``samples.parquet`` columns)."""
    tables = []
    for s in shards:
        t = read_listing(root, s.index)
        if t is None or t.num_rows != s.num_rows:
            raise StoreCorruptError(f"store {root}: the listing of shard {s.index} changed while reading it")
        tables.append(t)
    n = sum(s.num_rows for s in shards)
    keys = pa.concat_arrays([t.column("key").combine_chunks() for t in tables]) if tables else pa.array([], pa.string())
    labels = pa.concat_arrays([t.column("label").combine_chunks() for t in tables]) if tables else pa.array([], pa.int64())
    counts = [s.num_rows for s in shards]
    return pa.table(
        {
            "row": pa.array(np.arange(n, dtype=np.int64)),
            "key": keys,
            "shard": pa.array(np.repeat(np.array([s.index for s in shards], dtype=np.int32), counts)),
            "index_in_shard": pa.array(np.concatenate([np.arange(c, dtype=np.int32) for c in counts] or [np.zeros(0, np.int32)])),
            "label": labels,
        }
    )


def seal(root: Path) -> StoreManifest | None:
    """Write ``samples.parquet`` and then the sealed ``store.json`` once every shard is listed.

    Returns the sealed manifest, or None while shards are pending. Idempotent.
    """
    doc = read_json(layout.store_file(root), layout.STORE_FILE)
    if is_sealed(doc):
        return StoreManifest.from_json(doc)
    manifest, pending = assemble(root, doc)
    if pending:
        return None
    _put_table(samples_table(root, manifest.shards), layout.samples_path(root))
    write_json_atomic(layout.store_file(root), manifest.to_json())
    return manifest


def write_plan(
    root: Path,
    *,
    urls: Sequence[str],
    keys_per_shard: Sequence[Sequence[str]],
    labels_per_shard: Sequence[Sequence[int | None]],
) -> StoreManifest:
    """A sealed store from known keys (benchmarks and tests that write arrays themselves)."""
    start_plan(root, urls)
    for index, (keys, labels) in enumerate(zip(keys_per_shard, labels_per_shard)):
        write_listing(root, index, keys, labels)
    manifest = seal(root)
    assert manifest is not None
    return manifest
