"""Any student: build a ``torch.nn.Module`` from ``[model] factory``, run it the trainer's way,
record how it was built, and rebuild a trained one (:func:`load_student`).

``factory`` is ``"package.module:function"`` (importable: installed, or its folder on
``PYTHONPATH``) or ``"path/to/file.py:function"`` (a Python file, relative to the working
directory). The function is called with ``[model] args`` as keyword arguments, plus
``num_classes`` and ``input_shape`` when it has parameters of those names that ``args``
does not set. It must return an ``nn.Module`` whose ``forward(x [b, ...])`` returns the logits
``[b, k]`` or a dict (``logits``, ``embedding``, anything else).

:class:`FactoryStudent` wraps that module so the trainer always sees a dict: a tensor
output becomes ``{"logits": ...}``; ``[model] embedding`` names the student's embedding (a
key of its output dict, or a layer whose output is captured and flattened to ``[b, d]``);
with a DHO term it adds ``kd_head = Linear(d, k)`` on that embedding (``"kd_logits"``).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdstore.store.errors import InputError



# --------------------------------------------------------------------------- the factory


def _load_file_module(path: Path):
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    name = f"kdstore_student_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"model.factory: cannot load {path} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise InputError(f"model.factory: importing {path} failed ({type(exc).__name__}: {exc})") from None
    return module


def resolve_factory(spec: str) -> tuple[Any, str | None]:
    """``(callable, absolute file or None)`` for ``package.module:function`` or ``path/to/file.py:function``."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise InputError(f"model.factory must look like package.module:function or path/to/file.py:function, "
                         f"got {spec!r}")
    file = None
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise InputError(f"model.factory {spec}: file {path} not found (a relative path is read from the "
                             f"working directory)")
        module, file = _load_file_module(path), str(path)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise InputError(f"model.factory {spec}: cannot import {target!r} ({exc}); install it, put its folder on "
                             f"PYTHONPATH, or name the file: factory = \"path/to/file.py:{attr}\"") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"model.factory {spec}: {target!r} has no function {attr!r}{hint}")
    return fn, file


def call_factory(spec: str, args: Mapping[str, Any], *, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """Build the student: ``fn(**args)`` (+ ``num_classes`` / ``input_shape`` when it takes them)."""
    fn, _ = resolve_factory(spec)
    kwargs = dict(args)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if "num_classes" in params and "num_classes" not in kwargs:
        kwargs["num_classes"] = int(num_classes)
    if "input_shape" in params and "input_shape" not in kwargs:
        kwargs["input_shape"] = tuple(int(d) for d in input_shape)
    try:
        obj = fn(**kwargs)
    except TypeError as exc:
        raise InputError(f"model.factory {spec}: calling it with model.args {sorted(kwargs)} failed ({exc})") from None
    if not isinstance(obj, nn.Module):
        raise InputError(f"model.factory {spec} returned {type(obj).__name__}, not a torch.nn.Module")
    return obj


# --------------------------------------------------------------------------- layers


def find_layer(module: nn.Module, name: str, what: str) -> nn.Module:
    """The submodule ``name`` of ``module``; an unknown name lists the close matches."""
    named = dict(module.named_modules())
    if name and name in named:
        return named[name]
    known = [n for n in named if n]
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"close matches: {close}" if close else f"its layers: {known[:40]}" + (" …" if len(known) > 40 else "")
    raise InputError(f"{what}: the student has no layer {name!r}; {hint}")


def layer_output(output: Any) -> Tensor:
    """A hooked layer's output as a tensor (the first element of a tuple, as RNN layers return)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, Tensor):
        raise InputError(f"a hooked student layer returned {type(output).__name__}, not a tensor")
    return output


# --------------------------------------------------------------------------- the wrapper


class FactoryStudent(nn.Module):
    """``net`` (the factory's module) with a dict output: ``{"logits", "embedding", ..., "kd_logits"}``.

    Args:
        net: the user's module; ``net(x)`` returns a tensor (the logits) or a dict.
        embedding: where the embedding is: a key of ``net``'s output dict (``"embedding"`` by
            default; absent = no embedding), or a layer name of ``net`` (hooked, flattened to ``[b, d]``).
        kd_head: ``(d, k)`` to add the DHO head ``Linear(d, k)`` on the embedding, or None.
    """

    def __init__(self, net: nn.Module, embedding: str = "embedding", kd_head: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.net = net
        self.embedding = embedding
        self._captured: Tensor | None = None
        self._layer = embedding != "embedding" and embedding in dict(net.named_modules())
        if self._layer:
            find_layer(net, embedding, "model.embedding").register_forward_hook(self._capture)
        self.kd_head = nn.Linear(*kd_head) if kd_head else None

    def _capture(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._captured = layer_output(output)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        raw = self.net(x)
        if isinstance(raw, Tensor):
            out = {"logits": raw}
        elif isinstance(raw, Mapping):
            out = dict(raw)
        else:
            raise InputError(f"the student returned {type(raw).__name__}; return the logits [b, k] or a dict "
                             "with 'logits' (and 'embedding', ...)")
        if self._layer:
            out["embedding"] = self._captured.flatten(1)
            self._captured = None
        elif self.embedding != "embedding" and self.embedding in out:
            out["embedding"] = out[self.embedding]
        if self.kd_head is not None:
            out["kd_logits"] = self.kd_head(out["embedding"])
        return out


def dry_run(student: nn.Module, tap_root: nn.Module, layers: Sequence[str], sample: Tensor) -> tuple[dict, dict]:
    """One forward in eval mode without gradients: ``({output key: per-row shape}, {layer: per-row shape})``."""
    handles, shapes = [], {}
    for layer in layers:
        def hook(module, args, output, layer=layer):
            shapes[layer] = tuple(layer_output(output).shape[1:])
        handles.append(find_layer(tap_root, layer, "loss student_layer").register_forward_hook(hook))
    was = student.training
    student.eval()
    try:
        with torch.no_grad():
            out = student(sample)
    finally:
        student.train(was)
        for h in handles:
            h.remove()
    return {k: tuple(v.shape[1:]) for k, v in out.items() if isinstance(v, Tensor)}, shapes


def dummy_batch(input_shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """``[2, *input_shape]`` zeros: the dry run's input when no real sample batch is given."""
    return torch.zeros(2, *(int(d) for d in input_shape), device=device)


# --------------------------------------------------------------------------- record and reload


def rebuild(record: dict, factory: str | None = None) -> nn.Module:
    """The untrained student a :func:`build_model` record describes (same parameters, same names);
    ``factory`` replaces the recorded one (e.g. the file moved)."""
    from kdstore.train.models import build_student

    shape, k = tuple(record["input_shape"]), int(record["num_classes"])
    if "vocab_size" in record:  # a text student: (max_length,) with the tokenizer's vocabulary
        from kdstore.train.inputs import TextShape

        shape = TextShape(shape[0], int(record["vocab_size"]))
    if record.get("factory"):
        spec = record.get("factory_file") and f"{record['factory_file']}:{record['factory'].rpartition(':')[2]}"
        net = call_factory(factory or spec or record["factory"], record.get("args", {}), num_classes=k,
                           input_shape=shape)
        head = record.get("kd_head")
        return FactoryStudent(net, record.get("embedding", "embedding"), tuple(head) if head else None)
    return build_student(record["arch"], shape, k, hidden=record["hidden"], width=record["width"],
                         dual_head=record["dual_head"])


def load_student(out_dir: str | Path, *, checkpoint: str | Path | None = None, factory: str | None = None) -> nn.Module:
    """The trained student of a run, rebuilt and loaded (``torch.load(weights_only=True)``), in eval mode.

    Reads ``OUT/student.json`` (how the student was built) and ``OUT/student.pt`` (its weights);
    with ``checkpoint`` (a path), or when the run has not finished, the newest
    ``OUT/checkpoints/step-*.pt`` instead. A factory student is rebuilt by calling its factory
    again (the recorded file, or the module on ``PYTHONPATH``) with its recorded ``args``;
    ``factory`` (``module:function`` or ``file.py:function``) names it instead, e.g. after a move.

    Returns the factory's own module (its class, its forward) — or, for a DHO student, the
    :class:`FactoryStudent` holding it as ``.net`` plus ``.kd_head``; a preset student
    (``arch``) is the :class:`~kdstore.train.models.Classifier` (``forward`` returns a dict).
    """
    from kdstore.train import checkpoint as ck

    out_dir = Path(out_dir)
    weights_file = out_dir / ck.STUDENT_FILE
    if checkpoint is None and weights_file.is_file() and (out_dir / ck.STUDENT_RECORD_FILE).is_file():
        record = json.loads((out_dir / ck.STUDENT_RECORD_FILE).read_text())
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    else:
        paths = [Path(checkpoint)] if checkpoint else ck.checkpoint_paths(out_dir)
        if not paths or not paths[-1].is_file():
            raise InputError(f"{out_dir} holds no trained student (no {ck.STUDENT_FILE} with {ck.STUDENT_RECORD_FILE}, "
                             f"no checkpoint); is it a train.out_dir?")
        saved = ck.read_checkpoint(paths[-1])
        if "student" not in saved:
            raise InputError(f"checkpoint {paths[-1]} does not record how its student was built (written by an "
                             "older kdstore); rebuild the student yourself and load its state_dict")
        record = saved["student"]
        state = {k[len("student."):]: v for k, v in saved["model"].items() if k.startswith("student.")}
    student = rebuild(record, factory)
    student.load_state_dict(state)
    student.eval()
    if isinstance(student, FactoryStudent) and student.kd_head is None:
        return student.net
    return student
