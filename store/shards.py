"""Input shards, the inputs a store is planned from: expanding URL patterns, listing keys, iterating samples.

A shard is a WebDataset tar (local path or fsspec URL). Samples are dicts of raw bytes
keyed by extension, plus ``__key__``; nothing is decoded here. It lives in the store
package because planning, ``verify`` and the trainer all compare shards with a store's
keys (:mod:`kdstore.store.inputs`); ``kdstore.pipeline.shards`` re-exports it.
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
from webdataset import tariterators
from webdataset.shardlists import expand_urls as _wds_expand
from webdataset.tariterators import meta_prefix, meta_suffix

from kdstore.store import tarstream
from kdstore.store.errors import InputError
from kdstore.store.fs import remote_errors

LABEL_EXTENSIONS = ("cls", "label")


@dataclass(frozen=True, kw_only=True)
class ShardListing:
    """What the planning pass learns about one shard without running any teacher."""

    url: str
    keys: list[str]
    labels: list[int | None]


def _has_scheme(url: str) -> bool:
    return "://" in url


def expand_urls(patterns: Sequence[str] | str) -> list[str]:
    """Expand brace patterns (``train-{000000..000011}.tar``), globs and ``::``-joined lists.

    Returns URLs in the given order, each pattern's matches sorted. A glob that matches
    nothing is an :class:`InputError`; a brace pattern is expanded as written (a missing
    shard is reported when it is opened).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        for url in _wds_expand(pattern):
            if any(ch in url for ch in "*?["):
                if _has_scheme(url):
                    fs, path = fsspec.core.url_to_fs(url)
                    matches = sorted(fs.unstrip_protocol(p) for p in fs.glob(path))
                else:
                    matches = sorted(glob.glob(os.path.expanduser(url)))
                if not matches:
                    raise InputError(f"no shard matches {url!r}")
                urls.extend(matches)
            else:
                urls.append(url)
    if not urls:
        raise InputError("no input shards given")
    duplicates = {u for u in urls if urls.count(u) > 1}
    if duplicates:
        raise InputError(f"shard listed twice: {sorted(duplicates)[0]}")
    return urls


def _open(url: str):
    try:
        with remote_errors(f"shard {url}"):
            return fsspec.open(url, "rb").open()
    except FileNotFoundError:
        raise InputError(f"shard {url}: not found") from None
    except OSError as exc:
        raise InputError(f"shard {url}: cannot open ({exc})") from None


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's key convention: the key is the path up to the first dot of the basename."""
    head, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


@dataclass
class ReadStats:
    """Bytes read from input shards through :func:`iter_samples` / :func:`list_shard` (``stats=``)."""

    bytes_read: int = 0


class CountingReader:
    """File-like wrapper that counts the bytes read through it (truncation checks, ``ReadStats``);
    as a context manager it closes ``raw``."""

    def __init__(self, raw, stats: ReadStats | None = None) -> None:
        self.raw = raw
        self.bytes_read = 0
        self.stats = stats

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.bytes_read += len(data)
        if self.stats is not None:
            self.stats.bytes_read += len(data)
        return data

    def __enter__(self) -> "CountingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.raw.close()


def list_shard(url: str, stats: ReadStats | None = None) -> ShardListing:
    """List every key (and label, when a ``.cls`` member exists) of one shard, in tar order.

    Reads the whole shard (``verify`` and the trainer's checks; precompute lists shards while
    it reads them for the teacher, :func:`kdstore.pipeline.stages.read`)."""
    keys: list[str] = []
    labels: list[int | None] = []
    index: dict[str, int] = {}
    last_key = None
    try:
        with _open(url) as raw, tarfile.open(fileobj=(stream := CountingReader(raw, stats)), mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                if key.startswith("__"):
                    continue
                if key != last_key and key in index:
                    raise InputError(f"shard {url}: key {key!r} is split across the tar")
                last_key = key
                if key not in index:
                    index[key] = len(keys)
                    keys.append(key)
                    labels.append(None)
                if ext in LABEL_EXTENSIONS:
                    data = tar.extractfile(member)
                    text = data.read() if data is not None else b""
                    try:
                        labels[index[key]] = int(text.decode().strip())
                    except ValueError:
                        raise InputError(f"shard {url}: key {key!r}: label {text[:20]!r} is not an integer") from None
            # tarfile ends quietly on a short file; a complete tar holds every member's data
            # plus an end-of-archive block after the last member.
            stream.read()
            if _tar_cut_short(tar):
                raise InputError(f"shard {url}: truncated tar (ends inside or right after member {member.name!r})")
    except InputError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise InputError(f"shard {url}: unreadable tar ({exc or type(exc).__name__})") from None
    if not keys:
        raise InputError(f"shard {url}: no samples")
    return ShardListing(url=url, keys=keys, labels=labels)


class _Replay:
    """A stream whose first bytes were read already: ``first``, then the rest of ``raw``."""

    def __init__(self, first: bytes, raw) -> None:
        self.first, self.raw = first, raw

    def read(self, size: int = -1) -> bytes:
        if not self.first:
            return self.raw.read(size)
        if size < 0:
            head, self.first = self.first, b""
            return head + self.raw.read()
        head, self.first = self.first[:size], self.first[size:]
        return head + (self.raw.read(size - len(head)) if len(head) < size else b"")


def _tar_cut_short(tar: tarfile.TarFile) -> bool:
    """True when a streamed (``r|*``) tar ended without an end-of-archive block after its last
    member. ``tar.fileobj`` counts uncompressed bytes, so this holds for ``.tar.gz`` too."""
    return tar.fileobj.tell() < tar.offset + tarfile.BLOCKSIZE


def _tarfile_files(stream) -> Iterator[dict]:
    """``{"fname", "data"}`` of each regular member, through ``tarfile`` (compressed tars), as
    webdataset's ``tar_file_iterator`` yields them; a tar without its end-of-archive block
    raises :class:`tarstream.TruncatedTar` (``tarfile`` itself ends quietly there)."""
    last = None
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            last = member.name
            if not member.isreg():
                continue
            name = member.name
            if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
                continue
            if tarstream.SKIP_META.match(name):
                continue
            data = tar.extractfile(member).read()
            yield {"fname": name, "data": data}
            tar.members = []
        if last is not None and _tar_cut_short(tar):
            raise tarstream.TruncatedTar(f"ends inside or right after member {last!r}")


def iter_samples(url: str, stats: ReadStats | None = None) -> Iterator[dict]:
    """Yield samples ``{"__key__": str, ext: bytes, ...}`` of one shard in tar order.

    Uncompressed tars are read by :mod:`kdstore.store.tarstream` (3-6x faster than
    ``tarfile`` on shards of small images); others (gzip, ...) through ``tarfile``. A tar cut
    short (a member or the end-of-archive block missing) is ``InputError("... truncated tar")``.
    ``stats.bytes_read`` grows by the bytes read from the shard.
    """
    try:
        with _open(url) as raw:
            stream = CountingReader(raw, stats)
            first = stream.read(tarfile.BLOCKSIZE)
            if tarstream.is_tar_header(first):
                members = tarstream.plain_tar_files(stream, first)
            else:
                members = _tarfile_files(_Replay(first, stream))
            files = ({**f, "__url__": url} for f in members)
            yield from tariterators.group_by_keys(files)
    except InputError:
        raise
    except tarstream.TruncatedTar as exc:
        raise InputError(f"shard {url}: truncated tar ({exc})") from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise InputError(f"shard {url}: unreadable tar ({exc or type(exc).__name__})") from None


def read_label(sample: dict) -> int | None:
    for ext in LABEL_EXTENSIONS:
        if ext in sample:
            return int(bytes(sample[ext]).decode().strip())
    return None
