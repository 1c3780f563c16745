"""Durable small writes: JSON documents replaced atomically, folders and trees fsynced.

Files follow the process umask like any other file (``mkstemp`` alone would leave 0600).
On object storage (a ``UPath`` root, :mod:`kdstore.store.fs`) a JSON document is one PUT,
which is atomic there: no temp object, no rename.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from kdstore.store.errors import StoreCorruptError
from kdstore.store.fs import get_bytes, is_remote, put_bytes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (and ``root`` itself), deepest first."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def write_json_atomic(path: Path, doc: dict) -> None:
    """Write ``doc`` to a temp file beside ``path``, fsync, rename over it, fsync the folder.

    The file gets ``0666 & ~umask`` (``0644`` under the usual umask 022), as ``open`` would.
    On object storage: one PUT of the same bytes.
    """
    if is_remote(path):
        put_bytes(path, json.dumps(doc, indent=1, sort_keys=True).encode())
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_json(path: Path, what: str) -> dict:
    """A JSON object; ``FileNotFoundError`` passes, anything unreadable is ``StoreCorruptError``."""
    try:
        if is_remote(path):
            doc = json.loads(get_bytes(path))
        else:
            with open(path) as fh:
                doc = json.load(fh)
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreCorruptError(f"{what} {path} is unreadable ({exc})") from None
    if not isinstance(doc, dict):
        raise StoreCorruptError(f"{what} {path} is not a JSON object")
    return doc
