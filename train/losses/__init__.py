"""Distillation losses: pure functions from student outputs and stored teacher outputs to a scalar.

One module per family, all re-exported here (``from kdstore.train import losses as L; L.kd...``):
``logits`` (cross-entropy, soft KL, top-k KL, DHO, confidence weights), ``features``
(projector, feature matching, embedding cosine, RKD), ``retrieval`` (contrastive, ranking),
``multi_teacher`` (combine, router) and ``tokens`` (token KL, TAID).

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

from kdstore.train.losses.features import Projector, embedding_cosine, feature_match, rkd_angle, rkd_distance
from kdstore.train.losses.logits import (
    confidence_weights,
    cross_entropy,
    dho_combine,
    dho_loss,
    soft_kl,
    topk_kl,
)
from kdstore.train.losses.multi_teacher import (
    TeacherRouter,
    combine_teachers,
    multi_teacher_kl,
    routed_teacher_kl,
    router_balance_loss,
)
from kdstore.train.losses.retrieval import contrastive_distill, ranking_distill
from kdstore.train.losses.tokens import TaidSchedule, taid_loss, token_kl

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

