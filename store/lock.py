"""Store locks (``fcntl.flock``; the kernel drops them when the holder exits, however it exits).

Two lock files (paths in :mod:`kdstore.store.layout`):

- ``STORE/.lock``: :class:`StoreLock`, held exclusively by one ``kdstore precompute`` job,
  which writes its token there; workers check it (:func:`check_fence`) before publishing a
  shard, so the late writes of a killed job never land.
- ``STORE/.readers.lock``: :func:`store_lock`. ``index``, ``mine``, ``query`` and ``train``
  hold it shared while they read; ``precompute --overwrite`` (which deletes stored outputs)
  takes it exclusively and is refused while any reader holds it (and readers are refused
  while an overwrite runs). Neither side waits: the error says who holds the store.

On object storage (``s3://``) there is no ``flock``: :class:`StoreLock` holds a lease
instead (:mod:`kdstore.store.lease`, conditional PUTs, renewed, taken over once expired), and
:func:`check_fence` reads the lease. Readers take no lock there, so ``precompute --overwrite``
(which deletes stored outputs) is refused on object storage.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdstore.store import layout
from kdstore.store.errors import InputError, StoreLockedError
from kdstore.store.fs import is_remote
from kdstore.store.lease import Lease, check_lease_fence


def _who() -> str:
    return f"pid {os.getpid()} on {os.uname().nodename}"


class StoreLock:
    """An exclusive ``flock`` on ``STORE/.lock`` for one job; the kernel drops it on any exit.

    On object storage: a :class:`~kdstore.store.lease.Lease` with the same token.
    """

    def __init__(self, root: Path) -> None:
        self.path = layout.lock_path(root)
        self.token = uuid.uuid4().hex
        self._fh = None
        self._lease = Lease(root, self.token, _who()) if is_remote(self.path) else None

    def __enter__(self) -> "StoreLock":
        if self._lease is not None:
            self._lease.acquire()
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise StoreLockedError(
                f"store {self.path.parent} is locked by {holder}; wait for that job or stop it first"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{_who()} job {self.token}")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._lease is not None:
            self._lease.release()
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def check_fence(root: Path, token: str | None) -> None:
    """Refuse to commit when the job that sent this work no longer holds the store.

    Workers of a killed driver can outlive it; once a new job has taken the lock (and
    written its own token), their late writes must not land.
    """
    if token is None:
        return
    if is_remote(layout.root_of(root)):
        check_lease_fence(root, token)
        return
    try:
        holder = layout.lock_path(root).read_text()
    except FileNotFoundError:
        holder = ""
    if token not in holder:
        raise StoreLockedError(f"store {root} is now held by another job ({holder.strip() or 'none'}); this worker stops")


def _open_lock_file(path: Path, shared: bool):
    try:
        return open(path, "a+")
    except OSError:
        if not shared:
            raise
    try:  # a reader of a store it may not write to: flock works on a read-only descriptor
        return open(path)
    except OSError:
        return None


@contextlib.contextmanager
def store_lock(store: Any, *, shared: bool = True, what: str = "") -> Iterator[None]:
    """Hold ``STORE/.readers.lock``: shared for readers, exclusive for ``precompute --overwrite``.

    Never waits: raises :class:`StoreLockedError` saying what to do. ``store`` is a path or
    an open ``Store``; ``what`` names the command in the holder note an exclusive holder writes.
    A reader of a read-only store that has no lock file reads unlocked (nobody can overwrite it).
    """
    root = layout.root_of(store)
    if is_remote(root):
        if not shared:
            raise InputError(
                f"store {root} is on object storage, where readers hold no lock: {what or 'an overwrite'} "
                "could delete outputs a running train reads, so it is not supported there; precompute into a "
                "new --store prefix, or delete this one yourself when nothing reads it"
            )
        yield  # readers take no lock on object storage (docs/FORMAT.md)
        return
    path = layout.readers_lock_path(root)
    fh = _open_lock_file(path, shared)
    if fh is None:
        yield
        return
    try:
        try:
            fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            if shared:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise StoreLockedError(
                    f"store {root} is being overwritten ({holder}); wait for that job to finish, then rerun"
                ) from None
            raise StoreLockedError(
                f"store {root} is in use by a reader (kdstore index, mine, query or train); "
                "wait for it to finish or stop it, then rerun the overwrite"
            ) from None
        if not shared:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{what or 'an exclusive job'} {_who()}")
            fh.flush()
        yield
    finally:
        fh.close()  # closing the descriptor releases the flock
