"""Reading a store: the row plan, each teacher's fields, shard by shard or by rows.

Reads are shard-sequential: a field of one shard is one contiguous Zarr array, so a
trainer walking shards never does row-by-row random reads. A store on object storage
(``s3://bucket/prefix``) is read the same way, through fsspec (:mod:`kdstore.store.fs`).

Formats 1 and 2 read the same. A format 2 store that precompute has not finished listing is
read as far as its rows are numbered (:mod:`kdstore.store.listing`): ``store.shards``, ``keys``
and ``num_rows`` cover the numbered shards, ``store.pending_shards`` names the rest, and
selecting a pending shard (or all shards) is refused with a message saying to finish precompute.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from kdstore.store import layout, listing
from kdstore.store.atomic import read_json
from kdstore.store.errors import InputError, StoreCorruptError
from kdstore.store.fs import open_zarr_group, read_parquet, remote_errors
from kdstore.store.layout import SAMPLES_FILE, STORE_FILE, VALID_ARRAY, VIEWS_ARRAY
from kdstore.store.schema import (
    DoneRecord, FieldSpec, ShardInfo, StoreManifest, TeacherSpec, check_format_version,
)


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
        """Shards without a done record: numbered ones, then pending ones (not yet listed or numbered)."""
        done = self.done_records()
        return [s.index for s in self.store.shards if s.index not in done] + [
            i for i in self.store.pending_shards if i not in done]

    @property
    def complete(self) -> bool:
        return not self.missing_shards()

    def _group(self, shard_index: int) -> zarr.Group:
        path = layout.shard_array_path(self.store.path, self.name, shard_index)
        if not layout.done_path(self.store.path, self.name, shard_index).exists() or not path.exists():
            raise StoreCorruptError(
                f"teacher {self.name}: shard {shard_index} ({self.store.shard_url(shard_index)}) is not finished; "
                "rerun precompute to complete it"
            )
        return open_zarr_group(path)

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
        """Skipped samples ``{row, key, reason, shard, index_in_shard}``; ``row`` is None while
        the shard's rows are not numbered (format 2 records hold ``index_in_shard`` only)."""
        out = []
        for record in self.done_records().values():
            info = self.store.numbered.get(record.shard)
            for entry in record.skipped:
                entry = {"shard": record.shard, **entry}
                if "row" not in entry:
                    local = entry.get("index_in_shard")
                    entry["row"] = info.row_start + local if info is not None and local is not None else None
                elif info is not None and "index_in_shard" not in entry:
                    entry["index_in_shard"] = entry["row"] - info.row_start
                out.append(entry)
        return out


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

    def __init__(self, path: Path, manifest: StoreManifest, *, pending: Sequence[int] = (), sealed: bool = True) -> None:
        self.path = path
        self.manifest = manifest
        self.pending_shards: tuple[int, ...] = tuple(pending)  # input shards without row numbers yet
        self.sealed = sealed  # the row plan is in store.json (format 1, or format 2 once every shard is listed)

    @property
    def planned(self) -> bool:
        """True when every input shard has its rows (none pending)."""
        return not self.pending_shards

    @cached_property
    def numbered(self) -> dict[int, ShardInfo]:
        """Shard index → its numbered :class:`ShardInfo`."""
        return {s.index: s for s in self.shards}

    def shard(self, index: int) -> ShardInfo:
        """The numbered shard ``index``; a pending or unknown index is an ``InputError``."""
        if index in self.numbered:
            return self.numbered[index]
        if index in self.pending_shards:
            raise InputError(self._pending_message([index]))
        raise InputError(f"store {self.path} has no shard {index}; its shards are {self._index_text()}")

    def shard_url(self, index: int) -> str:
        """The recorded URL of shard ``index`` (numbered or pending)."""
        if index in self.numbered:
            return self.numbered[index].url
        if self.manifest.format_version >= 2 and 0 <= index < len(self.manifest.input_urls):
            return self.manifest.input_urls[index]
        return f"#{index}"

    def shard_listing(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(keys [n], labels [n] int64, -1 = none)`` of any listed shard, numbered or pending."""
        if index in self.numbered:
            s = self.numbered[index]
            return self.keys[s.row_start : s.row_stop], self.labels[s.row_start : s.row_stop]
        table = listing.read_listing(self.path, index) if self.manifest.format_version >= 2 else None
        if table is None:
            raise InputError(f"shard {index} of store {self.path} is not listed yet; finish `kdstore precompute`")
        return (table.column("key").to_numpy(zero_copy_only=False).astype(object),
                table.column("label").fill_null(-1).to_numpy().astype(np.int64))

    def _index_text(self) -> str:
        indices = [s.index for s in self.shards]
        return f"{indices[0]}..{indices[-1]}" if indices else "none"

    def _pending_message(self, indices: Sequence[int]) -> str:
        return (
            f"store {self.path}: {len(indices)} selected input shard(s) have no rows yet (first: shard {indices[0]}, "
            f"{self.shard_url(indices[0])}); {len(self.pending_shards)} of "
            f"{len(self.shards) + len(self.pending_shards)} are pending. Finish `kdstore precompute` (rerun it: it "
            "resumes), or select finished shards by index or name"
        )

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
        if not self.sealed:  # format 2 before sealing: the numbered shards' listings
            return listing.samples_table(self.path, self.shards)
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
        """Shards by index (a number selects that index only), ``"A..B"`` index range (inclusive), exact URL, or a substring of the
        shard's file name (``"train-"``; a selector with ``/`` is a substring of the whole URL),
        in store order; all when None. File names, because stores record absolute paths and a
        folder name must not select (``/tmp/pytest-1/...`` contains ``test-``). Selecting a pending
        shard of a store precompute has not finished listing is refused (its rows are not numbered)."""
        candidates = [(s.index, s.url) for s in self.shards] + [(i, self.shard_url(i)) for i in self.pending_shards]
        if selectors is None:
            chosen_ix = [i for i, _ in candidates]
        else:
            chosen_ix = []
            top = max((i for i, _ in candidates), default=-1)
            for sel in selectors:
                text = str(sel)
                first, sep, last = text.partition("..")
                if sep and first.isdigit() and last.isdigit():
                    if int(last) > top:
                        raise InputError(f"shard range {text}: store {self.path} has shards {self._index_text()}")
                    matches = [i for i, _ in candidates if int(first) <= i <= int(last)]
                elif text.isdigit():  # a number is an index, never a substring of names holding its digits
                    matches = [i for i, _ in candidates if i == int(text)]
                else:
                    matches = [i for i, url in candidates if url == text
                               or text in (url if "/" in text else url.rstrip("/").rsplit("/", 1)[-1])]
                if not matches:
                    raise InputError(f"no shard of store {self.path} matches {text!r}")
                chosen_ix.extend(matches)
            if not chosen_ix:
                raise InputError("no shard selected")
        pending = sorted({i for i in chosen_ix if i not in self.numbered})
        if pending:
            raise InputError(self._pending_message(pending))
        return [self.numbered[i] for i in sorted(set(chosen_ix))]

    def iter_shards(
        self, fields: dict[str, Sequence[str]], shards: Iterable[ShardInfo | int] | None = None
    ) -> Iterator[ShardBlock]:
        """Yield one :class:`ShardBlock` per shard (in the order given), each read sequentially."""
        teachers = {name: self.teacher(name) for name in fields}
        selected = self.shards if shards is None else [s if isinstance(s, ShardInfo) else self.shard(s) for s in shards]
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
    check_format_version(doc)
    if listing.is_sealed(doc):
        return Store(root, StoreManifest.from_json(doc))
    with remote_errors(f"store {root}"):
        manifest, pending = listing.assemble(root, doc)
    return Store(root, manifest, pending=pending, sealed=False)
