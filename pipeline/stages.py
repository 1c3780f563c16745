"""One shard through one teacher as a chain of small stages (read → preprocess → views → batch
→ forward → reduce → collect → write), each a generator over the previous one.

The read stage also lists the shard (keys, labels, bytes read) as it goes, so a shard is read
once: its rows are known when the chain ends, and the arrays grow until then.

The error policy is a handler passed in (as webdataset does): a stage that meets a bad
sample calls ``handler(SampleError)``; :func:`fail_handler` raises it, :func:`skip_handler`
records it and the stage goes on. Errors that no policy may skip (the shard changed since
planning, a teacher output of the wrong shape) are raised directly.

To add an input type: the teacher's ``preprocess`` turns the sample's bytes into one model
input (``kdstore.pipeline.decode.decode_field`` knows the extensions); nothing here changes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdstore.pipeline.augment import AugmentSpec, apply_view, view_params
from kdstore.pipeline.reduce import bad_rows, reduce_outputs
from kdstore.pipeline.teacher import Teacher
from kdstore.pipeline.transform import TransformSpec
from kdstore.store.errors import InputError, KdStoreError, StoreMismatchError, TeacherOutputError
from kdstore.store.schema import ShardInfo, TeacherSpec
from kdstore.store.shards import LABEL_EXTENSIONS, ReadStats, iter_samples


@dataclass(frozen=True)
class SampleError:
    """One sample a stage could not use: its shard row, key, why, and the error type to raise."""

    shard: ShardInfo
    row: int
    key: str
    reason: str
    error: type[KdStoreError] = InputError

    def exception(self) -> KdStoreError:
        return self.error(f"shard {self.shard.url} key {self.key!r}: {self.reason}")


Handler = Callable[[SampleError], None]


def fail_handler(err: SampleError) -> None:
    """``--on-error fail``: the first bad sample stops the shard."""
    raise err.exception()


def skip_handler(skipped: list[dict]) -> Handler:
    """``--on-error skip``: record ``{"index_in_shard", "key", "reason"}`` in ``skipped`` and go on."""

    def handle(err: SampleError) -> None:
        skipped.append({"index_in_shard": err.row, "key": err.key, "reason": err.reason})

    return handle


def error_handler(on_error: str, skipped: list[dict]) -> Handler:
    if on_error == "fail":
        return fail_handler
    if on_error == "skip":
        return skip_handler(skipped)
    raise InputError(f"--on-error must be fail or skip, got {on_error!r}")


@dataclass
class Batch:
    """Rows of one teacher call: ``inputs`` holds ``len(rows) * max(1, views)`` model inputs;
    ``params`` one ``[V, 5]`` int32 array of view parameters per row (with views only)."""

    rows: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=list)
    params: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)


class ShardReadError(InputError):
    """The shard itself cannot be read or listed (not one sample): ``--on-error skip`` leaves
    the whole shard out of the store, as an unreadable shard."""


@dataclass
class Listing:
    """What the read stage learns while it reads: keys and labels ``[n]`` in tar order, bytes read."""

    keys: list[str] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    stats: ReadStats = field(default_factory=ReadStats)


def _label(url: str, sample: dict) -> int | None:
    for ext in LABEL_EXTENSIONS:
        if ext in sample:
            text = bytes(sample[ext])
            try:
                return int(text.decode().strip())
            except ValueError:
                raise ShardReadError(
                    f"shard {url}: key {sample['__key__']!r}: label {text[:20]!r} is not an integer") from None
    return None


def changed_error(shard: ShardInfo, detail: str) -> StoreMismatchError:
    return StoreMismatchError(
        f"shard {shard.url} changed since the store listed its keys (store shard {shard.index}): {detail}. "
        "The store's rows (and any teacher's outputs) are of the old samples: precompute the changed "
        "shards into another --store"
    )


def read(shard: ShardInfo, keys: list[str] | None, listing: Listing | None = None) -> Iterator[tuple[int, str, dict]]:
    """``(row in shard, key, sample)`` in tar order, listing each key and label into ``listing``.

    ``keys``: the shard's keys as the store listed them (an earlier teacher or run), or None
    when this is the first read; a shard whose keys differ is refused (``StoreMismatchError``).
    A shard that cannot be read or listed (missing, truncated, a key split across the tar, a
    label that is not an integer, no samples) raises :class:`ShardReadError`.
    """
    listing = Listing() if listing is None else listing
    seen: set[str] = set()
    row = -1
    try:
        for row, sample in enumerate(iter_samples(shard.url, stats=listing.stats)):
            key = sample.get("__key__", "")
            if keys is not None and (row >= len(keys) or key != keys[row]):
                expected = keys[row] if row < len(keys) else "<end of shard>"
                raise changed_error(shard, f"row {row} is {key!r}, the store has {expected!r}")
            if key in seen:
                raise ShardReadError(f"shard {shard.url}: key {key!r} is split across the tar")
            seen.add(key)
            listing.labels.append(_label(shard.url, sample))
            listing.keys.append(key)
            yield row, key, sample
    except (ShardReadError, StoreMismatchError):
        raise
    except InputError as exc:
        raise ShardReadError(str(exc)) from None
    if keys is not None and row + 1 != len(keys):
        raise changed_error(shard, f"it has {row + 1} samples, the store {len(keys)}")
    if row < 0:
        raise ShardReadError(f"shard {shard.url}: no samples")


def preprocess(
    samples: Iterable[tuple[int, str, dict]], teacher: Teacher, shard: ShardInfo, handler: Handler,
    transform: TransformSpec | None = None,
) -> Iterator[tuple[int, str, Any]]:
    """``(row, key, model input)``; a sample the teacher cannot read goes to ``handler``.

    ``transform`` (``--transform``, recorded as ``TeacherSpec.transform``) is applied to the
    teacher's decoded image ``[C, H, W]`` before views and batching.
    """
    for row, key, sample in samples:
        try:
            x = teacher.preprocess(sample)
            if transform:
                x = transform(x)
        except KdStoreError as exc:
            handler(SampleError(shard, row, key, str(exc)))
            continue
        yield row, key, x


def views(
    items: Iterable[tuple[int, str, Any]], spec: TeacherSpec
) -> Iterator[tuple[int, str, list[Any], np.ndarray | None]]:
    """``(row, key, inputs, params)``: the input itself (``params`` None), or its ``spec.views``
    augmented views and their ``(top, left, h, w, flip)`` as ``params [V, 5]`` int32.
    """
    augment = AugmentSpec.parse(spec.augment) if spec.views else None
    for row, key, x in items:
        if not spec.views:
            yield row, key, [x], None
            continue
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise InputError("--views needs a teacher whose preprocess returns an image tensor [C, H, W]")
        out = []
        params = np.zeros((spec.views, 5), dtype=np.int32)
        for v in range(spec.views):
            p = view_params(augment, seed=spec.seed, key=key, view=v, height=x.shape[1], width=x.shape[2])
            params[v] = p
            out.append(apply_view(x, p))
        yield row, key, out, params


def batched(items: Iterable[tuple[int, str, list[Any], np.ndarray | None]], batch_size: int) -> Iterator[Batch]:
    """Batches of ``batch_size`` rows (the last may be shorter; none is empty)."""
    batch = Batch()
    for row, key, inputs, params in items:
        batch.rows.append(row)
        batch.keys.append(key)
        batch.inputs.extend(inputs)
        if params is not None:
            batch.params.append(params)
        if len(batch) >= batch_size:
            yield batch
            batch = Batch()
    if batch:
        yield batch


_DONE = object()


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """The same items in the same order, produced by a background thread up to ``depth`` ahead.

    Put between ``batched`` and ``forward``, it reads and decodes batch *n+1* while the
    teacher runs batch *n* (tar reading and PIL decode overlap torch's forward, which
    releases the GIL). An exception raised upstream (a handler's, a changed shard's) is
    re-raised here, after the items produced before it. Closing this generator early (the
    forward raised) stops the thread at its next item.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, which re-raises it)
            put((_DONE, exc))

    thread = threading.Thread(target=produce, name="kdstore-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if item is _DONE:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        thread.join()


def forward(
    batches: Iterable[Batch],
    teacher: Teacher,
    *,
    device: str = "cpu",
    amp: bool = False,
    shard: ShardInfo | None = None,
) -> Iterator[tuple[Batch, dict[str, Any]]]:
    """``(batch, raw teacher outputs)``; outputs have leading dim ``len(batch.inputs)``.

    A forward that raises becomes one :class:`InputError` naming ``shard``, the batch's keys
    and the cause (:func:`forward_error`).
    """
    for batch in batches:
        try:
            with torch.autocast(device_type=torch.device(device).type, enabled=amp):
                raw = teacher.forward(batch.inputs)
        except KdStoreError:
            raise
        except Exception as exc:  # noqa: BLE001 (the user's model): one line naming shard, keys and cause, no traceback
            raise forward_error(exc, batch, shard) from None
        yield batch, raw


# The way out for images of different sizes in one batch; the one place to update when
# kdstore gains a resize transform.
SIZE_HINT = ("give them one size and mode with --transform (e.g. --transform 'resize:32;center_crop:28;mode:L'), "
             "or pass a teacher that accepts variable sizes")


def _size(shape: tuple[int, ...], channels_differ: bool) -> str:
    return "x".join(map(str, shape if channels_differ or len(shape) != 3 else shape[1:]))


def forward_error(exc: Exception, batch: Batch, shard: ShardInfo | None) -> InputError:
    """One line for a teacher forward that raised: different input sizes get :data:`SIZE_HINT`."""
    where = f"shard {shard.url}" if shard is not None else "the batch"
    width = max(1, len(batch.inputs) // max(1, len(batch)))
    tensors = [x for x in batch.inputs if isinstance(x, torch.Tensor)]
    if len(tensors) == len(batch.inputs) and tensors:
        first = tuple(tensors[0].shape)
        other = next((i for i, x in enumerate(tensors) if tuple(x.shape) != first), None)
        if other is not None:
            second = tuple(tensors[other].shape)
            diff_c = len(first) == 3 and len(second) == 3 and first[0] != second[0]
            return InputError(
                f"images in {where} have sizes {_size(first, diff_c)} (key {batch.keys[0]!r}) and "
                f"{_size(second, diff_c)} (key {batch.keys[other // width]!r}) in one batch; {SIZE_HINT}"
            )
    cause = (str(exc).strip().splitlines() or [""])[0]
    seen = f" (its inputs are {'x'.join(map(str, tensors[0].shape))} tensors)" if tensors and len(tensors) == len(batch.inputs) else ""
    return InputError(
        f"{where} keys {batch.keys[0]!r}..{batch.keys[-1]!r}: the teacher's forward failed{seen}: "
        f"{type(exc).__name__}: {cause}"
    )


@dataclass
class Reduced:
    """One batch's stored fields ``[len(batch) * max(1, V), ...]`` and ``bad [len(batch)]`` rows (NaN/inf)."""

    batch: Batch
    fields: dict[str, Any]
    bad: np.ndarray


def reduce(
    items: Iterable[tuple[Batch, dict[str, Any]]], spec: TeacherSpec, shard: ShardInfo
) -> Iterator[Reduced]:
    """Map raw outputs to the stored fields of ``spec.outputs``, and flag rows with NaN/inf."""
    width = max(1, spec.views)
    dtype = np.dtype(spec.dtype)
    for batch, raw in items:
        b = len(batch) * width
        try:
            bad = bad_rows(raw, b)
            keys = [k for k in batch.keys for _ in range(width)]
            fields = reduce_outputs(raw, list(spec.outputs), batch_size=b, temperature=spec.temperature, dtype=dtype,
                                    keys=keys, seed=spec.seed)
        except TeacherOutputError as exc:
            raise TeacherOutputError(f"shard {shard.url} keys {batch.keys[0]!r}..{batch.keys[-1]!r}: {exc}") from None
        yield Reduced(batch, fields, bad.reshape(len(batch), width).any(1).numpy())


@dataclass
class ShardArrays:
    """The shard's columns as they fill: dense ``fields [n, (V,) ...]``, per-token ``ragged``,
    ``valid [n]``, ``params [n, V, 5]``.

    ``n`` is known only once the read stage has listed the whole shard: the columns start at
    ``capacity`` rows (the listed count when an earlier teacher or run listed the shard), grow
    by doubling, and :meth:`finish` cuts them to ``n``. ``listing`` is the read stage's.
    """

    shard: ShardInfo
    views: int
    capacity: int = 0
    fields: dict[str, np.ndarray] = field(default_factory=dict)
    ragged: dict[str, list[np.ndarray | None]] = field(default_factory=dict)
    valid: np.ndarray = None  # type: ignore[assignment]
    params: np.ndarray | None = None
    listing: Listing = field(default_factory=Listing)

    def __post_init__(self) -> None:
        n = max(0, int(self.capacity))
        self.capacity = n
        self.valid = np.zeros(n, dtype=bool)
        self.params = np.zeros((n, self.views, 5), dtype=np.int32) if self.views else None

    @property
    def num_rows(self) -> int:
        return len(self.listing.keys)

    def reserve(self, rows: int) -> None:
        """Make room for rows ``[0, rows)`` (amortised: at least doubles)."""
        if rows <= self.capacity:
            return
        cap = max(rows, 2 * self.capacity, 64)
        self._resize(cap)

    def _resize(self, cap: int) -> None:
        def resized(a: np.ndarray) -> np.ndarray:
            out = np.zeros((cap, *a.shape[1:]), dtype=a.dtype)
            keep = min(cap, a.shape[0])
            out[:keep] = a[:keep]
            return out

        self.fields = {k: resized(v) for k, v in self.fields.items()}
        self.valid = resized(self.valid)
        if self.params is not None:
            self.params = resized(self.params)
        for k, column in self.ragged.items():
            self.ragged[k] = (column + [None] * (cap - len(column)))[:cap]
        self.capacity = cap

    def finish(self) -> "ShardArrays":
        """Cut every column to the shard's listed row count."""
        if self.capacity != self.num_rows:
            self._resize(self.num_rows)
        return self


def collect(
    items: Iterable[Reduced], arrays: ShardArrays, handler: Handler, on_batch: Callable[[int], None] | None = None
) -> ShardArrays:
    """Place each batch's good rows (and view parameters) into ``arrays``; bad rows go to ``handler``.

    Call ``arrays.finish()`` after the chain is drained (the read stage has then listed every row).
    """
    shard, views = arrays.shard, arrays.views
    for item in items:
        batch, bad = item.batch, item.bad
        rows = np.asarray(batch.rows)
        arrays.reserve(int(rows.max()) + 1)
        n = arrays.capacity
        if batch.params and arrays.params is not None:
            arrays.params[rows] = np.stack(batch.params)
        for name, value in item.fields.items():
            if isinstance(value, list):  # per-token output: one [len_i, ...] array per row
                column = arrays.ragged.setdefault(name, [None] * n)
                for i in np.nonzero(~bad)[0]:
                    column[rows[i]] = value[i]
                continue
            value = value.reshape(len(batch), views, *value.shape[1:]) if views else value
            if name not in arrays.fields:
                arrays.fields[name] = np.zeros((n, *value.shape[1:]), dtype=value.dtype)
            elif arrays.fields[name].shape[1:] != value.shape[1:]:
                raise TeacherOutputError(
                    f"shard {shard.url} key {batch.keys[0]!r}: teacher output {name} changed shape "
                    f"from {arrays.fields[name].shape[1:]} to {value.shape[1:]}"
                )
            arrays.fields[name][rows[~bad]] = value[~bad]
        arrays.valid[rows[~bad]] = True
        if on_batch is not None:
            on_batch(len(batch))
        for i in np.nonzero(bad)[0]:
            handler(SampleError(shard, int(rows[i]), batch.keys[i], "teacher output has NaN or inf", TeacherOutputError))
    return arrays
