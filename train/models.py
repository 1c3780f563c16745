"""Students: a small MLP and a tiny CNN, a second head for DHO, a feature tap, and the
student-plus-projectors module the recipe trains (:func:`build_model`).

Every student is a :class:`Classifier` — a ``body`` producing an embedding ``[b, d]`` and a
linear ``head`` — so the dual-head variant (DHO) is one more linear layer on the same body,
and any named layer of the body can be tapped for feature matching.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
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
    is that layer's output ``[b, ...]`` (with its graph, so a loss on it trains the layer).
    ``"embedding"`` needs no hook: :class:`Classifier` returns it.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        self.features: dict[str, Tensor] = {}
        named = dict(model.named_modules())
        self._handles = []
        for layer in layers:
            if layer not in named:
                known = [n for n in named if n]
                raise InputError(f"the student has no layer {layer!r}; it has {known}")
            self._handles.append(named[layer].register_forward_hook(self._hook(layer)))

    def _hook(self, name: str):
        def store(module: nn.Module, args: tuple, output: Tensor) -> None:
            self.features[name] = output

        return store

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def output_shape(model: nn.Module, layer: str, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Per-row shape of ``layer``'s output (``"embedding"`` = the classifier's embedding) for one dummy input."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
            if layer == "embedding":
                return tuple(model(x)["embedding"].shape[1:])
            tap = FeatureTap(model, [layer])
            try:
                model(x)
                return tuple(tap.features[layer].shape[1:])
            finally:
                tap.remove()
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- student + projectors


class DistillModel(nn.Module):
    """The student plus the learned projectors of its projector terms: everything DDP syncs.

    ``forward(x [b, ...])`` returns the student's outputs and ``proj/<i>`` = projector i
    applied to the tapped student layer of loss term i (``[b, *teacher field shape]``).
    """

    def __init__(self, student: nn.Module, taps: dict[int, str], projectors: dict[int, nn.Module]) -> None:
        super().__init__()
        self.student = student
        self.taps = taps
        self.projectors = nn.ModuleDict({str(i): p for i, p in projectors.items()})
        layers = sorted({layer for layer in taps.values() if layer != "embedding"})
        self._tap = FeatureTap(student, layers) if layers else None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.student(x)
        for i, layer in self.taps.items():
            feat = out["embedding"] if layer == "embedding" else self._tap.features[layer]
            out[f"proj/{i}"] = self.projectors[str(i)](feat)
        return out


def build_model(cfg, input_shape: Sequence[int], num_classes: int, teacher_shapes: dict) -> DistillModel:
    """The student of ``cfg.model`` (two heads when a loss kind needs them) with a
    :class:`~kdstore.train.losses.Projector` per projector term, both read from the loss-kind table.

    ``teacher_shapes``: ``{teacher: {field: per-row shape}}``.
    """
    from kdstore.train.losses import Projector
    from kdstore.train.objective import KINDS, target_field

    student = build_student(cfg.model.arch, input_shape, num_classes, hidden=cfg.model.hidden,
                            width=cfg.model.width, dual_head=cfg.dual_head)
    taps, projectors = {}, {}
    for i, term in enumerate(cfg.loss):
        if not KINDS[term.kind].projector:
            continue
        layer = term.student_layer
        s_shape = output_shape(student, layer, input_shape)
        t_shape = teacher_shapes[term.teacher][target_field(term)]
        try:
            projectors[i] = Projector(s_shape, t_shape)
        except ValueError as exc:
            raise InputError(f"loss.{i} ({term.kind}): {exc}") from None
        taps[i] = layer
    return DistillModel(student, taps, projectors)
