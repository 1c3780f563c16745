"""One shard through one teacher: read → decode → views → teacher → reduce → write.

:class:`ShardProcessor` is plain Python (tested without Ray); the precompute job wraps it
in a Ray actor so the teacher is loaded once per worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdstore.pipeline.augment import AugmentSpec, apply_view, view_params
from kdstore.pipeline.reduce import OutputSpec, bad_rows, reduce_outputs
from kdstore.pipeline.shards import iter_samples
from kdstore.pipeline.teacher import Teacher, load_teacher
from kdstore.store.errors import InputError, KdStoreError, TeacherOutputError
from kdstore.store.schema import DoneRecord, ShardInfo, TeacherSpec
from kdstore.store.writer import write_shard


@dataclass(frozen=True, kw_only=True)
class TeacherLoad:
    """How a worker builds its teacher (picklable, sent to Ray actors)."""

    factory: str
    name: str | None = None
    input_key: str | None = None
    layers: tuple[str, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    device: str = "cpu"

    def build(self) -> Teacher:
        return load_teacher(
            self.factory,
            name=self.name,
            input_key=self.input_key,
            layers=self.layers,
            device=self.device,
            kwargs=dict(self.kwargs),
        )


class _Batch:
    def __init__(self) -> None:
        self.rows: list[int] = []
        self.keys: list[str] = []
        self.inputs: list[Any] = []

    def __len__(self) -> int:
        return len(self.rows)


class ShardProcessor:
    """Runs one loaded teacher over whole shards and writes their rows to a store."""

    def __init__(self, load: TeacherLoad, *, num_threads: int | None = None, amp: bool = False) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = load.device
        self.amp = amp
        # A user error while building the teacher is kept and raised from the first method
        # call: Ray reports errors of a method with their cause, errors of __init__ without.
        self._load_error: KdStoreError | None = None
        try:
            self.teacher = load.build()
        except KdStoreError as exc:
            self._load_error = exc

    def describe(self) -> dict:
        if self._load_error:
            raise self._load_error
        return {"name": self.teacher.name, "fingerprint": self.teacher.fingerprint, "input_key": self.teacher.input_key}

    def run_shard(
        self,
        root: str,
        spec: TeacherSpec,
        shard: ShardInfo,
        keys: list[str],
        *,
        batch_size: int,
        on_error: str,
        fence_token: str | None = None,
        progress: Any = None,
    ) -> DoneRecord:
        """Process every planned row of ``shard`` and write it; returns the done record.

        ``progress`` is an optional Ray actor handle with ``add(rows)``, told after each batch.
        """
        if self._load_error:
            raise self._load_error
        start = time.perf_counter()
        outputs = [OutputSpec.parse(o) for o in spec.outputs]
        augment = AugmentSpec.parse(spec.augment)
        n, views = shard.num_rows, spec.views
        fields: dict[str, np.ndarray] = {}
        ragged: dict[str, list[np.ndarray | None]] = {}
        valid = np.zeros(n, dtype=bool)
        params = np.zeros((n, views, 5), dtype=np.int32) if views else None
        skipped: list[dict] = []
        dtype = np.dtype(spec.dtype)

        def fail_or_skip(row: int, key: str, message: str, error: type[KdStoreError] = InputError) -> None:
            if on_error == "fail":
                raise error(f"shard {shard.url} key {key!r}: {message}")
            skipped.append({"row": shard.row_start + row, "key": key, "reason": message})

        def flush(batch: _Batch) -> None:
            if not batch:
                return
            with torch.autocast(device_type=torch.device(self.device).type, enabled=self.amp):
                raw = self.teacher.forward(batch.inputs)
            b = len(batch) * max(1, views)
            try:
                bad = bad_rows(raw, b)
                reduced = reduce_outputs(raw, outputs, batch_size=b, temperature=spec.temperature, dtype=dtype)
            except TeacherOutputError as exc:
                raise TeacherOutputError(f"shard {shard.url} keys {batch.keys[0]!r}..{batch.keys[-1]!r}: {exc}") from None
            bad = bad.reshape(len(batch), max(1, views)).any(1).numpy()
            rows = np.asarray(batch.rows)
            for name, value in reduced.items():
                if isinstance(value, list):  # per-token output: one [len_i, ...] array per row
                    column = ragged.setdefault(name, [None] * n)
                    for i in np.nonzero(~bad)[0]:
                        column[rows[i]] = value[i]
                    continue
                value = value.reshape(len(batch), views, *value.shape[1:]) if views else value
                if name not in fields:
                    fields[name] = np.zeros((n, *value.shape[1:]), dtype=value.dtype)
                elif fields[name].shape[1:] != value.shape[1:]:
                    raise TeacherOutputError(
                        f"shard {shard.url} key {batch.keys[0]!r}: teacher output {name} changed shape "
                        f"from {fields[name].shape[1:]} to {value.shape[1:]}"
                    )
                fields[name][rows[~bad]] = value[~bad]
            valid[rows[~bad]] = True
            if progress is not None:
                progress.add.remote(len(batch))
            for i in np.nonzero(bad)[0]:
                fail_or_skip(int(rows[i]), batch.keys[i], "teacher output has NaN or inf", TeacherOutputError)

        batch = _Batch()
        seen = 0
        for row, sample in enumerate(iter_samples(shard.url)):
            key = sample.get("__key__", "")
            if row >= n or key != keys[row]:
                expected = keys[row] if row < n else "<end of shard>"
                raise InputError(
                    f"shard {shard.url} changed since the store was planned: row {row} is {key!r}, expected {expected!r}"
                )
            seen += 1
            try:
                x = self.teacher.preprocess(sample)
            except KdStoreError as exc:
                fail_or_skip(row, key, str(exc))
                continue
            if views:
                if not isinstance(x, torch.Tensor) or x.ndim != 3:
                    raise InputError("--views needs a teacher whose preprocess returns an image tensor [C, H, W]")
                for v in range(views):
                    p = view_params(augment, seed=spec.seed, key=key, view=v, height=x.shape[1], width=x.shape[2])
                    params[row, v] = p
                    batch.inputs.append(apply_view(x, p))
            else:
                batch.inputs.append(x)
            batch.rows.append(row)
            batch.keys.append(key)
            if len(batch) >= batch_size:
                flush(batch)
                batch = _Batch()
        flush(batch)
        if seen != n:
            raise InputError(f"shard {shard.url} changed since the store was planned: {seen} samples, planned {n}")
        if not fields and not ragged:
            raise InputError(f"shard {shard.url}: every sample failed; first: {skipped[0]['reason'] if skipped else '?'}")
        return write_shard(
            Path(root),
            spec,
            shard,
            fields,
            ragged=ragged,
            valid=valid,
            view_params=params,
            skipped=skipped,
            seconds=time.perf_counter() - start,
            fence_token=fence_token,
        )
