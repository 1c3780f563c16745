"""Token-level losses (kdstore.train.losses_tokens) against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdstore.pipeline.lm_model import kd_mask, next_token_targets
from kdstore.pipeline.token_reduce import sample_tokens, topk_tokens
from kdstore.train.losses_tokens import (
    TaidSchedule,
    forward_kl,
    next_token_ce,
    reverse_kl,
    sampled_kl,
    taid_kl,
    taid_sampled_kl,
    taid_topk_kl,
    shared_log_probs,
    topk_kl,
)

S_ROW = [1.0, 0.0, -1.0, 0.5]  # student logits of the hand-computed position
P_ROW = [0.5, 0.3, 0.15, 0.05]  # teacher probabilities of the hand-computed position


def _softmax(row, t=1.0):
    e = [math.exp(x / t) for x in row]
    return [x / sum(e) for x in e]


def _one(row) -> torch.Tensor:
    """[1, 1, V] tensor from one row."""
    return torch.tensor([[row]], dtype=torch.float32)


def test_masks_stop_at_document_boundaries():
    eos = 0
    ids = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 0]])
    doc = torch.tensor([[3, 3, 3, 4, 4, 4, 4, -1]])
    targets, ce = next_token_targets(ids, doc, eos)
    assert targets[0, :7].tolist() == [6, 0, 7, 8, 9, 0, 0]
    # 5->6, 6->eos, (eos: nothing), 7->8, 8->9, 9->eos, (eos), (pad / last)
    assert ce[0].tolist() == [True, True, False, True, True, True, False, False]
    assert kd_mask(ids, doc, eos)[0].tolist() == [True, True, False, True, True, True, False, False]
    # the last position of a sample is a KD target but not a CE target
    ids2, doc2 = torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1, 1]])
    assert next_token_targets(ids2, doc2, eos)[1][0].tolist() == [True, True, False]
    assert kd_mask(ids2, doc2, eos)[0].tolist() == [True, True, True]
    # a document change without <|endoftext|> still stops the CE target
    ids3, doc3 = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[1, 1, 2, 2]])
    assert next_token_targets(ids3, doc3, eos)[1][0].tolist() == [True, False, True, False]


def test_next_token_ce_by_hand():
    logits = torch.tensor([[S_ROW, [0.0, 2.0, 0.0, 0.0]]])
    targets = torch.tensor([[3, 1]])
    q0, q1 = _softmax(S_ROW), _softmax([0.0, 2.0, 0.0, 0.0])
    both = next_token_ce(logits, targets)
    assert both.item() == pytest.approx((-math.log(q0[3]) - math.log(q1[1])) / 2, rel=1e-6)
    first = next_token_ce(logits, torch.tensor([[3, 99]]), torch.tensor([[True, False]]))
    assert first.item() == pytest.approx(-math.log(q0[3]), rel=1e-6)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_forward_and_reverse_kl_by_hand(t):
    teacher = [math.log(p) for p in P_ROW]
    q, p = _softmax(S_ROW, t), _softmax(teacher, t)
    fwd = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) * t * t
    rev = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q)) * t * t
    assert forward_kl(_one(S_ROW), _one(teacher), temperature=t).item() == pytest.approx(fwd, rel=1e-5)
    assert reverse_kl(_one(S_ROW), _one(teacher), temperature=t).item() == pytest.approx(rev, rel=1e-5)
    assert fwd != pytest.approx(rev, rel=1e-2)


def test_topk_kl_by_hand_keeps_the_residual_as_a_tail_bucket():
    q = _softmax(S_ROW)
    logprobs = torch.tensor([[[math.log(0.5), math.log(0.3)]]])
    ids = torch.tensor([[[0, 1]]], dtype=torch.uint8)
    residual = torch.tensor([[0.2]])
    hand = 0.5 * math.log(0.5 / q[0]) + 0.3 * math.log(0.3 / q[1]) + 0.2 * math.log(0.2 / (q[2] + q[3]))
    got = topk_kl(_one(S_ROW), logprobs, ids, residual)
    assert got.item() == pytest.approx(hand, rel=1e-5)
    # renormalising the top-k (dropping the tail) would give another value
    renorm = (0.5 / 0.8) * math.log((0.5 / 0.8) / (q[0] / (q[0] + q[1]))) + (0.3 / 0.8) * math.log(
        (0.3 / 0.8) / (q[1] / (q[0] + q[1]))
    )
    assert abs(got.item() - renorm) > 1e-2


def test_renormalized_topk_kl_by_hand_drops_the_residual_and_pulls_mass_onto_the_k_ids():
    q = _softmax(S_ROW)
    logprobs = torch.tensor([[[math.log(0.5), math.log(0.3)]]])
    ids = torch.tensor([[[0, 1]]])
    residual = torch.tensor([[0.2]])
    hand = 0.625 * math.log(0.625 / q[0]) + 0.375 * math.log(0.375 / q[1])  # 0.5 / 0.8, 0.3 / 0.8
    assert topk_kl(_one(S_ROW), logprobs, ids, residual, renormalize=True).item() == pytest.approx(hand, rel=1e-5)
    # its minimum puts every bit of the student's mass on the K ids (the over-confidence it
    # teaches); the tail-bucket form is minimised by the teacher's own bucket masses
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=1.0)
    for _ in range(300):
        opt.zero_grad()
        topk_kl(logits, logprobs, ids, residual, renormalize=True).backward()
        opt.step()
    assert torch.softmax(logits, -1)[0, 0, :2].sum() > 0.97


def test_topk_kl_equals_full_kl_when_k_is_v_and_from_stored_fields():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g) * 2
    t = 2.0
    fields = [topk_tokens(teacher[i], 16, temperature=t) for i in range(2)]
    stack = {k: torch.from_numpy(np.stack([f[k] for f in fields])) for k in fields[0]}
    got = topk_kl(student, stack["logprobs"], stack["ids"], stack["residual"], temperature=t)
    assert got.item() == pytest.approx(forward_kl(student, teacher, temperature=t).item(), rel=2e-3)
    # K < V: the tail bucket is what separates it from full KL, and it is never negative
    fields8 = [topk_tokens(teacher[i], 8, temperature=t) for i in range(2)]
    stack8 = {k: torch.from_numpy(np.stack([f[k] for f in fields8])) for k in fields8[0]}
    assert topk_kl(student, stack8["logprobs"], stack8["ids"], stack8["residual"], temperature=t).item() >= 0


@pytest.mark.parametrize("own_top", [False, True])
def test_topk_tail_matches_the_full_vocabulary_form_in_value_and_gradient(own_top):
    """The O(K) tail (K ids holding <= half the student's mass) and the log-sum-exp over the
    other ids (a confident student: its own top ids) agree with float64 over the whole row."""
    g = torch.Generator().manual_seed(1)
    b, n, v, k = 3, 6, 40, 4
    student = torch.randn(b, n, v, generator=g) * (4.0 if own_top else 0.5)
    if own_top:
        ids = student.topk(k, dim=-1).indices
    else:
        ids = torch.rand(b, n, v, generator=g).argsort(-1)[..., :k]
    logprobs = torch.log_softmax(torch.randn(b, n, v, generator=g), -1).gather(-1, ids)
    residual = 1 - logprobs.exp().sum(-1)
    x32 = student.clone().requires_grad_()
    x64 = student.double().requires_grad_()
    got = topk_kl(x32, logprobs, ids, residual)
    logq = F.log_softmax(x64, -1)
    tail = torch.logsumexp(logq.scatter(-1, ids, -math.inf), -1)
    p = logprobs.double().exp()
    ref = ((p * (p.log() - logq.gather(-1, ids))).sum(-1) + residual.double() * (residual.double().log() - tail)).mean()
    head_mass = logq.gather(-1, ids).exp().sum(-1)
    assert bool((head_mass > 0.5).any()) == own_top  # each case takes the branch it names
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    (g32,) = torch.autograd.grad(got, x32)
    (g64,) = torch.autograd.grad(ref, x64)
    assert torch.allclose(g32.double(), g64, atol=1e-6)


def test_sampled_kl_by_hand_ignores_padding():
    q = _softmax(S_ROW)
    ids = torch.tensor([[[2, 0, 0]]])
    counts = torch.tensor([[[3, 1, 0]]], dtype=torch.uint8)
    hand = -(0.75 * math.log(q[2]) + 0.25 * math.log(q[0]))
    assert sampled_kl(_one(S_ROW), ids, counts).item() == pytest.approx(hand, rel=1e-6)
    t = 2.0
    qt = _softmax(S_ROW, t)
    hand_t = -(0.75 * math.log(qt[2]) + 0.25 * math.log(qt[0])) * t * t
    assert sampled_kl(_one(S_ROW), ids, counts, temperature=t).item() == pytest.approx(hand_t, rel=1e-6)


def test_sampled_kl_is_unbiased_for_full_kd_gradient():
    """The mean RS-KD gradient over many independent draws approaches the full-KL gradient; top-k's does not."""
    g = torch.Generator().manual_seed(1)
    v, n = 64, 6
    teacher = torch.randn(n, v, generator=g) * 2.5
    student = (torch.randn(1, n, v, generator=g)).requires_grad_(True)
    full = torch.autograd.grad(forward_kl(student, teacher[None]), student)[0]
    ce = (forward_kl(student, teacher[None]) + (-(F.softmax(teacher, 1) * F.log_softmax(teacher, 1)).sum(1)).mean()).item()
    grads, values = [], []
    for seed in range(150):
        out = sample_tokens(teacher, 12, key="x", seed=seed)
        ids, counts = torch.from_numpy(out["ids"].astype(np.int64))[None], torch.from_numpy(out["counts"])[None]
        loss = sampled_kl(student, ids, counts)
        grads.append(torch.autograd.grad(loss, student)[0])
        values.append(loss.item())
    mean = torch.stack(grads).mean(0)
    cosine = F.cosine_similarity(mean.flatten(), full.flatten(), dim=0).item()
    assert cosine > 0.97
    assert (mean - full).norm().item() < 0.25 * full.norm().item()
    assert np.mean(values) == pytest.approx(ce, rel=0.03)  # E[CE vs sample] = KL + H(p)
    # a single draw is far noisier than the average: the check is not trivially satisfied
    assert F.cosine_similarity(grads[0].flatten(), full.flatten(), dim=0).item() < cosine - 0.1
    # top-2 KD (deterministic) stays biased however many times it is averaged
    top = topk_tokens(teacher, 2)
    tk = topk_kl(student, torch.from_numpy(top["logprobs"])[None], torch.from_numpy(top["ids"].astype(np.int64))[None],
                 torch.from_numpy(top["residual"])[None])
    top_grad = torch.autograd.grad(tk, student)[0]
    assert (top_grad - full).norm().item() > 2 * (mean - full).norm().item()


def test_masked_positions_do_not_count():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    mask = torch.tensor([[True, False, True]])
    garbage = teacher.clone()
    garbage[0, 1] = 1e4
    ref = forward_kl(student[:, [0, 2]], teacher[:, [0, 2]])
    assert forward_kl(student, garbage, mask).item() == pytest.approx(ref.item(), rel=1e-6)
    assert reverse_kl(student, garbage, mask).item() == pytest.approx(reverse_kl(student[:, [0, 2]], teacher[:, [0, 2]]).item(), rel=1e-6)
    ids = torch.tensor([[[1, 2], [10**6, -5], [3, 0]]])  # out-of-range ids at the masked position
    counts = torch.tensor([[[2, 1], [3, 0], [1, 1]]])
    s = sampled_kl(student, ids, counts, mask)
    s_ref = sampled_kl(student[:, [0, 2]], ids[:, [0, 2]], counts[:, [0, 2]])
    assert s.item() == pytest.approx(s_ref.item(), rel=1e-6)
    lp = torch.tensor([[[-0.5, -1.5], [0.0, 0.0], [-0.2, -2.0]]])
    res = torch.tensor([[0.1, 0.0, 0.05]])
    tk = topk_kl(student, lp, ids, res, mask)
    tk_ref = topk_kl(student[:, [0, 2]], lp[:, [0, 2]], ids[:, [0, 2]], res[:, [0, 2]])
    assert tk.item() == pytest.approx(tk_ref.item(), rel=1e-6)
    # nothing counted: 0 with a zero gradient
    st = student.clone().requires_grad_(True)
    none = forward_kl(st, teacher, torch.zeros(1, 3, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and st.grad.abs().sum().item() == 0.0


def test_taid_kl_by_hand():
    teacher = [2.0, -1.0, 0.0, 1.0]
    for lam in (0.0, 0.3, 1.0):
        target = _softmax([(1 - lam) * s + lam * t for s, t in zip(S_ROW, teacher)])
        q = _softmax(S_ROW)
        hand = sum(p * math.log(p / qi) for p, qi in zip(target, q))
        assert taid_kl(_one(S_ROW), _one(teacher), lam).item() == pytest.approx(hand, abs=1e-7, rel=1e-5)
    assert taid_kl(_one(S_ROW), _one(teacher), 1.0).item() == pytest.approx(forward_kl(_one(S_ROW), _one(teacher)).item(), rel=1e-6)
    # the interpolated target is a constant: the gradient is that of KL to a fixed distribution
    st = _one(S_ROW).requires_grad_(True)
    taid_kl(st, _one(teacher), 0.3).backward()
    target = torch.tensor(_softmax([0.7 * s + 0.3 * t for s, t in zip(S_ROW, teacher)]))
    np.testing.assert_allclose(st.grad[0, 0].numpy(), (torch.tensor(_softmax(S_ROW)) - target).numpy(), atol=1e-6)


def test_taid_topk_kl_by_hand_on_the_k_plus_1_buckets():
    """TAID on stored top-2 + residual: log-space interpolation of the 3 buckets, by hand, at T = 2."""
    t = 2.0
    logp = [math.log(0.5), math.log(0.3)]  # ids 0 and 1; residual 0.2
    ids, r = [0, 1], 0.2
    q = _softmax(S_ROW, t)
    qb = [q[0], q[1], 1 - q[0] - q[1]]
    pb = [0.5, 0.3, r]
    args = (_one(S_ROW), torch.tensor([[logp]]), torch.tensor([[ids]]), torch.tensor([[r]]))
    for lam in (0.0, 0.3, 0.8, 1.0):
        z = [math.exp((1 - lam) * math.log(a) + lam * math.log(b)) for a, b in zip(qb, pb)]
        target = [x / sum(z) for x in z]
        hand = sum(p * math.log(p / qi) for p, qi in zip(target, qb)) * t * t
        assert taid_topk_kl(*args, lam, temperature=t).item() == pytest.approx(hand, abs=1e-6, rel=1e-5), lam
    # lam = 1 is the top-k KL with the residual bucket
    assert taid_topk_kl(*args, 1.0, temperature=t).item() == pytest.approx(topk_kl(*args, temperature=t).item(), rel=1e-5)
    # the target is a constant: the gradient is that of KL(p_lam || Q) with p_lam fixed
    st = _one(S_ROW).requires_grad_(True)
    taid_topk_kl(st, *args[1:], 0.3, temperature=t).backward()
    z = torch.tensor([math.exp(0.7 * math.log(a) + 0.3 * math.log(b)) for a, b in zip(qb, pb)], dtype=torch.float64)
    target = z / z.sum()
    sq = torch.tensor(S_ROW, dtype=torch.float64).requires_grad_(True)
    qv = torch.softmax(sq / t, 0)
    (-(target * torch.log(torch.stack([qv[0], qv[1], 1 - qv[0] - qv[1]]))).sum() * t * t).backward()
    np.testing.assert_allclose(st.grad[0, 0].numpy(), sq.grad.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="lam"):
        taid_topk_kl(*args, 1.5)


def test_taid_sampled_kl_by_hand_is_lam_times_rskd_in_gradient():
    """TAID on stored samples: KL((1 - lam) q + lam * counts / S || q), by hand; padding ignored."""
    ids, counts = [[[2, 0, 3, 0]]], [[[3, 1, 0, 0]]]  # id 2 drawn 3 times, id 0 once; two padding entries
    p_hat = [0.25, 0.0, 0.75, 0.0]
    q = _softmax(S_ROW)
    for lam in (0.0, 0.4, 1.0):
        target = [(1 - lam) * qi + lam * p for qi, p in zip(q, p_hat)]
        hand = sum(p * math.log(p / qi) for p, qi in zip(target, q) if p > 0)
        got = taid_sampled_kl(_one(S_ROW), torch.tensor(ids), torch.tensor(counts), lam)
        assert got.item() == pytest.approx(hand, abs=1e-6, rel=1e-5), lam
    st = _one(S_ROW).requires_grad_(True)
    taid_sampled_kl(st, torch.tensor(ids), torch.tensor(counts), 0.4).backward()
    ref = _one(S_ROW).requires_grad_(True)
    sampled_kl(ref, torch.tensor(ids), torch.tensor(counts)).backward()
    np.testing.assert_allclose(st.grad.numpy(), 0.4 * ref.grad.numpy(), atol=1e-6)


def test_taid_schedule():
    sched = TaidSchedule(100, start=0.4, end=1.0, alpha=0.05)
    lams = [sched.update(5.0 - 0.01 * i, i) for i in range(101)]
    assert lams[0] == 0.4
    assert all(b >= a for a, b in zip(lams, lams[1:]))
    assert lams[-1] == 1.0
    # improving loss moves lam faster than the linear floor
    assert lams[10] > 0.4 + 0.6 * 10 / 100
    linear = TaidSchedule(100, adaptive=False)
    linear.update(1.0, 0)
    assert linear.update(1.0, 50) == pytest.approx(0.7)
    state = sched.state_dict()
    other = TaidSchedule(100)
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_first_k_of_a_stored_topk_equals_a_smaller_topk():
    """token_topk_kd top_k = 8 on a stored topk:32 reads what a stored topk:8 holds (residual included)."""
    from kdstore.train.objective_tokens import first_k

    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(2)) * 2
    big, small = topk_tokens(x, 32, temperature=1.5), topk_tokens(x, 8, temperature=1.5)
    lp, ids, r = first_k(torch.from_numpy(big["logprobs"]), torch.from_numpy(big["ids"].astype(np.int64)),
                         torch.from_numpy(big["residual"]), 8)
    np.testing.assert_array_equal(lp.numpy(), small["logprobs"])
    np.testing.assert_array_equal(ids.numpy(), small["ids"].astype(np.int64))
    np.testing.assert_allclose(r.numpy(), small["residual"], atol=2e-3)
    assert first_k(lp, ids, r, 0)[2] is r and first_k(lp, ids, r, 9)[0] is lp


def _graph_nodes(loss: torch.Tensor, name: str) -> int:
    seen, stack, count = set(), [loss.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == name
        stack.extend(n for n, _ in node.next_functions)
    return count


def test_shared_log_probs_computes_each_student_log_softmax_once_with_the_same_values():
    """CE + RS-KD + top-k KD at T = 1 and forward KL at T = 2: 2 student log-softmax nodes, not 4."""
    gen = torch.Generator().manual_seed(3)
    b, n, v, k = 2, 5, 11, 3
    logits = torch.randn(b, n, v, generator=gen)
    teacher = torch.randn(b, n, v, generator=gen)
    targets = torch.randint(0, v, (b, n), generator=gen)
    drawn = sample_tokens(teacher.reshape(-1, v), 6, key="k")
    ids, counts = (torch.as_tensor(drawn[f].astype(np.int64)).reshape(b, n, -1) for f in ("ids", "counts"))
    top = topk_tokens(teacher.reshape(-1, v), k)
    lp, tid = (torch.as_tensor(top[f].astype(np.float32 if f == "logprobs" else np.int64)).reshape(b, n, k)
               for f in ("logprobs", "ids"))
    res = torch.as_tensor(top["residual"]).reshape(b, n)

    def total(x):
        return (next_token_ce(x, targets) + sampled_kl(x, ids, counts) + topk_kl(x, lp, tid, res)
                + forward_kl(x, teacher, temperature=2.0))

    plain = logits.clone().requires_grad_(True)
    alone = total(plain)
    alone.backward()
    shared = logits.clone().requires_grad_(True)
    with shared_log_probs():
        together = total(shared)
        with shared_log_probs():  # nests
            assert torch.equal(total(shared), together)
    together.backward()
    assert _graph_nodes(alone, "LogSoftmaxBackward0") == 4
    assert _graph_nodes(together, "LogSoftmaxBackward0") == 2
    assert torch.equal(alone, together)
    torch.testing.assert_close(plain.grad, shared.grad, rtol=1e-6, atol=1e-7)
    # outside the block nothing is kept
    assert _graph_nodes(total(shared), "LogSoftmaxBackward0") == 4


def test_top1_calibration_by_hand_and_its_bootstrap_error():
    from kdstore.pipeline.lm_model import top1_calibration

    conf = torch.tensor([0.05, 0.05, 0.95, 0.95])
    hit = torch.tensor([0.0, 1.0, 1.0, 1.0])
    # bin 0: 1 hit vs confidence 0.1 in total; bin 14: 2 hits vs 1.9 → (0.9 + 0.1) / 4
    got = top1_calibration(conf, hit)
    assert got["ece"] == pytest.approx(0.25) and got["overconfidence"] == pytest.approx(-0.25)
    assert "ece_se" not in got
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(20000, generator=gen) * 0.4
    hit = (torch.rand(20000, generator=gen) < conf).float()  # calibrated by construction
    a, b = top1_calibration(conf, hit, bootstrap=50), top1_calibration(conf, hit, bootstrap=50)
    assert a == b and 0 < a["ece_se"] < 0.01 and a["ece"] < 0.01
    worse = top1_calibration(conf * 0.5, hit, bootstrap=50)  # under-confident by half
    assert worse["ece"] > 0.08 and worse["overconfidence"] < -0.08
