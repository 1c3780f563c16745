"""Retrieval losses: contrastive distillation against mined negatives, ranking distillation.

Shape conventions and masking rules: :mod:`kdstore.train.losses`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdstore.train.losses import _common as C


# --------------------------------------------------------------------------- retrieval


def _require_rows_of(name: str, x: object, b: int, d: int, letter: str) -> int:
    """Check ``x`` is a float [b, {letter}, d] tensor (``b, d`` from the anchor) and return its middle dim."""
    x = C._require_float_ndim(name, x, 3, f"[b, {letter}, d]")
    if x.shape[0] != b or x.shape[2] != d:
        raise ValueError(f"{name} must have shape [b, {letter}, d] = [{b}, {letter}, {d}], got {C._shape(x)}")
    return x.shape[1]


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
    C._require_float_ndim("student_anchor", student_anchor, 2, "[b, d]")
    b, d = student_anchor.shape
    C._require_float_shape("teacher_positive", teacher_positive, (b, d), "[b, d] like student_anchor")
    n = _require_rows_of("teacher_negatives", teacher_negatives, b, d, "n")
    temperature = C._positive("temperature", temperature)
    dtype = C._compute_dtype(student_anchor, teacher_positive, teacher_negatives)
    w = C._contribution((b,), weights, mask, dtype=dtype, device=student_anchor.device, spec="[b]")
    keep = w != 0
    anchor = F.normalize(student_anchor.to(dtype), dim=-1)
    positive = F.normalize(C._zero_rows(teacher_positive.detach().to(dtype), keep), dim=-1)
    negatives = F.normalize(C._zero_rows(teacher_negatives.detach().to(dtype), keep), dim=-1)
    pos_score = (anchor * positive).sum(-1) / temperature
    neg_scores = torch.einsum("bd,bnd->bn", anchor, negatives) / temperature
    if neg_mask is not None:
        neg_valid = C._bool_mask("neg_mask", neg_mask, (b, n), "[b, n]")
        neg_scores = neg_scores.masked_fill(~neg_valid, float("-inf"))
    logits = torch.cat([pos_score.unsqueeze(-1), neg_scores], dim=-1)
    per_row = torch.logsumexp(logits, dim=-1) - pos_score
    return C._weighted_mean(per_row, w)


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
    C._require_float_ndim("student_anchor", student_anchor, 2, "[b, d]")
    b, d = student_anchor.shape
    m = _require_rows_of("student_candidates", student_candidates, b, d, "m")
    C._require_float_shape("teacher_scores", teacher_scores, (b, m), "[b, m]")
    temperature = C._positive("temperature", temperature)
    t_temperature = (
        temperature if teacher_temperature is None else C._positive("teacher_temperature", teacher_temperature)
    )
    dtype = C._compute_dtype(student_anchor, student_candidates, teacher_scores)
    device = student_anchor.device
    valid = (
        torch.ones(b, m, dtype=torch.bool, device=device)
        if candidate_mask is None
        else C._bool_mask("candidate_mask", candidate_mask, (b, m), "[b, m]")
    )
    w = C._contribution((b,), weights, mask, dtype=dtype, device=device, spec="[b]")
    w = w * valid.any(-1).to(dtype)
    scores_t = C._zero_rows(teacher_scores.detach().to(dtype), w != 0) / t_temperature
    anchor = F.normalize(student_anchor.to(dtype), dim=-1)
    candidates = F.normalize(student_candidates.to(dtype), dim=-1)
    scores_s = torch.einsum("bd,bmd->bm", anchor, candidates) / temperature
    per_row = C._kl_rows(C._masked_log_softmax(scores_t, valid), C._masked_log_softmax(scores_s, valid))
    return C._weighted_mean(per_row, w)
