"""Store glue for retrieval: index a teacher's stored field, mine negatives, query by key / row / vector.

Raw text or image queries are embedded with a teacher in ``kdstore.pipeline.embed`` (the
store knows no teacher) and arrive here as vectors.

Files, beside the store's other parts::

    STORE/index/<teacher>.<field>.faiss   + .json (+ .rows.npy when the indexed rows are not 0..n-1)
    STORE/negatives/<name>.parquet

Only valid rows are indexed (samples skipped with ``--on-error skip`` have no output). The
index record keeps the teacher fingerprint it was built from; opening it after the
teacher's outputs changed raises :class:`StoreMismatchError`.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from kdstore.store import layout
from kdstore.store.errors import InputError, StoreMismatchError
from kdstore.store.index import (
    OPTION_KINDS,
    IndexSpec,
    VectorIndex,
    build_index,
    check_options_apply,
    load_index,
    option_mismatches,
    read_index_metadata,
)
from kdstore.store.layout import INDEX_DIR, NEGATIVES_DIR  # noqa: F401  (re-exported)
from kdstore.store.mine import MineSpec, MineStats, read_negatives, write_negatives
from kdstore.store.mine_exact import EXACT_MAX_ROWS, ExactIndex
from kdstore.store.reader import Store, TeacherData, open_store
from kdstore.store.schema import EMBEDDING


class QueryHit(NamedTuple):
    """One search result: store row, its key, score (larger = closer) and label (-1 = none)."""

    row: int
    key: str
    score: float
    label: int


def _store(store: Store | str | os.PathLike[str]) -> Store:
    return store if isinstance(store, Store) else open_store(store)


def index_path(store: Store | str | os.PathLike[str], teacher: str, field: str = EMBEDDING) -> Path:
    """``STORE/index/TEACHER.FIELD.faiss`` (:func:`kdstore.store.layout.index_path`)."""
    return layout.index_path(store, teacher, field)


def negatives_path(store: Store | str | os.PathLike[str], name: str) -> Path:
    """``STORE/negatives/NAME.parquet`` (:func:`kdstore.store.layout.negatives_path`)."""
    return layout.negatives_path(store, name)


def load_negatives(store: Store | str | os.PathLike[str], name: str):
    """``kdstore mine --name NAME``'s table and its ``{"spec", "stats", "teacher", "field", ...}`` record.

    Columns: row, key, positive_row, positive_score, negative_rows, negative_scores. Raises
    :class:`InputError` (saying to run ``kdstore mine``) when there is none.
    """
    path = layout.negatives_path(store, name)
    if not path.is_file():
        root = layout.root_of(store)
        raise InputError(f"no mined negatives {path}; create them with `kdstore mine {root} --teacher T --name {name}`")
    return read_negatives(path)


class StoreField:
    """A stored field as a read-only ``[num_rows, dim]`` array, read in row blocks on demand.

    ``field[a:b]`` reads each touched shard's rows as one contiguous slice; ``field[int_array]``
    reads only the Zarr chunks (:data:`kdstore.store.writer.CHUNK_ROWS` rows) that hold the
    asked rows, one chunk at a time, so a scattered gather costs its chunks, never whole
    shards, and decodes one chunk at once. Nothing holds the
    whole field in memory; the open shard arrays are kept (handles, not data).
    """

    def __init__(self, teacher: TeacherData, field: str) -> None:
        spec = teacher.fields.get(field)
        if spec is None:
            raise InputError(f"teacher {teacher.name} has no field {field!r}; it has {sorted(teacher.fields)}")
        if len(spec.shape) != 1:
            raise InputError(
                f"{teacher.name}/{field} has per-row shape {spec.shape}; an index needs one vector per row "
                "(store an embedding, or features pooled to [D])"
            )
        self.teacher, self.field = teacher, field
        self.shape = (teacher.store.num_rows, int(spec.shape[0]))
        self.dtype = np.dtype(spec.dtype)
        self._starts = np.asarray(teacher.store.shard_starts, dtype=np.int64)
        self._arrays: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def _array(self, shard_index: int) -> Any:
        if shard_index not in self._arrays:
            self._arrays[shard_index] = self.teacher._group(shard_index)[self.field]
        return self._arrays[shard_index]

    def __getitem__(self, sel: Any) -> np.ndarray:
        """``[len(sel), dim]`` in the stored dtype, rows in the order asked."""
        if isinstance(sel, slice):
            a, b, step = sel.indices(self.shape[0])
            if step == 1:
                return self.teacher.read(self.field, np.arange(a, b, dtype=np.int64))
            sel = np.arange(a, b, step)
        rows = np.asarray(sel, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise InputError(f"rows must be in [0, {self.shape[0]}), got {rows.min()}..{rows.max()}")
        out = np.empty((rows.size, self.shape[1]), dtype=self.dtype)
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1
        for shard_index in np.unique(shard_of):
            pos = np.nonzero(shard_of == shard_index)[0]
            local = rows[pos] - self._starts[shard_index]
            uniq, inverse = np.unique(local, return_inverse=True)
            array = self._array(int(shard_index))
            block = np.empty((len(uniq), self.shape[1]), dtype=self.dtype)
            # One Zarr chunk at a time: a whole-shard selection decodes all its chunks at once.
            starts = np.flatnonzero(np.diff(uniq // int(array.chunks[0]))) + 1
            for part in np.split(np.arange(len(uniq)), starts):
                block[part] = array.get_orthogonal_selection((uniq[part], slice(None)))
            out[pos] = block[inverse]
        return out


def read_field(store: Store | str | os.PathLike[str], teacher: str, field: str = EMBEDDING) -> np.ndarray:
    """The whole field, ``[num_rows, dim]`` in its stored dtype (shard-sequential reads)."""
    s = _store(store)
    StoreField(s.teacher(teacher), field)  # checks the field and its shape
    return s.teacher(teacher).read(field)


def _valid_rows(t: TeacherData) -> np.ndarray:
    missing = t.missing_shards()
    if missing:
        raise InputError(
            f"teacher {t.name} has unfinished shards {missing[:5]}{'...' if len(missing) > 5 else ''}: "
            "finish `kdstore precompute` before indexing"
        )
    return np.nonzero(t.valid())[0].astype(np.int64)


def build_store_index(
    store: Store | str | os.PathLike[str],
    teacher: str,
    field: str = "embedding",
    spec: IndexSpec | None = None,
    *,
    in_memory: bool = False,
    progress: bool = True,
) -> tuple[VectorIndex, Path]:
    """Index every valid row of ``teacher``'s ``field`` and save it under ``STORE/index/``.

    The field streams from the store: the training sample, then ``add_batch_rows`` blocks
    (memory: the index, the sample and one block; ``docs/RETRIEVAL.md`` "At a million rows").
    ``in_memory=True`` reads the whole field first (the former path; same index).
    """
    s = _store(store)
    if spec is not None and spec.kind == "exact":
        raise InputError("kind exact needs no saved index: `kdstore mine` builds it in memory (choose a FAISS kind to save)")
    t = s.teacher(teacher)
    source = StoreField(t, field)
    rows = _valid_rows(t)
    vectors: Any = t.read(field) if in_memory else source
    subset = vectors if len(rows) == s.num_rows else _Rows(vectors, rows)
    meta = {
        "teacher": teacher,
        "field": field,
        "teacher_fingerprint": t.spec.fingerprint,
        "store_rows": s.num_rows,
    }
    index = build_index(subset, spec, row_ids=rows, progress=progress, meta=meta)
    path = index.save(index_path(s, teacher, field))
    return index, path


class _Rows:
    """``vectors`` restricted to ``rows`` (positions 0..len(rows)-1 map to those rows)."""

    def __init__(self, vectors: Any, rows: np.ndarray) -> None:
        self.vectors, self.rows = vectors, rows
        self.shape = (len(rows), int(vectors.shape[1]))

    def __getitem__(self, sel: Any) -> np.ndarray:
        return self.vectors[self.rows[sel]]


def open_store_index(
    store: Store | str | os.PathLike[str], teacher: str, field: str = "embedding", **load_kwargs: Any
) -> VectorIndex:
    """Load ``STORE/index/<teacher>.<field>.faiss``; StoreMismatchError when the teacher changed since."""
    s = _store(store)
    t = s.teacher(teacher)
    index = load_index(index_path(s, teacher, field), **load_kwargs)
    built_from = index.meta.get("teacher_fingerprint")
    if built_from != t.spec.fingerprint or index.meta.get("store_rows") != s.num_rows:
        raise StoreMismatchError(
            f"index {index_path(s, teacher, field).name} was built from another version of teacher {teacher} "
            f"(fingerprint {str(built_from)[:16]}, {index.meta.get('store_rows')} rows); rebuild it with `kdstore index`"
        )
    return index


def get_or_build_index(
    store: Store | str | os.PathLike[str],
    teacher: str,
    field: str = "embedding",
    spec: IndexSpec | None = None,
    *,
    options: dict[str, Any] | None = None,
    rebuild: bool = False,
    progress: bool = True,
) -> tuple[VectorIndex | ExactIndex, str]:
    """The index mining uses, and a line saying which (``"exact cosine, built in memory"``, …).

    ``options``: only the :class:`IndexSpec` fields the user gave (``spec``: all of them). Rule:

    - no ``kind``: ``exact`` when the teacher has at most :data:`EXACT_MAX_ROWS` valid rows;
      above, the saved index when there is one, else IVF (at 10^5 rows it beats HNSW's
      defaults on recall, 0.991 vs 0.909: docs/RETRIEVAL.md "At a million rows").
    - ``exact``: built in memory from the field (never saved; ``rebuild`` is refused).
    - a FAISS kind: the saved index when its kind, metric and given build parameters match
      (given ``nprobe`` / ``ef_search`` are set on it), else the requested one is built and
      saved over it. ``rebuild`` always builds.

    Options the chosen kind does not use are refused (InputError), never silently ignored.
    """
    s = _store(store)
    given = dict(options or {})
    if spec is not None:
        fields = {k: v for k, v in asdict(spec).items() if k in ("kind", "metric") or spec.kind in OPTION_KINDS.get(k, ())}
        given = {k: v for k, v in {**fields, **given}.items() if v is not None and k != "add_batch_rows"}
    kind, why = given.get("kind"), ""
    t = s.teacher(teacher)
    rows = _valid_rows(t)
    json_path = index_path(s, teacher, field).with_suffix(".json")
    if kind is None:
        if len(rows) <= EXACT_MAX_ROWS:
            kind, why = "exact", f" (the default up to {EXACT_MAX_ROWS:,} rows; this store has {len(rows):,})"
        elif json_path.is_file() and not rebuild:
            kind, why = read_index_metadata(json_path.with_suffix(".faiss"))["kind"], " (the saved index)"
        else:
            kind, why = "ivf", f" (the default above {EXACT_MAX_ROWS:,} rows)"
    check_options_apply(kind, given, why=why)
    metric = given.get("metric", "cosine")
    if kind == "exact":
        if rebuild:
            raise InputError(f"--rebuild-index: the exact path{why} has no saved index to rebuild; give --kind for one")
        vectors = StoreField(t, field)  # streamed into ExactIndex's one prepared copy
        subset = vectors if len(rows) == s.num_rows else _Rows(vectors, rows)
        index = ExactIndex(subset, metric=metric, row_ids=rows, meta={"teacher": teacher, "field": field})
        return index, f"exact {metric}{why}, built in memory in {index.build_seconds:.2f} s"
    params = {k: v for k, v in given.items() if k not in ("kind", "metric")}
    if json_path.is_file() and not rebuild:
        saved = open_store_index(s, teacher, field)
        mismatches = option_mismatches(saved.spec, {**given, "kind": kind, **({"metric": metric} if "metric" in given else {})})
        if not mismatches:
            saved.set_search_params(nprobe=params.get("nprobe"), ef_search=params.get("ef_search"))
            return saved, f"saved {saved.spec.kind} {saved.metric}{why} index {json_path.with_suffix('.faiss').name}"
        reason = f"the saved index differs ({', '.join(mismatches)}); built and saved"
    else:
        reason = "rebuilt and saved" if rebuild else "built and saved"
    built, path = build_store_index(s, teacher, field, IndexSpec(kind=kind, metric=metric, **params), progress=progress)
    return built, f"{kind} {metric}{why}, {reason} in {built.build_seconds:.2f} s -> {path.name}"


def read_pairs(path: str | os.PathLike[str], store: Store) -> np.ndarray:
    """Anchor → positive pairs from Parquet or CSV (columns ``anchor``, ``positive``: keys or rows).

    Returns int64 ``[num_rows]``: the positive row of each anchor row, -1 where none.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise InputError(f"pairs file {path} does not exist")
    table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    if not {"anchor", "positive"} <= set(table.column_names):
        raise InputError(f"pairs file {path} needs columns 'anchor' and 'positive', it has {table.column_names}")
    out = np.full(store.num_rows, -1, dtype=np.int64)

    def to_rows(column: str) -> np.ndarray:
        values = table.column(column).to_pylist()
        if all(isinstance(v, int) for v in values):
            rows = np.asarray(values, dtype=np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= store.num_rows):
                raise InputError(f"pairs file {path}: {column} rows must be in [0, {store.num_rows})")
            return rows
        lookup = store.key_to_row
        unknown = [v for v in values if str(v) not in lookup]
        if unknown:
            raise InputError(f"pairs file {path}: {len(unknown)} {column} keys are not in the store, e.g. {unknown[0]!r}")
        return np.asarray([lookup[str(v)] for v in values], dtype=np.int64)

    anchors, positives = to_rows("anchor"), to_rows("positive")
    if len(np.unique(anchors)) != len(anchors):
        raise InputError(f"pairs file {path}: an anchor appears twice; give one positive per anchor")
    out[anchors] = positives
    return out


def mine_store(
    store: Store | str | os.PathLike[str],
    teacher: str,
    field: str = "embedding",
    spec: MineSpec | None = None,
    *,
    name: str | None = None,
    pairs: str | os.PathLike[str] | None = None,
    index_spec: IndexSpec | None = None,
    index_options: dict[str, Any] | None = None,
    rebuild_index: bool = False,
    progress: bool = True,
) -> tuple[Path, MineStats]:
    """Mine negatives for every indexed row and write ``STORE/negatives/<name>.parquet``.

    The index is chosen by :func:`get_or_build_index` from ``index_spec`` (every field given) or
    ``index_options`` (only the given ones); ``stats.index`` says which was used. ``pairs``
    names a Parquet/CSV pairs file for ``spec.positive == "pairs"``.
    """
    s = _store(store)
    spec = spec or MineSpec()
    index, used = get_or_build_index(
        s, teacher, field, index_spec, options=index_options, rebuild=rebuild_index, progress=progress
    )
    positive_rows = read_pairs(pairs, s) if pairs is not None else None
    if spec.positive == "pairs" and positive_rows is None:
        raise InputError("--positive pairs needs --pairs FILE (columns anchor, positive)")
    labels = s.labels
    if (spec.positive == "label" or spec.exclude_same_label) and not (labels >= 0).any():
        raise InputError(f"store {s.path} has no labels: use --positive none or --positive pairs")
    name = name or (teacher if field == "embedding" else f"{teacher}.{field}")
    path = negatives_path(s, name)
    # FAISS kinds (large stores): query batches and positives read from the store; a positive
    # missing from the neighbour list comes from a label-restricted index search (store scans
    # only where that finds none). exact (at most EXACT_MAX_ROWS rows by default): the field in
    # memory, because its label-positive scans re-read each label's rows per query batch.
    t = s.teacher(teacher)
    vectors = t.read(field) if index.spec.kind == "exact" else StoreField(t, field)
    stats = write_negatives(
        path,
        index,
        vectors,
        spec,
        labels=labels,
        positive_rows=positive_rows,
        keys=s.keys,
        progress=progress,
        extra_metadata={"teacher": teacher, "field": field, "index_used": used,
                        **({"index": index_path(s, teacher, field).name} if index.spec.kind != "exact" else {})},
    )
    stats.index = used
    return path, stats


def query(
    store: Store | str | os.PathLike[str],
    teacher: str,
    field: str = EMBEDDING,
    *,
    key: str | None = None,
    row: int | None = None,
    vector: np.ndarray | str | os.PathLike[str] | None = None,
    k: int = 10,
    include_self: bool = False,
) -> list[QueryHit]:
    """The ``k`` nearest stored rows to one query; give exactly one of key, row, vector.

    ``vector`` is an array ``[dim]`` or a ``.npy`` path (text / image queries:
    ``kdstore.pipeline.embed.query``). A query by key or row leaves that row out unless
    ``include_self``.
    """
    s = _store(store)
    given = [name for name, v in (("key", key), ("row", row), ("vector", vector)) if v is not None]
    if len(given) != 1:
        raise InputError(f"give exactly one of key, row, vector (got {given or 'none'})")
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    index = open_store_index(s, teacher, field)
    self_row = None
    if key is not None:
        if key not in s.key_to_row:
            raise InputError(f"key {key!r} is not in store {s.path}")
        row = s.key_to_row[key]
    if row is not None:
        if not 0 <= int(row) < s.num_rows:
            raise InputError(f"row must be in [0, {s.num_rows}), got {row}")
        self_row = int(row)
        q = s.teacher(teacher).read(field, [self_row])
    elif vector is not None:
        if isinstance(vector, (str, os.PathLike)):
            try:
                vector = np.load(vector)
            except (OSError, ValueError) as err:
                raise InputError(f"cannot read query vector {vector}: {err}") from None
        q = np.asarray(vector, dtype=np.float32).reshape(1, -1)
    extra = 1 if self_row is not None and not include_self else 0
    scores, rows = index.search(q, min(k + extra, index.ntotal))
    labels, keys = s.labels, s.keys
    hits = [
        QueryHit(int(r), str(keys[r]), float(sc), int(labels[r]))
        for sc, r in zip(scores[0], rows[0])
        if r >= 0 and (include_self or r != self_row)
    ]
    return hits[:k]


def label_recall_ndcg(found: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-query retrieval quality with same-label relevance, query ``i`` being document ``i``.

    ``found [n, k]`` int: the corpus rows query ``i`` retrieved (itself excluded), ``labels [n]``
    int. Returns ``(recall [n], ndcg [n], relevant [n])``: recall@k = relevant found /
    min(k, relevant), nDCG@k with binary gains, and the number of other documents sharing the
    query's label (a query with none scores 0; callers decide whether to keep it)."""
    rel = labels[found] == labels[:, None]
    n_rel = np.bincount(labels, minlength=labels.max() + 1)[labels] - 1
    recall = rel.sum(1) / np.maximum(1, np.minimum(k, n_rel))
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.array([discount[: min(k, n)].sum() for n in n_rel])
    ndcg = (rel * discount).sum(1) / np.maximum(ideal, 1e-9)
    return recall, ndcg, n_rel
