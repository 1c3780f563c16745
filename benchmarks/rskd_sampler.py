"""RS-KD ``sample:S`` op: per-position Philox generators (the first version) vs the vectorised one.

Times :func:`kdstore.pipeline.token_reduce.sample_tokens` against the first implementation
(kept here as the reference: one ``numpy.random.Philox`` generator per position, keyed by
sha256(seed, key, position), and a per-row ``np.unique``), on the same logits ``[n, V]``,
alternating the two sides, and prints the median CPU seconds per sample and the speed-up.

    python benchmarks/rskd_sampler.py [--n 128] [--vocab 4096] [--s 12] [--reps 15]
Writes benchmarks/results/rskd_sampler.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from kdstore.pipeline.token_reduce import _check_logits, id_dtype, pack_counts, sample_tokens, uniforms


def _ref_uniforms(seed: int, key: str, n: int, s: int) -> np.ndarray:
    return np.stack([np.random.Generator(np.random.Philox(key=int.from_bytes(hashlib.sha256(
        f"kdstore-rskd:{seed}:{key}:{p}".encode()).digest()[:16], "little"))).random(s) for p in range(n)])


def _ref_pack(draws: np.ndarray, v: int) -> dict[str, np.ndarray]:
    n, s = draws.shape
    ids, counts = np.zeros((n, s), dtype=id_dtype(v)), np.zeros((n, s), dtype=np.uint8)
    for r in range(n):
        uniq, cnt = np.unique(draws[r], return_counts=True)
        order = np.lexsort((uniq, -cnt))
        ids[r, : len(uniq)], counts[r, : len(uniq)] = uniq[order], cnt[order]
    return {"ids": ids, "counts": counts}


def _reference(logits: torch.Tensor, s: int, *, key: str, seed: int = 0) -> dict[str, np.ndarray]:
    """The first implementation: one Philox generator per position, then a per-row np.unique."""
    x = _check_logits(logits)
    n, v = x.shape
    u = _ref_uniforms(seed, key, n, s)
    cdf = torch.cumsum(F.softmax(x, dim=1), dim=1)
    cdf[:, -1] = 1.0
    draws = torch.searchsorted(cdf, torch.from_numpy(u), right=True).clamp_(max=v - 1).numpy()
    return _ref_pack(draws, v)


def _draws_only(kind: str, n: int, s: int, v: int, key: str) -> None:
    """The part the change touched: the uniforms and the (id, count) packing, no softmax."""
    if kind == "per_position_generators":
        u = _ref_uniforms(0, key, n, s)
        _ref_pack((u * v).astype(np.int64), v)
    else:
        u = uniforms(0, key, np.arange(n), s)
        pack_counts((u * v).astype(np.int64), v)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--s", type=int, default=12)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--result", type=Path, default=Path(__file__).parent / "results" / "rskd_sampler.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    logits = torch.randn(args.n, args.vocab, generator=torch.Generator().manual_seed(0)) * 3
    sides = {"per_position_generators": _reference, "vectorised": sample_tokens}
    times: dict[str, list[float]] = {k: [] for k in sides}
    for rep in range(args.reps):
        for name in (list(sides) if rep % 2 == 0 else list(sides)[::-1]):
            t0 = time.process_time()  # CPU seconds of this process: steadier than wall time on a loaded machine
            sides[name](logits, args.s, key=f"k{rep}")
            times[name].append(time.process_time() - t0)
    parts: dict[str, list[float]] = {k: [] for k in sides}
    for rep in range(args.reps):
        for name in (list(sides) if rep % 2 == 0 else list(sides)[::-1]):
            t0 = time.process_time()
            _draws_only(name, args.n, args.s, args.vocab, f"k{rep}")
            parts[name].append(time.process_time() - t0)
    report = {"n": args.n, "vocab": args.vocab, "s": args.s, "reps": args.reps, "loadavg": os.getloadavg()}
    print(f"{'side':26s} {'sample_tokens CPU s':>20s} {'draws+packing CPU s':>20s}")
    for k in sides:
        print(f"{k:26s} {statistics.median(times[k]):20.5f} {statistics.median(parts[k]):20.5f}")
    for label, t in (("sample_tokens", times), ("draws_and_packing", parts)):
        ratios = [a / b for a, b in zip(t["per_position_generators"], t["vectorised"])]
        report[label] = {"median_cpu_seconds": {k: statistics.median(v) for k, v in t.items()},
                         "speedup_median": statistics.median(ratios), "speedup_min_max": [min(ratios), max(ratios)]}
        print(f"{label}: speed-up {statistics.median(ratios):.1f}x (per-rep range {min(ratios):.1f}-{max(ratios):.1f})")
    print(f"load {report['loadavg'][0]:.1f}")
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
