"""Tests for kdstore.train.losses: each loss against a hand computation in numpy on tiny inputs,
plus gradients, masking/weights behaviour and shape errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdstore.train import losses as L

RNG = np.random.default_rng(0)


def t64(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a, dtype=np.float64))


def leaf(a) -> torch.Tensor:
    return t64(a).requires_grad_(True)


def np_log_softmax(x, axis=-1):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def np_softmax(x, axis=-1):
    return np.exp(np_log_softmax(x, axis))


def np_kl(p, q):
    p, q = np.asarray(p), np.asarray(q)
    safe = np.where(p > 0, p, 1.0)
    return np.where(p > 0, p * (np.log(safe) - np.log(q)), 0.0).sum(-1)


def np_smooth_l1(a, b):
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d**2, d - 0.5)


def assert_close(actual: torch.Tensor, expected, tol=1e-9):
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=tol, atol=tol)


def assert_grad(x: torch.Tensor, loss: torch.Tensor) -> None:
    assert loss.dim() == 0
    loss.backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


# --------------------------------------------------------------------------- cross_entropy


def test_cross_entropy_matches_hand_computation_and_ignores_unlabelled():
    logits = RNG.normal(size=(4, 3))
    labels = np.array([2, -1, 0, 1])
    weights = np.array([1.0, 5.0, 2.0, 0.5])
    ls = np_log_softmax(logits)
    nll = -ls[[0, 2, 3], [2, 0, 1]]
    w = weights[[0, 2, 3]]
    x = leaf(logits)
    loss = L.cross_entropy(x, torch.tensor(labels), weights=t64(weights))
    assert_close(loss, (w * nll).sum() / w.sum())
    assert_grad(x, loss)
    assert torch.all(x.grad[1] == 0)  # the unlabelled row gets no gradient


def test_cross_entropy_mask_and_all_unlabelled_gives_zero_with_grad():
    logits = RNG.normal(size=(3, 4))
    labels = torch.tensor([1, 3, 0])
    mask = torch.tensor([True, False, True])
    ls = np_log_softmax(logits)
    assert_close(L.cross_entropy(t64(logits), labels, mask=mask), -(ls[0, 1] + ls[2, 0]) / 2)
    x = leaf(logits)
    loss = L.cross_entropy(x, torch.tensor([-1, -1, -1]))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad is not None and torch.all(x.grad == 0)


def test_cross_entropy_shape_and_dtype_errors():
    with pytest.raises(ValueError, match=r"labels.*\(3,\).*\(3, 1\)"):
        L.cross_entropy(torch.zeros(3, 4), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="student_logits.*\\(4,\\)"):
        L.cross_entropy(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be an integer"):
        L.cross_entropy(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="weights.*\\(2,\\)"):
        L.cross_entropy(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), weights=torch.ones(2))
    with pytest.raises(ValueError, match="mask must be a bool"):
        L.cross_entropy(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), mask=torch.ones(3))


# --------------------------------------------------------------------------- soft_kl


def test_soft_kl_matches_hinton_formula():
    s, t, temp = RNG.normal(size=(3, 5)), 2 * RNG.normal(size=(3, 5)), 3.0
    per_row = np_kl(np_softmax(t / temp), np_softmax(s / temp)) * temp**2
    w = np.array([0.2, 1.0, 3.0])
    x = leaf(s)
    loss = L.soft_kl(x, t64(t), temp, weights=t64(w))
    assert_close(loss, (w * per_row).sum() / w.sum())
    assert_grad(x, loss)
    assert L.soft_kl(t64(s), t64(s), temp).item() == pytest.approx(0.0, abs=1e-12)


def test_soft_kl_masked_nan_teacher_rows_do_not_poison_loss_or_grad():
    s, t = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4))
    teacher = t64(t)
    teacher[1] = float("nan")  # a skipped sample in the store
    mask = torch.tensor([True, False, True])
    x = leaf(s)
    loss = L.soft_kl(x, teacher, 1.0, mask=mask)
    expected = np_kl(np_softmax(t[[0, 2]]), np_softmax(s[[0, 2]])).mean()
    assert_close(loss, expected)
    assert_grad(x, loss)


def test_soft_kl_accepts_float16_teacher_and_returns_float32():
    s = torch.randn(2, 6)
    t = torch.randn(2, 6)
    loss = L.soft_kl(s, t.half(), 2.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(L.soft_kl(s, t.half().float(), 2.0).item(), rel=1e-6)


def test_soft_kl_errors():
    with pytest.raises(ValueError, match=r"teacher_logits.*\(2, 4\).*\(2, 5\)"):
        L.soft_kl(torch.zeros(2, 4), torch.zeros(2, 5), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        L.soft_kl(torch.zeros(2, 4), torch.zeros(2, 4), 0.0)


# --------------------------------------------------------------------------- topk_kl


def test_topk_kl_matches_bucket_hand_computation():
    b, c, k, temp = 3, 6, 2, 2.0
    s, full_t = RNG.normal(size=(b, c)), 3 * RNG.normal(size=(b, c))
    idx = np.argsort(-full_t, axis=1)[:, :k]
    vals = np.take_along_axis(full_t, idx, 1)
    p_full = np_softmax(full_t / temp)
    residual = 1 - np.take_along_axis(p_full, idx, 1).sum(1)
    expected = []
    q_full = np_softmax(s / temp)
    for i in range(b):
        p = np.append((1 - residual[i]) * np_softmax(vals[i] / temp), residual[i])
        q_top = q_full[i, idx[i]]
        q = np.append(q_top, 1 - q_top.sum())
        expected.append(np_kl(p, q) * temp**2)
    x = leaf(s)
    loss = L.topk_kl(x, t64(vals), torch.tensor(idx, dtype=torch.int32), t64(residual), temp)
    assert_close(loss, np.mean(expected))
    assert_grad(x, loss)
    # merging classes into buckets can only lose information: a lower bound of full KD
    assert loss.item() <= L.soft_kl(t64(s), t64(full_t), temp).item() + 1e-12


def test_topk_kl_with_all_classes_and_zero_residual_equals_soft_kl():
    b, c, temp = 4, 5, 1.5
    s, t = RNG.normal(size=(b, c)), RNG.normal(size=(b, c))
    perm = np.stack([RNG.permutation(c) for _ in range(b)])
    vals = np.take_along_axis(t, perm, 1)
    x = leaf(s)
    loss = L.topk_kl(x, t64(vals), torch.tensor(perm), torch.zeros(b, dtype=torch.float64), temp)
    assert_close(loss, L.soft_kl(t64(s), t64(t), temp))
    assert_grad(x, loss)


def test_topk_kl_float16_values_and_masked_garbage_rows():
    s = torch.randn(3, 8)
    vals = torch.randn(3, 4).half()
    idx = torch.tensor([[0, 1, 2, 3], [99, -5, 7, 7], [4, 5, 6, 7]], dtype=torch.int32)
    res = torch.tensor([0.1, float("nan"), 0.3]).half()
    mask = torch.tensor([True, False, True])
    s.requires_grad_(True)
    loss = L.topk_kl(s, vals, idx, res, 1.0, mask=mask)
    assert loss.dtype == torch.float32
    keep = [0, 2]
    ref = L.topk_kl(s.detach()[keep], vals[keep], idx[keep], res[keep], 1.0)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert_grad(s, loss)


def test_topk_kl_shape_errors():
    s = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"topk_indices.*\(2, 3\).*\(2, 2\)"):
        L.topk_kl(s, torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match=r"topk_residual.*\(2,\).*\(2, 1\)"):
        L.topk_kl(s, torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 1), 1.0)
    with pytest.raises(ValueError, match="k = 6"):
        L.topk_kl(s, torch.zeros(2, 6), torch.zeros(2, 6, dtype=torch.long), torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="topk_indices must be an integer"):
        L.topk_kl(s, torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), 1.0)


# --------------------------------------------------------------------------- features and embeddings


def test_feature_match_mse_and_cosine_by_hand():
    s, t = RNG.normal(size=(3, 2, 2)), RNG.normal(size=(3, 2, 2))
    w = np.array([1.0, 0.0, 2.0])
    mse = ((s - t) ** 2).reshape(3, -1).mean(1)
    fs, ft = s.reshape(3, -1), t.reshape(3, -1)
    cos = 1 - (fs * ft).sum(1) / (np.linalg.norm(fs, axis=1) * np.linalg.norm(ft, axis=1))
    x = leaf(s)
    loss = L.feature_match(x, t64(t), kind="mse", weights=t64(w))
    assert_close(loss, (w * mse).sum() / w.sum())
    assert_grad(x, loss)
    assert_close(L.feature_match(t64(s), t64(t), kind="cosine"), cos.mean())


def test_feature_match_errors():
    with pytest.raises(ValueError, match=r"\(2, 3\) but teacher_feat has \(2, 4\).*Projector"):
        L.feature_match(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="kind"):
        L.feature_match(torch.zeros(2, 3), torch.zeros(2, 3), kind="l2")


def test_projector_linear_and_conv_pool_shapes_and_gradients():
    torch.manual_seed(0)
    lin = L.Projector((5,), (3,))
    s = torch.randn(4, 5)
    loss = L.feature_match(s, torch.randn(4, 3), lin)
    loss.backward()
    assert lin.proj.weight.grad is not None and lin.proj.weight.grad.abs().sum() > 0
    down = L.Projector((4, 8, 8), (6, 4, 4))
    assert down(torch.randn(2, 4, 8, 8)).shape == (2, 6, 4, 4)
    up = L.Projector((4, 2, 2), (6, 4, 4))
    assert up(torch.randn(2, 4, 2, 2)).shape == (2, 6, 4, 4)
    same = L.Projector((4, 3, 3), (2, 3, 3))
    assert same.pool is None and same(torch.randn(1, 4, 3, 3)).shape == (1, 2, 3, 3)
    # pooling first and conv first are the same map (both linear): check the shortcut is exact
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    down = down.double()
    conv_then_pool = down.pool(down.proj(x))
    torch.testing.assert_close(down(x), conv_then_pool)
    tokens = L.Projector((7, 5), (7, 3))
    assert tokens(torch.randn(2, 7, 5)).shape == (2, 7, 3)


def test_projector_errors():
    with pytest.raises(ValueError, match="same rank"):
        L.Projector((5,), (3, 2, 2))
    with pytest.raises(ValueError, match="token counts"):
        L.Projector((7, 5), (8, 5))
    with pytest.raises(ValueError, match=r"\[b, 5\].*\(2, 4\)"):
        L.Projector((5,), (3,))(torch.zeros(2, 4))


def test_embedding_cosine_by_hand():
    s, t = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4))
    cos = (s * t).sum(1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(t, axis=1))
    x = leaf(s)
    loss = L.embedding_cosine(x, t64(t), mask=torch.tensor([True, True, False]))
    assert_close(loss, (1 - cos[:2]).mean())
    assert_grad(x, loss)
    with pytest.raises(ValueError, match=r"teacher_emb.*\(3, 4\).*\(3, 5\)"):
        L.embedding_cosine(torch.zeros(3, 4), torch.zeros(3, 5))


# --------------------------------------------------------------------------- RKD


def np_rkd_distance(s, t):
    def psi(e):
        n = len(e)
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
        off = ~np.eye(n, dtype=bool)
        return d / d[off].mean(), off

    ds, off = psi(s)
    dt, _ = psi(t)
    return np_smooth_l1(ds, dt)[off].mean()


def np_rkd_angle(s, t):
    def cos(e, i, j, k):
        a, b = e[i] - e[j], e[k] - e[j]
        return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

    n = len(s)
    vals = [
        np_smooth_l1(cos(s, i, j, k), cos(t, i, j, k))
        for j in range(n)
        for i in range(n)
        for k in range(n)
        if len({i, j, k}) == 3
    ]
    return np.mean(vals)


def test_rkd_distance_and_angle_match_loops():
    s, t = RNG.normal(size=(5, 3)), 4 * RNG.normal(size=(5, 7))  # different dims are fine
    x = leaf(s)
    loss = L.rkd_distance(x, t64(t))
    assert_close(loss, np_rkd_distance(s, t), tol=1e-7)
    assert_grad(x, loss)
    x = leaf(s)
    loss = L.rkd_angle(x, t64(t))
    assert_close(loss, np_rkd_angle(s, t), tol=1e-7)
    assert_grad(x, loss)


def test_rkd_is_invariant_to_scale_and_rotation_and_mask_selects_rows():
    s = RNG.normal(size=(6, 4))
    q, _ = np.linalg.qr(RNG.normal(size=(4, 4)))
    t = 3.0 * s @ q + 1.5
    assert L.rkd_distance(t64(s), t64(t)).item() == pytest.approx(0.0, abs=1e-10)
    assert L.rkd_angle(t64(s), t64(t)).item() == pytest.approx(0.0, abs=1e-10)
    t2 = RNG.normal(size=(6, 4))
    t2_nan = t2.copy()
    t2_nan[2] = np.nan
    mask = torch.tensor([True, True, False, True, True, True])
    keep = [0, 1, 3, 4, 5]
    assert_close(L.rkd_distance(t64(s), t64(t2_nan), mask), np_rkd_distance(s[keep], t2[keep]), tol=1e-7)
    assert_close(L.rkd_angle(t64(s), t64(t2_nan), mask), np_rkd_angle(s[keep], t2[keep]), tol=1e-7)
    x = leaf(s)
    loss = L.rkd_angle(x, t64(t2), torch.tensor([True, True, False, False, False, False]))
    assert loss.item() == 0.0  # fewer than 3 rows: nothing contributes
    loss.backward()
    assert x.grad is not None
    with pytest.raises(ValueError, match="same batch size"):
        L.rkd_distance(torch.zeros(3, 2), torch.zeros(4, 2))


# --------------------------------------------------------------------------- retrieval


def np_unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_contrastive_distill_is_infonce_over_stored_teacher_embeddings():
    b, n, d, temp = 3, 4, 5, 0.1
    a, p, negs = RNG.normal(size=(b, d)), RNG.normal(size=(b, d)), RNG.normal(size=(b, n, d))
    neg_mask = np.array([[1, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    expected = []
    for i in range(b):
        logits = [np_unit(a[i]) @ np_unit(p[i]) / temp]
        logits += [np_unit(a[i]) @ np_unit(negs[i, j]) / temp for j in range(n) if neg_mask[i, j]]
        expected.append(-np_log_softmax(np.array(logits))[0])
    assert expected[2] == pytest.approx(0.0)  # no negatives left: nothing to contrast
    x = leaf(a)
    loss = L.contrastive_distill(x, t64(p), t64(negs), temp, neg_mask=torch.tensor(neg_mask))
    assert_close(loss, np.mean(expected))
    assert_grad(x, loss)
    with pytest.raises(ValueError, match=r"teacher_negatives.*\[3, n, 5\].*\(3, 4, 6\)"):
        L.contrastive_distill(x, t64(p), torch.zeros(3, 4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"neg_mask.*\(3, 4\).*\(3, 3\)"):
        L.contrastive_distill(x, t64(p), t64(negs), neg_mask=torch.ones(3, 3, dtype=torch.bool))


def test_ranking_distill_listwise_kl_with_candidate_mask():
    b, m, d, temp, t_temp = 2, 4, 3, 0.5, 2.0
    a, cands, scores = RNG.normal(size=(b, d)), RNG.normal(size=(b, m, d)), RNG.normal(size=(b, m))
    cmask = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], dtype=bool)
    expected = []
    for i in range(b):
        keep = cmask[i]
        s_scores = np.array([np_unit(a[i]) @ np_unit(c) for c in cands[i][keep]]) / temp
        expected.append(np_kl(np_softmax(scores[i][keep] / t_temp), np_softmax(s_scores)))
    x = leaf(a)
    loss = L.ranking_distill(
        x, t64(cands), t64(scores), temp, candidate_mask=torch.tensor(cmask), teacher_temperature=t_temp
    )
    assert_close(loss, np.mean(expected))
    assert_grad(x, loss)
    # a row without any valid candidate does not count
    cmask[1] = False
    loss = L.ranking_distill(
        t64(a), t64(cands), t64(scores), temp, candidate_mask=torch.tensor(cmask), teacher_temperature=t_temp
    )
    assert_close(loss, expected[0])
    with pytest.raises(ValueError, match=r"teacher_scores.*\(2, 4\).*\(2, 3\)"):
        L.ranking_distill(t64(a), t64(cands), torch.zeros(2, 3, dtype=torch.float64), 1.0)


# --------------------------------------------------------------------------- DHO


def test_dho_loss_is_alpha_ce_on_labelled_plus_kd_on_all():
    b, c, temp, alpha = 4, 3, 2.0, 0.3
    ce_h, kd_h, t = RNG.normal(size=(b, c)), RNG.normal(size=(b, c)), RNG.normal(size=(b, c))
    labels = np.array([0, -1, 2, -1])
    ce = -np_log_softmax(ce_h)[[0, 2], [0, 2]].mean()
    kd = (np_kl(np_softmax(t / temp), np_softmax(kd_h / temp)) * temp**2).mean()
    x_ce, x_kd = leaf(ce_h), leaf(kd_h)
    loss = L.dho_loss(x_ce, x_kd, torch.tensor(labels), t64(t), temp, alpha)
    assert_close(loss, alpha * ce + (1 - alpha) * kd)
    loss.backward()
    assert torch.all(x_ce.grad[[1, 3]] == 0) and x_ce.grad[[0, 2]].abs().sum() > 0
    assert torch.all(x_kd.grad.abs().sum(1) > 0)  # every row teaches the KD head
    # stored probabilities instead of logits give the same loss
    probs = t64(np_softmax(t))
    same = L.dho_loss(t64(ce_h), t64(kd_h), torch.tensor(labels), probs, temp, alpha, teacher_is_probs=True)
    assert_close(same, alpha * ce + (1 - alpha) * kd, tol=1e-8)
    # a batch without labels is fine: only the KD term
    none = L.dho_loss(t64(ce_h), t64(kd_h), torch.full((b,), -1), t64(t), temp, alpha)
    assert_close(none, (1 - alpha) * kd)


def test_dho_errors():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"kd_head_logits.*\(2, 4\)"):
        L.dho_loss(z, torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), z)
    with pytest.raises(ValueError, match="alpha"):
        L.dho_loss(z, z, torch.zeros(2, dtype=torch.long), z, alpha=1.5)
    with pytest.raises(ValueError, match="beta"):
        L.dho_combine(z, z, 0.5, 0.0)


def test_dho_combine_by_hand():
    ce_h, kd_h = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4))
    alpha, beta = 0.25, 1.7
    expected = alpha * np_softmax(ce_h) + (1 - alpha) * np_softmax(kd_h / beta)
    out = L.dho_combine(t64(ce_h), t64(kd_h), alpha, beta)
    assert_close(out, expected)
    assert_close(out.sum(1), np.ones(3))
    assert_close(L.dho_combine(t64(ce_h), t64(kd_h), 1.0, beta), np_softmax(ce_h))


# --------------------------------------------------------------------------- confidence weights


def test_confidence_weights():
    mp = t64([0.2, 1.0, 0.5])
    assert_close(L.confidence_weights(mp, "max_prob", power=2.0), [0.04, 1.0, 0.25])
    ent = t64([0.0, math.log(4), math.log(2)])
    assert_close(L.confidence_weights(ent, "entropy", num_classes=4), [1.0, 0.0, 0.5])
    assert_close(L.confidence_weights(t64([5.0]), "entropy", num_classes=4), [0.0])  # clamped
    with pytest.raises(ValueError, match="num_classes"):
        L.confidence_weights(ent, "entropy")
    with pytest.raises(ValueError, match="kind"):
        L.confidence_weights(ent, "margin")
    with pytest.raises(ValueError, match=r"scores.*\(3, 1\)"):
        L.confidence_weights(torch.zeros(3, 1))


# --------------------------------------------------------------------------- multi-teacher


def test_combine_teachers_fixed_and_confidence_by_hand():
    t, b, c, temp, tau = 3, 2, 4, 2.0, 0.5
    z = RNG.normal(size=(t, b, c)) * np.array([0.2, 1.0, 3.0])[:, None, None]
    w = np.array([1.0, 2.0, 1.0])
    fixed = np.einsum("t,tbc->bc", w / w.sum(), np_softmax(z / temp))
    assert_close(L.combine_teachers(t64(z), temp, "fixed", weights=w), fixed)
    as_list = L.combine_teachers([t64(z[i]) for i in range(t)], temp, "fixed", weights=torch.tensor(w))
    assert_close(as_list, fixed)
    p1 = np_softmax(z)
    ent = -(p1 * np.log(p1)).sum(-1)  # [t, b]
    cw = np.exp(-ent / tau)
    cw = cw / cw.sum(0, keepdims=True)
    conf = np.einsum("tb,tbc->bc", cw, np_softmax(z / temp))
    assert_close(L.combine_teachers(t64(z), temp, "confidence", tau=tau), conf)


def test_combine_teachers_teacher_mask_and_errors():
    z = RNG.normal(size=(2, 3, 4))
    z_nan = z.copy()
    z_nan[1, 0] = np.nan
    tmask = torch.tensor([[True, True, False], [False, True, False]])
    out = L.combine_teachers(t64(z_nan), 1.0, "confidence", teacher_mask=tmask)
    assert_close(out[0], np_softmax(z[0, 0]))
    assert_close(out[2], np.full(4, 0.25))  # no valid teacher: uniform, caller masks the row
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"teacher_logits\[1\].*\(3, 5\)"):
        L.combine_teachers([torch.zeros(3, 4), torch.zeros(3, 5)])
    with pytest.raises(ValueError, match="non-negative"):
        L.combine_teachers(t64(z), weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="mode"):
        L.combine_teachers(t64(z), mode="max")


def test_multi_teacher_kl_by_hand():
    s, temp = RNG.normal(size=(3, 4)), 2.0
    p = np_softmax(RNG.normal(size=(3, 4)))
    p[0] = [0.5, 0.5, 0.0, 0.0]  # zero-probability classes contribute 0
    expected = (np_kl(p, np_softmax(s / temp)) * temp**2).mean()
    x = leaf(s)
    loss = L.multi_teacher_kl(x, t64(p), temp)
    assert_close(loss, expected)
    assert_grad(x, loss)


def test_teacher_router_and_routed_kl_by_hand():
    torch.manual_seed(0)
    t, b, c, temp = 3, 4, 5, 2.0
    s, z = RNG.normal(size=(b, c)), RNG.normal(size=(t, b, c))
    router = L.TeacherRouter(c, t).double()
    route = router(t64(s))
    assert route.shape == (b, t)
    g = np_softmax(route.detach().numpy())
    kl = np.stack([np_kl(np_softmax(z[i] / temp), np_softmax(s / temp)) * temp**2 for i in range(t)], 1)
    distill = (g * kl).sum(1).mean()
    usage = g.mean(0)
    balance = (np.full(t, 1 / t) * (np.log(1 / t) - np.log(usage))).sum()
    x = leaf(s)
    loss = L.routed_teacher_kl(x, t64(z), route, temp, balance_weight=0.1)
    assert_close(loss, distill + 0.1 * balance)
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert router.net[0].weight.grad is not None and router.net[0].weight.grad.abs().sum() > 0
    assert_close(L.router_balance_loss(t64(np.full((b, t), 1 / t))), 0.0)


def test_routed_kl_top_k_and_teacher_mask():
    t, b, c = 3, 2, 4
    s, z = RNG.normal(size=(b, c)), RNG.normal(size=(t, b, c))
    route = np.array([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]])
    kl = np.stack([np_kl(np_softmax(z[i]), np_softmax(s)) for i in range(t)], 1)
    top2 = [(0, 1), (1, 2)]
    expected = np.mean([(np_softmax(route[r, list(k)]) * kl[r, list(k)]).sum() for r, k in enumerate(top2)])
    loss = L.routed_teacher_kl(t64(s), t64(z), t64(route), top_k=2, balance_weight=0.0)
    assert_close(loss, expected)
    # teacher 1 missing on row 1 (NaN in the store): routing renormalises over the others
    z_nan = z.copy()
    z_nan[1, 1] = np.nan
    tmask = torch.ones(t, b, dtype=torch.bool)
    tmask[1, 1] = False
    x = leaf(s)
    loss = L.routed_teacher_kl(x, t64(z_nan), t64(route), teacher_mask=tmask, balance_weight=0.0)
    row1 = (np_softmax(route[1, [0, 2]]) * kl[1, [0, 2]]).sum()
    row0 = (np_softmax(route[0]) * kl[0]).sum()
    assert_close(loss, (row0 + row1) / 2)
    assert_grad(x, loss)
    with pytest.raises(ValueError, match="top_k"):
        L.routed_teacher_kl(t64(s), t64(z), t64(route), top_k=4)
    with pytest.raises(ValueError, match=r"route_logits.*\(2, 3\).*\(2, 2\)"):
        L.routed_teacher_kl(t64(s), t64(z), torch.zeros(2, 2, dtype=torch.float64))


# --------------------------------------------------------------------------- token-level LM


def test_token_kl_averages_over_real_tokens():
    b, s_len, v, temp = 2, 3, 5, 2.0
    s, t = RNG.normal(size=(b, s_len, v)), RNG.normal(size=(b, s_len, v))
    am = np.array([[1, 1, 0], [1, 0, 0]])
    per = np_kl(np_softmax(t / temp), np_softmax(s / temp)) * temp**2  # [b, s]
    expected = (per * am).sum() / am.sum()
    x = leaf(s)
    loss = L.token_kl(x, t64(t), attention_mask=torch.tensor(am), temperature=temp)
    assert_close(loss, expected)
    assert_grad(x, loss)
    assert torch.all(x.grad[0, 2] == 0) and torch.all(x.grad[1, 1:] == 0)
    w = np.array([1.0, 3.0])
    weighted = L.token_kl(t64(s), t64(t), attention_mask=torch.tensor(am), temperature=temp, weights=t64(w))
    wt = am * w[:, None]
    assert_close(weighted, (per * wt).sum() / wt.sum())


def test_token_kl_topk_triplet_with_full_vocab_equals_full_logits():
    b, s_len, v = 2, 3, 4
    s, t = RNG.normal(size=(b, s_len, v)), RNG.normal(size=(b, s_len, v))
    idx = np.argsort(-t, axis=-1)
    vals = np.take_along_axis(t, idx, -1)
    am = torch.tensor([[True, True, True], [True, True, False]])
    full = L.token_kl(t64(s), t64(t), attention_mask=am, temperature=1.5)
    topk = L.token_kl(
        t64(s), teacher_topk=(t64(vals), torch.tensor(idx), torch.zeros(b, s_len, dtype=torch.float64)),
        attention_mask=am, temperature=1.5,
    )
    assert_close(topk, full)
    with pytest.raises(ValueError, match="exactly one"):
        L.token_kl(t64(s))
    with pytest.raises(ValueError, match=r"attention_mask.*\(2, 3\).*\(2, 2\)"):
        L.token_kl(t64(s), t64(t), attention_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"teacher_topk residual.*\(2, 3\)"):
        L.token_kl(t64(s), teacher_topk=(t64(vals), torch.tensor(idx), torch.zeros(2, dtype=torch.float64)))


# --------------------------------------------------------------------------- TAID


@pytest.mark.parametrize("space", ["logit", "prob"])
def test_taid_loss_by_hand_and_gradient_treats_target_as_constant(space):
    b, c, lam = 3, 4, 0.3
    s, t = RNG.normal(size=(b, c)), RNG.normal(size=(b, c))
    if space == "logit":
        target = np_softmax((1 - lam) * s + lam * t)
    else:
        target = (1 - lam) * np_softmax(s) + lam * np_softmax(t)
    q = np_softmax(s)
    mask = np.array([True, False, True])
    x = leaf(s)
    loss = L.taid_loss(x, t64(t), lam, torch.tensor(mask), space=space)
    assert_close(loss, np_kl(target, q)[mask].mean())
    loss.backward()
    # d/ds KL(stopgrad(p) || softmax(s)) = softmax(s) - p, averaged over the 2 kept rows
    expected_grad = (q - target) * mask[:, None] / mask.sum()
    assert_close(x.grad, expected_grad)


def test_taid_at_lambda_one_is_forward_kl_and_sequences_work():
    s, t = RNG.normal(size=(2, 3, 5)), RNG.normal(size=(2, 3, 5))
    am = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert_close(L.taid_loss(t64(s), t64(t), 1.0, am), L.token_kl(t64(s), t64(t), attention_mask=am))
    with pytest.raises(ValueError, match="lam"):
        L.taid_loss(t64(s), t64(t), 1.2)
    with pytest.raises(ValueError, match=r"mask.*\(2, 3\).*\(2,\)"):
        L.taid_loss(t64(s), t64(t), 0.5, torch.ones(2, dtype=torch.bool))


def test_taid_schedule_follows_the_paper_rule():
    sched = L.TaidSchedule(total_steps=100, start=0.4, end=1.0, alpha=0.1, beta=0.9)
    assert sched.update(2.0, step=0) == 0.4  # first call only records the loss
    lam, m, prev = 0.4, 0.0, 2.0
    for step, loss in enumerate([1.5, 1.4, 1.6, 1.0], start=1):
        m = 0.9 * m + 0.1 * (prev - loss) / (prev + 1e-15)
        lam = min(1.0, max(0.4 + 0.6 * step / 100, lam + 0.1 * (1 / (1 + math.exp(-m))) * (1 - lam)))
        prev = loss
        assert sched.update(torch.tensor(loss, dtype=torch.float64), step) == pytest.approx(lam, rel=1e-12)
    state = sched.state_dict()
    again = L.TaidSchedule(total_steps=100, start=0.4, end=1.0, alpha=0.1, beta=0.9)
    again.load_state_dict(state)
    assert again.update(0.9, 5) == sched.update(0.9, 5)


def test_taid_schedule_floor_monotonicity_and_errors():
    sched = L.TaidSchedule(total_steps=10, alpha=0.0)  # no adaptive push: the linear floor rules
    sched.update(1.0, 0)
    values = [sched.update(1.0 + step, step) for step in range(1, 11)]
    assert values[-1] == pytest.approx(1.0)
    assert values == sorted(values)
    assert values[4] == pytest.approx(0.4 + 0.6 * 5 / 10)
    linear = L.TaidSchedule(total_steps=10, adaptive=False)
    linear.update(1.0, 0)
    assert linear.update(0.1, 5) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="end"):
        L.TaidSchedule(10, start=0.5, end=0.5)
    with pytest.raises(ValueError, match="total_steps"):
        L.TaidSchedule(0)
