"""The precompute job's Ray actors: started at once, used once loaded, replaced when lost.

An actor joins the pool when its teacher has loaded (its ``describe`` call returned), so an
actor that Ray cannot place yet (no free CPU/GPU of the asked size on any node) holds no
shard: the job runs on the actors that did start. When an actor's process or node dies
(:class:`ray.exceptions.RayActorError` from one of its shards), the job puts that actor's
in-flight shards back at the head of the queue (:meth:`WorkerPool.lost`) and the pool starts
a replacement, which joins when Ray places it (on a live node, or a node added later). The
other actors keep their shards: only the lost node's shards are computed again.

Fencing is unchanged: every actor of the job writes with the job's lease token. A shard
given to a second actor is written by at most two actors of the same job with the same
inputs and teacher; a lost actor that was in fact still running (a partitioned node, not a
dead one) writes the same rows, and the done record is written last by whichever finishes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from kdstore.store.errors import KdStoreError

SLOTS_PER_ACTOR = 2  # shards in flight per actor: the next one is queued while one runs
MAX_SHARD_LOSSES = 3  # a shard whose worker died this many times stops the job (a crash it causes)


class WorkerLostError(KdStoreError):
    """A shard's worker died again and again (out of memory, a crash in the teacher)."""


def _unwrap(exc: Exception) -> Exception:
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, KdStoreError):
            return cause
    return exc


class WorkerPool:
    """``size`` actors made by ``make()``; :attr:`free` holds one entry per idle shard slot."""

    def __init__(self, make: Callable[[], Any], size: int) -> None:
        self.make = make
        self.size = size
        self.starting: dict[Any, Any] = {}  # describe ref -> actor, until its teacher has loaded
        self.ready: list[Any] = []
        self.free: list[Any] = []
        self.described: dict | None = None
        self.workers_lost = 0
        self.all: list[Any] = []
        for _ in range(size):
            self._start()

    def _start(self) -> None:
        actor = self.make()
        self.all.append(actor)
        self.starting[actor.describe.remote()] = actor

    def describe(self) -> dict:
        """The teacher's ``describe()`` from the first actor that loaded it (a user error is raised)."""
        while self.described is None:
            self.poll(timeout=None)
        return self.described

    def poll(self, timeout: float | None = 0) -> None:
        """Admit actors whose teacher has loaded; replace those that died while loading.

        ``timeout`` None: wait for at least one to answer.
        """
        if not self.starting:
            return
        done, _ = ray.wait(list(self.starting), num_returns=1 if timeout is None else len(self.starting),
                           timeout=timeout)
        for ref in done:
            actor = self.starting.pop(ref)
            try:
                described = ray.get(ref)
            except RayTaskError as exc:
                raise _unwrap(exc) from None
            except RayActorError:
                self._died(actor)
                continue
            self.described = self.described or described
            self.ready.append(actor)
            self.free.extend([actor] * SLOTS_PER_ACTOR)

    def wait_refs(self) -> list:
        """What the job waits on besides its shards: actors still loading."""
        return list(self.starting)

    def lost(self, actor: Any) -> None:
        """``actor``'s process or node is gone: drop it (once) and start a replacement."""
        if actor in self.ready:
            self.ready.remove(actor)
            self.free = [a for a in self.free if a != actor]
            self._died(actor)

    def _died(self, actor: Any) -> None:
        self.workers_lost += 1
        if self.workers_lost > MAX_SHARD_LOSSES * self.size:
            raise WorkerLostError(
                f"{self.workers_lost} Ray workers died (nodes lost, or workers out of memory or crashing while loading "
                "the teacher); check `ray status` and the worker logs (`ray logs`), then rerun to resume"
            )
        with contextlib.suppress(Exception):  # already gone with its node
            ray.kill(actor)
        self._start()

    def kill_all(self) -> None:
        for actor in self.all:
            with contextlib.suppress(Exception):
                ray.kill(actor)


def shard_lost(losses: dict[int, int], shard_index: int, url: str) -> None:
    """Count one loss of a shard's worker; raise :class:`WorkerLostError` at :data:`MAX_SHARD_LOSSES`."""
    losses[shard_index] = losses.get(shard_index, 0) + 1
    if losses[shard_index] >= MAX_SHARD_LOSSES:
        raise WorkerLostError(
            f"shard {url}: its Ray worker died {losses[shard_index]} times (its node was lost, or the worker ran out of "
            "memory or crashed); check `ray status` and the worker logs (`ray logs`), then rerun to resume"
        )
