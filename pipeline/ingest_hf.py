"""A Hugging Face ``datasets`` dataset saved with ``save_to_disk`` → a :class:`~kdstore.pipeline.ingest.Source`.

Read with ``datasets.load_from_disk`` (local files only, no hub). One column is the input:
an image column (``datasets.Image`` or raw bytes; stored as the original encoded bytes,
``KEY.png``/``KEY.jpg`` by the file's name or format) or a text column (``KEY.txt``, utf-8).
A ``ClassLabel`` label column keeps its ids and names; other labels map like a table's.
Keys come from ``key_column`` or the row index (``row-00000017``).
"""

from __future__ import annotations

import os
from pathlib import Path

from kdstore.pipeline.ingest import BadItem, check_image, label_ids, unique_keys
from kdstore.pipeline.ingest_folder import IMAGE_SUFFIXES
from kdstore.store.errors import InputError

_BATCH = 512
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff", "GIF": "gif", "PPM": "ppm"}


def _datasets():
    try:
        import datasets
    except ModuleNotFoundError:
        raise InputError(
            "`kdstore shards hf` needs the Hugging Face 'datasets' package: pip install 'kdstore[hf]'"
        ) from None
    return datasets


def _column(ds, name: str) -> list:
    """One column as a Python list, through Arrow (iterating ``ds[name]`` goes row by row: slow)."""
    return ds.with_format("arrow")[name].to_pylist()


class HFSource:
    """Rows of one split of a ``save_to_disk`` folder."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        split: str | None = None,
        text_column: str | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
        key_column: str | None = None,
    ) -> None:
        datasets = _datasets()
        self.path = Path(path)
        try:
            loaded = datasets.load_from_disk(str(self.path))
        except FileNotFoundError as exc:
            raise InputError(f"{self.path}: not a dataset saved with save_to_disk ({exc})") from None
        if isinstance(loaded, datasets.DatasetDict):
            names = sorted(loaded)
            if split is None and len(names) == 1:
                split = names[0]
            if split not in loaded:
                raise InputError(f"{self.path} holds splits {', '.join(names)}: choose one with --split")
            loaded = loaded[split]
        elif split is not None and split != str(loaded.split or split):
            raise InputError(f"{self.path} is a single dataset (split {loaded.split}); leave out --split")
        ds = loaded
        features = ds.features
        if (text_column is None) == (image_column is None):
            images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
            if text_column is None and image_column is None and len(images) == 1:
                image_column = images[0]
            else:
                raise InputError(f"give exactly one of --text-column or --image-column (columns: {', '.join(features)})")
        for col in (text_column, image_column, label_column, key_column):
            if col is not None and col not in features:
                raise InputError(f"{self.path}: no column {col!r} (it has {', '.join(features)})")
        self.column = text_column or image_column
        self.is_image = image_column is not None
        if self.is_image and isinstance(features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))  # the stored bytes, undecoded
        self.ds = ds.select_columns([self.column])
        self.split = split
        n = len(ds)
        self.row_keys = _column(ds, key_column) if key_column else None
        raw = [f"row-{i:08d}" if k is None else str(k) for i, k in enumerate(self.row_keys)] if key_column else [f"row-{i:08d}" for i in range(n)]
        self.keys = unique_keys(raw, self.describe)
        if label_column is None:
            self.labels, self.classes = [None] * n, None
        elif isinstance(features[label_column], datasets.ClassLabel):
            self.labels = [None if v is None or v < 0 else int(v) for v in _column(ds, label_column)]
            self.classes = list(features[label_column].names)
        else:
            self.labels, self.classes = label_ids(_column(ds, label_column))
        self._cache: tuple[int, list] = (-1, [])
        self.fingerprint = {
            "kind": "hf",
            "path": str(self.path.resolve()),
            "split": split,
            "dataset_fingerprint": getattr(loaded, "_fingerprint", None),
            "rows": n,
            "columns": {"text": text_column, "image": image_column, "label": label_column, "key": key_column},
        }

    def describe(self, i: int) -> str:
        key = f" (key {self.row_keys[i]!r})" if self.row_keys is not None else ""
        split = f" split {self.split}" if self.split else ""
        return f"{self.path}{split} row {i}{key}"

    def _value(self, i: int):
        start, rows = self._cache
        if not start <= i < start + len(rows):
            start = i - i % _BATCH
            rows = self.ds[start : start + _BATCH][self.column]
            self._cache = (start, rows)
        return rows[i - start]

    def sample(self, i: int) -> dict:
        value = self._value(i)
        sample = {"__key__": self.keys[i]}
        if self.is_image:
            name = None
            if isinstance(value, dict):
                data, name = value.get("bytes"), value.get("path")
                if data is None and name:
                    try:
                        data = Path(name).read_bytes()
                    except OSError as exc:
                        raise BadItem(f"image file {name}: cannot read ({exc.strerror or exc})") from None
            else:
                data = value
            if not isinstance(data, (bytes, bytearray)):
                raise BadItem("no image bytes" if data is None else f"image is a {type(data).__name__}, not encoded bytes")
            fmt = check_image(bytes(data))
            suffix = Path(name).suffix.lower().lstrip(".") if name else ""
            sample[suffix if f".{suffix}" in IMAGE_SUFFIXES else _FORMAT_EXT.get(fmt, fmt.lower() or "img")] = bytes(data)
        else:
            if not isinstance(value, str):
                raise BadItem("no text (empty cell)" if value is None else f"text is a {type(value).__name__}, not a string")
            sample["txt"] = value.encode("utf-8")
        if self.labels[i] is not None:
            sample["cls"] = str(self.labels[i]).encode("ascii")
        return sample
