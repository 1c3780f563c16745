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

from kdstore.pipeline.token_reduce import TokenReduceSpec, reduce_tokens
from kdstore.store.errors import TeacherOutputError
from kdstore.store.schema import LOGITS, OutputSpec

__all__ = ["OutputSpec", "bad_rows", "reduce_outputs"]

def _pool(x: torch.Tensor, pool: str) -> torch.Tensor:
    if pool == "mean" and x.ndim > 2:
        return x.flatten(2).mean(-1)
    if pool == "flatten" or (pool == "mean" and x.ndim <= 2):
        return x.flatten(1)
    return x


def _ragged_rows(x, name: str, batch_size: int) -> list[torch.Tensor]:
    """A per-token output: a list of ``b`` tensors ``[len_i, ...]`` with equal trailing shapes."""
    if not isinstance(x, (list, tuple)) or len(x) != batch_size or not all(isinstance(t, torch.Tensor) for t in x):
        raise TeacherOutputError(f"teacher output {name!r} must be a list of {batch_size} tensors [len_i, ...]")
    if len({tuple(t.shape[1:]) for t in x}) > 1 or any(t.ndim < 1 for t in x):
        raise TeacherOutputError(f"teacher output {name!r}: per-token tensors differ in trailing shape")
    return [t.detach().cpu() for t in x]


def _ragged(x, name: str, batch_size: int, dtype: np.dtype) -> list[np.ndarray]:
    """Per-token rows as numpy: floats stored as ``dtype``, integers and bools keep their dtype (ids stay exact)."""
    rows = _ragged_rows(x, name, batch_size)
    return [t.float().numpy().astype(dtype) if t.is_floating_point() else t.numpy() for t in rows]


def _token_reduce(x, spec: OutputSpec, batch_size: int, temperature: float, keys: list[str] | None, seed: int) -> dict:
    """``tokens:topk:K`` / ``tokens:sample:S`` on per-token logits: each field a list of ``b`` arrays ``[len_i, ...]``."""
    rows = _ragged_rows(x, spec.source, batch_size)
    if spec.token_reduce == "sample" and (keys is None or len(keys) != batch_size):
        raise TeacherOutputError(f"--output {spec.to_text()} needs the {batch_size} sample keys (they seed the draws)")
    op = TokenReduceSpec(kind=spec.token_reduce, k=spec.k, temperature=temperature, seed=seed)
    per_row = [reduce_tokens(r, op, key=keys[i] if keys else "") for i, r in enumerate(rows)]
    return {name: [row[name] for row in per_row] for name in spec.fields()}


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
    keys: list[str] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Map teacher outputs to stored fields.

    ``logits [b, c]`` → ``logits [b, c]``; ``topk/values [b, k]`` (teacher logits of the k
    largest), ``topk/indices [b, k]`` int32, ``topk/residual [b]`` (probability mass outside
    the top k of ``softmax(logits / temperature)``); ``features/<layer>`` pooled;
    ``embedding [b, d]`` (L2-normalised when asked); ``scores/entropy [b]`` and
    ``scores/max_prob [b]`` of ``softmax(logits)``. Floats are stored as ``dtype``.

    Per-token outputs are lists of ``b`` arrays ``[len_i, ...]``: ``tokens:NAME`` as the teacher
    returned it (integer dtypes kept); ``tokens:topk:K`` / ``tokens:sample:S`` reduce
    ``tokens/logits`` at ``temperature`` with :mod:`kdstore.pipeline.token_reduce` (their own
    dtypes: float16 log-probs, packed ids, uint8 counts). Sampling draws are seeded by
    ``(seed, keys[i], position)``.
    """
    fields: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.source not in outputs:
            raise TeacherOutputError(
                f"--output {spec.to_text()} needs teacher output {spec.source!r}; the teacher returned {sorted(outputs)}"
            )
        x = outputs[spec.source]
        if spec.token_reduce:
            fields.update(_token_reduce(x, spec, batch_size, temperature, keys, seed))
            continue
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
