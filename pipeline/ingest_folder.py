"""An image folder → a :class:`~kdstore.pipeline.ingest.Source`.

Two layouts:

- **class subfolders** (torchvision ``ImageFolder``): ``DIR/CLASS/.../IMG.png``; class
  names sorted give label ids 0..C-1; files directly in ``DIR`` are ignored.
- **a flat folder with a labels CSV** (``labels=FILE.csv``, header ``file,label``; ``file``
  relative to ``DIR``): the CSV lists the items; labels are ints or names.

With neither (no subfolders, no CSV) every image of ``DIR`` is an unlabeled item.

``classes`` pins the label ids (``--classes a,b,c`` or a file): label id ``i`` is
``classes[i]`` whatever the sorted order, e.g. the order a teacher numbers its classes in.
Every class folder (or CSV label name) must be listed; a listed class may have no images. Items
are sorted by relative path; the key is that path without its extension, sanitized
(``cat/img.01.png`` → ``cat/img_01``). Each sample is ``{KEY.EXT: the file's bytes,
KEY.cls}``; bytes are stored as they are (no re-encode), ``EXT`` is the lower-cased suffix.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from kdstore.pipeline.ingest import BadItem, check_image, label_ids, unique_keys
from kdstore.store.errors import InputError

# torchvision's IMG_EXTENSIONS
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _images_under(root: Path, exclude: Path | None = None) -> list[str]:
    """Relative paths (``/``-separated) of every image file under ``root`` (not under ``exclude``), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        if exclude is not None:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d).resolve() != exclude]
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


class FolderSource:
    """Images of ``root`` (see the module docstring for the layouts)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        labels: str | os.PathLike[str] | None = None,
        exclude: str | os.PathLike[str] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        """``exclude``: a folder inside ``root`` to leave out (the output folder); ``classes``: the
        label names in id order (pinned), else sorted."""
        self.root = Path(root)
        pinned = list(classes) if classes is not None else None
        if pinned is not None:
            dupes = sorted({c for c in pinned if pinned.count(c) > 1})
            if not pinned or dupes or any(not c for c in pinned):
                raise InputError("--classes must list distinct, non-empty class names"
                                 + (f" ({dupes[0]!r} is listed twice)" if dupes else ""))
        skip = Path(exclude).resolve() if exclude is not None else None
        if not self.root.is_dir():
            raise InputError(f"{self.root} is not a folder")
        label_values: list = []
        if labels is not None:
            self.layout = "csv"
            self.files, label_values = self._read_labels(Path(labels))
        else:
            class_dirs = sorted(
                e.name for e in os.scandir(self.root)
                if e.is_dir() and not e.name.startswith(".") and Path(e.path).resolve() != skip
            )
            if class_dirs:
                self.layout = "class-folders"
                if pinned is not None:
                    unknown = [d for d in class_dirs if d not in pinned]
                    if unknown:
                        raise InputError(f"{self.root}: class folder(s) {unknown[:5]} are not in --classes {pinned}; "
                                         "list every class folder (a listed class may have no folder)")
                ids = {name: (pinned.index(name) if pinned is not None else c) for c, name in enumerate(class_dirs)}
                self.files = []
                for name in class_dirs:
                    files = [f"{name}/{rel}" for rel in _images_under(self.root / name, skip)]
                    self.files.extend(files)
                    label_values.extend([ids[name]] * len(files))
            else:
                self.layout = "flat"
                self.files = _images_under(self.root, skip)
        if not self.files:
            raise InputError(f"{self.root}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
        if self.layout == "class-folders":
            self.labels: list[int | None] = label_values
            self.classes = pinned if pinned is not None else class_dirs
        elif self.layout == "csv":
            self.labels, self.classes = label_ids(label_values, classes=pinned)
        else:
            if pinned is not None:
                raise InputError(f"{self.root}: --classes needs labels (class subfolders or --labels FILE.csv)")
            self.labels, self.classes = [None] * len(self.files), None
        self.keys = unique_keys([f.rsplit(".", 1)[0] for f in self.files], self.describe)
        digest = hashlib.sha256()
        for rel, lab in zip(self.files, self.labels):
            try:
                size = (self.root / rel).stat().st_size
            except OSError:
                size = -1
            digest.update(f"{rel}\0{size}\0{lab}\n".encode())
        self.fingerprint = {
            "kind": "folder",
            "root": str(self.root.resolve()),
            "layout": self.layout,
            "items": digest.hexdigest(),
        }

    def _read_labels(self, path: Path) -> tuple[list[str], list]:
        try:
            with path.open(encoding="utf-8-sig", newline="") as fh:
                rows = list(csv.DictReader(fh))
        except OSError as exc:
            raise InputError(f"labels file {path}: cannot read ({exc})") from None
        if not rows or not {"file", "label"} <= set(rows[0]):
            raise InputError(f"labels file {path}: needs a header with columns 'file' and 'label'")
        pairs = sorted(
            (Path(r["file"].strip()).as_posix(), r["label"].strip() if r["label"] and r["label"].strip() else None)
            for r in rows
        )
        files = [f for f, _ in pairs]
        dupes = [a for a, b in zip(files, files[1:]) if a == b]
        if dupes:
            raise InputError(f"labels file {path}: {dupes[0]!r} is listed twice")
        return files, [lab for _, lab in pairs]

    def describe(self, i: int) -> str:
        return str(self.root / self.files[i])

    def sample(self, i: int) -> dict:
        rel = self.files[i]
        try:
            data = (self.root / rel).read_bytes()
        except OSError as exc:
            raise BadItem(f"cannot read ({exc.strerror or exc})") from None
        fmt = check_image(data)
        name = Path(rel).name
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else {"JPEG": "jpg"}.get(fmt, fmt.lower())
        sample = {"__key__": self.keys[i], ext: data}
        if self.labels[i] is not None:
            sample["cls"] = str(self.labels[i]).encode("ascii")
        return sample
