"""Per-token reduce ops for language-model teachers: top-k and RS-KD sampling (pure functions).

Input is one sample's teacher logits ``[n, V]`` (position t scores the token at t + 1).

- ``topk:K`` (:func:`topk_tokens`): per position, the K largest log-probabilities of
  ``softmax(logits / T)`` as float16, their ids in the smallest unsigned dtype that holds
  ``V``, the residual mass ``1 - sum(top-k probs)`` (float32) and the log-sum-exp of
  ``logits / T`` (float32; ``logits / T = logp + lse`` recovers the stored logits).
- ``sample:S`` (:func:`sample_tokens`): Random-Sampling KD (Anshumann et al., ACL 2025,
  "Sparse Logit Sampling"): S ids drawn with replacement from ``softmax(logits / T)``,
  stored as the unique ids with their counts, most frequent first, padded to S with count 0.
  ``counts / S`` is an unbiased estimate of the teacher distribution. The draws of position
  t of sample ``key`` come from a counter-based generator (Philox4x32-10, keyed by
  ``(seed, key)``, counter = (draw block, t)) evaluated for all positions at once, so they
  depend on ``(seed, key, t)`` only: not on batch composition, order or device. teacher.json
  records :data:`SAMPLER`; an earlier sampler (one numpy Philox stream per position, keyed by
  a sha256, no record) drew other ids, and precompute refuses to resume across the change.

:func:`bytes_per_token` reports the storage of either result from its arrays.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdstore.store.errors import InputError, TeacherOutputError

# Names the generator and layout of the sample:S draws, recorded in teacher.json; change it
# whenever the same (seed, key, position) would draw other ids.
SAMPLER = "philox4x32-10/key=(seed,key)/counter=(block,position)"
from kdstore.store.schema import (
    TOKENS_SAMPLE_COUNTS,
    TOKENS_SAMPLE_IDS,
    TOKENS_TOPK_IDS,
    TOKENS_TOPK_LOGPROBS,
    TOKENS_TOPK_LSE,
    TOKENS_TOPK_RESIDUAL,
)

# short names (what topk_tokens / sample_tokens return) -> stored field names
TOPK_FIELDS = {"logprobs": TOKENS_TOPK_LOGPROBS, "ids": TOKENS_TOPK_IDS, "residual": TOKENS_TOPK_RESIDUAL,
               "lse": TOKENS_TOPK_LSE}
SAMPLE_FIELDS = {"ids": TOKENS_SAMPLE_IDS, "counts": TOKENS_SAMPLE_COUNTS}


@dataclass(frozen=True, kw_only=True)
class TokenReduceSpec:
    """``topk:K`` or ``sample:S`` (optionally ``@T`` for the temperature, e.g. ``sample:12@2``)."""

    kind: str
    k: int
    temperature: float = 1.0
    seed: int = 0

    @classmethod
    def parse(cls, text: str, *, seed: int = 0) -> "TokenReduceSpec":
        body, _, temp = text.partition("@")
        kind, _, arg = body.partition(":")
        try:
            k = int(arg)
            temperature = float(temp) if temp else 1.0
        except ValueError:
            k, temperature = 0, 1.0
        if kind not in ("topk", "sample") or k < 1 or not temperature > 0:
            raise InputError(f"token output {text!r} not understood: use topk:K or sample:S, optionally @T (T > 0)")
        if kind == "sample" and k > 255:
            raise InputError(f"sample:{k}: at most 255 draws per token (counts are stored as uint8)")
        return cls(kind=kind, k=k, temperature=temperature, seed=seed)

    def to_text(self) -> str:
        return f"{self.kind}:{self.k}@{self.temperature:g}"

    def fields(self) -> list[str]:
        return list((TOPK_FIELDS if self.kind == "topk" else SAMPLE_FIELDS).values())


def id_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned integer dtype that holds ids ``0..vocab_size-1``."""
    if vocab_size < 1:
        raise InputError(f"vocab_size must be >= 1, got {vocab_size}")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _check_logits(logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TeacherOutputError(f"per-token logits must be a float tensor [n, V], got {shape}")
    logits = logits.detach().cpu().double()
    if not bool(torch.isfinite(logits).all()):
        raise TeacherOutputError("per-token logits contain NaN or inf")
    return logits


def topk_tokens(logits: torch.Tensor, k: int, *, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """Top-k of ``softmax(logits / T)`` per position.

    Args:
        logits: float ``[n, V]``, one sample's per-token teacher logits.
        k: 1 <= k <= V.
        temperature: T > 0.

    Returns:
        ``{"logprobs": float16 [n, k] (descending), "ids": id_dtype(V) [n, k],
        "residual": float32 [n] (1 - sum of the k probs, >= 0), "lse": float32 [n]
        (logsumexp(logits / T))}``.
    """
    x = _check_logits(logits) / float(temperature)
    n, v = x.shape
    if not 1 <= k <= v:
        raise InputError(f"topk:{k} needs 1 <= k <= vocabulary size {v}")
    lse = torch.logsumexp(x, dim=1)
    values, ids = torch.topk(x, k, dim=1)  # sorted, descending
    logp = values - lse.unsqueeze(1)
    residual = (-torch.expm1(torch.logsumexp(logp, dim=1))).clamp_(min=0.0)
    return {
        "logprobs": logp.numpy().astype(np.float16),
        "ids": ids.numpy().astype(id_dtype(v)),
        "residual": residual.numpy().astype(np.float32),
        "lse": lse.numpy().astype(np.float32),
    }


_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_LO = np.uint64(0xFFFFFFFF)


def philox4x32(counter: np.ndarray, key: tuple[int, int], rounds: int = 10) -> np.ndarray:
    """Philox4x32-10 (Salmon et al., SC 2011; Random123's reference), vectorised.

    Args:
        counter: uint32 ``[m, 4]``, one 128-bit counter per row.
        key: two 32-bit words.
        rounds: 10 for Philox4x32-10.

    Returns:
        uint32 ``[m, 4]``, the random words of each counter.
    """
    c = [counter[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & 0xFFFFFFFF, (k1 + _PHILOX_W[1]) & 0xFFFFFFFF
        p0, p1 = _PHILOX_M[0] * c[0], _PHILOX_M[1] * c[2]  # < 2^64: exact in uint64
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0), p1 & _LO, (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1), p0 & _LO]
    return np.stack(c, axis=1).astype(np.uint32)


def sample_key(seed: int, key: str) -> tuple[int, int]:
    """Philox key (two 32-bit words) for the draws of sample ``key`` under run seed ``seed``."""
    digest = hashlib.sha256(f"kdstore-rskd:{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def uniforms(seed: int, key: str, positions: np.ndarray, s: int) -> np.ndarray:
    """float64 ``[n, s]`` in [0, 1): the draws' uniforms, all positions at once.

    Draw ``j`` of position ``t`` comes from Philox4x32-10 with the sample's key
    (:func:`sample_key`) and counter ``(j // 2, t mod 2^32, t >> 32, 0x52534b44)``: two 53-bit
    doubles per counter (words 0-1 and 2-3, numpy's ``(a >> 5) * 2^26 + (b >> 6)``). So the
    draws depend on ``(seed, key, t, j)`` only, never on which other positions are drawn.
    """
    pos = np.asarray(positions, dtype=np.int64).astype(np.uint64)
    n, blocks = len(pos), (s + 1) // 2
    if n == 0:
        return np.zeros((0, s))
    counter = np.empty((n, blocks, 4), dtype=np.uint32)
    counter[..., 0] = np.arange(blocks, dtype=np.uint32)[None, :]
    counter[..., 1] = (pos & _LO).astype(np.uint32)[:, None]
    counter[..., 2] = (pos >> np.uint64(32)).astype(np.uint32)[:, None]
    counter[..., 3] = 0x52534B44  # "RSKD"
    words = philox4x32(counter.reshape(-1, 4), sample_key(seed, key)).astype(np.uint64).reshape(n, blocks * 2, 2)
    u = ((words[..., 0] >> np.uint64(5)) * np.uint64(1 << 26) + (words[..., 1] >> np.uint64(6))) * (1.0 / (1 << 53))
    return u[:, :s]


def sample_tokens(
    logits: torch.Tensor,
    s: int,
    *,
    key: str,
    temperature: float = 1.0,
    seed: int = 0,
    positions: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """RS-KD: ``s`` draws with replacement from ``softmax(logits / T)`` per position, as unique ids + counts.

    Args:
        logits: float ``[n, V]``, one sample's per-token teacher logits.
        s: draws per position, 1..255.
        key: the sample's key (seeds its draws).
        temperature: T > 0.
        seed: run-level seed.
        positions: int ``[n]`` positions of the rows in the sample (default ``0..n-1``), so a
            sample processed in pieces draws exactly what it draws whole.

    Returns:
        ``{"ids": id_dtype(V) [n, s], "counts": uint8 [n, s]}``: per row the distinct drawn ids,
        most frequent first (ties: smaller id first), then padding with id 0 and count 0;
        each row's counts sum to ``s``.
    """
    if not 1 <= s <= 255:
        raise InputError(f"sample:{s}: draws per token must be in 1..255")
    x = _check_logits(logits) / float(temperature)
    n, v = x.shape
    pos = np.arange(n) if positions is None else np.asarray(positions, dtype=np.int64)
    if pos.shape != (n,):
        raise InputError(f"positions must be [{n}], got {pos.shape}")
    cdf = torch.cumsum(F.softmax(x, dim=1), dim=1)
    cdf[:, -1] = 1.0  # exact top so that every u < 1 lands inside the vocabulary
    u = torch.from_numpy(uniforms(seed, key, pos, s))
    draws = torch.searchsorted(cdf, u, right=True).clamp_(max=v - 1)  # [n, s]
    return pack_counts(draws.numpy(), v)


def pack_counts(draws: np.ndarray, vocab_size: int) -> dict[str, np.ndarray]:
    """``draws int [n, s]`` → ``{"ids": [n, s], "counts": uint8 [n, s]}`` (unique, most frequent first, zero-padded).

    Vectorised over rows: sort each row, count the runs, order them by (count desc, id asc).
    """
    n, s = draws.shape
    if n == 0:
        return {"ids": np.zeros((0, s), dtype=id_dtype(vocab_size)), "counts": np.zeros((0, s), dtype=np.uint8)}
    srt = np.sort(np.asarray(draws, dtype=np.int64), axis=1)
    new = np.ones((n, s), dtype=bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    run = np.cumsum(new, axis=1) - 1  # index of each draw's run (distinct id) within its row
    flat = (np.arange(n)[:, None] * s + run).ravel()
    cnt = np.bincount(flat, minlength=n * s).reshape(n, s)
    run_ids = np.zeros((n, s), dtype=np.int64)
    run_ids.ravel()[flat[new.ravel()]] = srt[new]
    order = np.lexsort((run_ids, -cnt), axis=1)  # padding runs (count 0, id 0) sort last
    return {"ids": np.take_along_axis(run_ids, order, 1).astype(id_dtype(vocab_size)),
            "counts": np.take_along_axis(cnt, order, 1).astype(np.uint8)}


def bytes_per_token(fields: dict[str, np.ndarray]) -> dict[str, float]:
    """Storage per token position of one reduce result.

    ``"dense"``: the arrays as returned (padded ``[n, s]`` for samples). ``"compact"``: for
    sampled fields, only the non-zero (id, count) pairs plus one uint8 number of pairs per
    position (what a ragged encoding stores); equal to ``dense`` for top-k.
    """
    n = next(iter(fields.values())).shape[0]
    if n == 0:
        return {"dense": 0.0, "compact": 0.0}
    dense = sum(a.nbytes for a in fields.values()) / n
    if "counts" in fields:
        pairs = int((fields["counts"] > 0).sum())
        pair_bytes = fields["ids"].dtype.itemsize + fields["counts"].dtype.itemsize
        compact = (pairs * pair_bytes + n) / n
    else:
        compact = dense
    return {"dense": float(dense), "compact": float(compact)}


def reduce_tokens(logits: torch.Tensor, spec: TokenReduceSpec, *, key: str) -> dict[str, np.ndarray]:
    """Apply ``spec`` to one sample's ``logits [n, V]``; returns the fields named by ``spec.fields()``."""
    if spec.kind == "topk":
        out = topk_tokens(logits, spec.k, temperature=spec.temperature)
        return {TOPK_FIELDS[name]: value for name, value in out.items()}
    out = sample_tokens(logits, spec.k, key=key, temperature=spec.temperature, seed=spec.seed)
    return {SAMPLE_FIELDS[name]: value for name, value in out.items()}
