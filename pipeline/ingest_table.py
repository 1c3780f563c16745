"""A CSV, JSON Lines or Parquet table of texts → a :class:`~kdstore.pipeline.ingest.Source`.

Each row becomes ``{KEY.txt: the text as utf-8, KEY.cls: label id}``: the members
:mod:`kdstore.pipeline.text_corpus` writes, so the MiniLM teacher reads them unchanged.
Keys come from ``key_column`` (sanitized, unique) or the row index (``row-00000017``).
Labels: integers stay as they are, other values map to ids by sorted name (``classes.json``).
The used columns are read whole into memory (pyarrow), the rest of the file is not.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdstore.pipeline.ingest import BadItem, label_ids, unique_keys
from kdstore.store.errors import InputError

FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def _read(path: Path, fmt: str, columns: list[str]):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            names = pq.read_schema(path).names
            _check_columns(path, names, columns)
            return pq.read_table(path, columns=columns)
        if fmt == "csv":
            parse = pacsv.ParseOptions(delimiter="\t" if path.suffix.lower() == ".tsv" else ",", newlines_in_values=True)
            # text and key columns stay strings (a numeric-looking key keeps its zeros)
            convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns[:2]})
            table = pacsv.read_csv(path, parse_options=parse, convert_options=convert,
                                   read_options=pacsv.ReadOptions(block_size=1 << 24))
        else:
            table = pajson.read_json(path, read_options=pajson.ReadOptions(block_size=1 << 24))
        _check_columns(path, table.column_names, columns)
        return table.select(columns)
    except InputError:
        raise
    except (pa.ArrowInvalid, pa.ArrowKeyError, OSError) as exc:
        raise InputError(f"{path}: cannot read as {fmt} ({str(exc).splitlines()[0]})") from None


def _check_columns(path: Path, names: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in names]
    if missing:
        raise InputError(f"{path}: no column {missing[0]!r} (it has {', '.join(names)})")


class TableSource:
    """Rows of one table file; ``format`` is guessed from the suffix unless given."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        text_column: str,
        label_column: str | None = None,
        key_column: str | None = None,
        format: str | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such file")
        fmt = format or FORMATS.get(self.path.suffix.lower())
        if fmt not in ("csv", "jsonl", "parquet"):
            raise InputError(f"{self.path}: unknown table format; name it .csv, .jsonl or .parquet, or pass --format")
        # order matters for _read: text and key first (forced to strings in CSV)
        columns = list(dict.fromkeys(c for c in (text_column, key_column, label_column) if c))
        table = _read(self.path, fmt, columns)
        self.texts = table.column(text_column).to_pylist()
        self.row_keys = table.column(key_column).to_pylist() if key_column else None
        raw_keys = (
            [f"row-{i:08d}" if k is None else str(k) for i, k in enumerate(self.row_keys)]
            if key_column else [f"row-{i:08d}" for i in range(len(self.texts))]
        )
        self.keys = unique_keys(raw_keys, self.describe)
        if label_column:
            self.labels, self.classes = label_ids(table.column(label_column).to_pylist())
        else:
            self.labels, self.classes = [None] * len(self.texts), None
        stat = self.path.stat()
        self.fingerprint = {
            "kind": "table",
            "path": str(self.path.resolve()),
            "format": fmt,
            "bytes": stat.st_size,
            "rows": len(self.texts),
            "columns": {"text": text_column, "label": label_column, "key": key_column},
        }

    def describe(self, i: int) -> str:
        key = f" (key {self.row_keys[i]!r})" if self.row_keys is not None else ""
        return f"{self.path} row {i}{key}"

    def sample(self, i: int) -> dict:
        text = self.texts[i]
        if text is None:
            raise BadItem("no text (empty cell)")
        if not isinstance(text, str):
            raise BadItem(f"text is a {type(text).__name__}, not a string")
        sample = {"__key__": self.keys[i], "txt": text.encode("utf-8")}
        if self.labels[i] is not None:
            sample["cls"] = str(self.labels[i]).encode("ascii")
        return sample
