"""Users' own data → WebDataset shards: the part every source shares.

A *source* (an image folder, a table, a Hugging Face dataset; see ``ingest_folder``,
``ingest_table``, ``ingest_hf``) is a fixed, ordered list of ``n`` items with a key each,
and can build item ``i``'s sample. :func:`write_source` cuts the items into shards of
``shard_size`` by position (shard ``s`` holds items ``[s*size, (s+1)*size)``), so a rerun
cuts them the same way and skips every shard already finished:

```
OUT/PREFIX-000000.tar ...   one tar per shard, written as PREFIX-NNNNNN.tar.tmp then renamed
OUT/ingest.json             what was ingested (source fingerprint, shard size) + one record per finished shard
OUT/classes.json            label names: label id i is classes[i] (only when labels have names)
OUT/skipped.json            [{"shard", "key", "item", "reason"}] items left out with on_error="skip"
```
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from kdstore.store.errors import InputError

MANIFEST = "ingest.json"
CLASSES = "classes.json"
SKIPPED = "skipped.json"
ON_ERROR = ("fail", "skip")


class BadItem(Exception):
    """An item that cannot be stored (unreadable file, corrupt image, missing text); ``str`` is the reason."""


class Source(Protocol):
    """What :func:`write_source` needs from a source."""

    fingerprint: dict  # JSON-able; identifies the input and options (a rerun must give the same)
    keys: list[str]  # [n] unique sanitized keys, in item order
    classes: list[str] | None  # label names (label id i is classes[i]) or None

    def describe(self, i: int) -> str:  # item i for messages: a file path, "row 17"
        ...

    def sample(self, i: int) -> dict:  # {"__key__": keys[i], ext: bytes, ...}; raises BadItem
        ...


@dataclass(frozen=True, kw_only=True)
class IngestResult:
    """What one :func:`write_source` run did."""

    out_dir: Path
    shards: list[Path]  # every shard of the source that holds samples, in order
    shards_written: int
    shards_already_done: int
    samples: int  # samples stored across all shards
    skipped: list[dict] = field(default_factory=list)  # all skipped items, this run and earlier ones
    classes: list[str] | None = None

    @property
    def pattern(self) -> str:
        """A ``--inputs`` value for ``kdstore precompute`` naming every shard."""
        if not self.shards:
            return ""
        prefix = self.shards[0].name[: -len("000000.tar")]
        numbers = [int(p.name[len(prefix) : -4]) for p in self.shards]
        if numbers != list(range(len(numbers))):  # a shard of only bad items left a gap
            return str(self.out_dir / f"{prefix}[0-9][0-9][0-9][0-9][0-9][0-9].tar")
        return str(self.out_dir / f"{prefix}{{000000..{numbers[-1]:06d}}}.tar")


_KEY_BAD = re.compile(r"[^\w\-]")


def sanitize_key(raw: str) -> str:
    """A WebDataset-safe key: ``/``-separated parts of word characters and ``-`` only.

    Dots (WebDataset splits key and extension at the first one), spaces and other
    characters become ``_``; empty, ``.`` and ``..`` parts are dropped; a leading ``__``
    (reserved for tar metadata) gets a ``k`` in front. ``"cat/img 01.v2"`` → ``"cat/img_01_v2"``.
    """
    parts = [_KEY_BAD.sub("_", p) for p in str(raw).replace("\\", "/").split("/") if p not in ("", ".", "..")]
    key = "/".join(parts)
    return "k" + key if key.startswith("__") else key


def unique_keys(raw: Sequence[str], describe) -> list[str]:
    """Sanitize every key; two items with one key is an :class:`InputError` naming both."""
    keys = [sanitize_key(r) for r in raw]
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        if not key:
            raise InputError(f"{describe(i)}: key {raw[i]!r} is empty once sanitized; give every item a usable key")
        if key in seen:
            raise InputError(
                f"{describe(seen[key])} and {describe(i)} both get key {key!r} "
                "(keys keep letters, digits, '_', '-', '/'; other characters become '_'): rename one"
            )
        seen[key] = i
    return keys


def label_ids(values: Sequence, classes: Sequence[str] | None = None) -> tuple[list[int | None], list[str] | None]:
    """Labels as ids: integers (or integer strings) stay as they are; other values map to
    ``sorted(set(values))`` positions — or, with ``classes`` (pinned names in id order), to
    their position there (a name not listed is refused) — returned as the class names.
    ``None``, NaN and empty strings are "no label" (``None``): the sample gets no ``.cls``."""
    present = [v for v in values if v is not None and v == v]  # drops None and NaN
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        ids = [None if v is None else int(v) for v in values]
        if any(v is not None and v < 0 for v in ids):
            raise InputError(f"labels must be integers >= 0 or names, got {min(v for v in ids if v is not None)}")
        return ids, _pinned_for_ids(ids, classes)
    text = [None if v is None or v != v or not str(v).strip() else str(v).strip() for v in values]  # "" = no label
    if all(t.isascii() and t.isdigit() for t in text if t is not None):
        ids = [None if t is None else int(t) for t in text]
        return ids, _pinned_for_ids(ids, classes)
    if classes is not None:
        unknown = sorted({t for t in text if t is not None} - set(classes))
        if unknown:
            raise InputError(f"label(s) {unknown[:5]} are not in --classes {list(classes)}; list every label name")
        code = {c: i for i, c in enumerate(classes)}
        return [None if t is None else code[t] for t in text], list(classes)
    classes = sorted({t for t in text if t is not None})
    code = {c: i for i, c in enumerate(classes)}
    return [None if t is None else code[t] for t in text], classes


def _pinned_for_ids(ids: list[int | None], classes: Sequence[str] | None) -> list[str] | None:
    """Integer labels are ids already; pinned names then only name them (every id must have one)."""
    if classes is None:
        return None
    top = max((i for i in ids if i is not None), default=-1)
    if top >= len(classes):
        raise InputError(f"label id {top} has no name in --classes ({len(classes)} names)")
    return list(classes)


def read_classes_option(text: str) -> list[str]:
    """``--classes``: ``a,b,c``, or a file: a JSON list, a ``classes.json`` (``{"classes": [...]}``),
    or one name per line."""
    path = Path(text)
    if path.is_file():
        raw = path.read_text(encoding="utf-8")
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError:
            names = [line.strip() for line in raw.splitlines() if line.strip()]
        else:
            names = doc.get("classes") if isinstance(doc, dict) else doc
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise InputError(f"--classes {path}: give a JSON list of names, {{\"classes\": [...]}} or one name per line")
    else:
        names = [n.strip() for n in text.split(",")]
    if not names or any(not n for n in names):
        raise InputError(f"--classes {text!r}: an empty class name; give 'a,b,c' or a file of names")
    return names


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def _shard_path(out: Path, prefix: str, index: int) -> Path:
    return out / f"{prefix}-{index:06d}.tar"


def _prepare(out: Path, spec: dict, prefix: str, overwrite: bool) -> dict[int, dict]:
    """Check OUT against an earlier run; return the finished shards' records ``{index: record}``."""
    manifest_path = out / MANIFEST
    ours = sorted(out.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar*"))
    if overwrite:
        for path in ours:
            path.unlink()
        for name in (MANIFEST, CLASSES, SKIPPED):
            (out / name).unlink(missing_ok=True)
        return {}
    if not manifest_path.exists():
        if any(p.suffix == ".tar" for p in ours):
            raise InputError(
                f"{out} already holds {prefix}-*.tar shards that kdstore did not write for this input; "
                "choose an empty folder, another --prefix, or --overwrite"
            )
        return {}
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{manifest_path} is unreadable ({exc}); rerun with --overwrite") from None
    if manifest.get("spec") != spec:
        raise InputError(
            f"{out} holds shards of another input or other options ({manifest_path}); "
            "use another folder, or --overwrite to start over"
        )
    return {int(r["index"]): r for r in manifest.get("shards", [])}


def write_source(
    source: Source,
    out_dir: str | os.PathLike[str],
    *,
    shard_size: int = 1000,
    prefix: str = "shard",
    on_error: str = "fail",
    overwrite: bool = False,
    progress: bool = True,
) -> IngestResult:
    """Write ``source`` as ``OUT/PREFIX-NNNNNN.tar`` (``KEY.EXT`` members plus ``KEY.cls``).

    Resumable: a shard whose tar and record exist is not rewritten. ``on_error="fail"``
    stops at the first bad item with an :class:`InputError` naming it (finished shards stay);
    ``"skip"`` leaves it out and lists it in ``skipped.json``.
    """
    import webdataset as wds

    if shard_size < 1:
        raise InputError(f"--shard-size must be >= 1, got {shard_size}")
    if on_error not in ON_ERROR:
        raise InputError(f"--on-error must be one of {ON_ERROR}, got {on_error!r}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", prefix):
        raise InputError(f"--prefix must be letters, digits, '_' or '-', got {prefix!r}")
    n = len(source.keys)
    if n == 0:
        raise InputError("the input holds no items")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = {"source": source.fingerprint, "shard_size": shard_size, "prefix": prefix, "items": n, "classes": source.classes}
    records = _prepare(out, spec, prefix, overwrite)
    if source.classes is not None:
        _write_json(out / CLASSES, {"classes": source.classes, "class_to_idx": {c: i for i, c in enumerate(source.classes)}})

    num_shards = (n + shard_size - 1) // shard_size
    done = {s: r for s, r in records.items() if s < num_shards and (r["samples"] == 0 or _shard_path(out, prefix, s).exists())}
    written = 0
    initial = sum(min(shard_size, n - s * shard_size) for s in done)
    with tqdm(total=n, initial=initial, unit="item", desc=f"shards -> {out}", disable=not progress) as bar:
        for s in range(num_shards):
            if s in done:
                continue
            path = _shard_path(out, prefix, s)
            tmp = path.with_name(path.name + ".tmp")
            skipped: list[dict] = []
            count = 0
            try:
                with wds.TarWriter(str(tmp), mtime=int(time.time())) as sink:  # integer mtime: plain ustar members (a float mtime adds a PAX header to each, ~1/3 of read time)
                    for i in range(s * shard_size, min(n, (s + 1) * shard_size)):
                        try:
                            sample = source.sample(i)
                        except BadItem as exc:
                            if on_error == "fail":
                                raise InputError(f"{source.describe(i)}: {exc} (--on-error skip leaves it out)") from None
                            skipped.append({"shard": s, "key": source.keys[i], "item": source.describe(i), "reason": str(exc)})
                        else:
                            sink.write(sample)
                            count += 1
                        bar.update(1)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            if count:
                os.replace(tmp, path)
            else:  # every item bad: no empty tar (a reader would refuse it)
                tmp.unlink()
                path.unlink(missing_ok=True)
            done[s] = {"index": s, "name": path.name, "samples": count, "skipped": skipped}
            written += 1
            _write_json(out / MANIFEST, {"spec": spec, "shards": [done[k] for k in sorted(done)]})
    if written == 0 and not (out / MANIFEST).exists():
        _write_json(out / MANIFEST, {"spec": spec, "shards": [done[k] for k in sorted(done)]})
    all_skipped = [item for s in sorted(done) for item in done[s]["skipped"]]
    _write_json(out / SKIPPED, all_skipped)
    return IngestResult(
        out_dir=out,
        shards=[_shard_path(out, prefix, s) for s in sorted(done) if done[s]["samples"]],
        shards_written=written,
        shards_already_done=num_shards - written,
        samples=sum(r["samples"] for r in done.values()),
        skipped=all_skipped,
        classes=source.classes,
    )


def check_image(data: bytes) -> str:
    """Open ``data`` with PIL and ``verify()`` it (headers and, for PNG, every chunk's CRC;
    no full decode). PIL's JPEG ``verify()`` reads headers only, so a JPEG must also hold its
    end-of-image marker near the end (a cut-off download fails this). Returns PIL's format
    name (``"PNG"``, ``"JPEG"``); raises :class:`BadItem`."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
            img.verify()
    except UnidentifiedImageError:
        raise BadItem("not a readable image (PIL cannot identify its format)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadItem(f"not a readable image ({exc or type(exc).__name__})") from None
    if fmt == "JPEG" and b"\xff\xd9" not in data[-4096:]:
        raise BadItem("not a readable image (JPEG without its end marker: truncated)")
    return fmt
