"""Shared validation and row kernels of the loss functions (private)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


TeacherLogits = Sequence[Tensor] | Tensor


# --------------------------------------------------------------------------- validation


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _require_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _require_ndim(name: str, x: object, ndim: int, spec: str) -> Tensor:
    x = _require_tensor(name, x)
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {spec}, got {_shape(x)}")
    return x


def _require_shape(name: str, x: object, shape: Sequence[int], spec: str) -> Tensor:
    x = _require_tensor(name, x)
    if _shape(x) != tuple(shape):
        raise ValueError(f"{name} must have shape {spec} = {tuple(shape)}, got {_shape(x)}")
    return x


def _require_float(name: str, x: Tensor) -> None:
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _require_integer(name: str, x: Tensor) -> None:
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {x.dtype}")


def _require_float_ndim(name: str, x: object, ndim: int, spec: str) -> Tensor:
    """``_require_ndim`` then ``_require_float``: a floating-point tensor of rank ``ndim``."""
    x = _require_ndim(name, x, ndim, spec)
    _require_float(name, x)
    return x


def _require_float_shape(name: str, x: object, shape: Sequence[int], spec: str) -> Tensor:
    """``_require_shape`` then ``_require_float``: a floating-point tensor of exactly ``shape``."""
    x = _require_shape(name, x, shape, spec)
    _require_float(name, x)
    return x


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _unit_interval(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    # float16 logits lose too much in log_softmax; float64 is kept for exact checks.
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _bool_mask(name: str, mask: Tensor, shape: Sequence[int], spec: str) -> Tensor:
    _require_shape(name, mask, shape, spec)
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"{name} must be a bool (or 0/1 integer) tensor, got dtype {mask.dtype}")
    return mask != 0


def _contribution(
    shape: Sequence[int],
    weights: Tensor | None,
    mask: Tensor | None,
    *,
    dtype: torch.dtype,
    device: torch.device,
    spec: str,
) -> Tensor:
    """Per-row weights (shape ``shape``) with masked rows set to zero."""
    w = torch.ones(tuple(shape), dtype=dtype, device=device)
    if weights is not None:
        _require_shape("weights", weights, shape, spec)
        _require_float("weights", weights)
        w = weights.to(dtype)
    if mask is not None:
        w = w * _bool_mask("mask", mask, shape, spec).to(dtype)
    return w


def _weighted_mean(per_row: Tensor, w: Tensor) -> Tensor:
    """``sum(w * l) / sum(w)`` over rows with ``w != 0``; a zero with grad if there are none."""
    keep = w != 0
    safe = torch.where(keep, per_row, torch.zeros_like(per_row))
    total = w.sum()
    return (w * safe).sum() / torch.where(total > 0, total, torch.ones_like(total))


def _zero_rows(x: Tensor, keep: Tensor) -> Tensor:
    """Replace the rows of ``x`` (leading dims = ``keep.shape``) where ``keep`` is False by 0."""
    keep = keep.reshape(_shape(keep) + (1,) * (x.dim() - keep.dim()))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


# --------------------------------------------------------------------------- row kernels


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dim; classes with p == 0 contribute exactly 0."""
    p = log_p.exp()
    has_mass = p > 0
    log_p_safe = torch.where(has_mass, log_p, torch.zeros_like(log_p))
    terms = torch.where(has_mass, p * (log_p_safe - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def _soft_kl_rows(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    log_q = F.log_softmax(student / temperature, dim=-1)
    return _kl_rows(log_p, log_q) * temperature**2


def _topk_kl_rows(
    student: Tensor, values: Tensor, indices: Tensor, residual: Tensor, temperature: float
) -> Tensor:
    """Top-k KD over k+1 buckets for rows ``student [n, c]``, ``values/indices [n, k]``, ``residual [n]``."""
    residual = residual.clamp(0.0, 1.0)
    log_p_top = torch.log1p(-residual).unsqueeze(-1) + F.log_softmax(values / temperature, dim=-1)
    log_p_rest = torch.log(residual).unsqueeze(-1)
    log_q_all = F.log_softmax(student / temperature, dim=-1)
    log_q_top = log_q_all.gather(-1, indices)
    # log of the student's mass outside the top k, without the cancellation in 1 - sum(q_top):
    # a finite fill keeps logsumexp's gradient finite when the top k covers every class.
    in_top = torch.zeros_like(log_q_all, dtype=torch.bool).scatter_(-1, indices, True)
    outside = log_q_all.masked_fill(in_top, torch.finfo(log_q_all.dtype).min)
    log_q_rest = torch.logsumexp(outside, dim=-1, keepdim=True)
    log_q_rest = log_q_rest.clamp_min(math.log(torch.finfo(log_q_all.dtype).tiny))
    log_p = torch.cat([log_p_top, log_p_rest], dim=-1)
    log_q = torch.cat([log_q_top, log_q_rest], dim=-1)
    return _kl_rows(log_p, log_q) * temperature**2


def _masked_log_softmax(scores: Tensor, valid: Tensor) -> Tensor:
    """log_softmax over ``valid`` entries; invalid entries get -inf, all-invalid rows stay finite."""
    scores = scores.masked_fill(~valid, float("-inf"))
    any_valid = valid.any(-1, keepdim=True)
    scores = torch.where(any_valid, scores, torch.zeros_like(scores))
    return F.log_softmax(scores, dim=-1)


def _check_topk(
    prefix: str,
    lead: tuple[int, ...],
    num_classes: int,
    values: Tensor,
    indices: Tensor,
    residual: Tensor,
) -> int:
    spec_lead = ", ".join(("b", "s")[: len(lead)])
    _require_ndim(f"{prefix}values", values, len(lead) + 1, f"[{spec_lead}, k]")
    _require_float(f"{prefix}values", values)
    if _shape(values)[:-1] != lead:
        raise ValueError(
            f"{prefix}values must have shape [{spec_lead}, k] with leading dims {lead}, got {_shape(values)}"
        )
    k = values.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"{prefix}values has k = {k}; need 1 <= k <= num_classes = {num_classes}")
    _require_shape(f"{prefix}indices", indices, values.shape, f"[{spec_lead}, k] like {prefix}values")
    _require_integer(f"{prefix}indices", indices)
    _require_shape(f"{prefix}residual", residual, lead, f"[{spec_lead}]")
    _require_float(f"{prefix}residual", residual)
    return k
