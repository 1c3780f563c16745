"""Reading a store: the row plan, each teacher's fields, shard by shard or by rows.

Reads are shard-sequential: a field of one shard is one contiguous Zarr array, so a
trainer walking shards never does row-by-row random reads. A store on object storage
(``s3://bucket/prefix``) is read the same way, through fsspec (:mod:`kdstore.store.fs`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from kdstore.store import layout
from kdstore.store.atomic import read_json
from kdstore.store.errors import InputError, StoreCorruptError
from kdstore.store.fs import read_parquet, remote_errors, zarr_store
from kdstore.store.layout import SAMPLES_FILE, STORE_FILE, VALID_ARRAY, VIEWS_ARRAY
from kdstore.store.schema import DoneRecord, FieldSpec, ShardInfo, StoreManifest, TeacherSpec


class TeacherData:
    """One teacher's outputs in a store."""

    def __init__(self, store: "Store", spec: TeacherSpec) -> None:
        self.store = store
        self.spec = spec
        self.name = spec.name
        self.dir = layout.teacher_dir(store.path, spec.name)

    @property
    def views(self) -> int:
        return self.spec.views

    @property
    def temperature(self) -> float:
        return self.spec.temperature

    def done_records(self) -> dict[int, DoneRecord]:
        """Done records by shard index (re-read on each call: a job may be adding them)."""
        records = {}
        done_dir = layout.done_dir(self.store.path, self.name)
        if done_dir.is_dir():
            for path in sorted(done_dir.glob("*.json")):
                record = DoneRecord.from_json(read_json(path, "done record"))
                records[record.shard] = record
        return records

    @cached_property
    def fields(self) -> dict[str, FieldSpec]:
        """Stored fields (per-row shape, dtype), from the first finished shard."""
        records = self.done_records()
        if not records:
            return {}
        first = records[min(records)]
        return {k: v for k, v in first.fields.items() if not layout.is_reserved(k)}

    def missing_shards(self) -> list[int]:
        done = self.done_records()
        return [s.index for s in self.store.shards if s.index not in done]

    @property
    def complete(self) -> bool:
        return not self.missing_shards()

    def _group(self, shard_index: int) -> zarr.Group:
        path = layout.shard_array_path(self.store.path, self.name, shard_index)
        if not layout.done_path(self.store.path, self.name, shard_index).exists() or not path.exists():
            raise StoreCorruptError(
                f"teacher {self.name}: shard {shard_index} ({self.store.shards[shard_index].url}) is not finished; "
                "rerun precompute to complete it"
            )
        return zarr.open_group(zarr_store(path, read_only=True), mode="r")

    def _check_field(self, field: str) -> None:
        if field not in self.fields and field not in (VALID_ARRAY, VIEWS_ARRAY):
            raise InputError(f"teacher {self.name} has no field {field!r}; it has {sorted(self.fields)}")

    def read_shard(self, field: str, shard_index: int) -> np.ndarray:
        """``[shard.num_rows, *shape]``: one field of one shard, read in one sequential pass.

        For a per-token (ragged) field: ``[sum(len_i), *shape]``; see :meth:`read_tokens`.
        """
        self._check_field(field)
        return self._group(shard_index)[field][...]

    def read_tokens(self, field: str, shard_index: int) -> list[np.ndarray]:
        """A per-token field of one shard as ``num_rows`` arrays ``[len_i, *shape]``."""
        self._check_field(field)
        if not self.fields[field].ragged:
            raise InputError(f"field {field!r} of teacher {self.name} is not a per-token field")
        group = self._group(shard_index)
        values, offsets = group[field][...], group[layout.offsets_name(field)][...]
        return [values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]

    def read(self, field: str, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """``[len(rows), *shape]`` (all rows when ``rows`` is None), in the order asked.

        Reads each touched shard's rows once, as one contiguous slice.
        """
        self._check_field(field)
        if field in self.fields and self.fields[field].ragged:
            raise InputError(f"field {field!r} is per-token; read it with read_tokens(field, shard)")
        if rows is None:
            return np.concatenate([self.read_shard(field, s.index) for s in self.store.shards], axis=0)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.store.num_rows):
            raise InputError(f"rows must be in [0, {self.store.num_rows}), got {rows.min()}..{rows.max()}")
        starts = self.store.shard_starts
        shard_of = np.searchsorted(starts, rows, side="right") - 1
        spec = self.fields.get(field)
        out = None
        for shard_index in np.unique(shard_of):
            shard = self.store.shards[shard_index]
            sel = np.nonzero(shard_of == shard_index)[0]
            local = rows[sel] - shard.row_start
            lo, hi = int(local.min()), int(local.max()) + 1
            block = self._group(int(shard_index))[field][lo:hi]
            if out is None:
                shape = spec.shape if spec else block.shape[1:]
                out = np.empty((rows.size, *shape), dtype=block.dtype)
            out[sel] = block[local - lo]
        if out is None:
            shape = spec.shape if spec else ()
            out = np.empty((0, *shape), dtype=np.dtype(spec.dtype) if spec else np.float32)
        return out

    def valid(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """``[n]`` bool: False for samples skipped with ``--on-error skip``."""
        return self.read(VALID_ARRAY, rows)

    def view_params(self, shard_index: int) -> np.ndarray:
        """``[num_rows, V, 5]`` int32 view parameters ``(top, left, h, w, flip)`` of one shard."""
        if not self.views:
            raise InputError(f"teacher {self.name} was precomputed without augmentation views")
        return self.read_shard(VIEWS_ARRAY, shard_index)

    def skipped(self) -> list[dict]:
        return [s for r in self.done_records().values() for s in r.skipped]


@dataclass(frozen=True)
class ShardBlock:
    """One shard's rows: ``fields[teacher][field]`` is ``[shard.num_rows, ...]``."""

    shard: ShardInfo
    keys: np.ndarray
    labels: np.ndarray
    fields: dict[str, dict[str, np.ndarray]]
    valid: np.ndarray


class Store:
    """A kdstore store on local disk or object storage (``open_store(path_or_url)``)."""

    def __init__(self, path: Path, manifest: StoreManifest) -> None:
        self.path = path
        self.manifest = manifest

    @property
    def num_rows(self) -> int:
        return self.manifest.num_rows

    @property
    def shards(self) -> tuple[ShardInfo, ...]:
        return self.manifest.shards

    @cached_property
    def shard_starts(self) -> np.ndarray:
        return np.array([s.row_start for s in self.shards], dtype=np.int64)

    @cached_property
    def _samples(self):
        table = read_parquet(layout.samples_path(self.path))
        if table.num_rows != self.num_rows:
            raise StoreCorruptError(f"{SAMPLES_FILE} has {table.num_rows} rows, store.json says {self.num_rows}")
        return table

    def samples(self):
        """The ``samples.parquet`` table: row, key, shard, index_in_shard, label."""
        return self._samples

    @cached_property
    def keys(self) -> np.ndarray:
        return self._samples.column("key").to_numpy(zero_copy_only=False).astype(object)

    @cached_property
    def labels(self) -> np.ndarray:
        """``[num_rows]`` int64, -1 where a sample has no label."""
        return self._samples.column("label").fill_null(-1).to_numpy().astype(np.int64)

    @cached_property
    def key_to_row(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}

    @property
    def teachers(self) -> list[str]:
        tdir = layout.teachers_dir(self.path)
        if not tdir.is_dir():
            return []
        return sorted(p.name for p in tdir.iterdir() if layout.teacher_file(self.path, p.name).is_file())

    def teacher(self, name: str) -> TeacherData:
        path = layout.teacher_file(self.path, name)
        if not path.is_file():
            raise InputError(f"store {self.path} has no teacher {name!r}; it has {self.teachers}")
        return TeacherData(self, TeacherSpec.from_json(read_json(path, layout.TEACHER_FILE)))

    def select_shards(self, selectors: Iterable[str | int] | None) -> list[ShardInfo]:
        """Shards by index, ``"A..B"`` index range (inclusive), exact URL, or a substring of the
        shard's file name (``"train-"``; a selector with ``/`` is a substring of the whole URL),
        in store order; all when None. File names, because stores record absolute paths and a
        folder name must not select (``/tmp/pytest-1/...`` contains ``test-``)."""
        if selectors is None:
            return list(self.shards)
        chosen: dict[int, ShardInfo] = {}
        for sel in selectors:
            text = str(sel)
            first, sep, last = text.partition("..")
            if sep and first.isdigit() and last.isdigit():
                if int(last) >= len(self.shards):
                    raise InputError(f"shard range {text}: store {self.path} has {len(self.shards)} shards")
                matches = list(self.shards[int(first) : int(last) + 1])
            else:
                matches = [s for s in self.shards if (text.isdigit() and s.index == int(text)) or s.url == text
                           or text in (s.url if "/" in text else s.url.rstrip("/").rsplit("/", 1)[-1])]
            if not matches:
                raise InputError(f"no shard of store {self.path} matches {text!r}")
            chosen.update((s.index, s) for s in matches)
        if not chosen:
            raise InputError("no shard selected")
        return [chosen[i] for i in sorted(chosen)]

    def iter_shards(
        self, fields: dict[str, Sequence[str]], shards: Iterable[ShardInfo | int] | None = None
    ) -> Iterator[ShardBlock]:
        """Yield one :class:`ShardBlock` per shard (in the order given), each read sequentially."""
        teachers = {name: self.teacher(name) for name in fields}
        selected = self.shards if shards is None else [s if isinstance(s, ShardInfo) else self.shards[s] for s in shards]
        for shard in selected:
            data = {name: {f: t.read_shard(f, shard.index) for f in fields[name]} for name, t in teachers.items()}
            valid = np.ones(shard.num_rows, dtype=bool)
            for t in teachers.values():
                valid &= t.read_shard(VALID_ARRAY, shard.index)
            yield ShardBlock(
                shard=shard,
                keys=self.keys[shard.row_start : shard.row_stop],
                labels=self.labels[shard.row_start : shard.row_stop],
                fields=data,
                valid=valid,
            )


def open_store(path: str | Path) -> Store:
    """Open a store written by ``kdstore precompute``; raises ``InputError`` when there is none."""
    root = layout.root_of(path)
    try:
        with remote_errors(f"store {root}"):
            doc = read_json(layout.store_file(root), STORE_FILE)
    except FileNotFoundError:
        raise InputError(f"{root} is not a kdstore store (no {STORE_FILE}); create one with `kdstore precompute`") from None
    return Store(root, StoreManifest.from_json(doc))
