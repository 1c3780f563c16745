"""Losses on logits: cross-entropy, Hinton KD, top-k KD, DHO and confidence weights.

Shape conventions and masking rules: :mod:`kdstore.train.losses`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdstore.train.losses import _common as C


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
    C._require_float_ndim("student_logits", student_logits, 2, "[b, c]")
    b = student_logits.shape[0]
    C._require_shape("labels", labels, (b,), "[b]")
    C._require_integer("labels", labels)
    dtype = C._compute_dtype(student_logits)
    w = C._contribution((b,), weights, mask, dtype=dtype, device=student_logits.device, spec="[b]")
    w = w * (labels >= 0).to(dtype)
    safe_labels = torch.where(w != 0, labels, torch.zeros_like(labels)).long()
    per_row = F.cross_entropy(student_logits.to(dtype), safe_labels, reduction="none")
    return C._weighted_mean(per_row, w)


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
    C._require_float_ndim("student_logits", student_logits, 2, "[b, c]")
    C._require_float_shape("teacher_logits", teacher_logits, student_logits.shape, "[b, c] like student_logits")
    temperature = C._positive("temperature", temperature)
    dtype = C._compute_dtype(student_logits, teacher_logits)
    b = student_logits.shape[0]
    w = C._contribution((b,), weights, mask, dtype=dtype, device=student_logits.device, spec="[b]")
    teacher = C._zero_rows(teacher_logits.detach().to(dtype), w != 0)
    per_row = C._soft_kl_rows(student_logits.to(dtype), teacher, temperature)
    return C._weighted_mean(per_row, w)


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
    C._require_float_ndim("student_logits", student_logits, 2, "[b, c]")
    b, c = student_logits.shape
    C._check_topk("topk_", (b,), c, topk_values, topk_indices, residual)
    temperature = C._positive("temperature", temperature)
    dtype = C._compute_dtype(student_logits, topk_values, residual)
    w = C._contribution((b,), weights, mask, dtype=dtype, device=student_logits.device, spec="[b]")
    keep = w != 0
    values = C._zero_rows(topk_values.detach().to(dtype), keep)
    res = C._zero_rows(residual.detach().to(dtype), keep)
    # A skipped row may hold garbage indices; give it 0..k-1 so gather stays in range.
    arange = torch.arange(topk_indices.shape[1], device=topk_indices.device).expand_as(topk_indices)
    indices = torch.where(keep.unsqueeze(-1), topk_indices.long(), arange)
    per_row = C._topk_kl_rows(student_logits.to(dtype), values, indices, res, temperature)
    return C._weighted_mean(per_row, w)


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
    C._require_ndim("ce_head_logits", ce_head_logits, 2, "[b, c]")
    C._require_shape("kd_head_logits", kd_head_logits, ce_head_logits.shape, "[b, c] like ce_head_logits")
    C._require_float_shape("teacher", teacher, ce_head_logits.shape, "[b, c] like ce_head_logits")
    alpha = C._unit_interval("alpha", alpha)
    dtype = C._compute_dtype(ce_head_logits, kd_head_logits, teacher)
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
    C._require_float_ndim("ce_head_logits", ce_head_logits, 2, "[b, c]")
    C._require_float_shape("kd_head_logits", kd_head_logits, ce_head_logits.shape, "[b, c] like ce_head_logits")
    alpha = C._unit_interval("alpha", alpha)
    beta = C._positive("beta", beta)
    dtype = C._compute_dtype(ce_head_logits, kd_head_logits)
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
    C._require_float_ndim("scores", scores, 1, "[b]")
    power = float(power)
    if not (power >= 0 and math.isfinite(power)):
        raise ValueError(f"power must be a finite number >= 0, got {power}")
    x = scores.detach().to(C._compute_dtype(scores))
    if kind == "max_prob":
        base = x.clamp(0.0, 1.0)
    elif kind == "entropy":
        if num_classes is None or int(num_classes) < 2:
            raise ValueError(f"kind='entropy' needs num_classes >= 2, got {num_classes}")
        base = (1.0 - x / math.log(int(num_classes))).clamp(0.0, 1.0)
    else:
        raise ValueError(f"kind must be 'max_prob' or 'entropy', got {kind!r}")
    return base.pow(power)
