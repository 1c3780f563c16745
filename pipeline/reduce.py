"""Turning raw teacher outputs into stored fields: top-k, pooling, scores, dtype.

An :class:`~kdstore.store.schema.OutputSpec` (the store's vocabulary: kinds and field
names) is parsed once from ``--output`` text; :func:`reduce_outputs` maps a teacher's named
outputs ``[b, ...]`` to the stored fields ``[b, ...]`` as numpy. A new output kind gets its
reduction here, its name and fields in ``kdstore.store.schema``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdstore.store.errors import TeacherOutputError
from kdstore.store.schema import LOGITS, OutputSpec

__all__ = ["OutputSpec", "bad_rows", "reduce_outputs"]

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
        names = spec.fields()
        if spec.source == LOGITS and x.ndim != 2:
            raise TeacherOutputError(f"teacher logits must be [batch, classes], got shape {tuple(x.shape)}")
        if spec.kind == "logits":
            (logits,) = names
            fields[logits] = x.numpy().astype(dtype)
        elif spec.kind == "topk":
            if spec.k > x.shape[1]:
                raise TeacherOutputError(f"--output topk:{spec.k} but the teacher has only {x.shape[1]} classes")
            values, indices = torch.topk(x, spec.k, dim=1)
            probs = F.softmax(x / temperature, dim=1)
            residual = (1.0 - probs.gather(1, indices).sum(1)).clamp_(min=0.0)
            values_f, indices_f, residual_f = names
            fields[values_f] = values.numpy().astype(dtype)
            fields[indices_f] = indices.numpy().astype(np.int32)
            fields[residual_f] = residual.numpy().astype(np.float32)
        elif spec.kind == "scores":
            logp = F.log_softmax(x, dim=1)
            entropy_f, max_prob_f = names
            fields[entropy_f] = (-(logp.exp() * logp).sum(1)).numpy().astype(np.float32)
            fields[max_prob_f] = logp.max(1).values.exp().numpy().astype(np.float32)
        elif spec.kind == "features":
            (features_f,) = names
            fields[features_f] = _pool(x, spec.pool).numpy().astype(dtype)
        else:
            emb = x.flatten(1)
            if spec.l2:
                emb = F.normalize(emb, dim=1)
            (embedding_f,) = names
            fields[embedding_f] = emb.numpy().astype(dtype)
    return fields
