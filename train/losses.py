"""Distillation losses: pure functions from student outputs and stored teacher outputs to a scalar.

This module owns every training objective kdstore ships (see ``docs/LOSSES.md``). The rules
all of them follow:

- Teacher inputs are targets, never trained: they are detached.
- ``mask`` arguments are boolean (an integer 0/1 attention mask is accepted too); ``True``
  means the row (or token) contributes. ``weights`` are non-negative per-row floats.
- The result is the weighted mean over contributing rows, ``sum(w * l) / sum(w)``. When
  nothing contributes the result is a zero that is still connected to the graph, so
  ``loss.backward()`` works on a batch without, say, a single labelled row.
- Rows that do not contribute never poison the result: their teacher values are replaced
  by zeros before any arithmetic, so NaNs stored for skipped samples stay harmless.
- Arithmetic runs in float32 (float16/bfloat16 inputs, as stored, are upcast); float64
  inputs stay float64. Results are 0-dim tensors.
- A shape mismatch raises ``ValueError`` naming the argument and the shape it got.

The only state in this module lives in the two ``nn.Module`` helpers (``Projector``,
``TeacherRouter``, whose parameters are trained) and in ``TaidSchedule`` (the paper's
adaptive interpolation coefficient).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Projector",
    "TaidSchedule",
    "TeacherRouter",
    "combine_teachers",
    "confidence_weights",
    "contrastive_distill",
    "cross_entropy",
    "dho_combine",
    "dho_loss",
    "embedding_cosine",
    "feature_match",
    "multi_teacher_kl",
    "ranking_distill",
    "rkd_angle",
    "rkd_distance",
    "routed_teacher_kl",
    "router_balance_loss",
    "soft_kl",
    "taid_loss",
    "token_kl",
    "topk_kl",
]

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


# --------------------------------------------------------------------------- classification


def cross_entropy(
    student_logits: Tensor,
    labels: Tensor,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Supervised cross-entropy on labelled rows only.

    Args:
        student_logits (Tensor): [b, c] float, student logits.
        labels (Tensor): [b] integer (the store writes int64); a negative label (the store
            writes -1) marks an unlabelled row, which is ignored.
        weights (Tensor | None): [b] float, per-row weights.
        mask (Tensor | None): [b] bool, True = row contributes.

    Returns:
        Tensor: [] float, weighted mean of -log softmax(student)[label] over labelled rows.

    Raises:
        ValueError: on a shape or dtype mismatch.
    """
    _require_ndim("student_logits", student_logits, 2, "[b, c]")
    _require_float("student_logits", student_logits)
    b = student_logits.shape[0]
    _require_shape("labels", labels, (b,), "[b]")
    _require_integer("labels", labels)
    dtype = _compute_dtype(student_logits)
    w = _contribution((b,), weights, mask, dtype=dtype, device=student_logits.device, spec="[b]")
    w = w * (labels >= 0).to(dtype)
    safe_labels = torch.where(w != 0, labels, torch.zeros_like(labels)).long()
    per_row = F.cross_entropy(student_logits.to(dtype), safe_labels, reduction="none")
    return _weighted_mean(per_row, w)


def soft_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Hinton et al. (2015) knowledge distillation: ``KL(p_T || q_T) * T^2``.

    ``p_T = softmax(teacher / T)``, ``q_T = softmax(student / T)``. The ``T^2`` factor keeps
    gradient magnitudes comparable across temperatures.

    Args:
        student_logits (Tensor): [b, c] float.
        teacher_logits (Tensor): [b, c] float (float16 as stored is fine).
        temperature (float): T > 0.
        weights (Tensor | None): [b] float.
        mask (Tensor | None): [b] bool.

    Returns:
        Tensor: [] float, weighted mean over rows.

    Raises:
        ValueError: on a shape mismatch or T <= 0.
    """
    _require_ndim("student_logits", student_logits, 2, "[b, c]")
    _require_float("student_logits", student_logits)
    _require_shape("teacher_logits", teacher_logits, student_logits.shape, "[b, c] like student_logits")
    _require_float("teacher_logits", teacher_logits)
    temperature = _positive("temperature", temperature)
    dtype = _compute_dtype(student_logits, teacher_logits)
    b = student_logits.shape[0]
    w = _contribution((b,), weights, mask, dtype=dtype, device=student_logits.device, spec="[b]")
    teacher = _zero_rows(teacher_logits.detach().to(dtype), w != 0)
    per_row = _soft_kl_rows(student_logits.to(dtype), teacher, temperature)
    return _weighted_mean(per_row, w)


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


def topk_kl(
    student_logits: Tensor,
    topk_values: Tensor,
    topk_indices: Tensor,
    residual: Tensor,
    temperature: float,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Honest top-k KD: KL over the teacher's top-k classes plus one "rest" bucket, ``* T^2``.

    Teacher buckets: ``p_i = (1 - r) * softmax(values / T)_i`` for the k stored classes and
    ``p_rest = r``; this is the teacher's full softmax at T collapsed onto k+1 buckets, exact
    when ``residual`` was recorded at the same T. Student buckets: ``q_i = softmax(s / T)``
    at the stored indices and ``q_rest = 1 - sum_i q_i``, computed as the log-sum-exp of the
    other classes (no cancellation, never negative). With k == c and r == 0 this equals
    ``soft_kl``; otherwise it is a lower bound of it (merging classes cannot increase KL).

    Args:
        student_logits (Tensor): [b, c] float.
        topk_values (Tensor): [b, k] float (float16 as stored is fine), teacher LOGITS at the
            top-k classes.
        topk_indices (Tensor): [b, k] integer (int32 as stored is fine), distinct class ids.
        residual (Tensor): [b] float, teacher probability mass outside the top k at T.
        temperature (float): T > 0, the temperature ``residual`` was recorded at.
        weights (Tensor | None): [b] float.
        mask (Tensor | None): [b] bool.

    Returns:
        Tensor: [] float.

    Raises:
        ValueError: on a shape or dtype mismatch, k > c, or T <= 0.
    """
    _require_ndim("student_logits", student_logits, 2, "[b, c]")
    _require_float("student_logits", student_logits)
    b, c = student_logits.shape
    _check_topk("topk_", (b,), c, topk_values, topk_indices, residual)
    temperature = _positive("temperature", temperature)
    dtype = _compute_dtype(student_logits, topk_values, residual)
    w = _contribution((b,), weights, mask, dtype=dtype, device=student_logits.device, spec="[b]")
    keep = w != 0
    values = _zero_rows(topk_values.detach().to(dtype), keep)
    res = _zero_rows(residual.detach().to(dtype), keep)
    # A skipped row may hold garbage indices; give it 0..k-1 so gather stays in range.
    arange = torch.arange(topk_indices.shape[1], device=topk_indices.device).expand_as(topk_indices)
    indices = torch.where(keep.unsqueeze(-1), topk_indices.long(), arange)
    per_row = _topk_kl_rows(student_logits.to(dtype), values, indices, res, temperature)
    return _weighted_mean(per_row, w)


# --------------------------------------------------------------------------- features and embeddings


class Projector(nn.Module):
    """Learned map from a student feature shape to a teacher feature shape (FitNets regressor).

    Shapes are per row (no batch dim), as in the store's ``FieldSpec.shape``:

    - ``[d_s] -> [d_t]``: ``nn.Linear``.
    - ``[n, d_s] -> [n, d_t]`` (tokens): ``nn.Linear`` on the last dim; n must match.
    - ``[c_s, h_s, w_s] -> [c_t, h_t, w_t]``: 1x1 conv, plus adaptive average pooling to
      ``(h_t, w_t)`` when the spatial sizes differ. Both are linear and commute, so the
      pooling runs on whichever side is cheaper (before the conv when it shrinks the map).

    Args:
        student_shape (Sequence[int]): per-row student feature shape.
        teacher_shape (Sequence[int]): per-row teacher feature shape.

    Raises:
        ValueError: when the ranks differ, the rank is not 1, 2 or 3, or token counts differ.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        super().__init__()
        self.student_shape = tuple(int(x) for x in student_shape)
        self.teacher_shape = tuple(int(x) for x in teacher_shape)
        s, t = self.student_shape, self.teacher_shape
        if len(s) != len(t):
            raise ValueError(f"student_shape {s} and teacher_shape {t} must have the same rank")
        if any(x < 1 for x in s + t):
            raise ValueError(f"feature shapes must be positive, got student {s}, teacher {t}")
        self.pool: nn.Module | None = None
        self.pool_first = False
        if len(s) == 1:
            self.proj: nn.Module = nn.Linear(s[0], t[0])
        elif len(s) == 2:
            if s[0] != t[0]:
                raise ValueError(f"token counts differ: student_shape {s}, teacher_shape {t}")
            self.proj = nn.Linear(s[1], t[1])
        elif len(s) == 3:
            self.proj = nn.Conv2d(s[0], t[0], kernel_size=1)
            if s[1:] != t[1:]:
                self.pool = nn.AdaptiveAvgPool2d(t[1:])
                self.pool_first = s[1] * s[2] >= t[1] * t[2]
        else:
            raise ValueError(f"Projector supports [d], [n, d] and [c, h, w] features, got {s}")

    def forward(self, student_feat: Tensor) -> Tensor:
        """Map ``student_feat [b, *student_shape]`` to ``[b, *teacher_shape]``."""
        if student_feat.dim() < 1 or _shape(student_feat)[1:] != self.student_shape:
            raise ValueError(
                f"student_feat must have shape [b, {', '.join(map(str, self.student_shape))}], "
                f"got {_shape(student_feat)}"
            )
        x = student_feat
        if self.pool is not None and self.pool_first:
            x = self.pool(x)
        x = self.proj(x)
        if self.pool is not None and not self.pool_first:
            x = self.pool(x)
        return x


def feature_match(
    student_feat: Tensor,
    teacher_feat: Tensor,
    projector: nn.Module | None = None,
    kind: Literal["mse", "cosine"] = "mse",
    weights: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Feature (hint) distillation, FitNets-style (Romero et al., 2015).

    The projector (if any) is applied to the student; the result must have the teacher's
    shape. ``mse``: mean over a row's elements of ``(s - t)^2``. ``cosine``: ``1 - cos(s, t)``
    with each row flattened.

    Args:
        student_feat (Tensor): [b, ...] float.
        teacher_feat (Tensor): [b, ...] float.
        projector (nn.Module | None): e.g. ``Projector(student_shape, teacher_shape)``.
        kind (str): ``"mse"`` or ``"cosine"``.
        weights (Tensor | None): [b] float.
        mask (Tensor | None): [b] bool.

    Returns:
        Tensor: [] float.

    Raises:
        ValueError: on an unknown kind or when the (projected) shapes differ.
    """
    if kind not in ("mse", "cosine"):
        raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")
    _require_tensor("student_feat", student_feat)
    _require_tensor("teacher_feat", teacher_feat)
    _require_float("student_feat", student_feat)
    _require_float("teacher_feat", teacher_feat)
    if student_feat.dim() < 2:
        raise ValueError(f"student_feat must have shape [b, ...], got {_shape(student_feat)}")
    projected = projector(student_feat) if projector is not None else student_feat
    if _shape(projected) != _shape(teacher_feat):
        what = "student_feat after the projector" if projector is not None else "student_feat"
        hint = "" if projector is not None else "; pass projector=Projector(student_shape, teacher_shape)"
        raise ValueError(
            f"{what} has shape {_shape(projected)} but teacher_feat has {_shape(teacher_feat)}{hint}"
        )
    dtype = _compute_dtype(projected, teacher_feat)
    b = projected.shape[0]
    w = _contribution((b,), weights, mask, dtype=dtype, device=projected.device, spec="[b]")
    s = projected.to(dtype).reshape(b, -1)
    t = _zero_rows(teacher_feat.detach().to(dtype).reshape(b, -1), w != 0)
    if kind == "mse":
        per_row = (s - t).pow(2).mean(-1)
    else:
        per_row = 1.0 - F.cosine_similarity(s, t, dim=-1)
    return _weighted_mean(per_row, w)


def embedding_cosine(
    student_emb: Tensor,
    teacher_emb: Tensor,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Embedding distillation: weighted mean of ``1 - cos(student, teacher)``.

    Args:
        student_emb (Tensor): [b, d] float (project first if the dims differ).
        teacher_emb (Tensor): [b, d] float.
        weights (Tensor | None): [b] float.
        mask (Tensor | None): [b] bool.

    Returns:
        Tensor: [] float in [0, 2].
    """
    _require_ndim("student_emb", student_emb, 2, "[b, d]")
    _require_float("student_emb", student_emb)
    _require_shape("teacher_emb", teacher_emb, student_emb.shape, "[b, d] like student_emb")
    _require_float("teacher_emb", teacher_emb)
    return feature_match(student_emb, teacher_emb, None, "cosine", weights, mask)


def _flat_rows(name: str, x: Tensor) -> Tensor:
    _require_tensor(name, x)
    _require_float(name, x)
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [b, d], got {_shape(x)}")
    return x.reshape(x.shape[0], -1)


def _relational_inputs(
    student_emb: Tensor, teacher_emb: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    s = _flat_rows("student_emb", student_emb)
    t = _flat_rows("teacher_emb", teacher_emb)
    if s.shape[0] != t.shape[0]:
        raise ValueError(
            f"student_emb and teacher_emb must have the same batch size, got {_shape(student_emb)} "
            f"and {_shape(teacher_emb)}"
        )
    b = s.shape[0]
    valid = (
        torch.ones(b, dtype=torch.bool, device=s.device)
        if mask is None
        else _bool_mask("mask", mask, (b,), "[b]")
    )
    dtype = _compute_dtype(s, t)
    t = _zero_rows(t.detach().to(dtype), valid)
    return s.to(dtype), t, valid


def _pairwise_distances(x: Tensor) -> Tensor:
    """Euclidean distances [b, b] via the Gram matrix (memory b^2, not b^2 * d)."""
    sq = (x * x).sum(-1)
    d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.T)
    return d2.clamp_min(1e-12).sqrt()


def rkd_distance(student_emb: Tensor, teacher_emb: Tensor, mask: Tensor | None = None) -> Tensor:
    """RKD distance loss (Park et al., CVPR 2019, "Relational Knowledge Distillation").

    ``psi(i, j) = ||e_i - e_j|| / mu`` with ``mu`` the mean distance over the batch's pairs,
    computed separately in the student and the teacher space (dims may differ); the loss is
    the smooth-L1 (Huber, delta = 1) between student and teacher ``psi`` averaged over ordered
    pairs ``i != j`` of valid rows (the reference code also averages in the zero diagonal,
    which only rescales by ``(b - 1) / b``).

    Args:
        student_emb (Tensor): [b, d_s] float (extra dims are flattened).
        teacher_emb (Tensor): [b, d_t] float.
        mask (Tensor | None): [b] bool, rows taking part.

    Returns:
        Tensor: [] float; zero with grad when fewer than 2 rows are valid.
    """
    s, t, valid = _relational_inputs(student_emb, teacher_emb, mask)
    b = s.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=s.device)
    pairs = (valid.unsqueeze(0) & valid.unsqueeze(1) & ~eye).to(s.dtype)

    def normalised(d: Tensor) -> Tensor:
        mean = (d * pairs).sum() / pairs.sum().clamp_min(1.0)
        return d / torch.where(mean > 0, mean, torch.ones_like(mean))

    s_d = normalised(_pairwise_distances(s))
    t_d = normalised(_pairwise_distances(t))
    per_pair = F.smooth_l1_loss(s_d, t_d, reduction="none", beta=1.0)
    return _weighted_mean(per_pair, pairs)


def _triplet_cosines(x: Tensor) -> Tensor:
    """cos[j, i, k] = cos angle between x_i - x_j and x_k - x_j, from the Gram matrix [b, b, b]."""
    g = x @ x.T
    diag = g.diagonal()
    # <x_i - x_j, x_k - x_j> = g_ik - g_ij - g_jk + g_jj, indexed [j, i, k]
    dot = g.unsqueeze(0) - g.unsqueeze(2) - g.unsqueeze(1) + diag.view(-1, 1, 1)
    sq_norm = (diag.unsqueeze(0) - 2.0 * g + diag.unsqueeze(1)).clamp_min(1e-12)  # [j, i]
    norm = sq_norm.sqrt()
    return dot / (norm.unsqueeze(2) * norm.unsqueeze(1))


def rkd_angle(student_emb: Tensor, teacher_emb: Tensor, mask: Tensor | None = None) -> Tensor:
    """RKD angle loss (Park et al., CVPR 2019): smooth-L1 between triplet angle cosines.

    For every anchor j and distinct i, k: ``cos angle(e_i - e_j, e_k - e_j)`` in student and
    teacher space; the loss averages the smooth-L1 (delta = 1) over ordered triplets of
    distinct valid rows. Computed from the Gram matrix, so memory is b^3, independent of d.

    Args:
        student_emb (Tensor): [b, d_s] float.
        teacher_emb (Tensor): [b, d_t] float.
        mask (Tensor | None): [b] bool.

    Returns:
        Tensor: [] float; zero with grad when fewer than 3 rows are valid.
    """
    s, t, valid = _relational_inputs(student_emb, teacher_emb, mask)
    b = s.shape[0]
    idx = torch.arange(b, device=s.device)
    j, i, k = idx.view(-1, 1, 1), idx.view(1, -1, 1), idx.view(1, 1, -1)
    distinct = (i != j) & (k != j) & (i != k)
    triplets = distinct & valid.view(-1, 1, 1) & valid.view(1, -1, 1) & valid.view(1, 1, -1)
    per_triplet = F.smooth_l1_loss(_triplet_cosines(s), _triplet_cosines(t), reduction="none", beta=1.0)
    return _weighted_mean(per_triplet, triplets.to(s.dtype))


# --------------------------------------------------------------------------- retrieval


def contrastive_distill(
    student_anchor: Tensor,
    teacher_positive: Tensor,
    teacher_negatives: Tensor,
    temperature: float = 0.05,
    neg_mask: Tensor | None = None,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """InfoNCE against stored teacher embeddings of the positive and of mined hard negatives.

    ``l = -log( exp(cos(a, p) / T) / (exp(cos(a, p) / T) + sum_j exp(cos(a, n_j) / T)) )``:
    the student anchor must pick its positive's teacher embedding among the negatives'
    teacher embeddings (cross-entropy with target 0). Masked-out negatives are dropped; a row
    whose negatives are all masked has loss 0.

    Args:
        student_anchor (Tensor): [b, d] float, student embedding in the teacher's space.
        teacher_positive (Tensor): [b, d] float, stored teacher embedding of the positive.
        teacher_negatives (Tensor): [b, n, d] float, stored teacher embeddings of the negatives.
        temperature (float): T > 0.
        neg_mask (Tensor | None): [b, n] bool, True = a real negative (False: padding, or a
            false negative).
        weights (Tensor | None): [b] float.
        mask (Tensor | None): [b] bool.

    Returns:
        Tensor: [] float.
    """
    _require_ndim("student_anchor", student_anchor, 2, "[b, d]")
    _require_float("student_anchor", student_anchor)
    b, d = student_anchor.shape
    _require_shape("teacher_positive", teacher_positive, (b, d), "[b, d] like student_anchor")
    _require_float("teacher_positive", teacher_positive)
    _require_ndim("teacher_negatives", teacher_negatives, 3, "[b, n, d]")
    _require_float("teacher_negatives", teacher_negatives)
    if teacher_negatives.shape[0] != b or teacher_negatives.shape[2] != d:
        raise ValueError(
            f"teacher_negatives must have shape [b, n, d] = [{b}, n, {d}], got {_shape(teacher_negatives)}"
        )
    n = teacher_negatives.shape[1]
    temperature = _positive("temperature", temperature)
    dtype = _compute_dtype(student_anchor, teacher_positive, teacher_negatives)
    w = _contribution((b,), weights, mask, dtype=dtype, device=student_anchor.device, spec="[b]")
    keep = w != 0
    anchor = F.normalize(student_anchor.to(dtype), dim=-1)
    positive = F.normalize(_zero_rows(teacher_positive.detach().to(dtype), keep), dim=-1)
    negatives = F.normalize(_zero_rows(teacher_negatives.detach().to(dtype), keep), dim=-1)
    pos_score = (anchor * positive).sum(-1) / temperature
    neg_scores = torch.einsum("bd,bnd->bn", anchor, negatives) / temperature
    if neg_mask is not None:
        neg_valid = _bool_mask("neg_mask", neg_mask, (b, n), "[b, n]")
        neg_scores = neg_scores.masked_fill(~neg_valid, float("-inf"))
    logits = torch.cat([pos_score.unsqueeze(-1), neg_scores], dim=-1)
    per_row = torch.logsumexp(logits, dim=-1) - pos_score
    return _weighted_mean(per_row, w)


def ranking_distill(
    student_anchor: Tensor,
    student_candidates: Tensor,
    teacher_scores: Tensor,
    temperature: float,
    candidate_mask: Tensor | None = None,
    teacher_temperature: float | None = None,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Listwise ranking distillation (RankDistil / listwise KD) over the positive + hard negatives.

    ``KL( softmax(teacher_scores / T_t) || softmax(cos(anchor, candidate) / T) )`` over each
    row's valid candidates (no ``T^2`` factor: the student scores are cosines, not logits).

    Args:
        student_anchor (Tensor): [b, d] float, student query/anchor embedding.
        student_candidates (Tensor): [b, m, d] float, student embeddings of the candidates.
        teacher_scores (Tensor): [b, m] float, stored teacher relevance scores.
        temperature (float): T > 0 for the student cosines.
        candidate_mask (Tensor | None): [b, m] bool, True = a real candidate.
        teacher_temperature (float | None): T_t for the teacher scores; defaults to T.
        weights (Tensor | None): [b] float.
        mask (Tensor | None): [b] bool.

    Returns:
        Tensor: [] float; rows without a valid candidate do not contribute.
    """
    _require_ndim("student_anchor", student_anchor, 2, "[b, d]")
    _require_float("student_anchor", student_anchor)
    b, d = student_anchor.shape
    _require_ndim("student_candidates", student_candidates, 3, "[b, m, d]")
    _require_float("student_candidates", student_candidates)
    if student_candidates.shape[0] != b or student_candidates.shape[2] != d:
        raise ValueError(
            f"student_candidates must have shape [b, m, d] = [{b}, m, {d}], got {_shape(student_candidates)}"
        )
    m = student_candidates.shape[1]
    _require_shape("teacher_scores", teacher_scores, (b, m), "[b, m]")
    _require_float("teacher_scores", teacher_scores)
    temperature = _positive("temperature", temperature)
    t_temperature = (
        temperature if teacher_temperature is None else _positive("teacher_temperature", teacher_temperature)
    )
    dtype = _compute_dtype(student_anchor, student_candidates, teacher_scores)
    device = student_anchor.device
    valid = (
        torch.ones(b, m, dtype=torch.bool, device=device)
        if candidate_mask is None
        else _bool_mask("candidate_mask", candidate_mask, (b, m), "[b, m]")
    )
    w = _contribution((b,), weights, mask, dtype=dtype, device=device, spec="[b]")
    w = w * valid.any(-1).to(dtype)
    scores_t = _zero_rows(teacher_scores.detach().to(dtype), w != 0) / t_temperature
    anchor = F.normalize(student_anchor.to(dtype), dim=-1)
    candidates = F.normalize(student_candidates.to(dtype), dim=-1)
    scores_s = torch.einsum("bd,bmd->bm", anchor, candidates) / temperature
    per_row = _kl_rows(_masked_log_softmax(scores_t, valid), _masked_log_softmax(scores_s, valid))
    return _weighted_mean(per_row, w)


# --------------------------------------------------------------------------- DHO


def _teacher_as_logits(teacher: Tensor, is_probs: bool, dtype: torch.dtype) -> Tensor:
    teacher = teacher.detach().to(dtype)
    if not is_probs:
        return teacher
    # softmax(log p / T) == p^(1/T) / sum p^(1/T): exact tempering of stored probabilities.
    return torch.log(teacher.clamp_min(torch.finfo(dtype).tiny))


def dho_loss(
    ce_head_logits: Tensor,
    kd_head_logits: Tensor,
    labels: Tensor,
    teacher: Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
    *,
    teacher_is_probs: bool = False,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Dual-Head Optimization training loss (Kang et al., 2025, arXiv:2505.07675).

    ``alpha * CE(ce_head, labels) + (1 - alpha) * soft_kl(kd_head, teacher, T)``: the CE head
    learns only from labelled rows (mean over those), the KD head from every row (mean over
    all), so the two signals never share a classifier and their gradients do not conflict in
    the head. The authors' code (erjui/DHO) uses ``alpha = 0.5`` and ``T = 2``; it averages the
    KD term over the labelled and the unlabelled half separately and sums them, which this
    mixed-batch form replaces with one mean over rows.

    Args:
        ce_head_logits (Tensor): [b, c] float, logits of the supervised head.
        kd_head_logits (Tensor): [b, c] float, logits of the distillation head.
        labels (Tensor): [b] integer, -1 (any negative) = unlabelled.
        teacher (Tensor): [b, c] float, teacher logits, or probabilities with
            ``teacher_is_probs=True`` (tempered exactly: ``p^(1/T)`` renormalised).
        temperature (float): KD temperature T > 0.
        alpha (float): weight of the CE term in [0, 1].
        teacher_is_probs (bool): ``teacher`` holds probabilities, not logits.
        weights (Tensor | None): [b] float, applied to both terms.
        mask (Tensor | None): [b] bool, applied to both terms.

    Returns:
        Tensor: [] float.
    """
    _require_ndim("ce_head_logits", ce_head_logits, 2, "[b, c]")
    _require_shape("kd_head_logits", kd_head_logits, ce_head_logits.shape, "[b, c] like ce_head_logits")
    _require_shape("teacher", teacher, ce_head_logits.shape, "[b, c] like ce_head_logits")
    _require_float("teacher", teacher)
    alpha = _unit_interval("alpha", alpha)
    dtype = _compute_dtype(ce_head_logits, kd_head_logits, teacher)
    teacher_logits = _teacher_as_logits(teacher, teacher_is_probs, dtype)
    ce = cross_entropy(ce_head_logits, labels, weights, mask)
    kd = soft_kl(kd_head_logits, teacher_logits, temperature, weights, mask)
    return alpha * ce + (1.0 - alpha) * kd


def dho_combine(
    ce_head_logits: Tensor, kd_head_logits: Tensor, alpha: float = 0.5, beta: float = 1.0
) -> Tensor:
    """DHO inference: ``alpha * softmax(ce_head) + (1 - alpha) * softmax(kd_head / beta)``.

    The paper linearly combines the two heads' probabilities, with a temperature ``beta`` on
    the KD head only; both are tuned on validation data after training (the authors search
    alpha in 0..1 step 0.05 and beta in {0.5, 0.75, 1, 1.25, 1.5, 2, 4}). Here ``alpha``
    weights the CE head; the authors' ``evaluate`` names the KD-head weight alpha, so their
    alpha is ``1 - alpha`` here.

    Args:
        ce_head_logits (Tensor): [b, c] float.
        kd_head_logits (Tensor): [b, c] float.
        alpha (float): CE-head weight in [0, 1].
        beta (float): temperature > 0 on the KD head.

    Returns:
        Tensor: [b, c] float probabilities (rows sum to 1).
    """
    _require_ndim("ce_head_logits", ce_head_logits, 2, "[b, c]")
    _require_float("ce_head_logits", ce_head_logits)
    _require_shape("kd_head_logits", kd_head_logits, ce_head_logits.shape, "[b, c] like ce_head_logits")
    _require_float("kd_head_logits", kd_head_logits)
    alpha = _unit_interval("alpha", alpha)
    beta = _positive("beta", beta)
    dtype = _compute_dtype(ce_head_logits, kd_head_logits)
    p_ce = F.softmax(ce_head_logits.to(dtype), dim=-1)
    p_kd = F.softmax(kd_head_logits.to(dtype) / beta, dim=-1)
    return alpha * p_ce + (1.0 - alpha) * p_kd


# --------------------------------------------------------------------------- sample weights


def confidence_weights(
    scores: Tensor,
    kind: Literal["max_prob", "entropy"] = "max_prob",
    num_classes: int | None = None,
    power: float = 1.0,
) -> Tensor:
    """Per-row weights in [0, 1] from stored teacher confidence scores.

    - ``max_prob``: ``clamp(max_prob, 0, 1) ** power``.
    - ``entropy``: ``clamp(1 - H / log(C), 0, 1) ** power`` with H in nats
      (the store's ``scores/entropy``); 1 for a one-hot teacher, 0 for a uniform one.

    Args:
        scores (Tensor): [b] float, ``scores/max_prob`` or ``scores/entropy``.
        kind (str): ``"max_prob"`` or ``"entropy"``.
        num_classes (int | None): C, required for ``entropy``.
        power (float): exponent >= 0; larger values down-weight unsure rows harder.

    Returns:
        Tensor: [b] float, detached.
    """
    _require_ndim("scores", scores, 1, "[b]")
    _require_float("scores", scores)
    power = float(power)
    if not (power >= 0 and math.isfinite(power)):
        raise ValueError(f"power must be a finite number >= 0, got {power}")
    x = scores.detach().to(_compute_dtype(scores))
    if kind == "max_prob":
        base = x.clamp(0.0, 1.0)
    elif kind == "entropy":
        if num_classes is None or int(num_classes) < 2:
            raise ValueError(f"kind='entropy' needs num_classes >= 2, got {num_classes}")
        base = (1.0 - x / math.log(int(num_classes))).clamp(0.0, 1.0)
    else:
        raise ValueError(f"kind must be 'max_prob' or 'entropy', got {kind!r}")
    return base.pow(power)


# --------------------------------------------------------------------------- multi-teacher


def _stack_teachers(teacher_logits: TeacherLogits) -> Tensor:
    if isinstance(teacher_logits, Tensor):
        _require_ndim("teacher_logits", teacher_logits, 3, "[t, b, c]")
        _require_float("teacher_logits", teacher_logits)
        stacked = teacher_logits
    else:
        tensors = list(teacher_logits)
        if not tensors:
            raise ValueError("teacher_logits is empty; pass at least one [b, c] tensor")
        for i, x in enumerate(tensors):
            _require_ndim(f"teacher_logits[{i}]", x, 2, "[b, c]")
            _require_float(f"teacher_logits[{i}]", x)
            if _shape(x) != _shape(tensors[0]):
                raise ValueError(
                    f"teacher_logits[{i}] has shape {_shape(x)} but teacher_logits[0] has "
                    f"{_shape(tensors[0])}"
                )
        dtype = _compute_dtype(*tensors)
        stacked = torch.stack([x.to(dtype) for x in tensors])
    if stacked.shape[0] < 1:
        raise ValueError("teacher_logits has no teachers (t = 0)")
    return stacked.detach()


def _teacher_valid(teacher_mask: Tensor | None, t: int, b: int, device: torch.device) -> Tensor:
    if teacher_mask is None:
        return torch.ones(t, b, dtype=torch.bool, device=device)
    return _bool_mask("teacher_mask", teacher_mask, (t, b), "[t, b]")


def combine_teachers(
    teacher_logits: TeacherLogits,
    temperature: float = 1.0,
    mode: Literal["fixed", "confidence"] = "fixed",
    weights: Tensor | Sequence[float] | None = None,
    tau: float = 1.0,
    teacher_mask: Tensor | None = None,
) -> Tensor:
    """Mix several teachers into one target distribution ``sum_t w_tb * softmax(z_t / T)``.

    - ``fixed``: ``w_t`` = ``weights`` (default uniform), normalised over valid teachers.
    - ``confidence``: per row, ``w_tb`` = softmax over teachers of ``log(weights_t) - H_tb / tau``,
      with ``H_tb`` the entropy of teacher t's own (T = 1) prediction: confident teachers
      lead, and the choice does not wash out as T grows.

    Args:
        teacher_logits (Sequence[Tensor] | Tensor): t tensors [b, c], or one [t, b, c].
        temperature (float): T > 0 of the mixed distributions.
        mode (str): ``"fixed"`` or ``"confidence"``.
        weights (Tensor | Sequence[float] | None): [t] non-negative teacher weights (a prior
            in ``confidence`` mode).
        tau (float): > 0, sharpness of the confidence weighting.
        teacher_mask (Tensor | None): [t, b] bool, False where a teacher has no valid output
            (``TeacherData.valid()``); rows with no valid teacher come out uniform, so mask
            them out of the loss.

    Returns:
        Tensor: [b, c] float target probabilities at temperature T (rows sum to 1).
    """
    z = _stack_teachers(teacher_logits)
    t, b, c = z.shape
    temperature = _positive("temperature", temperature)
    if mode not in ("fixed", "confidence"):
        raise ValueError(f"mode must be 'fixed' or 'confidence', got {mode!r}")
    dtype = _compute_dtype(z)
    z = z.to(dtype)
    valid = _teacher_valid(teacher_mask, t, b, z.device)
    z = _zero_rows(z, valid)
    if weights is None:
        prior = torch.ones(t, dtype=dtype, device=z.device)
    else:
        prior = torch.as_tensor(weights, dtype=dtype, device=z.device)
        _require_shape("weights", prior, (t,), "[t]")
        if bool((prior < 0).any()) or not float(prior.sum()) > 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {prior.tolist()}")
    w = prior.unsqueeze(1).expand(t, b)
    if mode == "confidence":
        tau = _positive("tau", tau)
        probs_1 = F.softmax(z, dim=-1)
        entropy = -(probs_1 * F.log_softmax(z, dim=-1)).sum(-1)  # [t, b]
        # Shift by the per-row minimum over valid teachers: cancels in the normalisation.
        best = entropy.masked_fill(~valid, float("inf")).min(0, keepdim=True).values
        best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
        w = w * torch.exp(-(entropy - best) / tau)
    w = w * valid.to(dtype)
    total = w.sum(0)  # [b]
    mixed = (w.unsqueeze(-1) * F.softmax(z / temperature, dim=-1)).sum(0)
    mixed = mixed / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    uniform = torch.full_like(mixed, 1.0 / c)
    return torch.where((total > 0).unsqueeze(-1), mixed, uniform)


def multi_teacher_kl(
    student_logits: Tensor,
    teacher_probs: Tensor,
    temperature: float,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """``KL(teacher_probs || softmax(student / T)) * T^2`` for a precomputed target.

    Args:
        student_logits (Tensor): [b, c] float.
        teacher_probs (Tensor): [b, c] float probabilities at temperature T, e.g. from
            ``combine_teachers(..., temperature=T)``.
        temperature (float): T > 0.
        weights (Tensor | None): [b] float.
        mask (Tensor | None): [b] bool.

    Returns:
        Tensor: [] float.
    """
    _require_ndim("student_logits", student_logits, 2, "[b, c]")
    _require_float("student_logits", student_logits)
    _require_shape("teacher_probs", teacher_probs, student_logits.shape, "[b, c] like student_logits")
    _require_float("teacher_probs", teacher_probs)
    temperature = _positive("temperature", temperature)
    dtype = _compute_dtype(student_logits, teacher_probs)
    b = student_logits.shape[0]
    w = _contribution((b,), weights, mask, dtype=dtype, device=student_logits.device, spec="[b]")
    p = _zero_rows(teacher_probs.detach().to(dtype), w != 0).clamp_min(0.0)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    per_row = _kl_rows(torch.log(p), log_q) * temperature**2
    return _weighted_mean(per_row, w)


class TeacherRouter(nn.Module):
    """Instance-level teacher router, after MST-Distill (Li et al., 2025, arXiv:2507.07015).

    A two-layer MLP over a per-row student representation (MST-Distill feeds the student's
    logits; pooled features work too) giving routing logits over t teachers. Train it with
    ``routed_teacher_kl``, which adds the load-balancing regulariser.

    Args:
        in_features (int): d of the student representation.
        num_teachers (int): t.
        hidden_features (int | None): hidden width, default ``2 * in_features`` (as in
            MST-Distill's gate).
        detach_input (bool): stop the routing loss from reshaping the student's features
            (default True; the student learns from the distillation term only).
    """

    def __init__(
        self,
        in_features: int,
        num_teachers: int,
        hidden_features: int | None = None,
        detach_input: bool = True,
    ) -> None:
        super().__init__()
        if in_features < 1 or num_teachers < 1:
            raise ValueError(
                f"in_features and num_teachers must be >= 1, got {in_features} and {num_teachers}"
            )
        hidden = hidden_features if hidden_features is not None else 2 * in_features
        self.in_features = in_features
        self.num_teachers = num_teachers
        self.detach_input = detach_input
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, num_teachers))

    def forward(self, student_repr: Tensor) -> Tensor:
        """``student_repr [b, in_features]`` -> routing logits ``[b, t]``."""
        if student_repr.dim() != 2 or student_repr.shape[1] != self.in_features:
            raise ValueError(
                f"student_repr must have shape [b, {self.in_features}], got {_shape(student_repr)}"
            )
        x = student_repr.detach() if self.detach_input else student_repr
        return self.net(x)


def router_balance_loss(route_probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Load-balancing regulariser ``KL(uniform || mean_b route_probs)`` (MST-Distill's "KL" mode).

    Zero when teachers are used equally on average over the contributing rows.

    Args:
        route_probs (Tensor): [b, t] float, per-row routing probabilities.
        mask (Tensor | None): [b] bool.

    Returns:
        Tensor: [] float >= 0.
    """
    _require_ndim("route_probs", route_probs, 2, "[b, t]")
    _require_float("route_probs", route_probs)
    b, t = route_probs.shape
    dtype = _compute_dtype(route_probs)
    w = _contribution((b,), None, mask, dtype=dtype, device=route_probs.device, spec="[b]")
    probs = route_probs.to(dtype)
    total = w.sum()
    usage = (w.unsqueeze(-1) * probs).sum(0) / torch.where(total > 0, total, torch.ones_like(total))
    log_uniform = -math.log(t)
    kl = (math.exp(log_uniform) * (log_uniform - torch.log(usage.clamp_min(1e-12)))).sum()
    return torch.where(total > 0, kl, (probs * 0).sum())


def routed_teacher_kl(
    student_logits: Tensor,
    teacher_logits: TeacherLogits,
    route_logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    balance_weight: float = 0.01,
    teacher_mask: Tensor | None = None,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Distillation from a per-row routed mixture of teachers (MST-Distill-style).

    ``g = softmax(route_logits)`` over valid teachers (kept to the ``top_k`` largest and
    renormalised, if set); the loss is ``sum_t g_bt * KL(p_t || q) * T^2`` averaged over rows,
    plus ``balance_weight * router_balance_loss`` on the un-truncated routing. For the
    student this has the gradient of KL to the mixture ``sum_t g_bt p_t``; for the router
    it favours the teachers the student can follow on that row, which the balance term
    keeps from collapsing onto one teacher. (MST-Distill's own code selects the top-k
    teachers without passing a gradient through them; here the kept weights stay
    differentiable.)

    Args:
        student_logits (Tensor): [b, c] float.
        teacher_logits (Sequence[Tensor] | Tensor): t tensors [b, c], or one [t, b, c].
        route_logits (Tensor): [b, t] float, from ``TeacherRouter``.
        temperature (float): T > 0.
        top_k (int | None): keep only the k best-routed teachers per row.
        balance_weight (float): >= 0, weight of the load-balancing term.
        teacher_mask (Tensor | None): [t, b] bool, False = that teacher has no output for the row.
        weights (Tensor | None): [b] float.
        mask (Tensor | None): [b] bool.

    Returns:
        Tensor: [] float.
    """
    _require_ndim("student_logits", student_logits, 2, "[b, c]")
    _require_float("student_logits", student_logits)
    z = _stack_teachers(teacher_logits)
    t, b, c = z.shape
    if (b, c) != _shape(student_logits):
        raise ValueError(
            f"teacher_logits must have shape [t, b, c] with [b, c] = student_logits shape "
            f"{_shape(student_logits)}, got {_shape(z)}"
        )
    _require_shape("route_logits", route_logits, (b, t), "[b, t]")
    _require_float("route_logits", route_logits)
    temperature = _positive("temperature", temperature)
    balance_weight = float(balance_weight)
    if not (balance_weight >= 0 and math.isfinite(balance_weight)):
        raise ValueError(f"balance_weight must be a finite number >= 0, got {balance_weight}")
    if top_k is not None and not 1 <= int(top_k) <= t:
        raise ValueError(f"top_k must be in [1, t = {t}], got {top_k}")
    dtype = _compute_dtype(student_logits, z, route_logits)
    device = student_logits.device
    valid = _teacher_valid(teacher_mask, t, b, device)  # [t, b]
    z = _zero_rows(z.to(dtype), valid)
    kl = _soft_kl_rows(student_logits.to(dtype).unsqueeze(0), z, temperature)  # [t, b]
    kl = torch.where(valid, kl, torch.zeros_like(kl)).T  # [b, t]
    valid_bt = valid.T
    w = _contribution((b,), weights, mask, dtype=dtype, device=device, spec="[b]")
    w = w * valid_bt.any(-1).to(dtype)
    full_log_gate = _masked_log_softmax(route_logits.to(dtype), valid_bt)
    gate_logits = route_logits.to(dtype)
    if top_k is not None:
        kth = gate_logits.masked_fill(~valid_bt, float("-inf")).topk(int(top_k), dim=-1).values[:, -1:]
        valid_bt = valid_bt & (gate_logits >= kth)
    gate = _masked_log_softmax(gate_logits, valid_bt).exp()
    per_row = (gate * kl).sum(-1)
    distill = _weighted_mean(per_row, w)
    if balance_weight == 0:
        return distill
    return distill + balance_weight * router_balance_loss(full_log_gate.exp(), w != 0)


# --------------------------------------------------------------------------- language models


def _flatten_tokens(x: Tensor) -> Tensor:
    return x.reshape(-1, *x.shape[2:])


def token_kl(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    teacher_topk: tuple[Tensor, Tensor, Tensor] | None = None,
    attention_mask: Tensor | None = None,
    temperature: float = 1.0,
    weights: Tensor | None = None,
) -> Tensor:
    """Token-level LM distillation: per-token ``KL(p_T || q_T) * T^2``, mean over real tokens.

    The teacher is either full logits or the stored top-k triplet per token (then each token
    uses ``topk_kl``'s k+1-bucket KL). The mean runs over all non-masked tokens of the batch
    (each token counts once; long sequences weigh more, as in token-level LM losses).

    Args:
        student_logits (Tensor): [b, s, v] float.
        teacher_logits (Tensor | None): [b, s, v] float.
        teacher_topk (tuple | None): ``(values [b, s, k] float, indices [b, s, k] int,
            residual [b, s] float)``.
        attention_mask (Tensor | None): [b, s] bool or 0/1 int, True/1 = real token.
        temperature (float): T > 0.
        weights (Tensor | None): [b] float, per-sequence weights applied to its tokens.

    Returns:
        Tensor: [] float.
    """
    _require_ndim("student_logits", student_logits, 3, "[b, s, v]")
    _require_float("student_logits", student_logits)
    b, s, v = student_logits.shape
    if (teacher_logits is None) == (teacher_topk is None):
        raise ValueError("pass exactly one of teacher_logits and teacher_topk")
    temperature = _positive("temperature", temperature)
    dtype = _compute_dtype(student_logits, teacher_logits)
    device = student_logits.device
    w = _contribution((b, s), None, None, dtype=dtype, device=device, spec="[b, s]")
    if attention_mask is not None:
        w = w * _bool_mask("attention_mask", attention_mask, (b, s), "[b, s]").to(dtype)
    if weights is not None:
        _require_shape("weights", weights, (b,), "[b]")
        _require_float("weights", weights)
        w = w * weights.to(dtype).unsqueeze(-1)
    keep = w != 0
    student = _flatten_tokens(student_logits.to(dtype))
    if teacher_logits is not None:
        _require_shape("teacher_logits", teacher_logits, (b, s, v), "[b, s, v] like student_logits")
        _require_float("teacher_logits", teacher_logits)
        teacher = _zero_rows(teacher_logits.detach().to(dtype), keep)
        per_token = _soft_kl_rows(student, _flatten_tokens(teacher), temperature)
    else:
        if not isinstance(teacher_topk, tuple) or len(teacher_topk) != 3:
            raise ValueError("teacher_topk must be a tuple (values, indices, residual)")
        values, indices, residual = teacher_topk
        _check_topk("teacher_topk ", (b, s), v, values, indices, residual)
        k = values.shape[-1]
        values = _zero_rows(values.detach().to(dtype), keep)
        residual = _zero_rows(residual.detach().to(dtype), keep)
        arange = torch.arange(k, device=indices.device).expand_as(indices)
        indices = torch.where(keep.unsqueeze(-1), indices.long(), arange)
        per_token = _topk_kl_rows(
            student, _flatten_tokens(values), _flatten_tokens(indices), residual.reshape(-1), temperature
        )
    return _weighted_mean(per_token.reshape(b, s), w)


def taid_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    lam: float,
    mask: Tensor | None = None,
    *,
    space: Literal["logit", "prob"] = "logit",
    weights: Tensor | None = None,
) -> Tensor:
    """TAID (Shing et al., ICLR 2025, arXiv:2501.16937): KL to a student-teacher interpolation.

    ``J = KL(p_lam || q)`` with ``q = softmax(student)`` and the intermediate target

    - ``space="logit"`` (the paper's definition, and the reference code released with it,
      SakanaAI/TAID, read via the fork Rumia-Channel/TAID ``src/distil_losses/taid.py``):
      ``p_lam = softmax((1 - lam) * stopgrad(student) + lam * teacher)``;
    - ``space="prob"``: ``p_lam = (1 - lam) * softmax(stopgrad(student)) + lam * softmax(teacher)``.

    ``lam`` moves from ~0.4 to 1 during training (``TaidSchedule``); at ``lam = 1`` this is
    plain forward KL. The reference code reports the cross-entropy form (J + H(p_lam)); the
    gradient is the same.

    Args:
        student_logits (Tensor): [b, c] or [b, s, v] float.
        teacher_logits (Tensor): same shape, float.
        lam (float): interpolation coefficient in [0, 1].
        mask (Tensor | None): [b] or [b, s] bool (0/1 int accepted), True = counts.
        space (str): ``"logit"`` or ``"prob"``.
        weights (Tensor | None): [b] float, per-row (per-sequence) weights.

    Returns:
        Tensor: [] float, mean over contributing rows/tokens.
    """
    _require_tensor("student_logits", student_logits)
    _require_float("student_logits", student_logits)
    if student_logits.dim() not in (2, 3):
        raise ValueError(f"student_logits must have shape [b, c] or [b, s, v], got {_shape(student_logits)}")
    _require_shape("teacher_logits", teacher_logits, student_logits.shape, "like student_logits")
    _require_float("teacher_logits", teacher_logits)
    lam = _unit_interval("lam", lam)
    if space not in ("logit", "prob"):
        raise ValueError(f"space must be 'logit' or 'prob', got {space!r}")
    lead = _shape(student_logits)[:-1]
    spec = "[b]" if len(lead) == 1 else "[b, s]"
    dtype = _compute_dtype(student_logits, teacher_logits)
    device = student_logits.device
    w = _contribution(lead, None, None, dtype=dtype, device=device, spec=spec)
    if mask is not None:
        w = w * _bool_mask("mask", mask, lead, spec).to(dtype)
    if weights is not None:
        _require_shape("weights", weights, lead[:1], "[b]")
        _require_float("weights", weights)
        w = w * weights.to(dtype).reshape((-1,) + (1,) * (len(lead) - 1))
    student = student_logits.to(dtype)
    teacher = _zero_rows(teacher_logits.detach().to(dtype), w != 0)
    frozen = student.detach()
    if space == "logit":
        log_target = F.log_softmax((1.0 - lam) * frozen + lam * teacher, dim=-1)
    else:
        target = (1.0 - lam) * F.softmax(frozen, dim=-1) + lam * F.softmax(teacher, dim=-1)
        log_target = torch.log(target)
    per_row = _kl_rows(log_target, F.log_softmax(student, dim=-1))
    return _weighted_mean(per_row, w)


class TaidSchedule:
    """TAID's adaptive interpolation coefficient (Shing et al., ICLR 2025, arXiv:2501.16937).

    After each step with objective value ``J_n``:

    - ``delta_n = (J_{n-1} - J_n) / (J_{n-1} + 1e-15)`` (relative improvement),
    - ``m_n = beta * m_{n-1} + (1 - beta) * delta_n`` (momentum),
    - ``lam_{n+1} = min(end, max(lam_linear(n), lam_n + alpha * sigmoid(m_n) * (1 - lam_n)))``,

    where ``lam_linear(n) = start + (end - start) * n / total_steps`` is a floor that
    guarantees ``lam`` reaches ``end`` by the last step. ``lam`` moves faster while the student
    keeps improving and never decreases. The first call only records ``J``. Rule and defaults
    (start 0.4, end 1.0, alpha 5e-4, beta 0.99) follow the reference code released with the
    paper (``TAID.update_t``); ``adaptive=False`` gives the plain linear schedule.

    Args:
        total_steps (int): number of optimizer steps in the run (> 0).
        start (float): initial lam in [0, 1).
        end (float): final lam in (start, 1].
        alpha (float): step size of the adaptive increase, in [0, 1].
        beta (float): momentum coefficient in [0, 1).
        adaptive (bool): use the adaptive rule (True) or only the linear floor.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        start: float = 0.4,
        end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        adaptive: bool = True,
    ) -> None:
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0.0 <= start < 1.0:
            raise ValueError(f"start must be in [0, 1), got {start}")
        if not start < end <= 1.0:
            raise ValueError(f"end must be in (start, 1] = ({start}, 1], got {end}")
        _unit_interval("alpha", alpha)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.total_steps = int(total_steps)
        self.start = float(start)
        self.end = float(end)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.adaptive = bool(adaptive)
        self.lam = float(start)
        self.momentum = 0.0
        self.prev_loss: float | None = None

    def update(self, loss: float | Tensor, step: int) -> float:
        """Record the objective ``loss`` observed at optimizer step ``step``; return the new lam."""
        value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        if not math.isfinite(value):
            raise ValueError(f"loss must be finite, got {value}")
        if self.prev_loss is None:
            self.prev_loss = value
            return self.lam
        progress = min(max(int(step), 0) / self.total_steps, 1.0)
        linear = self.start + (self.end - self.start) * progress
        if self.adaptive:
            relative = (self.prev_loss - value) / (self.prev_loss + 1e-15)
            self.momentum = self.beta * self.momentum + (1.0 - self.beta) * relative
            increase = self.alpha * (1.0 / (1.0 + math.exp(-self.momentum))) * (1.0 - self.lam)
            self.lam = min(self.end, max(linear, self.lam + increase))
        else:
            self.lam = linear
        self.prev_loss = value
        return self.lam

    def state_dict(self) -> dict[str, float | None]:
        """The mutable state, for checkpoints."""
        return {"lam": self.lam, "momentum": self.momentum, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        """Restore what ``state_dict`` returned."""
        missing = {"lam", "momentum", "prev_loss"} - set(state)
        if missing:
            raise ValueError(f"TaidSchedule state is missing {sorted(missing)}")
        self.lam = float(state["lam"])  # type: ignore[arg-type]
        self.momentum = float(state["momentum"])  # type: ignore[arg-type]
        prev = state["prev_loss"]
        self.prev_loss = None if prev is None else float(prev)
