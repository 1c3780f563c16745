"""Language-model losses: token-level KD (full or top-k teacher) and TAID with its schedule.

Shape conventions and masking rules: :mod:`kdstore.train.losses`.
"""

from __future__ import annotations

import math
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
