"""Hard-negative mining over an index, with sentence-transformers' ``mine_hard_negatives`` options.

Every indexed row is a query (or the rows given). Query batches stream through the index
(a FAISS :class:`~kdstore.store.index.VectorIndex` or the exact, FAISS-free
:class:`~kdstore.store.mine_exact.ExactIndex`); no N×N score matrix is ever built: memory is
the index, one batch of ``batch_rows`` queries and the output.

Per query row ``q`` (all scores from the index's metric, larger = closer):

1. **Neighbour list**: the index's nearest rows to ``q``, ``q`` itself left out.
2. **Positive**: ``positive="label"``: the nearest row with ``q``'s label (the first one in
   the neighbour list, else the nearest an index search restricted to that label's rows
   finds (FAISS ``IDSelectorBitmap``: exact for ``flat``, approximate like the neighbour list
   for ivf/hnsw), else, when that finds none or the index cannot restrict (GPU, ``exact``),
   an exact scan over the label's indexed rows read from the store); ``"pairs"``: the
   given ``positive_rows[q]``; ``"none"``. Rows with label -1 or no such row get
   ``positive_row = -1``, ``positive_score = NaN``.
3. **Pool**: the first ``range_max + P`` rows of the neighbour list (``P`` = 1 when positives
   are used, the room sentence-transformers leaves for the positive).
4. **Filters** on the pool (the table :data:`FILTERS`, in order): drop the positive; with ``exclude_same_label`` every row sharing
   ``q``'s label; ``absolute_margin``: drop ``s + margin > s_pos``; ``relative_margin``:
   drop ``s > s_pos - |s_pos|·margin``; ``max_score``: drop ``s > max_score``;
   ``min_score``: drop ``s < min_score``. Margins need a positive and apply where one exists.
5. **Pick**: survivors in score order; skip the first ``range_min``, keep up to
   ``range_max``; ``sampling="top"`` takes the first ``num_negatives``, ``"random"`` the
   ``num_negatives`` with the smallest seeded hash of ``(seed, q, row)`` (so results do not
   depend on batch size or order), listed in score order. Rows may get fewer negatives.

With an ``exact`` or ``flat`` index this equals brute force exactly (see ``tests/test_mine.py``); with
IVF/HNSW the neighbour list is approximate; with ``ivfpq`` the candidates' scores are
recomputed from the stored vectors, so filters never act on quantised scores.

Differences from sentence-transformers: queries and corpus are the same rows, so the query
row is excluded by row id rather than by a margin; ``exclude_same_label`` and label
positives are kdstore's; with ``range_max=None`` the default is ``range_min +
10·num_negatives`` when any filter is set, else ``range_min + num_negatives``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from kdstore.store.errors import InputError
from kdstore.store.fs import is_remote, location, read_parquet, written_at
from kdstore.store.index import GPU_MAX_K, VectorIndex, prepare_vectors

NEGATIVES_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("key", pa.string()),
        pa.field("positive_row", pa.int64(), nullable=False),
        pa.field("positive_score", pa.float32(), nullable=False),
        pa.field("negative_rows", pa.list_(pa.int64()), nullable=False),
        pa.field("negative_scores", pa.list_(pa.float32()), nullable=False),
    ]
)
METADATA_KEY = b"kdstore.mine"


@dataclass(frozen=True, kw_only=True)
class MineSpec:
    """Mining options; names and meanings follow ``sentence_transformers.util.mine_hard_negatives``."""

    num_negatives: int = 3
    range_min: int = 0
    range_max: int | None = None
    max_score: float | None = None
    min_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    exclude_same_label: bool = False
    positive: Literal["label", "pairs", "none"] = "label"
    sampling: Literal["top", "random"] = "top"
    seed: int = 0
    batch_rows: int = 4096

    def __post_init__(self) -> None:
        if self.num_negatives < 1:
            raise InputError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if self.range_min < 0:
            raise InputError(f"range_min must be >= 0, got {self.range_min}")
        if self.positive not in ("label", "pairs", "none"):
            raise InputError(f"positive must be label, pairs or none, got {self.positive!r}")
        if self.sampling not in ("top", "random"):
            raise InputError(f"sampling must be top or random, got {self.sampling!r}")
        if self.batch_rows < 1:
            raise InputError(f"batch_rows must be >= 1, got {self.batch_rows}")
        if self.positive == "none" and (self.absolute_margin is not None or self.relative_margin is not None):
            raise InputError("margins compare negatives with the positive: use --positive label or pairs, or drop the margin")
        rmax = self.resolved_range_max
        if self.range_min >= rmax:
            raise InputError(f"range_min ({self.range_min}) must be smaller than range_max ({rmax})")
        if self.num_negatives > rmax - self.range_min:
            raise InputError(
                f"cannot mine {self.num_negatives} negatives from ranks {self.range_min}..{rmax}: "
                "raise range_max or lower num_negatives / range_min"
            )

    @property
    def has_filters(self) -> bool:
        return self.exclude_same_label or any(
            v is not None for v in (self.max_score, self.min_score, self.absolute_margin, self.relative_margin)
        )

    @property
    def resolved_range_max(self) -> int:
        if self.range_max is not None:
            return self.range_max
        return self.range_min + self.num_negatives * (10 if self.has_filters else 1)

    @property
    def positive_slots(self) -> int:
        return 0 if self.positive == "none" else 1


@dataclass(kw_only=True)
class MineStats:
    """Counts for the report (like sentence-transformers' skipped-candidate log)."""

    queries: int = 0
    candidates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    without_positive: int = 0
    positive_index_searches: int = 0  # positives found by a label-restricted index search
    positive_fallback_scans: int = 0  # positives found by an exact scan of the label's rows
    short_rows: int = 0  # rows that got fewer than num_negatives
    negatives: int = 0
    seconds: float = 0.0
    index: str = ""  # which index mined (set by kdstore.store.retrieval.mine_store)

    def add_skip(self, reason: str, count: int) -> None:
        if count:
            self.skipped[reason] = self.skipped.get(reason, 0) + int(count)


def sampling_keys(seed: int, query_rows: np.ndarray, candidate_rows: np.ndarray) -> np.ndarray:
    """uint64 hash of ``(seed, query row, candidate row)`` (splitmix64): the order ``sampling="random"`` uses.

    ``query_rows`` ``[b, 1]`` (or broadcastable) and ``candidate_rows`` ``[b, k]`` → ``[b, k]``.
    """
    with np.errstate(over="ignore"):
        z = (
            np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
            ^ np.asarray(query_rows, dtype=np.int64).astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
            ^ np.asarray(candidate_rows, dtype=np.int64).astype(np.uint64) * np.uint64(0x94D049BB133111EB)
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _scores_rows(metric: str, q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Scores of prepared queries ``q [b, d]`` against prepared rows ``c [m, d]`` → float32 ``[b, m]``."""
    if metric == "l2":
        d2 = (q * q).sum(1)[:, None] + (c * c).sum(1)[None, :] - 2.0 * (q @ c.T)
        return -np.maximum(d2, 0.0).astype(np.float32)
    return (q @ c.T).astype(np.float32, copy=False)


def _scores_pairs(metric: str, q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Row-wise scores of prepared ``q [b, d]`` and ``c [b, d]`` (or ``c [b, k, d]``) → float32 ``[b]`` / ``[b, k]``."""
    if c.ndim == 3:
        q = q[:, None, :]
    if metric == "l2":
        return -((q - c) ** 2).sum(-1).astype(np.float32)
    return (q * c).sum(-1).astype(np.float32)


class _LabelGroups:
    """Indexed rows grouped by label, for exact positive scans."""

    def __init__(self, labels: np.ndarray, indexed_rows: np.ndarray) -> None:
        lab = labels[indexed_rows]
        order = np.argsort(lab, kind="stable")
        self.positions = order  # index positions, grouped by label
        self.rows = indexed_rows[order]
        self.sorted_labels = lab[order]

    def _span(self, label: int) -> slice:
        lo, hi = np.searchsorted(self.sorted_labels, [label, label + 1])
        return slice(int(lo), int(hi))

    def members(self, label: int) -> np.ndarray:
        return self.rows[self._span(label)]

    def member_positions(self, label: int) -> np.ndarray:
        return self.positions[self._span(label)]


@dataclass(frozen=True, kw_only=True)
class Candidates:
    """One query batch's candidate pool, what the filter predicates see (``b`` queries, ``k`` candidates)."""

    spec: MineSpec
    scores: np.ndarray  # float32 [b, k], the index's scores (larger = closer)
    rows: np.ndarray  # int64 [b, k], candidate rows (-1 = none)
    pos: np.ndarray  # int64 [b], positive row (-1 = none)
    has_pos: np.ndarray  # bool [b]
    pos_score: np.ndarray  # float32 [b, 1], NaN without a positive
    q_labels: np.ndarray | None  # int64 [b]
    labels: np.ndarray | None  # int64 [n_rows]

    def same_label(self) -> np.ndarray:
        cand_labels = self.labels[np.where(self.rows >= 0, self.rows, 0)]
        return (cand_labels == self.q_labels[:, None]) & (self.q_labels[:, None] >= 0)


# The mining filters, applied in this order: (name in MineStats.skipped, predicate → bool [b, k]
# of candidates to drop, or None when the option is off). Rules: see the module docstring.
FILTERS: tuple[tuple[str, Callable[[Candidates], np.ndarray | None]], ...] = (
    ("positive", lambda c: c.rows == c.pos[:, None]),
    ("same_label", lambda c: c.same_label() if c.spec.exclude_same_label and c.q_labels is not None else None),
    ("absolute_margin", lambda c: None if c.spec.absolute_margin is None
        else c.has_pos[:, None] & (c.scores + np.float32(c.spec.absolute_margin) > c.pos_score)),
    ("relative_margin", lambda c: None if c.spec.relative_margin is None
        else c.has_pos[:, None] & (c.scores > c.pos_score - np.abs(c.pos_score) * np.float32(c.spec.relative_margin))),
    ("max_score", lambda c: None if c.spec.max_score is None else c.scores > np.float32(c.spec.max_score)),
    ("min_score", lambda c: None if c.spec.min_score is None else c.scores < np.float32(c.spec.min_score)),
)


class _Miner:
    def __init__(
        self,
        index: VectorIndex,
        vectors: Any,
        spec: MineSpec,
        labels: np.ndarray | None,
        positive_rows: np.ndarray | None,
        stats: MineStats,
    ) -> None:
        self.index, self.vectors, self.spec, self.stats = index, vectors, spec, stats
        self.metric = index.metric
        self.labels = labels
        self.positive_rows = positive_rows
        self.range_max = spec.resolved_range_max
        self.pool_size = self.range_max + spec.positive_slots
        # +1: the query row itself is usually its own nearest neighbour.
        self.k = min(self.pool_size + 1, index.ntotal)
        if index.on_gpu and self.k > GPU_MAX_K:
            raise InputError(f"range_max {self.range_max} needs {self.k} neighbours; FAISS on GPU returns at most {GPU_MAX_K}")
        self.groups = _LabelGroups(labels, index.row_ids) if labels is not None and spec.positive == "label" else None

    def _read(self, rows: np.ndarray) -> np.ndarray:
        return prepare_vectors(self.vectors[rows], self.metric)

    def _indexed_positives(self, label: int, q_rows: np.ndarray, q_vecs: np.ndarray) -> np.ndarray | None:
        """Nearest row with ``label`` per query (not the query itself) by an index search restricted
        to the label's rows; -1 where it finds none; None when the index cannot restrict (GPU, exact)."""
        among = getattr(self.index, "search_among", None)
        if among is None:
            return None
        found = among(q_vecs, 2, self.groups.member_positions(label))  # 2: the query row itself is a member
        if found is None:
            return None
        _, rows = found
        ok = (rows >= 0) & (rows != q_rows[:, None])
        first = ok.argmax(1)
        return np.where(ok.any(1), rows[np.arange(len(q_rows)), first], -1)

    def _label_positives(self, q_rows, q_vecs, q_labels, rows, valid):
        """First same-label row in the neighbour list; else the nearest the index finds among the
        label's rows (a restricted search); else an exact scan of the label's rows."""
        b = len(q_rows)
        same = valid & (self.labels[np.where(rows >= 0, rows, 0)] == q_labels[:, None]) & (q_labels[:, None] >= 0)
        has = same.any(1)
        first = same.argmax(1)
        pos = np.where(has, rows[np.arange(b), first], -1)
        need = np.nonzero(~has & (q_labels >= 0))[0]
        for label in np.unique(q_labels[need]):
            qi = need[q_labels[need] == label]
            found = self._indexed_positives(int(label), q_rows[qi], q_vecs[qi])
            if found is not None:
                pos[qi] = found
                self.stats.positive_index_searches += len(qi)
                qi = qi[found < 0]
                if not len(qi):
                    continue
            members = self.groups.members(int(label))
            best_score = np.full(len(qi), -np.inf, dtype=np.float32)
            best_row = np.full(len(qi), -1, dtype=np.int64)
            for a in range(0, len(members), 16384):
                block = members[a : a + 16384]
                s = _scores_rows(self.metric, q_vecs[qi], self._read(block))
                s[block[None, :] == q_rows[qi][:, None]] = -np.inf
                j = s.argmax(1)
                top = s[np.arange(len(qi)), j]
                better = top > best_score
                best_score[better], best_row[better] = top[better], block[j[better]]
            pos[qi] = best_row
            self.stats.positive_fallback_scans += len(qi)
        return pos

    def batch(self, q_rows: np.ndarray, keys: np.ndarray | None) -> pa.RecordBatch:
        spec, stats = self.spec, self.stats
        b = len(q_rows)
        q_vecs = self._read(q_rows)
        scores, rows = self.index.search(q_vecs, self.k)
        if self.index.spec.kind == "ivfpq":
            scores, rows = self._rescore(q_vecs, rows)
        valid = (rows >= 0) & (rows != q_rows[:, None])
        rank = np.cumsum(valid, axis=1)
        pool = valid & (rank <= self.pool_size)
        stats.candidates += int(pool.sum())

        q_labels = self.labels[q_rows] if self.labels is not None else None
        if spec.positive == "label":
            pos = self._label_positives(q_rows, q_vecs, q_labels, rows, valid)
        elif spec.positive == "pairs":
            pos = self.positive_rows[q_rows]
        else:
            pos = np.full(b, -1, dtype=np.int64)
        has_pos = pos >= 0
        pos_score = np.full(b, np.nan, dtype=np.float32)
        if has_pos.any():
            idx = np.nonzero(has_pos)[0]
            pos_score[idx] = _scores_pairs(self.metric, q_vecs[idx], self._read(pos[idx]))
        stats.without_positive += int((~has_pos).sum()) if spec.positive != "none" else 0

        cand = Candidates(
            spec=spec, scores=scores, rows=rows, pos=pos, has_pos=has_pos, pos_score=pos_score[:, None],
            q_labels=q_labels, labels=self.labels,
        )
        keep = pool.copy()
        with np.errstate(invalid="ignore"):
            for name, predicate in FILTERS:
                drop = predicate(cand)
                if drop is not None:
                    drop &= keep
                    stats.add_skip(name, int(drop.sum()))
                    keep &= ~drop

        survivor_rank = np.cumsum(keep, axis=1) - 1
        window = keep & (survivor_rank >= spec.range_min) & (survivor_rank < self.range_max)
        if spec.sampling == "top":
            take = window & (survivor_rank < spec.range_min + spec.num_negatives)
        else:
            hashed = sampling_keys(spec.seed, q_rows[:, None], rows)
            order = np.argsort(np.where(window, hashed, np.iinfo(np.uint64).max), axis=1, kind="stable")
            chosen = order[:, : spec.num_negatives]
            take = np.zeros_like(window)
            np.put_along_axis(take, chosen, True, axis=1)
            take &= window
        counts = take.sum(1)
        stats.short_rows += int((counts < spec.num_negatives).sum())
        stats.negatives += int(counts.sum())
        stats.queries += b
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        # Row-major nonzero keeps each query's negatives in pool (= score) order.
        neg_rows = rows[take]
        neg_scores = scores[take].astype(np.float32)
        return pa.RecordBatch.from_arrays(
            [
                pa.array(q_rows, pa.int64()),
                pa.array(keys, pa.string()) if keys is not None else pa.nulls(b, pa.string()),
                pa.array(pos, pa.int64()),
                pa.array(pos_score, pa.float32()),
                pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(neg_rows, pa.int64())),
                pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(neg_scores, pa.float32())),
            ],
            schema=NEGATIVES_SCHEMA,
        )

    def _rescore(self, q_vecs: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores for quantised candidates, re-sorted (score desc, then the index's order)."""
        scores = np.full(rows.shape, -np.inf, dtype=np.float32)
        for a in range(0, len(rows), 256):
            r = rows[a : a + 256]
            ok = r >= 0
            flat = np.where(ok, r, r.max(initial=0)).ravel()
            cand = self._read(flat).reshape(*r.shape, -1)
            s = _scores_pairs(self.metric, q_vecs[a : a + 256], cand)
            scores[a : a + 256] = np.where(ok, s, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def _check_inputs(index: VectorIndex, vectors: Any, spec: MineSpec, labels, positive_rows, query_rows, keys):
    n_rows = int(vectors.shape[0])
    if len(vectors.shape) != 2 or int(vectors.shape[1]) != index.dim:
        raise InputError(f"vectors must be [rows, {index.dim}] to match the index, got {tuple(vectors.shape)}")
    if index.ntotal and int(index.row_ids.max()) >= n_rows:
        raise InputError(f"the index refers to row {int(index.row_ids.max())}, vectors have {n_rows} rows")
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (n_rows,):
            raise InputError(f"labels must have shape ({n_rows},), got {labels.shape}")
    if spec.positive == "label" and labels is None:
        raise InputError("positive='label' needs labels; the store has none: use --positive none or a pairs file")
    if spec.exclude_same_label and labels is None:
        raise InputError("exclude_same_label needs labels")
    if spec.positive == "pairs":
        if positive_rows is None:
            raise InputError("positive='pairs' needs positive_rows (anchor row -> positive row, -1 = none)")
        positive_rows = np.asarray(positive_rows, dtype=np.int64)
        if positive_rows.shape != (n_rows,):
            raise InputError(f"positive_rows must have shape ({n_rows},), got {positive_rows.shape}")
        if positive_rows.max(initial=-1) >= n_rows or positive_rows.min(initial=0) < -1:
            raise InputError(f"positive_rows must hold rows in [0, {n_rows}) or -1")
    query_rows = index.row_ids if query_rows is None else np.asarray(query_rows, dtype=np.int64)
    if query_rows.size and (query_rows.min() < 0 or query_rows.max() >= n_rows):
        raise InputError(f"query rows must be in [0, {n_rows})")
    if keys is not None:
        keys = np.asarray(keys)
        if keys.shape != (n_rows,):
            raise InputError(f"keys must have shape ({n_rows},), got {keys.shape}")
    return labels, positive_rows, query_rows, keys


def iter_negatives(
    index: VectorIndex,
    vectors: Any,
    spec: MineSpec | None = None,
    *,
    labels: np.ndarray | None = None,
    positive_rows: np.ndarray | None = None,
    keys: np.ndarray | None = None,
    query_rows: np.ndarray | None = None,
    stats: MineStats | None = None,
    progress: bool = True,
) -> Iterator[pa.RecordBatch]:
    """Mine query batches one at a time (see the module docstring for the rules).

    Args:
        index: built over ``vectors`` (its ``row_ids`` are rows of ``vectors``).
        vectors: ``[n_rows, dim]`` float array-like indexed by row (numpy, memmap, store field).
        spec: options; default ``MineSpec()``.
        labels: int64 ``[n_rows]``, -1 = no label.
        positive_rows: int64 ``[n_rows]``, anchor row → positive row (-1 = none), for ``positive="pairs"``.
        keys: ``[n_rows]`` str, copied to the ``key`` column.
        query_rows: rows to mine for (default: every indexed row, in index order).
        stats: filled in as batches are produced.

    Yields:
        ``pa.RecordBatch`` with :data:`NEGATIVES_SCHEMA`, one row per query row.
    """
    import time

    from tqdm import tqdm

    spec = spec or MineSpec()
    stats = stats if stats is not None else MineStats()
    labels, positive_rows, query_rows, keys = _check_inputs(index, vectors, spec, labels, positive_rows, query_rows, keys)
    miner = _Miner(index, vectors, spec, labels, positive_rows, stats)
    start = time.perf_counter()
    for a in tqdm(range(0, len(query_rows), spec.batch_rows), desc="mine", disable=not progress, unit="batch"):
        q = query_rows[a : a + spec.batch_rows]
        yield miner.batch(q, keys[q] if keys is not None else None)
        stats.seconds = time.perf_counter() - start


def _metadata(spec: MineSpec, stats: MineStats, index: VectorIndex, extra: dict[str, Any] | None) -> dict[bytes, bytes]:
    doc = {
        "spec": {**asdict(spec), "range_max": spec.resolved_range_max},
        "stats": asdict(stats),
        "index": {"kind": index.spec.kind, "metric": index.metric, "ntotal": index.ntotal},
        **(extra or {}),
    }
    return {METADATA_KEY: json.dumps(doc).encode()}


def mine(
    index: VectorIndex,
    vectors: Any,
    spec: MineSpec | None = None,
    *,
    stats: MineStats | None = None,
    **kwargs: Any,
) -> pa.Table:
    """All query rows' negatives as one table (:data:`NEGATIVES_SCHEMA`); spec and stats in its metadata.

    Takes the arguments of :func:`iter_negatives`.
    """
    spec = spec or MineSpec()
    stats = stats if stats is not None else MineStats()
    batches = list(iter_negatives(index, vectors, spec, stats=stats, **kwargs))
    table = pa.Table.from_batches(batches, schema=NEGATIVES_SCHEMA)
    return table.replace_schema_metadata(_metadata(spec, stats, index, None))


def write_negatives(
    path: str | os.PathLike[str],
    index: VectorIndex,
    vectors: Any,
    spec: MineSpec | None = None,
    *,
    extra_metadata: dict[str, Any] | None = None,
    **kwargs: Any,
) -> MineStats:
    """Mine and stream the result to ``path`` (Parquet), batch by batch: a temp file, then ``os.replace``
    (on object storage: one upload, :func:`kdstore.store.fs.written_at`)."""
    import pyarrow.parquet as pq

    spec = spec or MineSpec()
    stats = MineStats()
    with written_at(location(path)) as tmp:
        with pq.ParquetWriter(tmp, NEGATIVES_SCHEMA) as writer:
            for batch in iter_negatives(index, vectors, spec, stats=stats, **kwargs):
                writer.write_batch(batch)
            meta = _metadata(spec, stats, index, extra_metadata)
            writer.add_key_value_metadata({k.decode(): v.decode() for k, v in meta.items()})
    return stats


def read_negatives(path: str | os.PathLike[str]) -> tuple[pa.Table, dict[str, Any]]:
    """A negatives file and its ``{"spec", "stats", ...}`` record."""
    import pyarrow.parquet as pq

    path = location(path)
    try:
        table = read_parquet(path)
    except FileNotFoundError:
        raise InputError(f"no negatives file at {path}: run `kdstore mine` first") from None
    # write_negatives adds the record to the file footer once mining has finished.
    footer = pq.read_metadata(path.path, filesystem=path.fs) if is_remote(path) else pq.read_metadata(path)
    raw = (footer.metadata or {}).get(METADATA_KEY) or (table.schema.metadata or {}).get(METADATA_KEY)
    return table, json.loads(raw) if raw else {}
