"""Do the input shards still hold the keys a store was planned from? One check, two users.

``kdstore verify`` collects the problems (:func:`input_problems`); the trainer's
``StreamingDataset`` refuses the first one (:func:`check_inputs`). Both compare each shard's
keys, in tar order, with the store's ``samples.parquet`` rows of that shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdstore.store.errors import KdStoreError, StoreMismatchError
from kdstore.store.layout import SAMPLES_FILE
from kdstore.store.schema import ShardInfo
from kdstore.store.shards import iter_samples, list_shard

if TYPE_CHECKING:
    from kdstore.store.reader import Store

MODES = ("full", "quick", "off")


def input_fingerprint(urls: Sequence[str], keys_per_shard: Sequence[Sequence[str]]) -> str:
    """sha256 over every shard URL, its key count and its keys: ``store.json``'s ``input_fingerprint``."""
    digest = hashlib.sha256()
    for url, keys in zip(urls, keys_per_shard):
        digest.update(f"{url}\0{len(keys)}\0".encode())
        digest.update("\0".join(keys).encode())
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True, kw_only=True)
class InputProblem:
    """One input shard that is not what the store was planned from.

    ``shard`` is None for a store-wide problem (the input fingerprint); ``error`` is set
    when the shard could not be listed at all.
    """

    shard: ShardInfo | None
    url: str
    detail: str
    error: KdStoreError | None = None


def _first_key(url: str) -> str | None:
    for sample in iter_samples(url):
        return sample.get("__key__")
    return None


def key_difference(keys: Sequence[str], expected: Sequence[str]) -> str | None:
    """None when equal, else what differs first (count, or the first differing sample)."""
    keys, expected = list(keys), list(expected)
    if keys == expected:
        return None
    if len(keys) != len(expected):
        return f"it has {len(keys)} samples, the store {len(expected)}"
    diff = next(i for i, (a, b) in enumerate(zip(keys, expected)) if a != b)
    return f"sample {diff} is {keys[diff]!r}, the store has {expected[diff]!r}"


def input_problems(
    store: "Store",
    shards: Sequence[ShardInfo] | None = None,
    *,
    urls: Mapping[int, str] | None = None,
    mode: str = "full",
) -> Iterator[InputProblem]:
    """Compare input shards with the store, lazily, first problem first.

    ``urls`` maps shard index → the URL to read (default: the store's own). ``full`` lists
    every key of every shard (and, when all of the store's shards are given, recomputes the
    input fingerprint); ``quick`` compares the first key only; ``off`` checks nothing.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return
    shards = list(store.shards if shards is None else shards)
    listed: dict[int, list[str]] = {}
    for s in shards:
        url = urls[s.index] if urls is not None else s.url
        expected = store.keys[s.row_start : s.row_stop]
        if mode == "quick":
            try:
                got = _first_key(url)
            except KdStoreError as exc:
                yield InputProblem(shard=s, url=url, detail=str(exc), error=exc)
                continue
            if got != expected[0]:
                yield InputProblem(shard=s, url=url, detail=f"its first key is {got!r}, the store's is {expected[0]!r}")
            continue
        try:
            keys = list_shard(url).keys
        except KdStoreError as exc:
            yield InputProblem(shard=s, url=url, detail=str(exc), error=exc)
            continue
        detail = key_difference(keys, expected)
        if detail is not None:
            yield InputProblem(shard=s, url=url, detail=detail)
            continue
        listed[s.index] = keys
    if len(listed) == len(store.shards):
        got = input_fingerprint([s.url for s in store.shards], [listed[s.index] for s in store.shards])
        if got != store.manifest.input_fingerprint:
            yield InputProblem(
                shard=None,
                url="",
                detail=(
                    f"input fingerprint {got[:19]}… differs from store {store.path}'s "
                    f"{store.manifest.input_fingerprint[:19]}…; the store's {SAMPLES_FILE} does not match store.json"
                ),
            )


DEFAULT_HINT = "point at the shards the store was built from, or precompute a new store"


def mismatch_error(store: "Store", shard: ShardInfo, url: str, detail: str, hint: str = DEFAULT_HINT) -> StoreMismatchError:
    """The one message for an input shard that differs from the store (planning, streaming)."""
    return StoreMismatchError(
        f"input shard {url} does not match store {store.path} (shard {shard.index}, {shard.url}): {detail}. "
        f"The shards changed since `kdstore precompute`: {hint}"
    )


def check_inputs(
    store: "Store",
    shards: Sequence[ShardInfo] | None = None,
    *,
    urls: Mapping[int, str] | None = None,
    mode: str = "full",
    hint: str = DEFAULT_HINT,
) -> None:
    """Raise for the first :func:`input_problems`: the listing's own error, else :class:`StoreMismatchError`."""
    for problem in input_problems(store, shards, urls=urls, mode=mode):
        if problem.error is not None:
            raise problem.error
        if problem.shard is None:
            raise StoreMismatchError(f"{problem.detail} — run `kdstore verify`")
        raise mismatch_error(store, problem.shard, problem.url, problem.detail, hint)
