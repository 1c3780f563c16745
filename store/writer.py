"""Writing a store: teacher specs and one shard's arrays at a time (the row plan and the
per-shard listings are :mod:`kdstore.store.listing`'s; ``write_plan`` is re-exported from there).

Every shard's arrays go into their own Zarr group (no two writers ever share a file or a
chunk), written under a temporary name, fsynced (every chunk file and folder), renamed into
place, and the parent folder fsynced; the shard's done record is written (and fsynced) last.
So a done record on disk implies durable chunks even across a power loss, and a resume
trusts done records without re-reading checksums. A crash leaves at worst a temporary
folder that the next run removes.

On object storage (``s3://``, :mod:`kdstore.store.fs`) there is no rename and no fsync: a
PUT is atomic and durable once it returns. A worker checks its job still holds the lease,
writes the shard's Zarr group straight to ``shards/SHARD.zarr`` (clearing what a previous
attempt left there), checks the lease again and PUTs the done record last; readers ignore
a shard without a done record, so a half-written group is never read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from kdstore.store import layout
from kdstore.store.atomic import fsync_dir, fsync_tree, write_json_atomic
from kdstore.store.fs import is_remote, remove_tree, tree_bytes, zarr_store
from kdstore.store.layout import OFFSETS_SUFFIX, VALID_ARRAY, VIEWS_ARRAY
from kdstore.store.listing import kdstore_version, write_plan  # noqa: F401  (re-exported)
from kdstore.store.lock import check_fence
from kdstore.store.schema import DoneRecord, FieldSpec, ShardInfo, TeacherSpec

CHUNK_ROWS = 4096


def array_sha256(array: np.ndarray) -> str:
    """Checksum of an array's logical content: dtype, shape and C-order bytes."""
    digest = hashlib.sha256(f"{array.dtype.str}:{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return "sha256:" + digest.hexdigest()


def write_teacher_spec(root: Path, spec: TeacherSpec) -> None:
    write_json_atomic(layout.teacher_file(root, spec.name), spec.to_json())


def clean_partial(root: Path, name: str) -> int:
    """Remove temporary shard folders a crashed run left behind; returns how many."""
    shards_dir = layout.shards_dir(root, name)
    removed = 0
    if is_remote(root):  # nothing is written under a temporary name there
        return 0
    if shards_dir.is_dir():
        for entry in shards_dir.iterdir():
            if entry.name.startswith(layout.TMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
    return removed


def write_shard(
    root: Path,
    teacher: TeacherSpec,
    shard: ShardInfo,
    fields: dict[str, np.ndarray],
    *,
    valid: np.ndarray,
    ragged: dict[str, list[np.ndarray | None]] | None = None,
    view_params: np.ndarray | None = None,
    skipped: Sequence[dict] = (),
    seconds: float = 0.0,
    extra: dict | None = None,
    fence_token: str | None = None,
) -> DoneRecord:
    """Write one shard's fields (each ``[num_rows, ...]``) and then its done record.

    ``shard.row_start`` is recorded as given: None from a precompute worker (format 2 numbers
    rows from the listings), a number from callers that write a sealed plan themselves.

    ``ragged`` fields hold one ``[len_i, ...]`` array per row (None for a skipped row); they
    are stored as ``NAME`` ``[sum(len_i), ...]`` plus ``NAME.offsets`` ``[num_rows + 1]`` int64.

    The arrays land in ``shards/SHARD.zarr`` via a temp folder and a rename; a previous
    partial folder of the same shard is replaced. Returns the done record written.
    """
    remote = is_remote(root)
    shards_dir = layout.shards_dir(root, teacher.name)
    final = layout.shard_array_path(root, teacher.name, shard.index)
    if remote:
        check_fence(root, fence_token)  # a late worker must not touch a newer job's objects
        remove_tree(final)
        tmp = final
    else:
        shards_dir.mkdir(parents=True, exist_ok=True)
        tmp = layout.shard_tmp_path(root, teacher.name, shard.index, uuid.uuid4().hex[:8])
    group = zarr.open_group(zarr_store(tmp, read_only=False), mode="w")
    specs: dict[str, FieldSpec] = {}
    arrays = dict(fields)
    arrays[VALID_ARRAY] = valid.astype(bool)
    if view_params is not None:
        arrays[VIEWS_ARRAY] = view_params.astype(np.int32)
    ragged_names = set()
    for name, column in (ragged or {}).items():
        template = next(r for r in column if r is not None)
        filled = [r if r is not None else np.zeros((0, *template.shape[1:]), template.dtype) for r in column]
        arrays[name + OFFSETS_SUFFIX] = np.concatenate([[0], np.cumsum([len(r) for r in filled])]).astype(np.int64)
        arrays[name] = np.concatenate(filled, axis=0)
        ragged_names.add(name)
    for name, array in arrays.items():
        if name in ragged_names or name.endswith(OFFSETS_SUFFIX):
            pass
        elif array.shape[0] != shard.num_rows:
            raise ValueError(f"field {name} has {array.shape[0]} rows, shard {shard.index} owns {shard.num_rows}")
        chunks = (min(CHUNK_ROWS, max(1, shard.num_rows)), *array.shape[1:])
        group.create_array(name, data=np.ascontiguousarray(array), chunks=chunks)
        specs[name] = FieldSpec(
            name=name,
            shape=tuple(int(d) for d in array.shape[1:]),
            dtype=array.dtype.name,
            sha256=array_sha256(array),
            nbytes_disk=tree_bytes(tmp / name),
            ragged=name in ragged_names,
        )
    if remote:
        check_fence(root, fence_token)
    else:
        fsync_tree(tmp)  # every chunk durable before the rename that publishes them
        check_fence(root, fence_token)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(shards_dir)  # the rename itself durable before the done record
    record = DoneRecord(
        shard=shard.index,
        url=shard.url,
        row_start=shard.row_start,
        num_rows=shard.num_rows,
        teacher_fingerprint=teacher.fingerprint,
        fields=specs,
        skipped=tuple(skipped),
        seconds=seconds,
        extra=dict(extra or {}),
    )
    write_json_atomic(layout.done_path(root, teacher.name, shard.index), record.to_json())
    return record
