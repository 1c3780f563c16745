"""Every path and reserved name of a store, in one place (format v2, docs/FORMAT.md).

::

    STORE/store.json                                  the input shards; once sealed, the row plan (StoreManifest)
    STORE/samples/SHARD.parquet                       one shard's key, label: written by its first worker
    STORE/samples/SHARD.skipped.json                  an unreadable shard left out with --on-error skip
    STORE/samples.parquet                             row, key, shard, index_in_shard, label (once sealed)
    STORE/.lock                                       a precompute job's exclusive lock (+ its token)
    STORE/.readers.lock                               readers' shared lock; ``--overwrite`` takes it exclusively
    STORE/teachers/NAME/teacher.json                  TeacherSpec
    STORE/teachers/NAME/shards/SHARD.zarr/FIELD       one Zarr group per shard (``_valid``, ``_views``, ``F.offsets``)
    STORE/teachers/NAME/done/SHARD.json               DoneRecord, written last
    STORE/index/TEACHER.FIELD.faiss (+ .json, .rows.npy)
    STORE/negatives/NAME.parquet

Functions take the store root (a path, a URL such as ``s3://bucket/prefix``) or anything with
a ``.path`` (an open ``Store``); they return a ``pathlib.Path`` for a local store and a
``upath.UPath`` on object storage (:func:`kdstore.store.fs.store_root`). On object storage
the job's lock is a lease, ``STORE/.lease/GENERATION.json`` (:mod:`kdstore.store.lease`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdstore.store.fs import store_root

STORE_FILE = "store.json"
SAMPLES_FILE = "samples.parquet"
LISTINGS_DIR = "samples"  # per-shard listings (format 2): SHARD.parquet, SHARD.skipped.json
SKIPPED_SUFFIX = ".skipped.json"
TEACHERS_DIR = "teachers"
TEACHER_FILE = "teacher.json"
SHARDS_DIR = "shards"
DONE_DIR = "done"
TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"
READERS_LOCK_FILE = ".readers.lock"
LEASE_DIR = ".lease"  # object storage: one lease object per generation, GENERATION.json
INDEX_DIR = "index"
NEGATIVES_DIR = "negatives"

# Reserved arrays of a shard group, beside the teacher's fields.
VALID_ARRAY = "_valid"  # [n] bool: False for samples skipped with --on-error skip
VIEWS_ARRAY = "_views"  # [n, V, 5] int32 view parameters
OFFSETS_SUFFIX = ".offsets"  # FIELD.offsets [n + 1] int64 of a per-token field


def root_of(store: Any) -> Path:
    """The store folder of a ``Store`` (its ``.path``), a path or a URL (a ``UPath`` then)."""
    return store_root(store)


def shard_name(index: int) -> str:
    return f"{index:06d}"


def is_reserved(array_name: str) -> bool:
    """True for arrays that are not teacher fields (``_valid``, ``_views``, ``F.offsets``)."""
    return array_name.startswith("_") or array_name.endswith(OFFSETS_SUFFIX)


def offsets_name(field: str) -> str:
    return field + OFFSETS_SUFFIX


def store_file(store: Any) -> Path:
    return root_of(store) / STORE_FILE


def samples_path(store: Any) -> Path:
    return root_of(store) / SAMPLES_FILE


def listings_dir(store: Any) -> Path:
    return root_of(store) / LISTINGS_DIR


def listing_path(store: Any, shard_index: int) -> Path:
    """``STORE/samples/SHARD.parquet``: the keys and labels of input shard ``shard_index``, in tar order."""
    return listings_dir(store) / f"{shard_name(shard_index)}.parquet"


def skipped_listing_path(store: Any, shard_index: int) -> Path:
    """``STORE/samples/SHARD.skipped.json``: ``{url, reason}`` of an input shard nobody could read."""
    return listings_dir(store) / f"{shard_name(shard_index)}{SKIPPED_SUFFIX}"


def lock_path(store: Any) -> Path:
    return root_of(store) / LOCK_FILE


def readers_lock_path(store: Any) -> Path:
    return root_of(store) / READERS_LOCK_FILE


def lease_dir(store: Any) -> Path:
    return root_of(store) / LEASE_DIR


def lease_path(store: Any, generation: int) -> Path:
    return lease_dir(store) / f"{generation:010d}.json"


def teachers_dir(store: Any) -> Path:
    return root_of(store) / TEACHERS_DIR


def teacher_dir(store: Any, name: str) -> Path:
    return teachers_dir(store) / name


def teacher_file(store: Any, name: str) -> Path:
    return teacher_dir(store, name) / TEACHER_FILE


def shards_dir(store: Any, teacher: str) -> Path:
    return teacher_dir(store, teacher) / SHARDS_DIR


def shard_array_path(store: Any, teacher: str, shard_index: int) -> Path:
    return shards_dir(store, teacher) / f"{shard_name(shard_index)}.zarr"


def shard_tmp_path(store: Any, teacher: str, shard_index: int, token: str) -> Path:
    return shards_dir(store, teacher) / f"{TMP_PREFIX}{shard_name(shard_index)}-{token}"


def done_dir(store: Any, teacher: str) -> Path:
    return teacher_dir(store, teacher) / DONE_DIR


def done_path(store: Any, teacher: str, shard_index: int) -> Path:
    return done_dir(store, teacher) / f"{shard_name(shard_index)}.json"


def _file_part(name: str) -> str:
    # Field names such as features/pool hold a slash; file names cannot.
    return name.replace("/", "~")


def index_dir(store: Any) -> Path:
    return root_of(store) / INDEX_DIR


def index_path(store: Any, teacher: str, field: str) -> Path:
    """``STORE/index/TEACHER.FIELD.faiss`` (its record: ``.with_suffix(".json")``)."""
    return index_dir(store) / f"{_file_part(teacher)}.{_file_part(field)}.faiss"


def negatives_dir(store: Any) -> Path:
    return root_of(store) / NEGATIVES_DIR


def negatives_path(store: Any, name: str) -> Path:
    """``STORE/negatives/NAME.parquet``, written by ``kdstore mine --name NAME``."""
    return negatives_dir(store) / f"{_file_part(name)}.parquet"
