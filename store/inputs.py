"""Where a store's input shards are, and do they still hold the keys the store was planned from?

Paths: a store records each local input shard as an absolute, normalised path, or relative
to the store folder when the shard lies inside it (:func:`record_url`); URLs with a scheme
as given. Stores planned before that recorded paths relative to where precompute ran
(``paths_relative_to == "cwd"``); they still resolve from that folder. :func:`shard_urls`
turns the records into readable URLs, moved under ``inputs_root`` when given (the folder
that now holds what was in the inputs' common folder, :func:`inputs_folder`).

Keys: one check, two users.

``kdstore verify`` collects the problems (:func:`input_problems`); the trainer's
``StreamingDataset`` refuses the first one (:func:`check_inputs`). Both compare each shard's
keys, in tar order, with the store's ``samples.parquet`` rows of that shard.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdstore.store.errors import InputError, KdStoreError, StoreMismatchError
from kdstore.store.layout import SAMPLES_FILE
from kdstore.store.schema import ShardInfo
from kdstore.store.shards import iter_samples, list_shard

if TYPE_CHECKING:
    from kdstore.store.reader import Store

MODES = ("full", "quick", "off")
RELOCATE = "pass --inputs-root DIR"  # how ``kdstore verify`` relocates the inputs (the trainer says its own)


def has_scheme(url: str) -> bool:
    return "://" in url


def normalize_url(url: str, base: str | os.PathLike | None = None) -> str:
    """A local path made absolute (from ``base``, default the working directory) and normalised
    (``a/b/../x.tar`` → ``/abs/a/x.tar``; symlinks are not resolved); a URL with a scheme as is."""
    if has_scheme(url):
        return url
    path = os.path.expanduser(url)
    if not os.path.isabs(path):
        path = os.path.join(os.path.abspath(os.fspath(base)) if base is not None else os.getcwd(), path)
    return os.path.normpath(path)


def record_url(url: str, store_root: str | os.PathLike) -> str:
    """How a store records an input shard: absolute and normalised, relative to the store
    (with ``/``) when it lies inside the store folder; a URL with a scheme as given."""
    if has_scheme(url):
        return url
    path = normalize_url(url)
    if has_scheme(str(store_root)):  # a store in object storage: local inputs by absolute path
        return path
    root = normalize_url(os.fspath(store_root))
    if path.startswith(root.rstrip(os.sep) + os.sep):
        return os.path.relpath(path, root).replace(os.sep, "/")
    return path


def recorded_to_absolute(store: "Store", url: str) -> str:
    """A recorded input URL as an absolute path (or URL), as the store's format says to read it."""
    base = store.path if store.manifest.paths_relative_to == "store" else None
    return normalize_url(url, base)


def inputs_folder(store: "Store") -> str:
    """The deepest folder (or URL prefix) holding every input shard the store was planned from."""
    urls = [recorded_to_absolute(store, u) for u in (store.manifest.input_urls or [s.url for s in store.shards])]
    parents = [posixpath.dirname(u) if has_scheme(u) else os.path.dirname(u) for u in urls]
    if any(has_scheme(u) for u in urls):
        prefix = os.path.commonprefix(parents)
        return prefix if prefix in parents else prefix.rsplit("/", 1)[0]
    return os.path.commonpath(parents)


def shard_urls(store: "Store", inputs_root: str | os.PathLike | None = None) -> dict[int, str]:
    """Shard index → the URL to read: the recorded one made absolute, or moved under ``inputs_root``."""
    absolute = {s.index: recorded_to_absolute(store, s.url) for s in store.shards}
    if not inputs_root:
        return absolute
    folder = inputs_folder(store)
    root = os.fspath(inputs_root)
    root = root.rstrip("/") if has_scheme(root) else normalize_url(root)
    out = {}
    for index, url in absolute.items():
        rel = url[len(folder):].lstrip("/") if has_scheme(url) else os.path.relpath(url, folder)
        out[index] = f"{root}/{rel}" if has_scheme(root) else os.path.normpath(os.path.join(root, rel))
    return out


def missing_local(url: str) -> bool:
    """True for a local path that does not exist (a URL with a scheme is never checked here)."""
    return not has_scheme(url) and not os.path.exists(url)


def moved_hint(store: "Store", option: str = RELOCATE) -> str:
    """The way out when a store's input shards are not where it recorded them."""
    return f"if the input shards moved, {option}, DIR being the folder that now holds what was in {inputs_folder(store)}"


def moved_error(store: "Store", url: str, option: str = RELOCATE) -> InputError:
    return InputError(f"input shard {url} of store {store.path} not found; {moved_hint(store, option)}")


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
    option: str = RELOCATE,
) -> Iterator[InputProblem]:
    """Compare input shards with the store, lazily, first problem first.

    ``urls`` maps shard index → the URL to read (default: :func:`shard_urls`); a missing local
    shard's error says ``option``, the way to relocate the inputs. ``full`` lists
    every key of every shard (and, when all of the store's shards are given, recomputes the
    input fingerprint); ``quick`` compares the first key only; ``off`` checks nothing.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return
    shards = list(store.shards if shards is None else shards)
    urls = shard_urls(store) if urls is None else urls
    listed: dict[int, list[str]] = {}
    for s in shards:
        url = urls[s.index]
        if missing_local(url):
            exc = moved_error(store, url, option)
            yield InputProblem(shard=s, url=url, detail=str(exc), error=exc)
            continue
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
    if len(listed) == len(store.shards) and store.manifest.input_fingerprint:  # "" while shards are pending
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
    option: str = RELOCATE,
) -> None:
    """Raise for the first :func:`input_problems`: the listing's own error, else :class:`StoreMismatchError`."""
    for problem in input_problems(store, shards, urls=urls, mode=mode, option=option):
        if problem.error is not None:
            raise problem.error
        if problem.shard is None:
            raise StoreMismatchError(f"{problem.detail} — run `kdstore verify`")
        raise mismatch_error(store, problem.shard, problem.url, problem.detail, hint)
