"""Feature and relational losses: the FitNets projector, feature matching, embedding cosine, RKD.

Shape conventions and masking rules: :mod:`kdstore.train.losses`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdstore.train.losses import _common as C


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
        if student_feat.dim() < 1 or C._shape(student_feat)[1:] != self.student_shape:
            raise ValueError(
                f"student_feat must have shape [b, {', '.join(map(str, self.student_shape))}], "
                f"got {C._shape(student_feat)}"
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
    C._require_tensor("student_feat", student_feat)
    C._require_tensor("teacher_feat", teacher_feat)
    C._require_float("student_feat", student_feat)
    C._require_float("teacher_feat", teacher_feat)
    if student_feat.dim() < 2:
        raise ValueError(f"student_feat must have shape [b, ...], got {C._shape(student_feat)}")
    projected = projector(student_feat) if projector is not None else student_feat
    if C._shape(projected) != C._shape(teacher_feat):
        what = "student_feat after the projector" if projector is not None else "student_feat"
        hint = "" if projector is not None else "; pass projector=Projector(student_shape, teacher_shape)"
        raise ValueError(
            f"{what} has shape {C._shape(projected)} but teacher_feat has {C._shape(teacher_feat)}{hint}"
        )
    dtype = C._compute_dtype(projected, teacher_feat)
    b = projected.shape[0]
    w = C._contribution((b,), weights, mask, dtype=dtype, device=projected.device, spec="[b]")
    s = projected.to(dtype).reshape(b, -1)
    t = C._zero_rows(teacher_feat.detach().to(dtype).reshape(b, -1), w != 0)
    if kind == "mse":
        per_row = (s - t).pow(2).mean(-1)
    else:
        per_row = 1.0 - F.cosine_similarity(s, t, dim=-1)
    return C._weighted_mean(per_row, w)


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
    C._require_float_ndim("student_emb", student_emb, 2, "[b, d]")
    C._require_float_shape("teacher_emb", teacher_emb, student_emb.shape, "[b, d] like student_emb")
    return feature_match(student_emb, teacher_emb, None, "cosine", weights, mask)


def _flat_rows(name: str, x: Tensor) -> Tensor:
    C._require_tensor(name, x)
    C._require_float(name, x)
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [b, d], got {C._shape(x)}")
    return x.reshape(x.shape[0], -1)


def _relational_inputs(
    student_emb: Tensor, teacher_emb: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    s = _flat_rows("student_emb", student_emb)
    t = _flat_rows("teacher_emb", teacher_emb)
    if s.shape[0] != t.shape[0]:
        raise ValueError(
            f"student_emb and teacher_emb must have the same batch size, got {C._shape(student_emb)} "
            f"and {C._shape(teacher_emb)}"
        )
    b = s.shape[0]
    valid = (
        torch.ones(b, dtype=torch.bool, device=s.device)
        if mask is None
        else C._bool_mask("mask", mask, (b,), "[b]")
    )
    dtype = C._compute_dtype(s, t)
    t = C._zero_rows(t.detach().to(dtype), valid)
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
    return C._weighted_mean(per_pair, pairs)


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
    return C._weighted_mean(per_triplet, triplets.to(s.dtype))
