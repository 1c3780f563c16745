"""Language-model losses: token-level KD (full or top-k teacher) and TAID with its schedule.

Shape conventions and masking rules: :mod:`kdstore.train.losses`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdstore.train.losses._common import (
    _shape,
    _require_tensor,
    _require_ndim,
    _require_shape,
    _require_float,
    _positive,
    _unit_interval,
    _compute_dtype,
    _bool_mask,
    _contribution,
    _weighted_mean,
    _zero_rows,
    _kl_rows,
    _soft_kl_rows,
    _topk_kl_rows,
    _check_topk,
)


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


# One TAID schedule for the library and the LM trainer (kdstore.train.losses_tokens).
from kdstore.train.losses_tokens import TaidSchedule  # noqa: E402,F401
