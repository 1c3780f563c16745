"""The training config: frozen, keyword-only dataclasses parsed and validated once.

A config is one TOML file (YAML too, when PyYAML is installed) with the sections
``[data]``, ``[model]``, ``[optim]``, ``[train]``, ``[online]`` and a list ``[[loss]]``;
``--set section.field=value`` overrides a field (``--set loss.1.temperature=2`` indexes
the loss list). Every field is documented in ``docs/TRAINING.md``. Unknown names and bad
values raise :class:`InputError` naming the field and what it accepts.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdstore.pipeline.transform import TransformSpec
from kdstore.store.errors import InputError
from kdstore.train.labels import LabelsSpec
from kdstore.train.objective import KINDS, LOSS_KINDS, check_term, check_terms, term_fields

__all__ = ["LOSS_KINDS", "Config", "DataConfig", "LabelsSpec", "LossConfig", "ModelConfig", "OnlineConfig", "OptimConfig",
           "TrainConfig", "apply_overrides", "load_config", "parse_config", "read_config_file"]
ARCHS = ("mlp", "cnn", "bag", "text_transformer", "gpt")  # gpt: the LM student (kdstore.train.lm_train)
SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "sgd")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where samples and targets come from and how they are streamed."""

    store: str
    train_shards: tuple[str, ...] = ("train-",)
    eval_shards: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    inputs_root: str = ""  # the folder that now holds the store's input shards, when they moved
    input_key: str = ""
    labels: LabelsSpec = LabelsSpec()  # TOML text all | none | per_class:N | count:N | keys:PATH
    labels_seed: int = 0
    only_labeled: bool = False
    batch_size: int = 256
    shuffle_buffer: int = 4096
    workers: int = 0
    cache: bool = False
    verify_inputs: str = "full"
    transform: str = "store"  # images: "store" (the teacher's recorded --transform), "none", or a transform
    tokenizer: str = ""  # text: "minilm" or a tokenizer.json path; "" = the teacher's (MiniLM)
    max_length: int = 128  # text: tokens per document, at most

    def __post_init__(self) -> None:
        _check(self.max_length >= 2, "data.max_length must be >= 2")
        if self.transform not in ("store", "none"):
            TransformSpec.parse(self.transform)  # raises naming the bad step
        _check(self.batch_size > 0, "data.batch_size must be > 0")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer must be >= 1 (1 = no shuffling within a shard)")
        _check(self.workers >= 0, "data.workers must be >= 0")
        _check(bool(self.train_shards), "data.train_shards must name at least one shard (index, URL substring or A..B)")
        _check(self.verify_inputs in ("full", "quick", "off"),
               f"data.verify_inputs must be full, quick or off, got {self.verify_inputs!r}")
        if not isinstance(self.labels, LabelsSpec):  # the text, from Python: parsed here, once
            object.__setattr__(self, "labels", LabelsSpec.parse(self.labels))


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The student: a preset (``arch``: ``mlp`` = flatten → Linear(hidden) → ReLU → Linear;
    ``cnn`` = two conv blocks) or any ``nn.Module`` from ``factory`` called with ``args``
    (:mod:`kdstore.train.student`); ``embedding`` = where a factory student's embedding is."""

    arch: str = "mlp"
    hidden: int = 32
    width: int = 16
    factory: str = ""  # package.module:function or path/to/file.py:function
    args: dict = field(default_factory=dict)
    embedding: str = "embedding"  # factory students: an output dict key or a layer name
    dho_alpha: float = 0.5
    dho_beta: float = 1.0
    depth: int = 2  # gpt: transformer blocks (width = model.width, heads = model.heads)
    heads: int = 4

    def __post_init__(self) -> None:
        _check(self.arch in ARCHS, f"model.arch must be one of {ARCHS}, got {self.arch!r}")
        _check(not self.factory or ":" in self.factory,
               f"model.factory must look like package.module:function or path/to/file.py:function, got {self.factory!r}")
        _check(bool(self.factory) or (not self.args and self.embedding == "embedding"),
               "model.args and model.embedding apply to a factory student: set model.factory, or drop them")
        _check(not self.factory or (self.arch, self.hidden, self.width) == ("mlp", 32, 16),
               "model.arch, hidden and width describe the preset students; a model.factory student replaces them: "
               "drop them (pass sizes in model.args)")
        _check(bool(self.embedding), "model.embedding must name an output key or a layer")
        _check(self.hidden > 0 and self.width > 0, "model.hidden and model.width must be > 0")
        _check(0.0 <= self.dho_alpha <= 1.0, "model.dho_alpha must be in [0, 1]")
        _check(self.dho_beta > 0, "model.dho_beta must be > 0")
        _check(self.depth > 0 and self.heads > 0 and (self.arch != "gpt" or self.width % self.heads == 0),
               "model.depth and model.heads must be > 0 (gpt: model.width divisible by model.heads)")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        _check(self.name in OPTIMIZERS, f"optim.name must be one of {OPTIMIZERS}, got {self.name!r}")
        _check(self.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(self.lr > 0, "optim.lr must be > 0")
        _check(self.weight_decay >= 0 and self.warmup_steps >= 0 and self.grad_clip >= 0,
               "optim.weight_decay, optim.warmup_steps and optim.grad_clip must be >= 0")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How long, where to write, how often to checkpoint / log / evaluate."""

    out_dir: str = "runs/train"
    epochs: int = 10
    steps: int = 0
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    amp: str = "auto"
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 2
    log_every_steps: int = 50
    eval_every_epochs: int = 1
    deterministic: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.epochs > 0 or self.steps > 0, "train.epochs or train.steps must be > 0")
        _check(self.steps >= 0, "train.steps must be >= 0 (0 = epochs × steps per epoch)")
        _check(self.amp in ("auto", "on", "off"), f"train.amp must be auto, on or off, got {self.amp!r}")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               f"train.device must be auto, cpu or cuda[:N], got {self.device!r}")
        _check(self.checkpoint_every_steps >= 0 and self.log_every_steps > 0 and self.eval_every_epochs >= 0,
               "train.checkpoint_every_steps and train.eval_every_epochs must be >= 0, train.log_every_steps > 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        _check(self.threads >= 0, "train.threads must be >= 0 (0 = torch's default)")


@dataclass(frozen=True, kw_only=True)
class OnlineConfig:
    """Online KD baseline: run the teacher in the loop on fresh augmentations (``kdstore.train.online``)."""

    enabled: bool = False
    teacher: str = ""
    factory: str = ""
    teacher_args: dict = field(default_factory=dict)
    layers: tuple[str, ...] = ()
    augment: str = ""
    check_fingerprint: bool = True

    def __post_init__(self) -> None:
        _check(not self.enabled or bool(self.factory), "online.factory (package.module:factory) is required when online.enabled")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """One weighted term of the objective; which fields apply depends on ``kind`` (docs/TRAINING.md)."""

    kind: str
    weight: float = 1.0
    teacher: str = ""
    teachers: tuple[str, ...] = ()
    temperature: float | None = None  # None: the stored one (topk_kd), else 1.0
    alpha: float = 0.5
    field: str = ""
    student_layer: str = "embedding"
    metric: str = "mse"
    sample_weights: str = ""
    weight_power: float = 1.0
    combine: str = "fixed"
    teacher_weights: tuple[float, ...] = ()
    tau: float = 1.0
    negatives: str = ""  # contrastive: STORE/negatives/NAME.parquet from `kdstore mine`
    teacher_temperature: float | None = None  # ranking: of the teacher's scores (None: temperature)
    router_input: str = "logits"  # routed_kd: what the router reads (logits, embedding or a layer)
    router_hidden: int = 0  # routed_kd: hidden width (0: 2 × its input)
    top_k: int = 0  # routed_kd: keep the k best-routed teachers per row; token_topk_kd: use the first k stored (0: all)
    balance_weight: float = 0.01  # routed_kd: load-balancing term
    renormalize: bool = False  # token_topk_kd: the common renormalised top-k (residual dropped; a biased baseline)

    def __post_init__(self) -> None:
        kinds = ", ".join(LOSS_KINDS)
        _check(self.kind in KINDS, f"loss.kind must be one of {kinds}, got {self.kind!r}")
        _check(self.weight >= 0, f"loss {self.kind}: weight must be >= 0")
        _check(self.temperature is None or self.temperature > 0, f"loss {self.kind}: temperature must be > 0")
        _check(0.0 <= self.alpha <= 1.0, f"loss {self.kind}: alpha must be in [0, 1]")
        _check(self.metric in ("mse", "cosine"), f"loss {self.kind}: metric must be mse or cosine")
        _check(self.sample_weights in ("", "max_prob", "entropy"),
               f"loss {self.kind}: sample_weights must be '', max_prob or entropy, got {self.sample_weights!r}")
        _check(self.combine in ("fixed", "confidence"), f"loss {self.kind}: combine must be fixed or confidence")
        _check(self.teacher_temperature is None or self.teacher_temperature > 0,
               f"loss {self.kind}: teacher_temperature must be > 0")
        _check(self.router_hidden >= 0 and self.balance_weight >= 0,
               f"loss {self.kind}: router_hidden and balance_weight must be >= 0")
        _check(self.top_k >= 0 and (self.kind != "routed_kd" or self.top_k <= max(1, len(self.teachers))),
               f"loss {self.kind}: top_k must be in [0, number of teachers] (0 = all), got {self.top_k}")
        check_term(self, _check)
        _check(not self.teacher_weights or len(self.teacher_weights) == len(self.teachers),
               "loss multi_kd: teacher_weights needs one weight per teacher")

    @property
    def teacher_names(self) -> tuple[str, ...]:
        return self.teachers if KINDS[self.kind].teachers == "many" else ((self.teacher,) if self.teacher else ())


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole training run."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    loss: tuple[LossConfig, ...] = (LossConfig(kind="ce"),)

    def __post_init__(self) -> None:
        _check(bool(self.loss), "give at least one [[loss]] term")
        check_terms(self.loss, _check)

    @property
    def dual_head(self) -> bool:
        return any(KINDS[t.kind].second_head for t in self.loss)

    def teachers(self) -> dict[str, set[str]]:
        """Stored fields each teacher must provide: ``{teacher: {field, ...}}``."""
        need: dict[str, set[str]] = {}
        for term in self.loss:
            for name in term.teacher_names:
                need.setdefault(name, set()).update(term_fields(term))
        return need

    def to_dict(self) -> dict:
        doc = _plain(dataclasses.asdict(self))
        doc["data"]["labels"] = str(self.data.labels)
        return doc

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


# --------------------------------------------------------------------------- parsing


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:  # X | None
        return None if value is None else _coerce(value, next(a for a in args if a is not type(None)), where)
    if hint is LabelsSpec and isinstance(value, (str, LabelsSpec)):
        return LabelsSpec.parse(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    if hint is dict and isinstance(value, dict):
        return dict(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        inner = typing.get_args(hint)[0]
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is tuple and isinstance(value, (str, int, float)):
        return _coerce([value], hint, where)
    name = getattr(hint, "__name__", str(hint))
    raise InputError(f"{where} must be {name}, got {value!r}")


def _build(cls: type, doc: Any, where: str) -> Any:
    if not isinstance(doc, dict):
        raise InputError(f"{where} must be a table of settings, got {doc!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise InputError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in doc.items():
        hint = hints[name]
        if hint is LossConfig or typing.get_origin(hint) is tuple and typing.get_args(hint)[0] is LossConfig:
            continue
        if dataclasses.is_dataclass(hint) and hint is not LabelsSpec:
            kwargs[name] = _build(hint, value, f"{where}.{name}" if where else name)
        else:
            kwargs[name] = _coerce(value, hint, f"{where}.{name}" if where else name)
    if cls is Config and "loss" in doc:
        terms = doc["loss"]
        if not isinstance(terms, list):
            raise InputError("loss must be a list of tables ([[loss]] in TOML)")
        kwargs["loss"] = tuple(_build(LossConfig, t, f"loss.{i}") for i, t in enumerate(terms))
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if missing:
        raise InputError(f"{where or 'config'}: missing required setting(s) {missing}")
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax when it parses (numbers, booleans, lists), else a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(doc: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b=value`` overrides to a raw config document (a deep copy is returned)."""
    import copy

    doc = copy.deepcopy(doc)
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise InputError(f"--set must look like section.field=value, got {item!r}")
        parts = path.strip().split(".")
        node: Any = doc
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise InputError(f"--set {item}: {'.'.join(parts[:i])} has {len(node)} entries, no {part!r}")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            raise InputError(f"--set {item}: name a field of one list entry, e.g. {path}.0.weight")
        node[last] = _parse_value(text.strip())
    return doc


def read_config_file(path: str | Path) -> dict:
    """The raw document of a ``.toml`` (or, with PyYAML installed, ``.yaml``/``.yml``) file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} not found")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise InputError(f"{path}: YAML configs need PyYAML (pip install pyyaml); or use TOML") from None
        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: invalid YAML ({exc})") from None
    elif path.suffix == ".toml":
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{path}: invalid TOML ({exc})") from None
    else:
        raise InputError(f"config file {path} must end in .toml, .yaml or .yml")
    if not isinstance(doc, dict):
        raise InputError(f"{path}: the top level must be a table")
    return doc


def parse_config(doc: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Validate a raw document (after ``overrides``) into a :class:`Config`."""
    return _build(Config, apply_overrides(doc, overrides), "")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate a config file."""
    return parse_config(read_config_file(path), overrides)
