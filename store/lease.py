"""The job lock of a store on object storage, where there is no ``flock``: a lease.

A lease is a sequence of generation objects ``STORE/.lease/GGGGGGGGGG.json``; the highest
generation is the current lease. Each holds ``{generation, token, holder, expires}``
(``expires``: Unix seconds). The rules:

- **Acquire**: read the highest generation N. If it is held (not released, not expired),
  refuse, naming the holder and when the lease expires. Otherwise create generation N+1
  with a conditional PUT (``If-None-Match: *``, fsspec ``pipe_file(mode="create")``). Two
  jobs racing for the same N+1: the store accepts exactly one create, the other gets
  ``PreconditionFailed`` and is refused. A generation object is created once and never
  reused, so there is no compare-and-swap on a shared object to get wrong.
- **Renew**: a thread in the holder re-PUTs its own generation with a later expiry every
  ``ttl / 3`` seconds. Only the holder writes its generation's object. Before renewing it
  lists the generations: if a higher one exists the lease was taken over (the holder was
  silent for a whole ``ttl``) and it stops renewing; a renewal that races with a takeover
  only rewrites an object that is no longer the highest, which changes nothing.
- **Take over**: an expired (or released) generation N is superseded by creating N+1, as
  in acquire. Expiry compares the holder's wall clock with the taker's: clocks must agree
  to well within ``ttl`` (NTP does; the default ttl is 60 s, ``KDSTORE_LEASE_SECONDS``).
- **Fence**: a worker checks (:func:`current`) that the highest generation still carries
  its job's token before writing a shard and again before its done record; a late worker
  of a job whose lease was taken over stops. The check and the write are two requests, so
  a worker stalled between them for longer than the ttl could still land one shard's
  objects after a takeover: the window is one stall longer than the ttl, not zero.
- **Release**: the holder re-PUTs its generation with ``released: true``; the next job
  creates the next generation at once instead of waiting for expiry. Older generations
  than the one just acquired are deleted (the highest one alone decides).

Readers (``info``, ``verify``, ``index``, ``mine``, ``query``, ``train``) take no lease on
object storage; ``precompute --overwrite`` is refused there (:func:`kdstore.store.lock.store_lock`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from kdstore.store import layout
from kdstore.store.errors import StoreLockedError
from kdstore.store.fs import create_exclusive, get_bytes, put_bytes, remote_errors

DEFAULT_TTL = 60.0


def default_ttl() -> float:
    return float(os.environ.get("KDSTORE_LEASE_SECONDS", DEFAULT_TTL))


def _generations(root: Any) -> list[int]:
    lease_dir = layout.lease_dir(root)
    try:
        names = [name.rsplit("/", 1)[-1] for name in lease_dir.fs.ls(lease_dir.path, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def current(root: Any) -> dict | None:
    """The highest generation's document, or None when the store never had a lease."""
    with remote_errors(f"store {layout.root_of(root)}"):
        return _current(root)


def _current(root: Any) -> dict | None:
    for generation in reversed(_generations(root)):
        try:
            return json.loads(get_bytes(layout.lease_path(root, generation)))
        except FileNotFoundError:  # deleted as an old generation meanwhile: look lower
            continue
    return None


def is_held(doc: dict | None, now: float | None = None) -> bool:
    return bool(doc) and not doc.get("released") and doc["expires"] > (time.time() if now is None else now)


def describe(doc: dict) -> str:
    left = doc["expires"] - time.time()
    return f"{doc['holder']} job {doc['token']} (lease generation {doc['generation']}, expires in {left:.0f} s)"


class Lease:
    """One job's lease on a store on object storage; a context manager like ``StoreLock``."""

    def __init__(self, root: Any, token: str, holder: str, *, ttl: float | None = None) -> None:
        self.root = layout.root_of(root)
        self.token = token
        self.holder = holder
        self.ttl = default_ttl() if ttl is None else float(ttl)
        self.generation: int | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self, *, released: bool = False) -> bytes:
        doc = {
            "generation": self.generation,
            "token": self.token,
            "holder": self.holder,
            "ttl": self.ttl,
            "expires": time.time() + self.ttl,
            "released": released,
        }
        return json.dumps(doc, sort_keys=True).encode()

    def acquire(self) -> Lease:
        with remote_errors(f"store {self.root}"):
            return self._acquire()

    def _acquire(self) -> Lease:
        generations = _generations(self.root)
        top = generations[-1] if generations else -1
        doc = current(self.root) if generations else None
        if is_held(doc):
            raise StoreLockedError(
                f"store {self.root} is leased by {describe(doc)}; wait for that job or, if it died, "
                "for the lease to expire, then rerun"
            )
        self.generation = top + 1
        if not create_exclusive(layout.lease_path(self.root, self.generation), self._doc()):
            winner = current(self.root)
            raise StoreLockedError(
                f"store {self.root} was just leased by {describe(winner) if winner else 'another job'}; "
                "wait for that job, then rerun"
            )
        for old in generations:  # the highest generation alone decides; keep the listing short
            layout.lease_path(self.root, old).fs.rm_file(layout.lease_path(self.root, old).path)
        self._thread = threading.Thread(target=self._renew_loop, name="kdstore-lease", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> bool:
        """Push the expiry out by ``ttl``; False (and ``lost``) once another job took over."""
        if self.lost or self.generation is None:
            return False
        generations = _generations(self.root)
        if generations and generations[-1] > self.generation:
            self.lost = True
            return False
        put_bytes(layout.lease_path(self.root, self.generation), self._doc())
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.renew():
                    return
            except Exception:  # noqa: BLE001  any failed request (OSError, botocore's own): retry next
                continue  # round; if renewals keep failing the lease expires and the fence stops our workers

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.generation is not None and not self.lost:
            generations = _generations(self.root)
            if not generations or generations[-1] == self.generation:
                put_bytes(layout.lease_path(self.root, self.generation), self._doc(released=True))
        self.generation = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_lease_fence(root: Any, token: str) -> None:
    """Raise ``StoreLockedError`` unless the current lease still carries ``token``."""
    doc = current(root)
    if not doc or doc.get("token") != token or doc.get("released"):
        held = describe(doc) if doc and not doc.get("released") else "none"
        raise StoreLockedError(f"store {layout.root_of(root)} is now held by another job ({held}); this worker stops")
