"""A small GPT (decoder-only transformer) that serves as both the LM teacher and LM student presets.

Pre-LayerNorm blocks, learned position embeddings, causal self-attention through
``F.scaled_dot_product_attention``, output head tied to the token embedding. With
``doc_ids`` the attention is also block-diagonal over documents, so a packed sequence
never attends across a document boundary. Initialisation draws from a generator seeded
with ``seed`` only: the same config gives the same weights on every machine.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdstore.store.errors import InputError


def next_token_targets(ids: torch.Tensor, doc: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids, doc [b, n]`` → ``(targets [b, n] int64, mask [b, n] bool)``: position t predicts ``ids[t+1]``.

    A position counts when the next token is in the sample and in the same document, and the
    token itself is not ``<|endoftext|>`` (nothing follows a document's end).
    """
    targets = torch.zeros_like(ids, dtype=torch.long)
    targets[:, :-1] = ids[:, 1:]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, :-1] = (doc[:, 1:] == doc[:, :-1]) & (doc[:, :-1] >= 0)
    return targets, mask & (ids != eos_id)


def kd_mask(ids: torch.Tensor, doc: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``[b, n]`` bool: positions whose teacher distribution is a distillation target.

    Every real token (``doc >= 0``) but ``<|endoftext|>``, including the last position of a
    sample (the teacher still predicts the token after it; only the CE target is missing).
    """
    return (doc >= 0) & (ids != eos_id)


def top1_calibration(conf: torch.Tensor, hit: torch.Tensor, bins: int = 15, *, bootstrap: int = 0,
                     seed: int = 0) -> dict[str, float]:
    """Calibration of next-token top-1 predictions: ``conf [m]`` (top-1 probability), ``hit [m]``
    (1 where the top-1 token was right) → ``ece`` (expected calibration error over ``bins``
    equal-width confidence bins, weighted by tokens) and ``overconfidence`` (mean confidence −
    accuracy: > 0 over-, < 0 under-confident). ``bootstrap = B > 0`` adds ``ece_se``: the
    standard deviation of the ECE over B resamples of the tokens (seeded), its sampling noise."""
    conf, hit = conf.double().flatten(), hit.double().flatten()
    if not len(conf):
        return {"ece": float("nan"), "overconfidence": float("nan")}
    which = torch.clamp((conf * bins).long(), max=bins - 1)

    def ece(idx: torch.Tensor | None) -> float:
        w, c, h = (which, conf, hit) if idx is None else (which[idx], conf[idx], hit[idx])
        gap = torch.bincount(w, weights=h, minlength=bins) - torch.bincount(w, weights=c, minlength=bins)
        return float(gap.abs().sum() / len(c))

    out = {"ece": ece(None), "overconfidence": float(conf.mean() - hit.mean())}
    if bootstrap:
        gen = torch.Generator().manual_seed(seed)
        draws = [ece(torch.randint(0, len(conf), (len(conf),), generator=gen)) for _ in range(bootstrap)]
        out["ece_se"] = float(torch.tensor(draws).std())
    return out


def next_token_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits [m, V]``, ``targets [m]`` (the scored positions only) → per token ``(nll, top-1
    probability, top-1 hit as 0/1)``, each ``[m]`` float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    top = logp.max(-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), top.values.exp(), (top.indices == targets).float()


def score_tokens(nll: torch.Tensor, conf: torch.Tensor, hit: torch.Tensor, bins: int = 15, *,
                 bootstrap: int = 0) -> dict[str, float]:
    """``ce`` (mean nll), ``acc``, ``tokens`` and :func:`top1_calibration` of the scores of
    :func:`next_token_scores` (concatenated over batches, at least one token)."""
    return {"ce": float(nll.double().mean()), "acc": float(hit.mean()), "tokens": len(nll),
            **top1_calibration(conf, hit, bins, bootstrap=bootstrap)}


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Shape of a :class:`GPT`. ``width`` must divide by ``heads``."""

    vocab_size: int
    context: int = 128
    depth: int = 4
    width: int = 128
    heads: int = 4
    mlp_ratio: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "depth", "width", "heads", "mlp_ratio"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise InputError(f"GPTConfig.width ({self.width}) must be a multiple of heads ({self.heads})")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise InputError(f"GPT config has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.fc = nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width)
        self.out = nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """``ids [b, n] int64 (n <= context)`` → next-token logits ``[b, n, vocab_size]`` float32.

    Position ``t`` of the output is the distribution of the token at ``t + 1``.
    ``doc_ids [b, n]`` (optional, any integer dtype) restricts attention to earlier tokens of
    the same document; without it the mask is plain causal.

    ``temperature`` (a plain attribute, 1 unless set; not a weight) divides the output logits:
    :func:`kdstore.pipeline.lm_teacher.load_lm` sets a teacher's fitted calibration temperature.
    """

    temperature: float = 1.0

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)
        self._init(cfg.seed)

    @torch.no_grad()
    def _init(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(int(seed))
        resid_std = 0.02 / math.sqrt(2 * self.cfg.depth)
        for name, p in sorted(self.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            elif ".ln" in name or name.startswith("ln_f"):
                p.fill_(1.0)
            else:
                std = resid_std if name.endswith(("proj.weight", "out.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        if ids.dim() != 2:
            raise ValueError(f"ids must be [b, n], got shape {tuple(ids.shape)}")
        b, n = ids.shape
        if n > self.cfg.context:
            raise ValueError(f"sequence length {n} exceeds the model context {self.cfg.context}")
        pos = torch.arange(n, device=ids.device)
        x = self.tok(ids) + self.pos(pos)
        mask = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
        if doc_ids is not None:
            if doc_ids.shape != ids.shape:
                raise ValueError(f"doc_ids must be [b, n] like ids, got {tuple(doc_ids.shape)}")
            same = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)
            mask = (mask & same).unsqueeze(1)  # [b, 1, n, n]
        for block in self.blocks:
            x = block(x, mask)
        logits = self.ln_f(x) @ self.tok.weight.t()
        return logits if self.temperature == 1.0 else logits / self.temperature

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
