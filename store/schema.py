"""Store format v1: the JSON documents of a store, as frozen dataclasses.

Each document is parsed and checked once when read (``from_json``) and trusted after.
The layout they describe is documented in ``docs/FORMAT.md``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdstore.store.errors import StoreCorruptError

FORMAT_VERSION = 1
STORE_FILE = "store.json"
SAMPLES_FILE = "samples.parquet"
TEACHERS_DIR = "teachers"
LOCK_FILE = ".lock"


def shard_name(index: int) -> str:
    return f"{index:06d}"


def write_json_atomic(path: Path, doc: dict) -> None:
    """Write ``doc`` to a temp file beside ``path``, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreCorruptError(f"{what} {path} is unreadable ({exc})") from None
    if not isinstance(doc, dict):
        raise StoreCorruptError(f"{what} {path} is not a JSON object")
    return doc


def _require(doc: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in doc]
    if missing:
        raise StoreCorruptError(f"{what} lacks {missing}")


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    """One input shard and the contiguous rows it owns: ``[row_start, row_start + num_rows)``."""

    index: int
    url: str
    row_start: int
    num_rows: int

    @property
    def row_stop(self) -> int:
        return self.row_start + self.num_rows

    @property
    def name(self) -> str:
        return shard_name(self.index)


@dataclass(frozen=True, kw_only=True)
class StoreManifest:
    """``store.json``: the planned rows. Written once, before any teacher runs."""

    format_version: int
    kdstore_version: str
    num_rows: int
    input_fingerprint: str
    input_urls: tuple[str, ...]
    shards: tuple[ShardInfo, ...]
    skipped_shards: tuple[dict, ...] = ()

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["shards"] = [asdict(s) for s in self.shards]
        doc["input_urls"] = list(self.input_urls)
        doc["skipped_shards"] = list(self.skipped_shards)
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> "StoreManifest":
        _require(doc, ("format_version", "num_rows", "shards", "input_fingerprint", "input_urls"), "store.json")
        if doc["format_version"] != FORMAT_VERSION:
            raise StoreCorruptError(
                f"store format_version {doc['format_version']} is not supported by this kdstore (reads {FORMAT_VERSION})"
            )
        shards = tuple(ShardInfo(**s) for s in doc["shards"])
        expected = 0
        for s in shards:
            if s.row_start != expected:
                raise StoreCorruptError(f"store.json: shard {s.index} starts at row {s.row_start}, expected {expected}")
            expected = s.row_stop
        if expected != doc["num_rows"]:
            raise StoreCorruptError(f"store.json: shards cover {expected} rows but num_rows is {doc['num_rows']}")
        return cls(
            format_version=doc["format_version"],
            kdstore_version=doc.get("kdstore_version", "?"),
            num_rows=doc["num_rows"],
            input_fingerprint=doc["input_fingerprint"],
            input_urls=tuple(doc["input_urls"]),
            shards=shards,
            skipped_shards=tuple(doc.get("skipped_shards", ())),
        )


@dataclass(frozen=True, kw_only=True)
class TeacherSpec:
    """``teachers/NAME/teacher.json``: what was asked of the teacher. Never changes."""

    name: str
    fingerprint: str
    factory: str
    input_key: str
    outputs: tuple[str, ...]
    temperature: float
    dtype: str
    views: int = 0
    augment: str = ""
    seed: int = 0
    layers: tuple[str, ...] = ()
    factory_args: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["outputs"] = list(self.outputs)
        doc["layers"] = list(self.layers)
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> "TeacherSpec":
        _require(doc, ("name", "fingerprint", "outputs", "temperature", "dtype"), "teacher.json")
        return cls(
            name=doc["name"],
            fingerprint=doc["fingerprint"],
            factory=doc.get("factory", ""),
            input_key=doc.get("input_key", ""),
            outputs=tuple(doc["outputs"]),
            temperature=float(doc["temperature"]),
            dtype=doc["dtype"],
            views=int(doc.get("views", 0)),
            augment=doc.get("augment", ""),
            seed=int(doc.get("seed", 0)),
            layers=tuple(doc.get("layers", ())),
            factory_args=dict(doc.get("factory_args", {})),
        )

    def differences(self, other: "TeacherSpec") -> list[str]:
        """Names of the settings that make ``other`` a different precompute.

        The factory path and arguments are recorded but not compared (weights may move, a
        delay may change): the fingerprint is what identifies the teacher's outputs, so a
        Teacher whose outputs depend on an argument folds it into its fingerprint (the
        MiniLM teacher does so with ``max_seq_length``).
        """
        keys = ("fingerprint", "input_key", "outputs", "temperature", "dtype", "views", "augment", "seed")
        return [k for k in keys if getattr(self, k) != getattr(other, k)]


@dataclass(frozen=True, kw_only=True)
class FieldSpec:
    """One stored field: ``shape`` is per row (without the row axis); ``sha256`` of one shard's bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    sha256: str = ""
    nbytes_disk: int = 0
    ragged: bool = False  # per-token: ``shape`` is per token, rows via ``NAME.offsets``


@dataclass(frozen=True, kw_only=True)
class DoneRecord:
    """``teachers/NAME/done/SHARD.json``: written last, after the shard's arrays are in place."""

    shard: int
    url: str
    row_start: int
    num_rows: int
    teacher_fingerprint: str
    fields: dict[str, FieldSpec]
    skipped: tuple[dict, ...] = ()
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["fields"] = {k: {**asdict(v), "shape": list(v.shape)} for k, v in self.fields.items()}
        doc["skipped"] = list(self.skipped)
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> "DoneRecord":
        _require(doc, ("shard", "url", "row_start", "num_rows", "teacher_fingerprint", "fields"), "done record")
        return cls(
            shard=doc["shard"],
            url=doc["url"],
            row_start=doc["row_start"],
            num_rows=doc["num_rows"],
            teacher_fingerprint=doc["teacher_fingerprint"],
            fields={k: FieldSpec(**{**v, "shape": tuple(v["shape"])}) for k, v in doc["fields"].items()},
            skipped=tuple(doc.get("skipped", ())),
            seconds=float(doc.get("seconds", 0.0)),
            extra=dict(doc.get("extra", {})),
        )
