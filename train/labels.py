"""Which rows' labels the student may use: ``data.labels``, parsed once into a :class:`LabelsSpec`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdstore.store.errors import InputError
from kdstore.store.reader import Store
from kdstore.store.schema import ShardInfo

LABEL_KINDS = ("all", "none", "per_class", "count", "keys")


@dataclass(frozen=True, kw_only=True)
class LabelsSpec:
    """``all`` | ``none`` | ``per_class:N`` | ``count:N`` | ``keys:PATH``.

    ``kind`` is one of :data:`LABEL_KINDS`; ``count`` is N (per class for ``per_class``);
    ``path`` the key list of ``keys``. ``str(spec)`` gives the config text back.
    """

    kind: str = "all"
    count: int = 0
    path: str = ""

    def __post_init__(self) -> None:
        ok = (self.kind in ("all", "none") and not self.count and not self.path
              or self.kind in ("per_class", "count") and self.count > 0 and not self.path
              or self.kind == "keys" and bool(self.path) and not self.count)
        if not ok:
            raise InputError(f"data.labels must be all | none | per_class:N | count:N | keys:PATH, got {self}")

    @classmethod
    def parse(cls, text: "str | LabelsSpec") -> "LabelsSpec":
        if isinstance(text, LabelsSpec):
            return text
        kind, _, arg = str(text).partition(":")
        if kind in ("all", "none") and not arg:
            return cls(kind=kind)
        if kind in ("per_class", "count") and arg.isdigit() and int(arg) > 0:
            return cls(kind=kind, count=int(arg))
        if kind == "keys" and arg:
            return cls(kind=kind, path=arg)
        raise InputError(f"data.labels must be all | none | per_class:N | count:N | keys:PATH, got {text!r}")

    def __str__(self) -> str:
        if self.kind in ("per_class", "count"):
            return f"{self.kind}:{self.count}"
        if self.kind == "keys":
            return f"keys:{self.path}"
        return self.kind


def labeled_mask(store: Store, shards: Sequence[ShardInfo], spec: LabelsSpec | str, seed: int) -> np.ndarray:
    """``[store.num_rows]`` bool: rows whose label the student may use.

    ``all`` every labelled row of ``shards``; ``none``; ``per_class:N`` N rows per class and
    ``count:N`` N rows, drawn with ``seed`` from ``shards`` (a fixed, documented choice);
    ``keys:PATH`` the keys listed one per line in PATH.
    """
    spec = LabelsSpec.parse(spec)
    labels = store.labels
    domain = np.zeros(store.num_rows, dtype=bool)
    for s in shards:
        domain[s.row_start : s.row_stop] = True
    domain &= labels >= 0
    mask = np.zeros(store.num_rows, dtype=bool)
    rng = np.random.default_rng(seed)
    if spec.kind == "all":
        mask = domain
    elif spec.kind == "per_class":
        for c in np.unique(labels[domain]):
            rows = np.nonzero(domain & (labels == c))[0]
            if len(rows) < spec.count:
                raise InputError(f"data.labels {spec}: class {c} has only {len(rows)} labelled rows "
                                 "in the training shards")
            mask[rng.choice(rows, size=spec.count, replace=False)] = True
    elif spec.kind == "count":
        rows = np.nonzero(domain)[0]
        if len(rows) < spec.count:
            raise InputError(f"data.labels {spec}: only {len(rows)} labelled rows in the training shards")
        mask[rng.choice(rows, size=spec.count, replace=False)] = True
    elif spec.kind == "keys":
        path = Path(spec.path)
        if not path.is_file():
            raise InputError(f"data.labels {spec}: {path} not found")
        index = store.key_to_row
        for line in path.read_text().split():
            if line not in index:
                raise InputError(f"data.labels {spec}: key {line!r} is not in the store")
            mask[index[line]] = True
        mask &= domain
    return mask
