"""The streaming join: student inputs from the WebDataset shards, targets from the store.

One epoch is planned before anything is read, from the seed alone:

1. the selected shards are put in a seeded per-epoch order, and their rows (all rows, or
   only the labelled subset) concatenated;
2. that sequence is cut into ``world_size × workers`` contiguous slots of equal length
   (sizes differ by at most one sample; the short slots get one blank *pad* item, masked
   out of every loss), so each sample is seen exactly once per epoch and every rank runs
   the same number of steps;
3. each slot's yield order is a bounded shuffle buffer simulated on positions;
4. with stored views, each row takes view ``(h(seed, row) + epoch) % V``.

Then each slot reads its shards in order: per shard, one contiguous store range per field
(never row-by-row) and the tar's samples, checking that every key matches the store row.
Because the order is a function of ``(seed, epoch, slot)``, resuming mid-epoch is skipping
the first items of the order — skipped shards are not even opened.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kdstore.pipeline.augment import AugmentSpec, apply_view, view_params
from kdstore.pipeline.transform import TransformSpec
from kdstore.store.errors import InputError, StoreMismatchError
from kdstore.store.hashing import mix64
from kdstore.store.inputs import check_inputs, mismatch_error, missing_local, moved_error, shard_urls
from kdstore.store import layout
from kdstore.store.fs import open_zarr_group
from kdstore.store.layout import VALID_ARRAY, VIEWS_ARRAY
from kdstore.store.reader import Store, open_store
from kdstore.store.schema import ShardInfo
from kdstore.store.shards import expand_urls, iter_samples
from kdstore.train.inputs import STORE_TRANSFORM, InputSpec, stack_inputs
from kdstore.train.labels import LabelsSpec, labeled_mask  # noqa: F401 (labeled_mask: re-exported)
from kdstore.train.plan import (  # noqa: F401 (re-exported: they used to live here)
    Segment, SlotPlan, shard_order, shuffle_order, split_contiguous,
)
from kdstore.train.prefetch import read_ahead, store_prefetch

# Online augmentation of epoch e draws view index ONLINE_VIEW_BASE - e: disjoint from the stored 0..V-1.
ONLINE_VIEW_BASE = -1


# --------------------------------------------------------------------------- inputs vs store


def resolve_inputs(store: Store, patterns: Sequence[str], inputs_root: str | None = None) -> dict[int, str]:
    """Shard index → input URL: the store's own URLs (moved under ``inputs_root`` when given,
    :func:`kdstore.store.inputs.shard_urls`), or ``patterns`` matched by file name."""
    if patterns and inputs_root:
        raise InputError("give data.inputs or data.inputs_root, not both")
    if not patterns:
        return shard_urls(store, inputs_root)
    by_name: dict[str, str] = {}
    for url in expand_urls(list(patterns)):
        name = os.path.basename(url.rstrip("/"))
        if name in by_name:
            raise InputError(f"data.inputs: two shards are named {name} ({by_name[name]}, {url})")
        by_name[name] = url
    return {s.index: by_name[os.path.basename(s.url)] for s in store.shards if os.path.basename(s.url) in by_name}


INPUTS_OPTION = "set data.inputs_root = DIR in the config (or kdstore train --set data.inputs_root=DIR)"
INPUTS_HINT = "point data.inputs at the shards the store was built from, or precompute a new store"


def verify_inputs(store: Store, urls: dict[int, str], shards: Sequence[ShardInfo], mode: str) -> None:
    """Refuse inputs that are not the ones the store was precomputed from.

    ``full`` lists every key of every shard and compares it with the store (and, when all
    of the store's shards are given, recomputes the input fingerprint); ``quick`` compares
    the first key of each shard; ``off`` checks nothing here (keys are still checked while
    streaming). The check is :func:`kdstore.store.inputs.check_inputs`, shared with ``kdstore verify``.
    """
    check_inputs(store, shards, urls=urls, mode=mode, hint=INPUTS_HINT, option=INPUTS_OPTION)


def _mismatch(store: Store, shard: ShardInfo, url: str, detail: str) -> StoreMismatchError:
    return mismatch_error(store, shard, url, detail, INPUTS_HINT)


# --------------------------------------------------------------------------- the dataset


class InputCache:
    """Decoded 8-bit student images kept in memory, per shard and row (``data.cache``), before the transform.

    Holds uint8 copies (``decode_image`` divides 8-bit pixels by 255, so the round trip is
    exact), one array per row so images of several sizes are cached too; a shard whose needed
    rows are all cached is not opened again. Each DataLoader worker process holds its own copy:
    use it with ``persistent_workers`` or in-process.
    """

    def __init__(self) -> None:
        self._images: dict[str, list[np.ndarray | None]] = {}

    def has_all(self, url: str, rows: np.ndarray) -> bool:
        have = self._images.get(url)
        return have is not None and all(have[i] is not None for i in rows.tolist())

    def get(self, url: str, row: int) -> torch.Tensor:
        return torch.from_numpy(self._images[url][row]).float().div_(255.0)

    def put(self, url: str, num_rows: int, row: int, image: torch.Tensor) -> None:
        rows = self._images.setdefault(url, [None] * num_rows)
        rows[row] = image.mul(255.0).round_().to(torch.uint8).numpy()


class StreamingDataset(IterableDataset):
    """Samples ``{"input", "label", "targets", "row", "key", "valid", "pad", "view"}`` of one epoch.

    - ``input``: the decoded member (:mod:`kdstore.train.inputs`): image float32 ``[C, H, W]`` after the
      transform (the store's recorded one by default) and the stored view's crop/flip when the store
      has views; text int64 ``[len]`` token ids + 1; array float32;
    - ``label``: int, -1 when the row is outside the labelled subset or has no label;
    - ``targets[teacher][field]``: the stored row as numpy (view axis resolved, stored dtype),
      plus ``targets[teacher]["valid"]`` (bool);
    - ``row`` int store row; ``key`` str; ``valid`` bool (all teachers valid); ``pad`` bool (blank
      filler so all slots have equal length; never valid); ``view`` int (-1 = none);
    - ``teacher_input`` (only with ``teacher_transform`` differing from the student's transform):
      the image as the teacher saw it in precompute (its recorded transform, same fresh view).

    A ``DataLoader`` with the default collate (or the faster :func:`collate`) turns these
    into batched tensors.

    Args:
        store: a store or its path.
        shards: selectors (index, URL substring, ``"A..B"`` index range); all when None.
        fields: ``{teacher: [field, ...]}`` targets to read.
        inputs: input URL patterns replacing the store's shard URLs (matched by file name).
        inputs_root: the folder that now holds the store's input shards, when they moved
            (replaces the recorded shards' common folder; not with ``inputs``).
        labels / labels_seed / only_labeled: the labelled subset (a :class:`LabelsSpec` or its text);
            ``only_labeled`` streams only it.
        shuffle: seeded shard order and shuffle buffer (False: store order, for evaluation).
        replay_views: when the teachers have views, apply one stored view per sample and give
            its targets; a row cycles through its views from a seeded start, one per epoch.
            False: un-augmented inputs, targets keep their ``[V]`` axis (evaluation).
        augment: fresh seeded augmentation per epoch (online KD); exclusive with stored views.
        transform: image preprocessing before views: ``"store"`` (the teachers' recorded
            ``--transform``), ``"none"``, or a transform text. tokenizer / max_length: for text inputs.
        teacher_transform: online KD: the live teacher's recorded ``--transform``; when it differs
            from the student's, each item also carries ``teacher_input`` (the image through it).
        rank / world_size: default from ``torch.distributed`` when initialised.
        loader_workers / loader_batch_size: the DataLoader's ``num_workers`` and ``batch_size``;
            needed for :meth:`batches_per_rank` and mid-epoch resume (None: not checked).
    """

    def __init__(
        self,
        store: Store | str | Path,
        *,
        shards: Sequence[str | int] | None = None,
        fields: dict[str, Sequence[str]] | None = None,
        inputs: Sequence[str] = (),
        inputs_root: str | None = None,
        input_key: str = "",
        transform: str = STORE_TRANSFORM,
        tokenizer: str = "",
        max_length: int = 128,
        labels: LabelsSpec | str = "all",
        labels_seed: int = 0,
        only_labeled: bool = False,
        shuffle: bool = True,
        shuffle_buffer: int = 4096,
        seed: int = 0,
        replay_views: bool = True,
        augment: str = "",
        rank: int | None = None,
        world_size: int | None = None,
        loader_workers: int | None = None,
        loader_batch_size: int = 1,
        cache: InputCache | bool | None = None,
        verify: str = "full",
        teacher_transform: str | None = None,
    ) -> None:
        super().__init__()
        self.store = store if isinstance(store, Store) else open_store(store)
        self.shards = select_shards(self.store, shards)
        self.fields = {name: list(f) for name, f in (fields or {}).items()}
        self.teachers = {name: self.store.teacher(name) for name in self.fields}
        self.input_key = input_key or self._default_input_key()
        # The teachers read (or, with none read, all of the store's) decide the default preprocessing.
        specs = [t.spec for t in self.teachers.values()] or [
            spec for spec in (self.store.teacher(n).spec for n in self.store.teachers)
            if spec.input_key in ("", self.input_key)]
        self.input_spec = InputSpec.resolve(self.input_key, teacher_specs=specs, transform=transform,
                                            tokenizer=tokenizer, max_length=max_length)
        self.decoder = self.input_spec.decoder()
        # Online KD: the live teacher must see what precompute fed it (its recorded transform),
        # not the student's preprocessing; only when the two differ does an item carry both.
        self.teacher_transform: TransformSpec | None = None
        if teacher_transform is not None and self.input_spec.kind == "image":
            spec = TransformSpec.parse(teacher_transform)
            if spec.to_text() != self.input_spec.transform:
                self.teacher_transform = spec
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, int(shuffle_buffer), int(seed)
        self.only_labeled = only_labeled
        self.labeled = labeled_mask(self.store, self.shards, LabelsSpec.parse(labels), labels_seed)
        self.views = self._check_views()
        self.replay = bool(replay_views and self.views)
        self.augment = AugmentSpec.parse(augment) if augment else None
        if (self.augment or self.replay) and self.input_spec.kind != "image":
            raise InputError(f"views and augmentation apply to images; {self.input_key!r} is {self.input_spec.kind}")
        if self.augment and self.replay:
            raise InputError("fresh augmentation (online) and stored views cannot both apply; use a store without views")
        if rank is None or world_size is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        self.rank, self.world_size = int(rank), int(world_size)
        self.loader_workers = None if loader_workers is None else int(loader_workers)
        self.loader_batch_size = int(loader_batch_size)
        self.cache = InputCache() if cache is True else (cache or None)
        if self.input_spec.kind != "image":
            self.cache = None  # the cache holds 8-bit images
        self.urls = resolve_inputs(self.store, inputs, inputs_root)
        missing = [s.url for s in self.shards if s.index not in self.urls]
        if missing:
            raise InputError(f"data.inputs has no shard named like {os.path.basename(missing[0])} "
                             f"(store shard {missing[0]})")
        gone = [self.urls[s.index] for s in self.shards if s.index in self.urls and missing_local(self.urls[s.index])]
        if gone and not inputs:
            raise moved_error(self.store, gone[0], INPUTS_OPTION)
        self._check_teachers()
        self._groups: dict = {}  # (teacher, shard, pid) -> open Zarr group (see _group)
        verify_inputs(self.store, self.urls, self.shards, verify)
        # Shared with forked DataLoader workers, so persistent workers see set_epoch/resume.
        self._state = torch.zeros(2, dtype=torch.int64).share_memory_()

    # ----------------------------------------------------------------- setup checks

    def _default_input_key(self) -> str:
        specs = [t.spec for t in self.teachers.values()] or [self.store.teacher(n).spec for n in self.store.teachers]
        keys = {s.input_key for s in specs if s.input_key}
        if len(keys) > 1:
            raise InputError(f"teachers read different inputs {sorted(keys)}; set data.input_key")
        return keys.pop() if keys else "png"

    def _check_views(self) -> int:
        specs = {(t.views, t.spec.augment, t.spec.seed) for t in self.teachers.values()}
        if any(v for v, _, _ in specs) and len(specs) > 1:
            raise InputError(
                "teachers were precomputed with different views/augmentation "
                f"({', '.join(f'{n}: views={t.views} augment={t.spec.augment!r}' for n, t in self.teachers.items())}); "
                "the student input can match only one — train from teachers with the same views"
            )
        return next(iter(specs))[0] if specs else 0

    def _check_teachers(self) -> None:
        for name, t in self.teachers.items():
            absent = set(t.missing_shards())
            missing = [s.index for s in self.shards if s.index in absent]
            if missing:
                raise InputError(f"teacher {name} has no outputs for shard(s) {missing[:5]} yet; "
                                 "finish `kdstore precompute`")
            for f in self.fields[name]:
                if f not in t.fields:
                    raise InputError(f"teacher {name} has no field {f!r}; it has {sorted(t.fields)}")

    def input_shape(self) -> tuple[int, ...]:
        """Per-sample student input shape (first sample of the first shard; text: ``TextShape``)."""
        shard = self.shards[0]
        for sample in iter_samples(self.urls[shard.index]):
            return self.decoder.shape(self.decoder(sample))
        raise InputError(f"shard {self.urls[shard.index]} is empty")

    # ----------------------------------------------------------------- planning

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next ``iter()`` streams (also seen by persistent workers)."""
        self._state[0] = int(epoch)

    def set_resume(self, batches_done: int) -> None:
        """Skip the first ``batches_done`` batches this rank's DataLoader yielded in the epoch."""
        self._state[1] = int(batches_done)

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    def _rows(self, shard: ShardInfo) -> np.ndarray:
        rows = np.arange(shard.num_rows)
        if self.only_labeled:
            rows = rows[self.labeled[shard.row_start : shard.row_stop]]
        return rows

    def num_samples(self) -> int:
        """Real samples per epoch over all ranks."""
        return sum(len(self._rows(s)) for s in self.shards)

    def _slots(self, workers: int) -> int:
        return self.world_size * max(1, workers)

    def slot_size(self, workers: int | None = None) -> int:
        """Items (real + pad) every slot yields per epoch."""
        slots = self._slots(self.loader_workers or 0 if workers is None else workers)
        return -(-self.num_samples() // slots)

    def batches_per_rank(self) -> int:
        """Batches this rank's DataLoader yields per epoch (the same on every rank)."""
        per_worker = -(-self.slot_size() // self.loader_batch_size)
        return max(1, self.loader_workers or 0) * per_worker

    def plan(self, epoch: int, slot: int, slots: int) -> SlotPlan:
        """The slot's segments and yield order for ``epoch`` (pure: depends on the seed only)."""
        order = shard_order(len(self.shards), self.seed, epoch if self.shuffle else None)
        shards = [self.shards[i] for i in order]
        rows = [self._rows(s) for s in shards]
        total = sum(len(r) for r in rows)
        if total < slots:
            raise InputError(f"{total} samples cannot feed {slots} ranks × workers; use fewer")
        pieces = split_contiguous([len(r) for r in rows], slots)[slot]
        segments = tuple(Segment(shards[i], self.urls[shards[i].index], rows[i][a:b]) for i, a, b in pieces)
        n = sum(len(s.rows) for s in segments)
        buffer = self.shuffle_buffer if self.shuffle else 1
        rng = np.random.default_rng([self.seed, epoch, slot, 0xB0FF])
        return SlotPlan(segments=segments, order=shuffle_order(n, buffer, rng), pads=-(-total // slots) - n)

    # ----------------------------------------------------------------- streaming

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        actual = info.num_workers if info else 0
        if self.loader_workers is not None and actual != self.loader_workers:
            raise InputError(f"the DataLoader has {actual} workers but the dataset was planned for {self.loader_workers}")
        epoch, batches_done = self.epoch, int(self._state[1])
        # A DataLoader takes batches round-robin from its workers starting at worker 0, and
        # every logical worker yields the same number per epoch: after ``batches_done``
        # batches the next one belongs to logical worker ``batches_done % workers``, so
        # the physical workers take the logical streams rotated by that much.
        logical = (worker + batches_done) % workers
        plan = self.plan(epoch, self.rank * workers + logical, self.world_size * workers)
        mine = max(0, -(-(batches_done - logical) // workers))
        skip = min(mine * self.loader_batch_size, plan.num_items)
        yield from self._stream(plan, epoch, skip)

    def _stream(self, plan: SlotPlan, epoch: int, skip: int) -> Iterator[dict]:
        wanted = plan.order[skip:]
        needed = np.zeros(len(plan.order), dtype=bool)
        needed[wanted] = True
        reader = self._read(plan, needed, epoch)
        pending: dict[int, dict] = {}
        template = None
        for pos in wanted:
            while pos not in pending:
                p, item = next(reader)
                pending[p] = item
            item = pending.pop(pos)
            template = template or item
            yield item
        pads = plan.pads - max(0, skip - len(plan.order))
        if pads > 0:
            template = template or self._template(plan, epoch)
            for _ in range(pads):
                yield _blank(template)

    def _template(self, plan: SlotPlan, epoch: int) -> dict:
        """A real item of the slot, only to give a pad its shapes (when every real item was skipped)."""
        needed = np.zeros(len(plan.order), dtype=bool)
        needed[plan.order[0]] = True
        return next(self._read(plan, needed, epoch))[1]

    def _read(self, plan: SlotPlan, needed: np.ndarray, epoch: int) -> Iterator[tuple[int, dict]]:
        """Yield ``(position, item)`` for the needed positions, in read order, shard by shard.

        The store rows of the next :func:`store_prefetch` pieces are read by a background
        thread while this one decodes the inputs of the current piece (:func:`read_ahead`).
        """
        pieces, offset = [], 0
        for seg in plan.segments:
            want = needed[offset : offset + len(seg.rows)]
            if want.any():
                pieces.append((offset, seg, seg.rows[want]))
            offset += len(seg.rows)
        getters = read_ahead([(seg, rows) for _, seg, rows in pieces], self._targets, store_prefetch())
        for (offset, seg, rows), stored in zip(pieces, getters):
            for i, item in self._read_segment(seg, rows, epoch, stored):
                yield offset + int(np.searchsorted(seg.rows, i)), item

    def _targets(self, seg: Segment, rows: np.ndarray) -> tuple[dict, dict, np.ndarray | None]:
        """``(blocks, valid, view params)`` of rows ``rows[0]..rows[-1]`` of the segment's shard: one
        contiguous read per field and teacher for the whole piece of the shard."""
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        groups = {name: self._group(name, seg.shard.index) for name in self.teachers}
        blocks = {name: {f: groups[name][f][lo:hi] for f in self.fields[name]} for name in self.teachers}
        valid = {name: groups[name][VALID_ARRAY][lo:hi] for name in self.teachers}
        params = groups[next(iter(self.teachers))][VIEWS_ARRAY][lo:hi] if self.replay else None
        return blocks, valid, params

    def _group(self, teacher: str, shard_index: int):
        """The shard's Zarr group, opened once per process (each open costs round trips on object storage;
        ``_check_teachers`` made sure every selected shard is finished)."""
        key = (teacher, shard_index, os.getpid())
        if key not in self._groups:
            self._groups[key] = open_zarr_group(layout.shard_array_path(self.store.path, teacher, shard_index))
        return self._groups[key]

    def _read_segment(self, seg: Segment, rows: np.ndarray, epoch: int, stored) -> Iterator[tuple[int, dict]]:
        """``stored()``: the piece's targets (:meth:`_targets`), asked for once its first input is decoded."""
        shard = seg.shard
        lo = int(rows[0])
        blocks = None
        keys = self.store.keys
        for i, raw in self._inputs(seg, rows):
            if blocks is None:
                blocks, valid, params = stored()
            row = shard.row_start + i
            j = i - lo
            image = self.decoder.finish(raw)
            teacher_image = None
            if self.teacher_transform is not None:
                teacher_image = self.teacher_transform(raw) if self.teacher_transform else raw
            view = -1
            if self.replay:
                # Each row walks through its stored views from a seeded start, one per epoch:
                # every view is used once per ``views`` epochs (a random pick repeats some).
                view = (int(mix64(self.seed, row) % np.uint64(self.views)) + epoch) % self.views
                image = apply_view(image, params[j, view])
            elif self.augment is not None:
                # A fresh view per epoch. Stored views draw indices 0..V-1, so the online stream
                # draws negative ones (-1 - epoch): with the store's seed and augment it still
                # never replays a stored crop.
                p = view_params(self.augment, seed=self.seed, key=keys[row], view=ONLINE_VIEW_BASE - epoch,
                                height=image.shape[1], width=image.shape[2])
                image = apply_view(image, p)
                if teacher_image is not None:  # the same draw on the teacher's own image size
                    p = view_params(self.augment, seed=self.seed, key=keys[row], view=ONLINE_VIEW_BASE - epoch,
                                    height=teacher_image.shape[1], width=teacher_image.shape[2])
                    teacher_image = apply_view(teacher_image, p)
            targets = {}
            ok = True
            for name in self.teachers:
                # numpy rows and python scalars: the DataLoader's collate batches them in one go
                # (a torch.tensor per sample and field costs more than the rest of the pipeline).
                per = {f: (b[j] if view < 0 else b[j, view]) for f, b in blocks[name].items()}
                per["valid"] = bool(valid[name][j])
                ok &= per["valid"]
                targets[name] = per
            item = {
                "input": image,
                "label": int(self.store.labels[row]) if self.labeled[row] else -1,
                "targets": targets,
                "row": int(row),
                "key": keys[row],
                "valid": ok,
                "pad": False,
                "view": view,
            }
            if teacher_image is not None:
                item["teacher_input"] = teacher_image
            yield i, item

    def _inputs(self, seg: Segment, rows: np.ndarray) -> Iterator[tuple[int, torch.Tensor]]:
        """``(local_row, decoded input before its transform)`` for ``rows`` of the segment's shard,
        from the cache (images) or the tar."""
        shard, cache, decoder = seg.shard, self.cache, self.decoder
        if cache is not None and cache.has_all(seg.url, rows):
            for i in rows.tolist():
                yield i, cache.get(seg.url, i)
            return
        keys = self.store.keys
        wanted = set(rows.tolist())
        last = int(rows[-1])
        i = -1
        for i, sample in enumerate(iter_samples(seg.url)):
            if i >= shard.num_rows or sample.get("__key__") != keys[shard.row_start + i]:
                got = sample.get("__key__") if i < shard.num_rows else "an extra sample"
                expected = keys[shard.row_start + i] if i < shard.num_rows else "the end of the shard"
                detail = f"sample {i} is {got!r}, expected {expected!r}"
                raise _mismatch(self.store, shard, seg.url, detail)
            if i in wanted:
                x = decoder.raw(sample)
                if cache is not None:
                    cache.put(seg.url, shard.num_rows, i, x)
                yield i, x
            if i >= last:
                return
        detail = f"it ends after {i + 1} samples, the store has {shard.num_rows}"
        raise _mismatch(self.store, shard, seg.url, detail)


def _blank(template: dict) -> dict:
    """A pad item shaped like ``template``: zeros, label -1, invalid, excluded from every loss."""
    targets = {
        name: {f: (False if f == "valid" else np.zeros_like(v)[()]) for f, v in per.items()}  # [()]: 0-d → scalar
        for name, per in template["targets"].items()
    }
    blank = {"input": torch.zeros_like(template["input"]), "label": -1, "targets": targets, "row": -1, "key": "",
             "valid": False, "pad": True, "view": -1}
    if "teacher_input" in template:
        blank["teacher_input"] = torch.zeros_like(template["teacher_input"])
    return blank


def collate(items: list[dict]) -> dict:
    """Batch dataset items: one ``np.stack``/``torch.stack`` per field.

    Same result as ``torch.utils.data.default_collate`` on these items (numpy rows →
    tensors of their dtype, ints → int64, bools → bool, strings → lists), without its
    per-item ``torch.as_tensor`` calls, which cost more than the store reads.
    """
    out: dict = {}
    for key, first in items[0].items():
        values = [item[key] for item in items]
        if key == "input" and isinstance(first, torch.Tensor):
            out.update(stack_inputs(values))  # pads token ids, adds input_mask
        elif isinstance(first, dict):
            out[key] = collate(values)
        elif isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, (np.ndarray, np.generic)):
            out[key] = torch.from_numpy(np.stack(values))
        elif isinstance(first, bool):
            out[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, int):
            out[key] = torch.tensor(values, dtype=torch.int64)
        else:
            out[key] = values
    return out


def select_shards(store: Store, selectors: Sequence[str | int] | None) -> list[ShardInfo]:
    """Shards as :meth:`Store.select_shards` picks them (index, file-name substring, ``"A..B"``); all when None."""
    return store.select_shards(selectors)
