"""Turning raw teacher outputs into stored fields: top-k, pooling, scores, dtype.

An :class:`OutputSpec` is parsed once from ``--output`` text; :func:`reduce_outputs` maps
a teacher's named outputs ``[b, ...]`` to the stored fields ``[b, ...]`` as numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdstore.store.errors import InputError, TeacherOutputError

POOLS = ("none", "mean", "flatten")


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    """One requested output. ``kind`` is logits | topk | features | embedding | scores."""

    kind: str
    k: int = 0
    layer: str = ""
    pool: str = "none"
    l2: bool = False

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
        if kind == "embedding" and len(args) <= 2:
            l2 = bool(args) and args[-1] == "l2"
            if args and args[-1] in ("l2", "raw"):
                args = args[:-1]
            if len(args) <= 1:
                return cls(kind="embedding", layer=args[0] if args else "", l2=l2)
        raise InputError(
            f"--output {text!r} not understood; use logits | topk:K | features:LAYER[:none|mean|flatten] "
            "| embedding[:LAYER][:l2] | scores | tokens:NAME"
        )

    def to_text(self) -> str:
        if self.kind == "topk":
            return f"topk:{self.k}"
        if self.kind == "features":
            return f"features:{self.layer}:{self.pool}"
        if self.kind == "tokens":
            return f"tokens:{self.layer}"
        if self.kind == "embedding":
            return ":".join(["embedding", *([self.layer] if self.layer else []), *(["l2"] if self.l2 else [])])
        return self.kind

    @property
    def source(self) -> str:
        """The teacher output this spec reads."""
        if self.kind in ("logits", "topk", "scores"):
            return "logits"
        if self.kind == "tokens":
            return f"tokens/{self.layer}"
        if self.kind == "features" or (self.kind == "embedding" and self.layer):
            return f"features/{self.layer}"
        return "embedding"

    def fields(self) -> list[str]:
        return {
            "logits": ["logits"],
            "topk": ["topk/values", "topk/indices", "topk/residual"],
            "features": [f"features/{self.layer}"],
            "embedding": ["embedding"],
            "scores": ["scores/entropy", "scores/max_prob"],
            "tokens": [f"tokens/{self.layer}"],
        }[self.kind]


def _pool(x: torch.Tensor, pool: str) -> torch.Tensor:
    if pool == "mean" and x.ndim > 2:
        return x.flatten(2).mean(-1)
    if pool == "flatten" or (pool == "mean" and x.ndim <= 2):
        return x.flatten(1)
    return x


def _ragged(x, name: str, batch_size: int, dtype: np.dtype) -> list[np.ndarray]:
    """A per-token output: a list of ``b`` tensors ``[len_i, ...]`` with equal trailing shapes."""
    if not isinstance(x, (list, tuple)) or len(x) != batch_size:
        raise TeacherOutputError(f"teacher output {name!r} must be a list of {batch_size} tensors [len_i, ...]")
    rows = [t.detach().float().cpu().numpy() for t in x]
    if len({r.shape[1:] for r in rows}) > 1 or any(r.ndim < 1 for r in rows):
        raise TeacherOutputError(f"teacher output {name!r}: per-token tensors differ in trailing shape")
    return [r.astype(dtype) for r in rows]


def bad_rows(outputs: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
    """``[b]`` bool: rows with NaN/inf in any dense output."""
    bad = torch.zeros(batch_size, dtype=torch.bool)
    for value in outputs.values():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape[:1] == (batch_size,):
            bad |= ~torch.isfinite(value.detach().float().cpu().reshape(batch_size, -1)).all(1)
        elif isinstance(value, (list, tuple)) and len(value) == batch_size:
            bad |= torch.tensor([not bool(torch.isfinite(t.detach().float()).all()) for t in value])
    return bad


def reduce_outputs(
    outputs: dict[str, torch.Tensor],
    specs: list[OutputSpec],
    *,
    batch_size: int,
    temperature: float,
    dtype: np.dtype,
) -> dict[str, np.ndarray]:
    """Map teacher outputs to stored fields.

    ``logits [b, c]`` → ``logits [b, c]``; ``topk/values [b, k]`` (teacher logits of the k
    largest), ``topk/indices [b, k]`` int32, ``topk/residual [b]`` (probability mass outside
    the top k of ``softmax(logits / temperature)``); ``features/<layer>`` pooled;
    ``embedding [b, d]`` (L2-normalised when asked); ``scores/entropy [b]`` and
    ``scores/max_prob [b]`` of ``softmax(logits)``. Floats are stored as ``dtype``.
    """
    fields: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.source not in outputs:
            raise TeacherOutputError(
                f"--output {spec.to_text()} needs teacher output {spec.source!r}; the teacher returned {sorted(outputs)}"
            )
        x = outputs[spec.source]
        if spec.kind == "tokens":
            fields[spec.source] = _ragged(x, spec.source, batch_size, dtype)
            continue
        if not isinstance(x, torch.Tensor) or x.shape[:1] != (batch_size,):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise TeacherOutputError(f"teacher output {spec.source!r} has shape {shape}; expected leading dim {batch_size}")
        x = x.detach().float().cpu()
        if spec.source == "logits" and x.ndim != 2:
            raise TeacherOutputError(f"teacher logits must be [batch, classes], got shape {tuple(x.shape)}")
        if spec.kind == "logits":
            fields["logits"] = x.numpy().astype(dtype)
        elif spec.kind == "topk":
            if spec.k > x.shape[1]:
                raise TeacherOutputError(f"--output topk:{spec.k} but the teacher has only {x.shape[1]} classes")
            values, indices = torch.topk(x, spec.k, dim=1)
            probs = F.softmax(x / temperature, dim=1)
            residual = (1.0 - probs.gather(1, indices).sum(1)).clamp_(min=0.0)
            fields["topk/values"] = values.numpy().astype(dtype)
            fields["topk/indices"] = indices.numpy().astype(np.int32)
            fields["topk/residual"] = residual.numpy().astype(np.float32)
        elif spec.kind == "scores":
            logp = F.log_softmax(x, dim=1)
            fields["scores/entropy"] = (-(logp.exp() * logp).sum(1)).numpy().astype(np.float32)
            fields["scores/max_prob"] = logp.max(1).values.exp().numpy().astype(np.float32)
        elif spec.kind == "features":
            fields[f"features/{spec.layer}"] = _pool(x, spec.pool).numpy().astype(dtype)
        else:
            emb = x.flatten(1)
            if spec.l2:
                emb = F.normalize(emb, dim=1)
            fields["embedding"] = emb.numpy().astype(dtype)
    return fields
