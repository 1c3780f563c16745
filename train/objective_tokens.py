"""Token-level loss kinds (LM students), merged into :data:`kdstore.train.objective.KINDS`.

Each kind's ``compute(term, x)`` reads, for a batch of ``b`` sequences of ``n`` positions:
``x.out["logits"]`` the student's ``[b, n, V]``; ``x.tg`` the LM batch of
:func:`kdstore.train.lm_data.pack_batch` (``targets``/``ce_mask`` ``[b, n]``, the teacher's
per-token fields ``[b, n, ...]``); ``x.mask`` the KD positions ``[b, n]`` (``kd_mask``:
padding and ``<|endoftext|>`` out, nothing crosses a document).

- ``token_ce``: next-token cross-entropy on the token shards (no teacher).
- ``token_topk_kd``: :func:`~kdstore.train.losses_tokens.topk_kl` on ``tokens:topk:K``
  (K + 1 buckets, the residual is the tail bucket), at the recorded temperature; ``top_k = k``
  uses only the first k stored (:func:`first_k`: one ``topk:32`` store serves k <= 32);
  ``renormalize = true`` gives the common renormalised top-k instead
  (:func:`~kdstore.train.losses_tokens.topk_kl` ``renormalize=True``, residual dropped: a biased
  baseline, for comparison).
- ``token_sampled_kd``: RS-KD, :func:`~kdstore.train.losses_tokens.sampled_kl` on
  ``tokens:sample:S``, at the recorded temperature.

- ``token_taid``: TAID from the store, ``field = "topk"`` (default) or ``"sample"``:
  :func:`~kdstore.train.losses_tokens.taid_topk_kl` (the paper's log-space interpolation on
  the K + 1 top-k buckets) or :func:`~kdstore.train.losses_tokens.taid_sampled_kl`
  (probability mixture on the counts), at the recorded temperature, with ``lam`` from the
  run's :class:`~kdstore.train.losses_tokens.TaidSchedule`, which the trainer keeps (and
  checkpoints) and hands over as ``x.tg[TAID_LAMBDA]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdstore.store.errors import InputError
from kdstore.store.schema import OutputSpec
from kdstore.train import losses_tokens as LT
from torch import Tensor

if TYPE_CHECKING:
    from kdstore.train.config import LossConfig
    from kdstore.train.objective import LossKind, TermInput


TAID_LAMBDA = "taid/lambda"  # the batch entry (a [] tensor) holding the TAID schedule's current lam
TAID_FIELDS = ("topk", "sample")


def token_fields(op: str) -> tuple[str, ...]:
    """Stored fields of ``tokens:topk:K`` / ``tokens:sample:S`` (names from the store schema)."""
    return tuple(OutputSpec(kind="tokens", layer=op, k=1).fields())


def _t(term: "LossConfig") -> float:
    if term.temperature is None:
        raise ValueError(f"loss {term.kind}: temperature not resolved; call resolve_terms(terms, store) first")
    return term.temperature


def _token_ce(term, x: "TermInput") -> Tensor:
    return LT.next_token_ce(x.out["logits"], x.tg["targets"], x.tg["ce_mask"])


def first_k(logprobs: Tensor, ids: Tensor, residual: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The stored top-K cut to its first ``k`` (descending) entries; the dropped mass joins the residual.

    ``logprobs``/``ids`` ``[..., K]``, ``residual`` ``[...]`` → ``[..., k]``, ``[..., k]``, ``[...]``.
    ``k = 0`` or ``k >= K`` keeps all. The same as storing ``topk:k`` up to float16 rounding of
    the dropped log-probs.
    """
    if not k or k >= logprobs.shape[-1]:
        return logprobs, ids, residual
    dropped = logprobs[..., k:].float().exp().sum(-1)
    return logprobs[..., :k], ids[..., :k], residual.float() + dropped


def _token_topk_kd(term, x: "TermInput") -> Tensor:
    logprobs, ids, residual, _lse = token_fields("topk")
    lp, i, r = first_k(x.tg[logprobs], x.tg[ids], x.tg[residual], term.top_k)
    return LT.topk_kl(x.out["logits"], lp, i, r, x.mask, temperature=_t(term), renormalize=term.renormalize)


def _token_sampled_kd(term, x: "TermInput") -> Tensor:
    ids, counts = token_fields("sample")
    return LT.sampled_kl(x.out["logits"], x.tg[ids], x.tg[counts], x.mask, temperature=_t(term))


def _taid_field(term: "LossConfig") -> str:
    op = term.field or "topk"
    if op not in TAID_FIELDS:
        raise InputError(f"loss token_taid: field must be one of {TAID_FIELDS} (the stored form it reads), got {op!r}")
    return op


def _taid_fields(term: "LossConfig") -> tuple[str, ...]:
    op = _taid_field(term)
    return token_fields(op)[:3] if op == "topk" else token_fields(op)


def _token_taid(term, x: "TermInput") -> Tensor:
    if TAID_LAMBDA not in x.tg:
        raise ValueError("loss token_taid needs the run's TAID lambda in the batch (kdstore.train.lm_train sets it)")
    lam = float(x.tg[TAID_LAMBDA])
    if _taid_field(term) == "topk":
        logprobs, ids, residual, _lse = token_fields("topk")
        return LT.taid_topk_kl(x.out["logits"], x.tg[logprobs], x.tg[ids], x.tg[residual], lam, x.mask,
                               temperature=_t(term))
    ids, counts = token_fields("sample")
    return LT.taid_sampled_kl(x.out["logits"], x.tg[ids], x.tg[counts], lam, x.mask, temperature=_t(term))


def token_kinds(loss_kind: type["LossKind"]) -> tuple["LossKind", ...]:
    """The token kinds as ``LossKind`` entries (built by ``objective`` to avoid an import cycle)."""
    return (
        loss_kind(name="token_ce", compute=_token_ce, teachers="none"),
        loss_kind(name="token_topk_kd", compute=_token_topk_kd, fields=lambda t: token_fields("topk")[:3],
                  stored_temperature=True, settings=("temperature", "top_k", "renormalize")),
        loss_kind(name="token_sampled_kd", compute=_token_sampled_kd, fields=lambda t: token_fields("sample"),
                  stored_temperature=True, settings=("temperature",)),
        loss_kind(name="token_taid", compute=_token_taid, fields=_taid_fields,
                  stored_temperature=True, settings=("temperature", "field")),
    )


TOKEN_KINDS = ("token_ce", "token_topk_kd", "token_sampled_kd", "token_taid")
