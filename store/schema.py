"""Store format v2: the JSON documents of a store and the names of its fields, as frozen dataclasses.

Each document is parsed and checked once when read (``from_json``, one small parse per
field) and trusted after: a :class:`TeacherSpec` holds :class:`OutputSpec` objects, never
the ``--output`` text. Stored field names come from :meth:`OutputSpec.fields`; the paths
and reserved array names are in :mod:`kdstore.store.layout`; the layout is documented in
``docs/FORMAT.md``.

To add an output kind: a branch in :meth:`OutputSpec.parse` / ``to_text`` / ``source`` /
``fields`` here, and its reduction in ``kdstore.pipeline.reduce.reduce_outputs``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from kdstore.store.atomic import read_json, write_json_atomic  # noqa: F401  (re-exported)
from kdstore.store.errors import InputError, StoreCorruptError
from kdstore.store.layout import LOCK_FILE, SAMPLES_FILE, STORE_FILE, TEACHERS_DIR, shard_name  # noqa: F401

FORMAT_VERSION = 2
# Versions this kdstore reads. Format 1 stores (rows planned by listing every shard before any
# teacher ran) are read as they are; precompute writes into format 2 stores only.
READABLE_VERSIONS = (1, 2)

# Stored field names (per row; with views V > 0 each gets a [V] axis after the row axis).
LOGITS = "logits"  # [C]
TOPK_VALUES = "topk/values"  # [K] teacher logits of the K largest
TOPK_INDICES = "topk/indices"  # [K] int32
TOPK_RESIDUAL = "topk/residual"  # [] probability mass outside the top K at the recorded temperature
EMBEDDING = "embedding"  # [D]
SCORES_ENTROPY = "scores/entropy"  # []
SCORES_MAX_PROB = "scores/max_prob"  # []
# Per-token (ragged) fields of the LM reduce ops ``tokens:topk:K`` / ``tokens:sample:S`` (each ``[sum(len_i), ...]``).
TOKENS_LOGITS = "tokens/logits"  # the teacher output both reduce ops read: [n_i, V] per sample
TOKENS_TOPK_LOGPROBS = "tokens/topk/logprobs"  # [K] float16 log-softmax at T, descending
TOKENS_TOPK_IDS = "tokens/topk/ids"  # [K] smallest unsigned int dtype holding V
TOKENS_TOPK_RESIDUAL = "tokens/topk/residual"  # [] float32 1 - sum of the top-K probabilities
TOKENS_TOPK_LSE = "tokens/topk/lse"  # [] float32 logsumexp(logits / T)
TOKENS_SAMPLE_IDS = "tokens/sample/ids"  # [S] distinct drawn ids, most frequent first, 0-padded
TOKENS_SAMPLE_COUNTS = "tokens/sample/counts"  # [S] uint8 draw counts (0 = padding)
TOKEN_REDUCE_OPS = ("topk", "sample")
POOLS = ("none", "mean", "flatten")
OUTPUT_KINDS = ("logits", "topk", "features", "embedding", "scores", "tokens")


def features_field(layer: str) -> str:
    """``features/LAYER``: a captured layer (also the teacher output name a hook fills)."""
    return f"features/{layer}"


def tokens_field(name: str) -> str:
    """``tokens/NAME``: a per-token (ragged) teacher output."""
    return f"tokens/{name}"


def scores_field(name: str) -> str:
    """``scores/NAME`` (``entropy`` or ``max_prob``)."""
    return f"scores/{name}"


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    """One requested output. ``kind`` is logits | topk | features | embedding | scores | tokens.

    ``temperature`` is the teacher's recorded temperature (``TeacherSpec`` fills it in when
    read; the top-k residual was computed at it). It is not part of the ``--output`` text.
    """

    kind: str
    k: int = 0
    layer: str = ""
    pool: str = "none"
    l2: bool = False
    temperature: float | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, text: str) -> "OutputSpec":
        parts = text.split(":")
        kind, args = parts[0], parts[1:]
        if kind in ("logits", "scores") and not args:
            return cls(kind=kind)
        if kind == "topk" and len(args) == 1 and args[0].isdigit() and int(args[0]) > 0:
            return cls(kind="topk", k=int(args[0]))
        if kind == "features" and 1 <= len(args) <= 2 and args[0]:
            pool = args[1] if len(args) == 2 else "none"
            if pool not in POOLS:
                raise InputError(f"--output {text}: pool must be one of {POOLS}")
            return cls(kind="features", layer=args[0], pool=pool)
        if kind == "tokens" and len(args) == 1 and args[0]:
            return cls(kind="tokens", layer=args[0])
        if kind == "tokens" and len(args) == 2 and args[0] in TOKEN_REDUCE_OPS and args[1].isdigit() and int(args[1]) > 0:
            if args[0] == "sample" and int(args[1]) > 255:
                raise InputError(f"--output {text}: at most 255 draws per token (counts are stored as uint8)")
            return cls(kind="tokens", layer=args[0], k=int(args[1]))
        if kind == "embedding" and len(args) <= 2:
            l2 = bool(args) and args[-1] == "l2"
            if args and args[-1] in ("l2", "raw"):
                args = args[:-1]
            if len(args) <= 1:
                return cls(kind="embedding", layer=args[0] if args else "", l2=l2)
        raise InputError(
            f"--output {text!r} not understood; use logits | topk:K | features:LAYER[:none|mean|flatten] "
            "| embedding[:LAYER][:l2] | scores | tokens:NAME | tokens:topk:K | tokens:sample:S"
        )

    def to_text(self) -> str:
        if self.kind == "topk":
            return f"topk:{self.k}"
        if self.kind == "features":
            return f"features:{self.layer}:{self.pool}"
        if self.kind == "tokens":
            return f"tokens:{self.layer}:{self.k}" if self.token_reduce else f"tokens:{self.layer}"
        if self.kind == "embedding":
            return ":".join(["embedding", *([self.layer] if self.layer else []), *(["l2"] if self.l2 else [])])
        return self.kind

    @property
    def token_reduce(self) -> str:
        """``"topk"`` / ``"sample"`` for the per-token LM reduce ops (``k`` = K or S), else ``""``."""
        return self.layer if self.kind == "tokens" and self.k > 0 else ""

    @property
    def source(self) -> str:
        """The teacher output this spec reads."""
        if self.kind in ("logits", "topk", "scores"):
            return LOGITS
        if self.token_reduce:
            return TOKENS_LOGITS
        if self.kind == "tokens":
            return tokens_field(self.layer)
        if self.kind == "features" or (self.kind == "embedding" and self.layer):
            return features_field(self.layer)
        return EMBEDDING

    def fields(self) -> list[str]:
        """The stored fields this output writes, in a fixed order (top-k: values, indices, residual).

        ``tokens:topk:K``: logprobs, ids, residual, lse; ``tokens:sample:S``: ids, counts.
        """
        if self.token_reduce == "topk":
            return [TOKENS_TOPK_LOGPROBS, TOKENS_TOPK_IDS, TOKENS_TOPK_RESIDUAL, TOKENS_TOPK_LSE]
        if self.token_reduce == "sample":
            return [TOKENS_SAMPLE_IDS, TOKENS_SAMPLE_COUNTS]
        return {
            "logits": [LOGITS],
            "topk": [TOPK_VALUES, TOPK_INDICES, TOPK_RESIDUAL],
            "features": [features_field(self.layer)],
            "embedding": [EMBEDDING],
            "scores": [SCORES_ENTROPY, SCORES_MAX_PROB],
            "tokens": [tokens_field(self.layer)],
        }[self.kind]


def _require(doc: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in doc]
    if missing:
        raise StoreCorruptError(f"{what} lacks {missing}")


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    """One input shard and the contiguous rows it owns: ``[row_start, row_start + num_rows)``.

    In a format 2 store ``index`` is the shard's position in ``input_urls``. A worker's shard
    before the store's rows are numbered has ``row_start=None`` (it never needs it).
    """

    index: int
    url: str
    row_start: int | None
    num_rows: int

    @property
    def row_stop(self) -> int:
        if self.row_start is None:
            raise ValueError(f"shard {self.index} has no row numbers yet (earlier shards are not listed)")
        return self.row_start + self.num_rows

    @property
    def name(self) -> str:
        return shard_name(self.index)


@dataclass(frozen=True, kw_only=True)
class StoreManifest:
    """The numbered rows of a store: ``shards`` own ``[row_start, row_stop)``, in input order.

    Format 1: ``store.json`` as written before any teacher ran. Format 2: ``store.json`` once
    sealed (every input shard listed), else assembled by the reader from the per-shard
    listings (:mod:`kdstore.store.listing`): then ``shards`` are the numbered prefix and
    ``input_fingerprint`` is ``""`` until every shard is listed.
    """

    format_version: int
    kdstore_version: str
    num_rows: int
    input_fingerprint: str
    input_urls: tuple[str, ...]
    shards: tuple[ShardInfo, ...]
    skipped_shards: tuple[dict, ...] = ()
    # "store": relative local paths are relative to the store folder (stores planned since
    # absolute paths were recorded); "cwd": relative to where precompute ran (older stores).
    paths_relative_to: str = "cwd"

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["shards"] = [asdict(s) for s in self.shards]
        doc["input_urls"] = list(self.input_urls)
        doc["skipped_shards"] = list(self.skipped_shards)
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> "StoreManifest":
        _require(doc, ("format_version", "num_rows", "shards", "input_fingerprint", "input_urls"), "store.json")
        check_format_version(doc)
        shards = tuple(ShardInfo(**s) for s in doc["shards"])
        expected = 0
        for s in shards:
            if s.row_start != expected:
                raise StoreCorruptError(f"store.json: shard {s.index} starts at row {s.row_start}, expected {expected}")
            expected = s.row_stop
        if expected != doc["num_rows"]:
            raise StoreCorruptError(f"store.json: shards cover {expected} rows but num_rows is {doc['num_rows']}")
        return cls(
            format_version=doc["format_version"],
            kdstore_version=doc.get("kdstore_version", "?"),
            num_rows=doc["num_rows"],
            input_fingerprint=doc["input_fingerprint"],
            input_urls=tuple(doc["input_urls"]),
            shards=shards,
            skipped_shards=tuple(doc.get("skipped_shards", ())),
            paths_relative_to=doc.get("paths_relative_to", "cwd"),
        )


def check_format_version(doc: dict) -> int:
    """``store.json``'s format version, refused (one line saying what to do) when unreadable."""
    version = doc.get("format_version")
    if version not in READABLE_VERSIONS:
        raise StoreCorruptError(
            f"store format_version {version} is not supported by this kdstore (reads {', '.join(map(str, READABLE_VERSIONS))}); "
            "use the kdstore version that wrote the store (store.json's kdstore_version)"
        )
    return int(version)


def _parse_outputs(texts: Any) -> tuple[OutputSpec, ...]:
    if not isinstance(texts, list) or not texts:
        raise StoreCorruptError(f"teacher.json: outputs must be a non-empty list, got {texts!r}")
    try:
        return tuple(OutputSpec.parse(str(t)) for t in texts)
    except InputError as exc:
        raise StoreCorruptError(f"teacher.json: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class TeacherSpec:
    """``teachers/NAME/teacher.json``: what was asked of the teacher. Never changes."""

    name: str
    fingerprint: str
    factory: str
    input_key: str
    outputs: tuple[OutputSpec, ...]
    temperature: float
    dtype: str
    views: int = 0
    augment: str = ""
    seed: int = 0
    layers: tuple[str, ...] = ()
    factory_args: dict[str, Any] = field(default_factory=dict)
    transform: str = ""  # image preprocessing before the teacher (kdstore.pipeline.transform); "" = none
    # The generator behind ``tokens:sample:S`` draws (kdstore.pipeline.token_reduce.SAMPLER);
    # "" without sample outputs, and in stores written before it was recorded. Compared: a
    # resumed precompute must not mix the draws of two samplers.
    sampler: str = ""
    # Recorded, never compared: the class names the teacher declares (``class_names``; logit i is
    # class_names[i]) and the inputs' label names at precompute (their classes.json; label id i).
    class_names: tuple[str, ...] = ()
    label_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Text is accepted when building a spec by hand; each output carries the temperature.
        parsed = tuple(o if isinstance(o, OutputSpec) else OutputSpec.parse(o) for o in self.outputs)
        object.__setattr__(
            self, "outputs", tuple(dataclasses.replace(o, temperature=float(self.temperature)) for o in parsed)
        )

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["outputs"] = [o.to_text() for o in self.outputs]
        doc["layers"] = list(self.layers)
        doc["class_names"] = list(self.class_names)
        doc["label_names"] = list(self.label_names)
        if not self.sampler:
            del doc["sampler"]
        return doc

    def fields(self) -> list[str]:
        """Every stored field of this teacher, in output order."""
        return [f for o in self.outputs for f in o.fields()]

    def output(self, name: str) -> OutputSpec:
        """The output of kind ``name`` (``"topk"``) or the one writing field ``name`` (``"topk/values"``).

        ``spec.output("topk").temperature`` is the temperature the residual was computed at.
        """
        for o in self.outputs:
            if o.kind == name or name in o.fields():
                return o
        raise InputError(
            f"teacher {self.name} has no output {name!r}; it stores {[o.to_text() for o in self.outputs]}"
        )

    @classmethod
    def from_json(cls, doc: dict) -> "TeacherSpec":
        _require(doc, ("name", "fingerprint", "outputs", "temperature", "dtype"), "teacher.json")
        return cls(
            name=doc["name"],
            fingerprint=doc["fingerprint"],
            factory=doc.get("factory", ""),
            input_key=doc.get("input_key", ""),
            outputs=_parse_outputs(doc["outputs"]),
            temperature=float(doc["temperature"]),
            dtype=doc["dtype"],
            views=int(doc.get("views", 0)),
            augment=doc.get("augment", ""),
            seed=int(doc.get("seed", 0)),
            layers=tuple(doc.get("layers", ())),
            factory_args=dict(doc.get("factory_args", {})),
            transform=doc.get("transform", ""),
            sampler=doc.get("sampler", ""),
            class_names=tuple(doc.get("class_names", ())),
            label_names=tuple(doc.get("label_names", ())),
        )

    def differences(self, other: "TeacherSpec") -> list[str]:
        """Names of the settings that make ``other`` a different precompute.

        The factory path and arguments are recorded but not compared (weights may move, a
        delay may change): the fingerprint is what identifies the teacher's outputs, so a
        Teacher whose outputs depend on an argument folds it into its fingerprint (the
        MiniLM teacher does so with ``max_seq_length``).
        """
        keys = ("fingerprint", "input_key", "outputs", "temperature", "dtype", "views", "augment", "seed", "transform",
                "sampler")
        return [k for k in keys if getattr(self, k) != getattr(other, k)]


@dataclass(frozen=True, kw_only=True)
class FieldSpec:
    """One stored field: ``shape`` is per row (without the row axis); ``sha256`` of one shard's bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    sha256: str = ""
    nbytes_disk: int = 0
    ragged: bool = False  # per-token: ``shape`` is per token, rows via ``NAME.offsets``


@dataclass(frozen=True, kw_only=True)
class DoneRecord:
    """``teachers/NAME/done/SHARD.json``: written last, after the shard's arrays are in place.

    Format 2: ``row_start`` is None (rows are numbered from the listings, not by the worker)
    and each ``skipped`` entry holds ``index_in_shard`` instead of the store ``row``.
    """

    shard: int
    url: str
    row_start: int | None
    num_rows: int
    teacher_fingerprint: str
    fields: dict[str, FieldSpec]
    skipped: tuple[dict, ...] = ()
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["fields"] = {k: {**asdict(v), "shape": list(v.shape)} for k, v in self.fields.items()}
        doc["skipped"] = list(self.skipped)
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> "DoneRecord":
        _require(doc, ("shard", "url", "num_rows", "teacher_fingerprint", "fields"), "done record")
        return cls(
            shard=doc["shard"],
            url=doc["url"],
            row_start=doc.get("row_start"),
            num_rows=doc["num_rows"],
            teacher_fingerprint=doc["teacher_fingerprint"],
            fields={k: FieldSpec(**{**v, "shape": tuple(v["shape"])}) for k, v in doc["fields"].items()},
            skipped=tuple(doc.get("skipped", ())),
            seconds=float(doc.get("seconds", 0.0)),
            extra=dict(doc.get("extra", {})),
        )
