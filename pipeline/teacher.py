"""Teachers: the protocol the precompute job drives, and loading from ``module:factory``.

:class:`TeacherLoad` is how a teacher is built anywhere (precompute workers, online KD,
query embedding): a picklable recipe, never read from a store without the user naming it.

A factory may return a full :class:`Teacher` or a plain ``torch.nn.Module``; a module is
wrapped in :class:`ModuleTeacher`, which decodes images, runs the module and captures
intermediate layers with forward hooks.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from kdstore.pipeline.decode import decode_field
from kdstore.store.errors import InputError
from kdstore.store.schema import LOGITS, features_field


@runtime_checkable
class Teacher(Protocol):
    """What the precompute job needs from a teacher.

    ``preprocess`` turns one raw sample (dict of bytes) into one model input; for image
    teachers that is a ``[C, H, W]`` float tensor, so augmentation views can be applied to
    it. ``forward`` takes a list of inputs and returns named outputs with leading dim ``b``
    (``logits [b, c]``, ``embedding [b, d]``, ``features/<layer> [b, ...]``), or, for ragged
    per-token outputs under names starting with ``tokens/``, a list of ``b`` tensors.
    """

    name: str
    fingerprint: str
    input_key: str

    def preprocess(self, sample: dict) -> Any: ...

    def forward(self, inputs: list[Any]) -> dict[str, Any]: ...


def state_dict_fingerprint(module: nn.Module) -> str:
    """sha256 over parameter/buffer names, shapes, dtypes and bytes: equal weights, equal hash."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()


class ModuleTeacher:
    """Wrap a plain ``nn.Module``: images decode to float32 ``[C, H, W]`` in [0, 1].

    The module's output is named ``logits`` when it is a tensor (a dict is used as is);
    each of ``layers`` is captured with a forward hook as ``features/<layer>``.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        name: str,
        input_key: str = "png",
        layers: Sequence[str] = (),
        device: str = "cpu",
        fingerprint: str | None = None,
    ) -> None:
        self.module = module.eval().to(device)
        self.name = name
        self.input_key = input_key
        self.device = torch.device(device)
        self.fingerprint = fingerprint or state_dict_fingerprint(module)
        # A module may declare what its logits mean: ``class_names`` (logit i is class_names[i]).
        self.class_names = tuple(str(c) for c in (getattr(module, "class_names", None) or ()))
        self._captured: dict[str, torch.Tensor] = {}
        named = dict(self.module.named_modules())
        for layer in layers:
            if layer not in named or not layer:
                known = [n for n in named if n][:30]
                raise InputError(f"teacher has no layer {layer!r}; its layers include {known}")
            named[layer].register_forward_hook(self._hook(layer))

    def _hook(self, layer: str):
        def capture(_module, _inputs, output):
            self._captured[features_field(layer)] = output[0] if isinstance(output, tuple) else output

        return capture

    def preprocess(self, sample: dict) -> Any:
        return decode_field(sample, self.input_key)

    @torch.inference_mode()
    def forward(self, inputs: list[Any]) -> dict[str, Any]:
        self._captured.clear()
        batch = torch.stack(inputs).to(self.device, non_blocking=True)
        output = self.module(batch)
        outputs = dict(output) if isinstance(output, dict) else {LOGITS: output}
        outputs.update(self._captured)
        return outputs


def load_factory(spec: str):
    """Import ``package.module:factory`` and return the callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"--teacher must look like package.module:factory, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"--teacher {spec}: cannot import {module_name!r} ({exc})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise InputError(f"--teacher {spec}: module {module_name!r} has no {attr!r}") from None


def load_teacher(
    spec: str,
    *,
    name: str | None = None,
    input_key: str | None = None,
    layers: Sequence[str] = (),
    device: str = "cpu",
    kwargs: dict | None = None,
) -> Teacher:
    """Build the teacher named by ``spec`` (``module:factory``) on ``device``."""
    factory = load_factory(spec)
    kwargs = dict(kwargs or {})
    params = inspect.signature(factory).parameters
    if "device" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs.setdefault("device", device)
    obj = factory(**kwargs)
    default_name = spec.partition(":")[2]
    if isinstance(obj, nn.Module):
        return ModuleTeacher(obj, name=name or default_name, input_key=input_key or "png", layers=layers, device=device)
    if not isinstance(obj, Teacher):
        raise InputError(f"--teacher {spec}: factory returned {type(obj).__name__}, not a Teacher or torch.nn.Module")
    if layers:
        raise InputError(f"--teacher {spec}: --layer applies to plain torch modules only")
    if name:
        obj.name = name
    if input_key:
        obj.input_key = input_key
    return obj


@dataclass(frozen=True, kw_only=True)
class TeacherLoad:
    """How to build a teacher (picklable: sent to Ray actors; also used by online KD and query)."""

    factory: str
    name: str | None = None
    input_key: str | None = None
    layers: tuple[str, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    device: str = "cpu"

    def build(self) -> Teacher:
        return load_teacher(
            self.factory,
            name=self.name,
            input_key=self.input_key,
            layers=self.layers,
            device=self.device,
            kwargs=dict(self.kwargs),
        )
