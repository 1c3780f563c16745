"""Multi-teacher losses: fixed / confidence mixing, the learned router (MST-Distill-style).

Shape conventions and masking rules: :mod:`kdstore.train.losses`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdstore.train.losses import _common as C


# --------------------------------------------------------------------------- multi-teacher


def _stack_teachers(teacher_logits: C.TeacherLogits) -> Tensor:
    if isinstance(teacher_logits, Tensor):
        C._require_float_ndim("teacher_logits", teacher_logits, 3, "[t, b, c]")
        stacked = teacher_logits
    else:
        tensors = list(teacher_logits)
        if not tensors:
            raise ValueError("teacher_logits is empty; pass at least one [b, c] tensor")
        for i, x in enumerate(tensors):
            C._require_float_ndim(f"teacher_logits[{i}]", x, 2, "[b, c]")
            if C._shape(x) != C._shape(tensors[0]):
                raise ValueError(
                    f"teacher_logits[{i}] has shape {C._shape(x)} but teacher_logits[0] has "
                    f"{C._shape(tensors[0])}"
                )
        dtype = C._compute_dtype(*tensors)
        stacked = torch.stack([x.to(dtype) for x in tensors])
    if stacked.shape[0] < 1:
        raise ValueError("teacher_logits has no teachers (t = 0)")
    return stacked.detach()


def _teacher_valid(teacher_mask: Tensor | None, t: int, b: int, device: torch.device) -> Tensor:
    if teacher_mask is None:
        return torch.ones(t, b, dtype=torch.bool, device=device)
    return C._bool_mask("teacher_mask", teacher_mask, (t, b), "[t, b]")


def combine_teachers(
    teacher_logits: C.TeacherLogits,
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
    temperature = C._positive("temperature", temperature)
    if mode not in ("fixed", "confidence"):
        raise ValueError(f"mode must be 'fixed' or 'confidence', got {mode!r}")
    dtype = C._compute_dtype(z)
    z = z.to(dtype)
    valid = _teacher_valid(teacher_mask, t, b, z.device)
    z = C._zero_rows(z, valid)
    if weights is None:
        prior = torch.ones(t, dtype=dtype, device=z.device)
    else:
        prior = torch.as_tensor(weights, dtype=dtype, device=z.device)
        C._require_shape("weights", prior, (t,), "[t]")
        if bool((prior < 0).any()) or not float(prior.sum()) > 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {prior.tolist()}")
    w = prior.unsqueeze(1).expand(t, b)
    if mode == "confidence":
        tau = C._positive("tau", tau)
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
    C._require_float_ndim("student_logits", student_logits, 2, "[b, c]")
    C._require_float_shape("teacher_probs", teacher_probs, student_logits.shape, "[b, c] like student_logits")
    temperature = C._positive("temperature", temperature)
    dtype = C._compute_dtype(student_logits, teacher_probs)
    b = student_logits.shape[0]
    w = C._contribution((b,), weights, mask, dtype=dtype, device=student_logits.device, spec="[b]")
    p = C._zero_rows(teacher_probs.detach().to(dtype), w != 0).clamp_min(0.0)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    per_row = C._kl_rows(torch.log(p), log_q) * temperature**2
    return C._weighted_mean(per_row, w)


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
                f"student_repr must have shape [b, {self.in_features}], got {C._shape(student_repr)}"
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
    C._require_float_ndim("route_probs", route_probs, 2, "[b, t]")
    b, t = route_probs.shape
    dtype = C._compute_dtype(route_probs)
    w = C._contribution((b,), None, mask, dtype=dtype, device=route_probs.device, spec="[b]")
    probs = route_probs.to(dtype)
    total = w.sum()
    usage = (w.unsqueeze(-1) * probs).sum(0) / torch.where(total > 0, total, torch.ones_like(total))
    log_uniform = -math.log(t)
    kl = (math.exp(log_uniform) * (log_uniform - torch.log(usage.clamp_min(1e-12)))).sum()
    return torch.where(total > 0, kl, (probs * 0).sum())


def routed_teacher_kl(
    student_logits: Tensor,
    teacher_logits: C.TeacherLogits,
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
    C._require_float_ndim("student_logits", student_logits, 2, "[b, c]")
    z = _stack_teachers(teacher_logits)
    t, b, c = z.shape
    if (b, c) != C._shape(student_logits):
        raise ValueError(
            f"teacher_logits must have shape [t, b, c] with [b, c] = student_logits shape "
            f"{C._shape(student_logits)}, got {C._shape(z)}"
        )
    C._require_float_shape("route_logits", route_logits, (b, t), "[b, t]")
    temperature = C._positive("temperature", temperature)
    balance_weight = float(balance_weight)
    if not (balance_weight >= 0 and math.isfinite(balance_weight)):
        raise ValueError(f"balance_weight must be a finite number >= 0, got {balance_weight}")
    if top_k is not None and not 1 <= int(top_k) <= t:
        raise ValueError(f"top_k must be in [1, t = {t}], got {top_k}")
    dtype = C._compute_dtype(student_logits, z, route_logits)
    device = student_logits.device
    valid = _teacher_valid(teacher_mask, t, b, device)  # [t, b]
    z = C._zero_rows(z.to(dtype), valid)
    kl = C._soft_kl_rows(student_logits.to(dtype).unsqueeze(0), z, temperature)  # [t, b]
    kl = torch.where(valid, kl, torch.zeros_like(kl)).T  # [b, t]
    valid_bt = valid.T
    w = C._contribution((b,), weights, mask, dtype=dtype, device=device, spec="[b]")
    w = w * valid_bt.any(-1).to(dtype)
    full_log_gate = C._masked_log_softmax(route_logits.to(dtype), valid_bt)
    gate_logits = route_logits.to(dtype)
    if top_k is not None:
        kth = gate_logits.masked_fill(~valid_bt, float("-inf")).topk(int(top_k), dim=-1).values[:, -1:]
        valid_bt = valid_bt & (gate_logits >= kth)
    gate = C._masked_log_softmax(gate_logits, valid_bt).exp()
    per_row = (gate * kl).sum(-1)
    distill = C._weighted_mean(per_row, w)
    if balance_weight == 0:
        return distill
    return distill + balance_weight * router_balance_loss(full_log_gate.exp(), w != 0)
