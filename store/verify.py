"""Checking a store against its checksums, its row plan, its index records and its input shards; summaries."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field


from kdstore.store import layout
from kdstore.store.fs import open_zarr_group
from kdstore.store.inputs import input_problems, shard_urls
from kdstore.store.reader import Store
from kdstore.store.schema import ShardInfo
from kdstore.store.writer import array_sha256


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    shards_checked: int = 0
    fields_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_shard_fields(store: Store, name: str, shard: ShardInfo, record) -> Iterable[str]:
    path = layout.shard_array_path(store.path, name, shard.index)
    try:
        group = open_zarr_group(path)
    except Exception as exc:  # zarr raises many types for a damaged group
        yield f"teacher {name} shard {shard.index} ({shard.url}): arrays unreadable ({exc})"
        return
    # format 2 done records hold no row_start (rows are numbered from the listings)
    if record.num_rows != shard.num_rows or record.row_start not in (None, shard.row_start):
        yield f"teacher {name} shard {shard.index}: done record rows {record.row_start}+{record.num_rows} do not match the plan"
    for fname, spec in record.fields.items():
        try:
            data = group[fname][...]
        except Exception as exc:  # a flipped byte surfaces as a codec error of any type
            yield f"teacher {name} field {fname} shard {shard.index} ({shard.url}): unreadable ({type(exc).__name__}: {exc})"
            continue
        if array_sha256(data) != spec.sha256:
            yield f"teacher {name} field {fname} shard {shard.index} ({shard.url}): checksum mismatch"


def verify_store(
    store: Store,
    *,
    shards: Iterable[str | int] | None = None,
    check_inputs: bool = True,
    inputs_root: str | None = None,
) -> VerifyReport:
    """Re-check every (selected) shard: checksums of each field, row coverage, and that the
    input shards still hold the planned keys (read under ``inputs_root`` when the inputs
    moved). Never raises for a damaged store: problems are returned, first one first."""
    report = VerifyReport()
    if shards is None:  # a store precompute has not finished listing: its pending shards are problems
        selected = list(store.shards)
        for i in store.pending_shards:
            report.problems.append(f"input shard {i} ({store.shard_url(i)}): not listed yet, its rows are not numbered; "
                                   "rerun `kdstore precompute` to finish the store")
    else:
        selected = store.select_shards(shards)
    if check_inputs:
        urls = shard_urls(store, inputs_root)
        for problem in input_problems(store, selected, urls=urls, mode="full"):
            if problem.shard is None:
                report.problems.append(problem.detail)
            elif problem.error is not None:
                report.problems.append(f"input shard {problem.shard.index}: {problem.detail}")
            else:
                report.problems.append(
                    f"input shard {problem.shard.index} ({problem.url}): keys differ from the store's plan ({problem.detail})"
                )
    for name in store.teachers:
        teacher = store.teacher(name)
        done = teacher.done_records()
        for shard in selected:
            record = done.get(shard.index)
            if record is None:
                report.problems.append(
                    f"teacher {name} shard {shard.index} ({shard.url}): rows {shard.row_start}..{shard.row_stop - 1} missing"
                )
                continue
            if record.teacher_fingerprint != teacher.spec.fingerprint:
                report.problems.append(f"teacher {name} shard {shard.index}: written by another teacher fingerprint")
            report.problems.extend(_check_shard_fields(store, name, shard, record))
            report.fields_checked += len(record.fields)
        report.shards_checked += len(selected)
    report.problems.extend(idx["error"] for idx in _indexes(store) if "error" in idx)
    return report


def summarize(store: Store) -> dict:
    """Numbers for ``kdstore info``: rows, shards done/missing/pending, and per field shape, dtype, bytes.

    ``rows``/``shards`` count the numbered shards; ``pending_shards`` those whose rows are not
    numbered yet (format 2 while precompute has not listed every shard)."""
    teachers = []
    for name in store.teachers:
        t = store.teacher(name)
        done = t.done_records()
        fields = []
        for fname, spec in t.fields.items():
            nbytes = sum(r.fields[fname].nbytes_disk for r in done.values() if fname in r.fields)
            rows_done = sum(r.num_rows for r in done.values())
            per_token = {}
            if spec.ragged:  # tokens stored = the last offset of each finished shard
                tokens = sum(_num_tokens(store, name, fname, s) for s in done)
                per_token = {"tokens": tokens, "bytes_per_token": nbytes / tokens if tokens else float("nan"),
                             "raw_bytes_per_token": _raw_bytes_per_token(spec)}
            fields.append(
                {
                    "field": fname,
                    "shape": list(spec.shape),
                    "dtype": spec.dtype,
                    "ragged": spec.ragged,
                    "bytes_on_disk": nbytes,
                    "bytes_per_sample": nbytes / rows_done if rows_done else float("nan"),
                    **per_token,
                }
            )
        teachers.append(
            {
                "name": name,
                "fingerprint": t.spec.fingerprint,
                "outputs": [o.to_text() for o in t.spec.outputs],
                "temperature": t.spec.temperature,
                "views": t.spec.views,
                "augment": t.spec.augment,
                "shards_done": len(done),
                "shards_missing": len(t.missing_shards()),
                "samples_skipped": sum(len(r.skipped) for r in done.values()),
                "skipped_examples": t.skipped()[:5],
                "fields": fields,
            }
        )
    labels = store.labels
    return {
        "path": str(store.path),
        "format_version": store.manifest.format_version,
        "rows": store.num_rows,
        "labeled_rows": int((labels >= 0).sum()),
        "num_classes": int(labels.max() + 1) if (labels >= 0).any() else 0,
        "shards": len(store.shards),
        "pending_shards": len(store.pending_shards),  # format 2, precompute unfinished: not yet listed/numbered
        "sealed": store.sealed,
        "skipped_shards": list(store.manifest.skipped_shards),
        "teachers": teachers,
        "indexes": _indexes(store),
    }


def _num_tokens(store: Store, teacher: str, field: str, shard: int) -> int:
    """Positions stored in one finished shard of a per-token field (its last offset)."""
    group = open_zarr_group(layout.shard_array_path(store.path, teacher, shard))
    offsets = group[layout.offsets_name(field)]
    return int(offsets[offsets.shape[0] - 1]) if offsets.shape[0] else 0


def _raw_bytes_per_token(spec) -> int:
    """Uncompressed bytes of one position of a per-token field (``prod(shape) * itemsize``)."""
    import numpy as np

    return int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize


def _indexes(store: Store) -> list[dict]:
    """Each ``index/*.json`` record (+ name, bytes on disk); an unreadable one gets an ``error``."""
    out = []
    index_dir = layout.index_dir(store.path)
    if index_dir.is_dir():
        for meta in sorted(index_dir.glob("*.json")):
            faiss_file = meta.with_suffix(".faiss")
            try:
                doc = json.loads(meta.read_text())
                if not isinstance(doc, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                doc = {"error": f"index {meta.stem}: metadata {meta} is unreadable ({exc}); rebuild it with `kdstore index`"}
            doc["name"] = meta.stem
            doc["bytes_on_disk"] = faiss_file.stat().st_size if faiss_file.exists() else 0
            out.append(doc)
    return out
