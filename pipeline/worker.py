"""One shard through one teacher, as the precompute job's Ray actors run it.

:class:`ShardProcessor` is plain Python (tested without Ray); the precompute job wraps it
in a Ray actor so the teacher is loaded once per worker. The work itself is the stage chain
of :mod:`kdstore.pipeline.stages`; the error policy is a handler chosen from ``on_error``.

The shard is read once: the read stage lists its keys and labels while the teacher runs.
The first worker to read a shard writes its listing (``samples/SHARD.parquet``) before the
shard's arrays and done record; a later teacher (or run) gets the listed keys and refuses a
shard whose keys differ. A shard that cannot be read is an error, or with ``--on-error skip``
and no listing yet, recorded as skipped for the whole store (``samples/SHARD.skipped.json``).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from kdstore.pipeline import stages
from kdstore.pipeline.transform import TransformSpec
from kdstore.pipeline.teacher import TeacherLoad  # noqa: F401  (re-exported: it used to live here)
from kdstore.store import layout
from kdstore.store.errors import InputError, KdStoreError
from kdstore.store.inputs import key_difference
from kdstore.store.listing import read_listing, write_listing, write_skipped
from kdstore.store.schema import DoneRecord, ShardInfo, TeacherSpec
from kdstore.store.writer import write_shard


class ShardProcessor:
    """Runs one loaded teacher over whole shards and writes their rows to a store."""

    def __init__(
        self, load: TeacherLoad, *, num_threads: int | None = None, amp: bool = False, prefetch: int = 2
    ) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.prefetch = prefetch  # decoded batches a reader thread keeps ready (0: read in the forward's thread)
        self.device = load.device
        self.amp = amp
        # A user error while building the teacher is kept and raised from the first method
        # call: Ray reports errors of a method with their cause, errors of __init__ without.
        self._load_error: KdStoreError | None = None
        try:
            self.teacher = load.build()
        except KdStoreError as exc:
            self._load_error = exc
        except Exception as exc:  # noqa: BLE001 (the user's factory raised): one line, not a worker traceback
            cause = (str(exc).strip().splitlines() or [""])[0]
            self._load_error = InputError(f"--teacher {load.factory}: building the teacher failed: {type(exc).__name__}: {cause}")

    def describe(self) -> dict:
        if self._load_error:
            raise self._load_error
        return {"name": self.teacher.name, "fingerprint": self.teacher.fingerprint, "input_key": self.teacher.input_key,
                "class_names": [str(c) for c in (getattr(self.teacher, "class_names", None) or ())]}

    def compute(
        self, spec: TeacherSpec, shard: ShardInfo, keys: list[str] | None, *, batch_size: int, on_error: str,
        progress: Any = None,
    ) -> tuple[stages.ShardArrays, list[dict]]:
        """The shard's stored columns (not yet written; ``arrays.listing`` holds its keys, labels
        and bytes read) and its skipped rows; see :meth:`run_shard`.

        read → preprocess → views → batched run in a reader thread ``self.prefetch`` batches
        ahead (:func:`stages.prefetch`); forward → reduce → collect in the calling thread.
        """
        skipped: list[dict] = []
        handler = stages.error_handler(on_error, skipped)
        arrays = stages.ShardArrays(shard=shard, views=spec.views, capacity=len(keys) if keys is not None else 0)
        chain = stages.read(shard, keys, arrays.listing)
        chain = stages.preprocess(chain, self.teacher, shard, handler, TransformSpec.parse(spec.transform))
        chain = stages.views(chain, spec)
        chain = stages.batched(chain, batch_size)
        if self.prefetch:
            chain = stages.prefetch(chain, depth=self.prefetch)
        chain = stages.forward(chain, self.teacher, device=self.device, amp=self.amp, shard=shard)
        chain = stages.reduce(chain, spec, shard)
        stages.collect(chain, arrays, handler, on_batch=None if progress is None else progress.add.remote)
        return arrays.finish(), skipped

    def run_shard(
        self,
        root: str,
        spec: TeacherSpec,
        shard: ShardInfo,
        keys: list[str] | None,
        *,
        batch_size: int,
        on_error: str,
        fence_token: str | None = None,
        progress: Any = None,
    ) -> DoneRecord | dict:
        """Process every row of ``shard`` and write it; returns the done record.

        ``shard`` is ``(index, url)`` (its row numbers are not needed); ``keys`` the shard's
        listed keys, or None when no listing exists yet: this worker then writes it (before
        the arrays). With ``on_error="skip"``, an unlisted shard that cannot be read is
        recorded as skipped and its record ``{index, url, reason}`` returned instead.
        ``extra["input_bytes"]`` of the done record: bytes read from the input shard.
        ``progress`` is an optional Ray actor handle with ``add(rows)``, told after each batch.
        """
        if self._load_error:
            raise self._load_error
        start = time.perf_counter()
        store = layout.root_of(root)
        try:
            arrays, skipped = self.compute(spec, shard, keys, batch_size=batch_size, on_error=on_error, progress=progress)
        except stages.ShardReadError as exc:
            if on_error == "skip" and keys is None:
                return write_skipped(store, shard.index, shard.url, str(exc), fence_token=fence_token)
            raise
        if not arrays.fields and not arrays.ragged:
            raise InputError(f"shard {shard.url}: every sample failed; first: {skipped[0]['reason'] if skipped else '?'}")
        listing = arrays.listing
        if keys is None:  # the first read of this shard, unless another attempt listed it meanwhile
            existing = read_listing(store, shard.index)
            if existing is None:
                write_listing(store, shard.index, listing.keys, listing.labels, fence_token=fence_token)
            elif (detail := key_difference(listing.keys, existing.column("key").to_pylist())) is not None:
                raise stages.changed_error(shard, detail)
        return write_shard(
            store,
            spec,
            ShardInfo(index=shard.index, url=shard.url, row_start=None, num_rows=arrays.num_rows),
            arrays.fields,
            ragged=arrays.ragged,
            valid=arrays.valid,
            view_params=arrays.params,
            skipped=skipped,
            seconds=time.perf_counter() - start,
            extra={"input_bytes": listing.stats.bytes_read},
            fence_token=fence_token,
        )
