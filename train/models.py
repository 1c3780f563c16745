"""Students and the module the recipe trains (:func:`build_model`).

The presets (``[model] arch = "mlp" | "cnn"``) are a :class:`Classifier` — a ``body``
producing an embedding ``[b, d]`` and a linear ``head`` — so their dual-head variant (DHO) is
one more linear layer on the same body. Any other ``nn.Module`` comes from ``[model] factory``
(:mod:`kdstore.train.student`). Either way :class:`DistillModel` adds what the loss terms
train beside the student: a projector per projector term, a router per routed term, and a
forward hook on each named layer the terms read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from kdstore.store.errors import InputError


class Classifier(nn.Module):
    """``x [b, C, H, W]`` → ``{"logits": [b, k], "embedding": [b, d]}`` (+ ``"kd_logits"`` when dual-head).

    Args:
        body: maps the input to ``[b, embed_dim]``.
        embed_dim: d.
        num_classes: k.
        dual_head: add ``kd_head`` (DHO: the CE head learns from labels, the KD head from the teacher).
    """

    def __init__(self, body: nn.Module, embed_dim: int, num_classes: int, dual_head: bool = False) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(embed_dim, num_classes)
        self.kd_head = nn.Linear(embed_dim, num_classes) if dual_head else None
        self.embed_dim = embed_dim

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.body(x)
        out = {"logits": self.head(z), "embedding": z}
        if self.kd_head is not None:
            out["kd_logits"] = self.kd_head(z)
        return out


def mlp(input_shape: Sequence[int], hidden: int, num_classes: int, dual_head: bool = False) -> Classifier:
    """``flatten → Linear(prod(input_shape), hidden) → ReLU`` body; layer names ``fc``, ``act``."""
    size = 1
    for d in input_shape:
        size *= int(d)
    body = nn.Sequential()
    body.add_module("flatten", nn.Flatten())
    body.add_module("fc", nn.Linear(size, hidden))
    body.add_module("act", nn.ReLU())
    return Classifier(body, hidden, num_classes, dual_head)


def tiny_cnn(input_shape: Sequence[int], width: int, num_classes: int, dual_head: bool = False) -> Classifier:
    """Two conv blocks ``conv1``, ``conv2`` (conv3x3 → BN → ReLU → maxpool 2), then ``embed`` (Linear → ReLU, 4·width)."""
    c, h, w = (int(d) for d in input_shape)
    body = nn.Sequential()
    for name, (cin, cout) in (("conv1", (c, width)), ("conv2", (width, 2 * width))):
        body.add_module(name, nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)))
    body.add_module("flatten", nn.Flatten())
    embed = 4 * width
    body.add_module("embed", nn.Sequential(nn.Linear(2 * width * (h // 4) * (w // 4), embed), nn.ReLU()))
    return Classifier(body, embed, num_classes, dual_head)


def build_student(arch: str, input_shape: Sequence[int], num_classes: int, *, hidden: int = 32, width: int = 16,
                  dual_head: bool = False) -> Classifier:
    """A student by name: ``mlp`` (784-hidden-k on Fashion-MNIST) or ``cnn``."""
    if arch == "mlp":
        return mlp(input_shape, hidden, num_classes, dual_head)
    if arch == "cnn":
        if len(input_shape) != 3:
            raise InputError(f"model.arch cnn needs image inputs [C, H, W], got {tuple(input_shape)}")
        return tiny_cnn(input_shape, width, num_classes, dual_head)
    from kdstore.train.text_models import TEXT_ARCHS, build_text_student  # text presets (train/text_models.py)

    if arch in TEXT_ARCHS:
        return build_text_student(arch, input_shape, num_classes, hidden=hidden, dual_head=dual_head)
    raise InputError(f"model.arch must be mlp, cnn, bag or text_transformer, got {arch!r}")


class FeatureTap:
    """Capture the outputs of named submodules on every forward (for feature matching).

    ``tap = FeatureTap(model, ["body.fc"])``; after ``model(x)``, ``tap.features["body.fc"]``
    is that layer's output ``[b, ...]`` (with its graph, so a loss on it trains the layer; a
    tuple output gives its first element). An unknown name raises, listing close matches.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        from kdstore.train.student import find_layer

        self.features: dict[str, Tensor] = {}
        self._handles = [find_layer(model, layer, "loss student_layer").register_forward_hook(self._hook(layer))
                         for layer in layers]

    def _hook(self, name: str):
        def store(module: nn.Module, args: tuple, output: Any) -> None:
            from kdstore.train.student import layer_output

            self.features[name] = layer_output(output)

        return store

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def tap_root(student: nn.Module) -> nn.Module:
    """The module whose layer names the config uses: a factory student's own module, else the student."""
    from kdstore.train.student import FactoryStudent

    return student.net if isinstance(student, FactoryStudent) else student


# --------------------------------------------------------------------------- student + term modules


class DistillModel(nn.Module):
    """The student plus the modules its loss terms train: everything DDP syncs.

    ``forward(x [b, ...])`` returns the student's outputs (``logits [b, k]``, ``embedding
    [b, d]`` when it has one, ``kd_logits`` with DHO) and, for each term ``i`` that reads a
    student tensor, ``proj/<i>`` = that term's module (a ``Projector``, ``nn.Identity`` or a
    ``TeacherRouter``) applied to its source: a key of the student's output dict
    (``embedding``, ``logits``) or the output of a named layer (hooked).

    ``record``: plain values saying how to rebuild the student (:func:`kdstore.train.load_student`).
    """

    def __init__(self, student: nn.Module, taps: dict[int, str], projectors: dict[int, nn.Module],
                 record: dict | None = None, flatten: Sequence[int] = ()) -> None:
        super().__init__()
        self.student = student
        self.taps = taps
        self.projectors = nn.ModuleDict({str(i): p for i, p in projectors.items()})
        self.record = dict(record or {})
        self.flatten = frozenset(flatten)
        self._layers = sorted({layer for layer in taps.values() if layer not in _OUTPUT_KEYS})
        self._tap = FeatureTap(tap_root(student), self._layers) if self._layers else None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.student(x)
        for i, layer in self.taps.items():
            feat = self._tap.features[layer] if layer in self._layers else out[layer]
            if i in self.flatten:
                feat = feat.flatten(1)
            out[f"proj/{i}"] = self.projectors[str(i)](feat)
        return out


# Sources a term reads from the student's output dict rather than from a hooked layer.
_OUTPUT_KEYS = ("embedding", "logits")


def build_model(cfg, input_shape: Sequence[int], num_classes: int, teacher_shapes: dict,
                sample: Tensor | None = None) -> DistillModel:
    """The student of ``cfg.model`` and the modules of ``cfg.loss``'s terms, read from the loss-kind table.

    The student is a preset (``arch``) or the ``factory``'s module; a DHO term adds the second
    head. One dry run (eval mode, no gradients) on ``sample`` (a real input batch ``[b, ...]``;
    default: zeros ``[2, *input_shape]``) checks the output and sizes every projector and router.
    ``teacher_shapes``: ``{teacher: {field: per-row shape}}``.
    """
    from kdstore.train.losses import Projector, TeacherRouter
    from kdstore.train.objective import KINDS, target_field
    from kdstore.train.student import FactoryStudent, call_factory, dry_run, dummy_batch, find_layer

    m = cfg.model
    sample = dummy_batch(input_shape) if sample is None else sample
    if m.factory:
        from kdstore.train.student import resolve_factory

        net = call_factory(m.factory, m.args, num_classes=num_classes, input_shape=input_shape)
        student = FactoryStudent(net, m.embedding)
        record = {"factory": m.factory, "factory_file": resolve_factory(m.factory)[1], "args": dict(m.args),
                  "embedding": m.embedding, "kd_head": None}
    else:
        student = build_student(m.arch, input_shape, num_classes, hidden=m.hidden, width=m.width,
                                dual_head=cfg.dual_head)
        record = {"arch": m.arch, "hidden": m.hidden, "width": m.width, "dual_head": cfg.dual_head}
    record.update(input_shape=[int(d) for d in input_shape], num_classes=int(num_classes))
    if getattr(input_shape, "vocab_size", None) is not None:  # text: the token embedding's size
        record["vocab_size"] = int(input_shape.vocab_size)

    sources = {i: _source(term, KINDS[term.kind]) for i, term in enumerate(cfg.loss)}
    sources = {i: s for i, s in sources.items() if s is not None}
    layers = sorted({s for s in sources.values() if s not in _OUTPUT_KEYS})
    for i, layer in sources.items():
        if layer not in _OUTPUT_KEYS:
            setting = "router_input" if KINDS[cfg.loss[i].kind].student == "router" else "student_layer"
            find_layer(tap_root(student), layer, f"loss.{i} ({cfg.loss[i].kind}) {setting}")
    out_shapes, layer_shapes = dry_run(student, tap_root(student), layers, sample)
    _check_outputs(cfg, out_shapes, num_classes)
    if m.factory and m.embedding != "embedding" and "embedding" not in out_shapes:
        from kdstore.train.student import find_layer

        find_layer(tap_root(student), m.embedding, f"model.embedding (not a key of the student's output "
                                                   f"{sorted(out_shapes)})")
    if m.factory and cfg.dual_head:  # the DHO head on the factory student's embedding
        (d,) = _embedding_shape(out_shapes, "the dho term", m)
        student.kd_head = nn.Linear(d, num_classes)
        record["kd_head"] = [d, num_classes]

    taps, modules, flat = {}, {}, []
    for i, layer in sources.items():
        term, kind = cfg.loss[i], KINDS[cfg.loss[i].kind]
        what = f"loss.{i} ({term.kind})"
        if layer in _OUTPUT_KEYS:
            s_shape = out_shapes.get(layer) or _embedding_shape(out_shapes, what, m)
        else:
            s_shape = layer_shapes[layer]
        if kind.student == "projector":
            t_shape = teacher_shapes[term.teacher][target_field(term)]
            try:
                modules[i] = Projector(s_shape, t_shape)
            except ValueError as exc:
                raise InputError(f"{what}: {exc}") from None
        elif kind.student == "router":
            d = 1
            for n in s_shape:
                d *= int(n)
            modules[i] = TeacherRouter(d, len(term.teachers), term.router_hidden or None)
            flat.append(i)
        else:  # "layer": the tensor as it is
            modules[i] = nn.Identity()
        taps[i] = layer
    return DistillModel(student, taps, modules, record, flat)


def _source(term, kind) -> str | None:
    if kind.student in ("projector", "layer"):
        return term.student_layer
    if kind.student == "router":
        return term.router_input
    return None


def _embedding_shape(out_shapes: dict, what: str, m) -> tuple[int, ...]:
    shape = out_shapes.get("embedding")
    if shape is None:
        keys = sorted(out_shapes)
        raise InputError(
            f"{what} needs the student's embedding, but its output has none (keys {keys}): return a dict with "
            f"'embedding', or set model.embedding to an output key or a layer name"
            + ("" if m.embedding == "embedding" else f" (model.embedding = {m.embedding!r} is neither)"))
    if len(shape) != 1:
        raise InputError(f"{what}: the student's embedding must be [b, d], got [b, {', '.join(map(str, shape))}]")
    return shape


def _check_outputs(cfg, out_shapes: dict, num_classes: int) -> None:
    from kdstore.train.objective import KINDS

    logit_terms = sorted({t.kind for t in cfg.loss if KINDS[t.kind].reads_logits})
    if not logit_terms:
        return
    shape = out_shapes.get("logits")
    if shape is None:
        raise InputError(
            f"the student's output has no 'logits' (a dict with keys {sorted(out_shapes)}), but loss "
            f"{'/'.join(logit_terms)} trains them: return the logits [b, k], or a dict with 'logits'")
    if shape != (num_classes,):
        raise InputError(f"the student's logits are [b, {', '.join(map(str, shape))}], but the store's teachers / "
                         f"labels have {num_classes} classes: build it with num_classes={num_classes}")
