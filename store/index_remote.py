"""FAISS index files of a store on object storage: uploaded whole, read through a local cache.

FAISS reads and writes local files (or bytes), so an index under ``s3://.../index/`` is:

- **saved** by :meth:`VectorIndex.save` into a local temp folder, then uploaded: the
  ``.faiss`` file, the ``.rows.npy`` map when there is one, and the ``.json`` record last.
  Each upload is atomic (a reader sees the old object or the new one); the ``.json`` is the
  commit record, as on local disk, and carries the ``.faiss`` file's sha256.
- **loaded** by reading the ``.json`` (one GET), then downloading the files once into
  ``$KDSTORE_CACHE/index/<sha256 of the .json>/`` (default ``~/.cache/kdstore``); the copy is
  checked against the recorded sha256, and later loads (``kdstore query`` again, ``mine``)
  read it from there (``mmap`` works on it). A rebuilt index has another ``.json``, hence
  another cache folder: a stale copy is never used. Each folder names its source in
  ``source.txt``; caching a new record removes the older folders of the same source (a
  process that has the old copy open or mapped keeps reading it: POSIX unlinks only the name).

A reader that fetches while a rebuild uploads may pair a new ``.json`` with the old
``.faiss``: the sha256 check refuses it (StoreCorruptError: rerun).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from kdstore.store.errors import StoreCorruptError
from kdstore.store.fs import cache_dir, file_sha256, get_bytes
from upath import UPath

if TYPE_CHECKING:
    from kdstore.store.index import VectorIndex


def save_remote(index: VectorIndex, path: UPath) -> UPath:
    """Save ``index`` to ``path`` (``.../NAME.faiss`` on object storage); returns ``path``."""
    with tempfile.TemporaryDirectory(prefix="kdstore-index-") as folder:
        local = index.save(Path(folder) / path.name)
        for suffix in (".faiss", ".rows.npy", ".json"):  # the record last
            part = local.with_suffix(suffix)
            if part.exists():
                target = path.with_suffix(suffix)
                target.fs.put_file(str(part), target.path)
    return path


def fetch(path: UPath) -> Path:
    """A local copy of the index at ``path`` (``.faiss`` on object storage), downloaded once per record."""
    from kdstore.store.index import read_index_metadata

    record = get_bytes(path.with_suffix(".json"))  # raises like a missing local record
    meta = read_index_metadata(path)  # checks the format (and says how to build a missing one)
    folder = cache_dir() / "index" / hashlib.sha256(record).hexdigest()[:32]
    local = folder / path.name
    if local.with_suffix(".json").is_file():
        return local
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        part = tmp / path.name
        path.fs.get_file(path.path, str(part))
        expected = meta.get("faiss_sha256")
        if expected and file_sha256(part) != expected:
            raise StoreCorruptError(
                f"{path} does not match the sha256 its record {path.with_suffix('.json').name} gives (an index "
                "rebuilt while it was read?); rerun, or rebuild it with `kdstore index`"
            )
        if "file" in meta.get("row_ids", {}):
            rows = path.with_suffix(".rows.npy")
            rows.fs.get_file(rows.path, str(part.with_suffix(".rows.npy")))
        source = str(path)
        (tmp / SOURCE_FILE).write_text(source)
        part.with_suffix(".json").write_bytes(record)  # the record last: a complete copy
        try:
            os.rename(tmp, folder)
        except OSError:  # another process cached the same record meanwhile
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remove_superseded(folder, source)
    return local


SOURCE_FILE = "source.txt"


def _remove_superseded(keep: Path, source: str) -> None:
    """Delete the other cache folders holding an older record of ``source``."""
    for other in keep.parent.iterdir():
        marker = other / SOURCE_FILE
        if other == keep or other.name.startswith(".") or not marker.is_file():
            continue
        try:
            if marker.read_text() == source:
                shutil.rmtree(other, ignore_errors=True)
        except OSError:  # removed by another process meanwhile
            continue
