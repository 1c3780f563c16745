"""Per-token reduce ops (kdstore.pipeline.token_reduce) against a real GPT forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from kdstore.pipeline.lm_model import GPT, GPTConfig
from kdstore.pipeline.token_reduce import (
    TokenReduceSpec,
    bytes_per_token,
    id_dtype,
    pack_counts,
    philox4x32,
    uniforms,
    reduce_tokens,
    sample_tokens,
    topk_tokens,
)
from kdstore.store.errors import InputError

V = 300


@pytest.fixture(scope="module")
def logits() -> torch.Tensor:
    """A real (randomly initialised, seeded) GPT's per-token logits for one sample: [24, V]."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, context=32, depth=2, width=32, heads=2, seed=3)).eval()
    with torch.no_grad():
        # a bigger init scale gives peaked, realistic distributions instead of near-uniform ones
        model.tok.weight.mul_(8.0)
        ids = torch.randint(0, V, (1, 24), generator=torch.Generator().manual_seed(1))
        return model(ids)[0].float()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_matches_direct_forward(logits, temperature):
    k = 8
    out = topk_tokens(logits, k, temperature=temperature)
    x = logits.double() / temperature
    order = torch.argsort(x, dim=1, descending=True)
    sorted_x = torch.gather(x, 1, order)
    assert bool((sorted_x[:, k - 1] > sorted_x[:, k]).all()), "test needs untied top-k"
    assert out["ids"].dtype == np.uint16
    np.testing.assert_array_equal(out["ids"].astype(np.int64), order[:, :k].numpy())
    logp = F.log_softmax(x, dim=1)
    ref = torch.gather(logp, 1, order[:, :k]).numpy()
    assert out["logprobs"].dtype == np.float16
    np.testing.assert_allclose(out["logprobs"].astype(np.float64), ref, rtol=1e-3, atol=2e-3)
    residual = 1.0 - torch.gather(logp.exp(), 1, order[:, :k]).sum(1).numpy()
    np.testing.assert_allclose(out["residual"], residual, rtol=1e-5, atol=1e-7)
    assert (out["residual"] > 0.01).all() and (out["residual"] < 0.99).all()
    np.testing.assert_allclose(out["lse"], torch.logsumexp(x, 1).numpy(), rtol=1e-6)
    # logprob + lse recovers the (temperature-scaled) logits
    np.testing.assert_allclose(
        out["logprobs"].astype(np.float64) + out["lse"][:, None],
        torch.gather(x, 1, order[:, :k]).numpy(),
        atol=5e-3 * max(1.0, float(x.abs().max())),
    )


def test_id_dtype_and_spec():
    assert id_dtype(256) == np.uint8 and id_dtype(257) == np.uint16
    assert id_dtype(65536) == np.uint16 and id_dtype(65537) == np.uint32
    assert TokenReduceSpec.parse("sample:12@2").temperature == 2.0
    assert TokenReduceSpec.parse("topk:32").fields()[0] == "tokens/topk/logprobs"
    for bad in ("topk", "topk:0", "sample:x", "sample:300", "topk:4@0", "mean:3"):
        with pytest.raises(InputError):
            TokenReduceSpec.parse(bad)
    with pytest.raises(InputError):
        topk_tokens(torch.zeros(2, 5), 6)


def test_sample_is_deterministic_and_batch_independent(logits):
    whole = sample_tokens(logits, 12, key="doc-1", temperature=1.5, seed=7)
    again = sample_tokens(logits, 12, key="doc-1", temperature=1.5, seed=7)
    pieces = [
        sample_tokens(logits[a:b], 12, key="doc-1", temperature=1.5, seed=7, positions=np.arange(a, b))
        for a, b in ((0, 5), (5, 6), (6, 24))
    ]
    for name in ("ids", "counts"):
        np.testing.assert_array_equal(whole[name], again[name])
        np.testing.assert_array_equal(whole[name], np.concatenate([p[name] for p in pieces]))
    assert whole["counts"].dtype == np.uint8 and whole["ids"].dtype == np.uint16
    assert (whole["counts"].sum(1) == 12).all()
    for row_ids, row_counts in zip(whole["ids"], whole["counts"]):
        real = row_ids[row_counts > 0]
        assert len(set(real.tolist())) == len(real)  # unique
        assert (np.diff(row_counts[row_counts > 0].astype(int)) <= 0).all()  # most frequent first
        assert (row_counts[len(real):] == 0).all()
    other = sample_tokens(logits, 12, key="doc-2", temperature=1.5, seed=7)
    assert not np.array_equal(other["ids"], whole["ids"])


def _chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square of observed ``counts [V]`` against ``probs [V]``; cells with expectation < 5 pooled."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, exp).pvalue)


def _pooled_counts(draw_logits: torch.Tensor, position: int, temperature: float, keys: int = 120, s: int = 250) -> np.ndarray:
    """Counts per id of ``keys * s`` draws for one position (each key is an independent stream)."""
    row = draw_logits[position : position + 1]
    total = np.zeros(V, dtype=np.int64)
    for i in range(keys):
        out = sample_tokens(row, s, key=f"k{i}", temperature=temperature, seed=0, positions=np.array([position]))
        np.add.at(total, out["ids"][0].astype(np.int64), out["counts"][0].astype(np.int64))
    return total


@pytest.mark.parametrize("position", [3, 17])
def test_sample_counts_follow_teacher_distribution(logits, position):
    temperature = 1.5
    probs = F.softmax(logits[position].double() / temperature, dim=0).numpy()
    assert probs.max() < 0.9  # a distribution with a real spread
    counts = _pooled_counts(logits, position, temperature)
    assert _chi_square_pvalue(counts, probs) > 1e-3


@pytest.mark.parametrize("position", [3, 17])
def test_chi_square_catches_a_biased_sampler(logits, position):
    """The same check rejects a sampler that draws from a sharpened (T / 1.15) distribution."""
    temperature = 1.5
    probs = F.softmax(logits[position].double() / temperature, dim=0).numpy()
    counts = _pooled_counts(logits * 1.15, position, temperature)
    assert _chi_square_pvalue(counts, probs) < 1e-6


def test_bytes_per_token():
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0)) * 3
    assert bytes_per_token(topk_tokens(x, 8))["dense"] == 8 * 2 + 8 * 2 + 4 + 4
    assert bytes_per_token(topk_tokens(x, 32))["dense"] == 32 * 2 + 32 * 2 + 4 + 4
    sampled = sample_tokens(x, 12, key="a")
    figures = bytes_per_token(sampled)
    assert figures["dense"] == 12 * 2 + 12
    pairs = int((sampled["counts"] > 0).sum())
    assert figures["compact"] == (pairs * 3 + 64) / 64 < figures["dense"]


def test_reduce_tokens_names_fields(logits):
    for text in ("topk:4", "sample:6"):
        spec = TokenReduceSpec.parse(text)
        out = reduce_tokens(logits, spec, key="k")
        assert sorted(out) == sorted(spec.fields())
        assert all(v.shape[0] == logits.shape[0] for v in out.values())


def test_philox4x32_known_answers():
    """Random123's known-answer vectors for Philox4x32-10 (counter, key -> output)."""
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, want in kat:
        got = philox4x32(np.array([counter], dtype=np.uint32), key)
        assert tuple(int(x) for x in got[0]) == want


def test_uniforms_per_position_and_vectorised_agree():
    """All positions at once = each position alone (the draws are seeded by key and position only)."""
    pos = np.array([0, 1, 7, 2**33 + 5, 128])
    whole = uniforms(3, "doc", pos, 11)
    alone = np.concatenate([uniforms(3, "doc", pos[i : i + 1], 11) for i in range(len(pos))])
    np.testing.assert_array_equal(whole, alone)
    assert whole.shape == (5, 11) and (whole >= 0).all() and (whole < 1).all()
    assert len(np.unique(whole)) == whole.size
    assert not np.array_equal(uniforms(3, "doc", pos, 11), uniforms(4, "doc", pos, 11))
    assert not np.array_equal(uniforms(3, "doc", pos, 11), uniforms(3, "doc2", pos, 11))


def test_pack_counts_vectorised_equals_a_per_row_loop():
    rng = np.random.default_rng(0)
    draws = np.concatenate([rng.integers(0, 6, (200, 12)), rng.integers(0, 3000, (50, 12)), np.full((3, 12), 7)])
    got = pack_counts(draws, 3000)
    for r, row in enumerate(draws):
        uniq, cnt = np.unique(row, return_counts=True)
        order = np.lexsort((uniq, -cnt))
        m = len(uniq)
        np.testing.assert_array_equal(got["ids"][r, :m], uniq[order])
        np.testing.assert_array_equal(got["counts"][r, :m], cnt[order])
        assert (got["ids"][r, m:] == 0).all() and (got["counts"][r, m:] == 0).all()
    assert got["ids"].dtype == np.uint16 and got["counts"].dtype == np.uint8
