"""Where a store lives: a local folder (``pathlib.Path``) or an fsspec URL (``UPath``).

A store location is parsed once from a string (:func:`store_root`): ``s3://bucket/prefix``
(``gs://`` by the same fsspec mechanism, untested here) becomes a ``upath.UPath``, whose
``.fs`` is the fsspec filesystem and ``.path`` the root inside it; ``file://PATH`` and plain
paths become a ``pathlib.Path`` and keep the local rules exactly (temp file + fsync +
rename, ``flock``). Everything else in ``kdstore.store`` asks this module how to write:

- metadata JSON and done records: one PUT per object on object storage (a PUT is atomic:
  a reader sees the old object or the new one, never a part), temp + rename locally;
- Parquet: ``pyarrow`` through the fsspec filesystem;
- Zarr groups: ``zarr.storage.FsspecStore`` on object storage, a folder locally.

Credentials and endpoint come from the environment as boto/fsspec users expect
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``
for an S3-compatible server); Ray actors of a local cluster inherit them from the driver.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdstore.store.errors import InputError
from upath import UPath

REMOTE_HINT = (
    "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a non-AWS server); "
    "Ray workers read their own node's environment (docs/CLUSTER.md)"
)


@contextlib.contextmanager
def remote_errors(what: str) -> Iterator[None]:
    """Turn botocore's client-side errors (no credentials, unreachable endpoint) into one
    ``InputError`` line that says what to set."""
    try:
        yield
    except Exception as exc:
        if any(cls.__name__ == "BotoCoreError" for cls in type(exc).__mro__):
            raise InputError(f"{what}: {exc}; {REMOTE_HINT}") from None
        raise


NO_CACHE = {"use_listings_cache": False}


def is_url(text: Any) -> bool:
    return isinstance(text, str) and "://" in text


def store_root(store: Any) -> Path | UPath:
    """The root of a store: a ``Path`` for local folders (and ``file://``), a ``UPath`` for URLs.

    ``store`` is a path, a URL string, a ``UPath``, or anything with a ``.path`` (an open ``Store``).
    """
    if not isinstance(store, (UPath, Path, str)):
        store = getattr(store, "path", store)  # an open Store (a UPath's .path is its key, not this)
    if isinstance(store, UPath):
        return _local(store.path) if store.protocol in ("", "file", "local") else store
    if isinstance(store, Path):
        return store.expanduser()
    text = os.fspath(store)
    if is_url(text):
        if text.startswith("file://"):
            return _local(text[len("file://") :])
        # No listing cache: another process (a worker, another job) adds done records and
        # lease generations, and every listing must see them.
        return UPath(text.rstrip("/"), **NO_CACHE)
    return Path(text).expanduser()


def _local(path: str) -> Path:
    return Path(path).expanduser()


def is_remote(path: Any) -> bool:
    """True for a location on object storage (a ``UPath`` that is not a local file)."""
    return isinstance(path, UPath) and path.protocol not in ("", "file", "local")


def get_bytes(path: UPath) -> bytes:
    """One GET of a whole object. (Not ``open()``: that pins the ETag of a first request, and an
    object replaced meanwhile, such as a renewed lease, fails the read with ``FileExpired``.)"""
    return path.fs.cat_file(path.path)


def put_bytes(path: UPath, data: bytes) -> None:
    """One PUT: the object appears whole or not at all."""
    path.fs.pipe_file(path.path, data)


def create_exclusive(path: UPath, data: bytes) -> bool:
    """Create ``path`` only if no object has that name (a conditional PUT, ``If-None-Match: *``).

    Returns False when it already exists (another writer won).
    """
    try:
        path.fs.pipe_file(path.path, data, mode="create")
    except FileExistsError:
        return False
    return True


def remove_tree(path: Path | UPath) -> None:
    """Delete a folder / object prefix and everything under it; a missing one is fine."""
    if is_remote(path):
        try:
            path.fs.rm(path.path, recursive=True)
        except FileNotFoundError:
            pass
    else:
        shutil.rmtree(path, ignore_errors=True)


def tree_bytes(path: Path | UPath) -> int:
    """Bytes stored under a folder / object prefix."""
    if is_remote(path):
        return int(path.fs.du(path.path, total=True))
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def zarr_store(path: Path | UPath, *, read_only: bool):
    """What ``zarr.open_group`` takes for this location: a folder name, or an ``FsspecStore``."""
    if is_remote(path):
        import zarr.storage

        # zarr wants an asynchronous filesystem: from_url builds one from the same URL (and env).
        # max_concurrency 1: s3fs otherwise sends a HEAD before every whole-object GET (to split
        # objects over 50 MiB into parallel ranges; a chunk is far smaller), doubling the requests.
        options = NO_CACHE if not read_only else {**NO_CACHE, "max_concurrency": 1}
        return zarr.storage.FsspecStore.from_url(str(path), storage_options=options, read_only=read_only)
    return str(path)


def open_zarr_group(path: Path | UPath):
    """Open a stored Zarr group read-only in one request for its metadata.

    ``zarr.open_group`` without a format looks for v3 and v2 metadata both (on object storage
    about ten requests, several of them listings); kdstore writes Zarr v3, so v3 is asked
    first and the generic probe is only the fallback.
    """
    import zarr

    store = zarr_store(path, read_only=True)
    try:
        return zarr.open_group(store, mode="r", zarr_format=3)
    except (FileNotFoundError, KeyError, ValueError, zarr.errors.GroupNotFoundError):
        return zarr.open_group(store, mode="r")


def read_parquet(path: Path | UPath):
    import pyarrow.parquet as pq

    if is_remote(path):
        return pq.read_table(path.path, filesystem=path.fs)
    return pq.read_table(path)


def write_parquet(table, path: UPath) -> None:
    """Write a Parquet object in one upload (object storage only; local writes go via a temp file)."""
    import pyarrow.parquet as pq

    pq.write_table(table, path.path, filesystem=path.fs)


def location(path: Any) -> Path | UPath:
    """A file's location (not only a store root): a ``UPath`` for URLs and ``UPath`` s, else a ``Path``."""
    return store_root(path) if isinstance(path, (str, UPath, Path)) else Path(path)


@contextlib.contextmanager
def written_at(path: Path | UPath) -> Iterator[Path]:
    """A local temp file that becomes ``path`` when the block ends without error, whole or not at all.

    Locally: temp name beside ``path`` (fsynced), then ``os.replace``. On object storage: a local
    temp file, then one upload (a PUT, or a multipart upload that the server completes at
    once); a reader sees the old object or the new one. The temp file is removed either way.
    """
    import tempfile

    if is_remote(path):
        fd, name = tempfile.mkstemp(prefix="kdstore-", suffix=f"-{path.name}")
        os.close(fd)
        tmp = Path(name)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if is_remote(path):
            path.fs.put_file(str(tmp), path.path)
        else:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cache_dir() -> Path:
    """``$KDSTORE_CACHE`` or ``~/.cache/kdstore``: local copies of objects (FAISS indexes) kept between runs."""
    return Path(os.environ.get("KDSTORE_CACHE") or Path.home() / ".cache" / "kdstore")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a local file, read 1 MiB at a time."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
