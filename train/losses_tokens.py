"""Token-level losses for language-model distillation (pure functions).

Conventions for every function here:

- ``student_logits [b, n, V]``: the student's next-token logits; position t scores the token
  at t + 1 (as :class:`kdstore.pipeline.lm_model.GPT` returns them).
- Teacher targets are aligned to the same positions: full logits ``[b, n, V]``, the stored
  ``topk:K`` fields ``[b, n, K]`` / ``[b, n]``, or the ``sample:S`` fields ``[b, n, S]``
  (see :mod:`kdstore.pipeline.token_reduce`).
- ``mask [b, n]`` bool (0/1 ints accepted): True = the position counts. Use
  :func:`kdstore.pipeline.lm_model.kd_mask` for distillation terms (padding and
  ``<|endoftext|>`` positions excluded, so nothing crosses a document boundary) and the mask
  of :func:`~kdstore.pipeline.lm_model.next_token_targets` for CE.
- The result is the mean over counted positions (each token counts once); a batch with no
  counted position gives 0 (with a gradient of 0). KD terms are multiplied by ``T**2``.
- Inside :func:`shared_log_probs`, the student's ``log_softmax(logits / T)`` over the
  vocabulary is computed once per logits tensor and T and reused by every function here (CE
  beside a KD term at T = 1 costs one log-softmax and one backward through it, not two).

These supersede ``token_kl`` (full and top-k) and ``taid_loss``/``TaidSchedule`` of
:mod:`kdstore.train.losses` for the token family: :func:`topk_kl` keeps the residual as a
tail bucket *and* takes the stored log-probs (not raw logits), :func:`sampled_kl` is new
(RS-KD), :func:`forward_kl` / :func:`reverse_kl` / :func:`taid_kl` take ``[b, n, V]`` with a
position mask.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

_NEG = -1e9  # finite "minus infinity": keeps log-sum-exp over an empty set differentiable


def _check(student_logits: Tensor, mask: Tensor | None) -> tuple[int, int, int, Tensor]:
    if not isinstance(student_logits, Tensor) or student_logits.dim() != 3 or not student_logits.is_floating_point():
        shape = tuple(student_logits.shape) if isinstance(student_logits, Tensor) else type(student_logits).__name__
        raise ValueError(f"student_logits must be a float tensor [b, n, V], got {shape}")
    b, n, v = student_logits.shape
    if mask is None:
        m = torch.ones(b, n, dtype=torch.bool, device=student_logits.device)
    else:
        if tuple(mask.shape) != (b, n):
            raise ValueError(f"mask must be [b, n] = [{b}, {n}], got {tuple(mask.shape)}")
        m = mask.to(device=student_logits.device).bool()
    return b, n, v, m


def _same(name: str, x: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")


def _temperature(t: float) -> float:
    t = float(t)
    if not t > 0 or not math.isfinite(t):
        raise ValueError(f"temperature must be > 0, got {t}")
    return t


_SHARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("kdstore_shared_log_probs", default=None)


@contextlib.contextmanager
def shared_log_probs() -> Iterator[None]:
    """Within the block the student's ``log_softmax(logits / T)`` is computed once per (logits
    tensor, T) and shared by the token losses (values and gradients unchanged); nests."""
    if _SHARED.get() is not None:
        yield
        return
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def _log_probs(student_logits: Tensor, t: float) -> Tensor:
    """``log_softmax(student_logits / t)`` in float32 over the last dimension (shared inside
    :func:`shared_log_probs`; the cache keeps the tensor alive, so its id is not reused meanwhile)."""
    cache = _SHARED.get()
    key = (id(student_logits), t)
    if cache is not None and key in cache:
        return cache[key][1]
    x = student_logits.float()
    out = F.log_softmax(x / t if t != 1.0 else x, dim=-1)
    if cache is not None:
        cache[key] = (student_logits, out)
    return out


def _masked_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """``per_token [b, n]``, ``mask [b, n]`` bool → [] mean over True positions (0 when none)."""
    w = mask.to(per_token.dtype)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    return (per_token * w).sum() / w.sum().clamp(min=1.0)


def next_token_ce(student_logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy on the next tokens.

    Args:
        student_logits: [b, n, V] float.
        targets: [b, n] int, the token at t + 1 for position t.
        mask: [b, n] bool.

    Returns:
        [] float, mean over counted positions of ``-log q(targets)``.
    """
    b, n, v, m = _check(student_logits, mask)
    _same("targets", targets, (b, n))
    safe = torch.where(m, targets.long(), torch.zeros_like(targets, dtype=torch.long))
    logq = _log_probs(student_logits, 1.0)
    return _masked_mean(-logq.gather(-1, safe.unsqueeze(-1)).squeeze(-1), m)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, temperature: float = 1.0) -> Tensor:
    """``KL(p || q) * T^2`` on full logits, ``p = softmax(teacher / T)``, ``q = softmax(student / T)``.

    Args:
        student_logits: [b, n, V] float.
        teacher_logits: [b, n, V] float (no gradient flows into it).
        mask: [b, n] bool.
        temperature: T > 0.

    Returns:
        [] float.
    """
    b, n, v, m = _check(student_logits, mask)
    _same("teacher_logits", teacher_logits, (b, n, v))
    t = _temperature(temperature)
    logp = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    logq = _log_probs(student_logits, t)
    per = (logp.exp() * (logp - logq)).sum(-1)
    return _masked_mean(per, m) * t * t


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *, temperature: float = 1.0) -> Tensor:
    """``KL(q || p) * T^2`` on full logits (mode-seeking), same shapes as :func:`forward_kl`."""
    b, n, v, m = _check(student_logits, mask)
    _same("teacher_logits", teacher_logits, (b, n, v))
    t = _temperature(temperature)
    logp = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    logq = _log_probs(student_logits, t)
    per = (logq.exp() * (logq - logp)).sum(-1)
    return _masked_mean(per, m) * t * t


def _topk_buckets(student_logits, logprobs, ids, residual, mask, temperature):
    """Shared by :func:`topk_kl` and :func:`taid_topk_kl`: checks, then ``(mask [b, n], T,
    log q_k [b, n, K], log q_tail [b, n], log p_k [b, n, K], r [b, n])`` with the teacher side
    detached; masked positions gather ids ``0..K-1`` (any valid id) instead of padding."""
    b, n, v, m = _check(student_logits, mask)
    k = logprobs.shape[-1] if logprobs.dim() == 3 else -1
    _same("logprobs", logprobs, (b, n, k))
    _same("ids", ids, (b, n, k))
    _same("residual", residual, (b, n))
    t = _temperature(temperature)
    idx = torch.where(m.unsqueeze(-1), ids.long(), torch.arange(k, device=ids.device).expand(b, n, k))
    logq = _log_probs(student_logits, t)
    logq_k = logq.gather(-1, idx)
    return m, t, logq_k, _log_tail(logq, logq_k, idx), logprobs.detach().float(), residual.detach().float().clamp(min=0.0)


_HALF = math.log(0.5)


def _log_tail(logq: Tensor, logq_k: Tensor, idx: Tensor) -> Tensor:
    """``log(1 - sum_k q_k)`` [b, n]: the student's mass outside the K ids.

    Where the K ids hold at most half the mass, ``log1p(-sum_k q_k)`` is exact to float32 and
    costs O(K); the other positions (a confident student, where that form would cancel) take
    a log-sum-exp over the other V - K ids. A full-vocabulary pass over every position made
    top-k KD 2-4x the cost of CE per step.
    """
    head = torch.logsumexp(logq_k, dim=-1)
    easy = head <= _HALF
    tail = torch.log1p(-torch.exp(head.clamp(max=_HALF)))
    hard = (~easy).nonzero(as_tuple=True)
    if hard[0].numel():
        exact = torch.logsumexp(logq[hard].scatter(-1, idx[hard], _NEG), dim=-1)
        tail = tail.index_put(hard, exact)
    return tail


def topk_kl(
    student_logits: Tensor,
    logprobs: Tensor,
    ids: Tensor,
    residual: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    renormalize: bool = False,
) -> Tensor:
    """KL over K + 1 buckets: the teacher's top-k ids and one tail bucket holding the residual.

    ``KL = sum_k p_k (log p_k - log q_k) + r (log r - log q_tail)`` with ``p_k = exp(logprobs)``,
    ``r = residual`` (no renormalisation), ``q = softmax(student / T)`` and
    ``q_tail = 1 - sum_k q_k`` (computed as a log-sum-exp over the other ids). ``0 log 0 = 0``.

    ``renormalize=True`` gives the common top-k KD instead, kept as a baseline: the residual is
    dropped and the K teacher probabilities renormalised, ``p~_k = p_k / sum_j p_j``, and the loss
    is ``sum_k p~_k (log p~_k - log q_k)`` with the student's full-vocabulary ``q`` (>= 0; 0 only
    when the student puts all its mass on the K ids in the teacher's proportions). It is biased
    (Anshumann et al., ACL 2025): it pushes the student's whole mass onto the K ids, so the
    student comes out over-confident.

    Args:
        student_logits: [b, n, V] float.
        logprobs: [b, n, K] float (float16 as stored is fine), teacher log-probs at T.
        ids: [b, n, K] int (any integer dtype), their token ids.
        residual: [b, n] float, ``1 - sum_k p_k``.
        mask: [b, n] bool.
        temperature: the T the teacher fields were reduced at (> 0).
        renormalize: the biased renormalised form above (``residual`` checked, not used).

    Returns:
        [] float, times ``T^2``.
    """
    m, t, logq_k, logq_tail, logp_k, r = _topk_buckets(student_logits, logprobs, ids, residual, mask, temperature)
    if renormalize:
        logp_n = logp_k - torch.logsumexp(logp_k, dim=-1, keepdim=True)
        return _masked_mean((logp_n.exp() * (logp_n - logq_k)).sum(-1), m) * t * t
    head = (logp_k.exp() * (logp_k - logq_k)).sum(-1)
    tail = torch.where(r > 0, r * (torch.log(r.clamp(min=1e-30)) - logq_tail), torch.zeros_like(r))
    return _masked_mean(head + tail, m) * t * t


def sampled_kl(
    student_logits: Tensor,
    ids: Tensor,
    counts: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """RS-KD (Anshumann et al., ACL 2025): student cross-entropy against the empirical teacher sample.

    Per position ``-sum_j (c_j / S) log q(id_j)``, ``S = sum_j c_j``, ``q = softmax(student / T)``.
    With the ids drawn from the teacher's ``softmax(teacher / T)`` (``sample:S``), its
    expectation is ``CE(p, q) = KL(p || q) + H(p)``: the same value up to a constant in the
    student and the same gradient as :func:`forward_kl` in expectation (unbiased, unlike
    top-k). Zero-count padding entries contribute nothing.

    Args:
        student_logits: [b, n, V] float.
        ids: [b, n, S] int, drawn ids (unique per position, zero-padded).
        counts: [b, n, S] int (uint8 as stored is fine), draws per id; 0 = padding.
        mask: [b, n] bool.
        temperature: the T the draws were made at (> 0).

    Returns:
        [] float, times ``T^2``.
    """
    b, n, v, m = _check(student_logits, mask)
    s = ids.shape[-1] if ids.dim() == 3 else -1
    _same("ids", ids, (b, n, s))
    _same("counts", counts, (b, n, s))
    t = _temperature(temperature)
    c = counts.to(device=student_logits.device).float()
    total = c.sum(-1, keepdim=True)
    m = m & (total.squeeze(-1) > 0)
    weights = c / total.clamp(min=1.0)
    logq = _log_probs(student_logits, t)
    per = -(weights * logq.gather(-1, ids.long().clamp(0, v - 1))).sum(-1)
    return _masked_mean(per, m) * t * t


def taid_kl(student_logits: Tensor, teacher_logits: Tensor, lam: float, mask: Tensor | None = None) -> Tensor:
    """TAID (Shing et al., ICLR 2025, arXiv:2501.16937): ``KL(p_lam || q)`` to an interpolated target.

    ``p_lam = softmax((1 - lam) * stopgrad(student) + lam * teacher)`` (logit space, the paper's
    definition), ``q = softmax(student)``; ``lam`` comes from :class:`TaidSchedule`. At
    ``lam = 1`` this is :func:`forward_kl` at T = 1; at ``lam = 0`` it is 0.

    Args:
        student_logits: [b, n, V] float.
        teacher_logits: [b, n, V] float.
        lam: interpolation in [0, 1].
        mask: [b, n] bool.

    Returns:
        [] float.
    """
    b, n, v, m = _check(student_logits, mask)
    _same("teacher_logits", teacher_logits, (b, n, v))
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    target = (1.0 - lam) * student_logits.detach().float() + lam * teacher_logits.detach().float()
    logp = F.log_softmax(target, dim=-1)
    logq = _log_probs(student_logits, 1.0)
    return _masked_mean((logp.exp() * (logp - logq)).sum(-1), m)


def taid_topk_kl(
    student_logits: Tensor,
    logprobs: Tensor,
    ids: Tensor,
    residual: Tensor,
    lam: float,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """TAID on stored top-k targets: :func:`taid_kl` over the K + 1 buckets of :func:`topk_kl`.

    The teacher's bucket distribution ``P = (p_1..p_K, r)`` (stored log-probs, the residual as
    the tail bucket) and the student's ``Q = (q_1..q_K, q_tail)`` at temperature T are
    interpolated in log space as in the paper, ``p_lam = softmax((1 - lam) * stopgrad(log Q) +
    lam * log P)`` over the K + 1 buckets, and the loss is ``KL(p_lam || Q) * T^2``. At
    ``lam = 1`` it equals :func:`topk_kl`; at ``lam = 0`` it is 0.

    Args:
        student_logits: [b, n, V] float.
        logprobs: [b, n, K] float, ids: [b, n, K] int, residual: [b, n] float (``tokens:topk:K``).
        lam: interpolation in [0, 1] (:class:`TaidSchedule`).
        mask: [b, n] bool.
        temperature: the T the fields were reduced at.

    Returns:
        [] float.
    """
    lam = _lam(lam)
    m, t, logq_k, logq_tail, logp_k, r = _topk_buckets(student_logits, logprobs, ids, residual, mask, temperature)
    log_qb = torch.cat([logq_k, logq_tail.unsqueeze(-1)], -1)  # [b, n, K + 1]
    log_pb = torch.cat([logp_k, torch.log(r.clamp(min=1e-30)).unsqueeze(-1)], -1)
    log_target = F.log_softmax((1.0 - lam) * log_qb.detach() + lam * log_pb, dim=-1)
    per = (log_target.exp() * (log_target - log_qb)).sum(-1)
    return _masked_mean(per, m) * t * t


def taid_sampled_kl(
    student_logits: Tensor,
    ids: Tensor,
    counts: Tensor,
    lam: float,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """TAID on stored RS-KD samples: ``KL(p_lam || q) * T^2`` with ``p_lam = (1 - lam) * stopgrad(q) + lam * p_hat``.

    ``p_hat = counts / S`` (zero outside the drawn ids), ``q = softmax(student / T)``. The
    paper's log-space interpolation needs ``log p`` of every id, which counts do not give (an
    undrawn id has ``p_hat = 0``), so the target mixes probabilities: linear in ``p_hat``, so
    unbiased for the mixture with the true teacher. Its gradient is ``lam`` times
    :func:`sampled_kl`'s (``sum_v q_v grad log q_v = 0``): on samples TAID acts as RS-KD whose
    weight follows the adaptive schedule; the value is a proper KL (0 at ``lam = 0``).

    Args:
        student_logits: [b, n, V] float.
        ids: [b, n, S] int, counts: [b, n, S] int (``tokens:sample:S``; count 0 = padding).
        lam: interpolation in [0, 1].
        mask: [b, n] bool.
        temperature: the T the draws were made at.

    Returns:
        [] float.
    """
    b, n, v, m = _check(student_logits, mask)
    s = ids.shape[-1] if ids.dim() == 3 else -1
    _same("ids", ids, (b, n, s))
    _same("counts", counts, (b, n, s))
    t, lam = _temperature(temperature), _lam(lam)
    c = counts.to(device=student_logits.device).float()
    total = c.sum(-1, keepdim=True)
    m = m & (total.squeeze(-1) > 0)
    p_hat = torch.zeros_like(student_logits, dtype=torch.float32).scatter_add_(
        -1, ids.long().clamp(0, v - 1), c / total.clamp(min=1.0))
    logq = _log_probs(student_logits, t)
    target = (1.0 - lam) * logq.detach().exp() + lam * p_hat
    per = (target * (torch.log(target.clamp(min=1e-30)) - logq)).sum(-1)
    return _masked_mean(per, m) * t * t


def _lam(lam: float) -> float:
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return lam


class TaidSchedule:
    """TAID's adaptive ``lam`` (paper Sec. 3.2 and its reference code ``TAID.update_t``).

    After each step with objective ``J_n``: ``delta = (J_{n-1} - J_n) / (J_{n-1} + 1e-15)``,
    ``m = beta * m + (1 - beta) * delta``, and
    ``lam = min(end, max(start + (end - start) * n / total_steps, lam + alpha * sigmoid(m) * (1 - lam)))``.
    ``lam`` never decreases and reaches ``end`` by the last step. The first call records ``J`` only.
    Defaults: start 0.4, end 1.0, alpha 5e-4, beta 0.99. ``adaptive=False`` gives the linear floor.
    """

    def __init__(
        self, total_steps: int, *, start: float = 0.4, end: float = 1.0, alpha: float = 5e-4, beta: float = 0.99, adaptive: bool = True
    ) -> None:
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not (0.0 <= start < end <= 1.0 and 0.0 <= alpha <= 1.0 and 0.0 <= beta < 1.0):
            raise ValueError(f"need 0 <= start < end <= 1, alpha in [0, 1], beta in [0, 1); got {start}, {end}, {alpha}, {beta}")
        self.total_steps, self.start, self.end = int(total_steps), float(start), float(end)
        self.alpha, self.beta, self.adaptive = float(alpha), float(beta), bool(adaptive)
        self.lam, self.momentum, self.prev_loss = float(start), 0.0, None

    def update(self, loss: float | Tensor, step: int) -> float:
        """Record the objective at optimizer step ``step``; return the next ``lam``."""
        value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        if not math.isfinite(value):
            raise ValueError(f"loss must be finite, got {value}")
        if self.prev_loss is None:
            self.prev_loss = value
            return self.lam
        linear = self.start + (self.end - self.start) * min(max(int(step), 0) / self.total_steps, 1.0)
        if self.adaptive:
            delta = (self.prev_loss - value) / (self.prev_loss + 1e-15)
            self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
            grow = self.alpha * (1.0 / (1.0 + math.exp(-self.momentum))) * (1.0 - self.lam)
            self.lam = min(self.end, max(linear, self.lam + grow))
        else:
            self.lam = linear
        self.prev_loss = value
        return self.lam

    def state_dict(self) -> dict[str, float | None]:
        return {"lam": self.lam, "momentum": self.momentum, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.lam, self.momentum = float(state["lam"]), float(state["momentum"])  # type: ignore[arg-type]
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])  # type: ignore[arg-type]
