"""A causal LM teacher trained here: a small GPT on the packaged corpora's training split.

``train_lm_teacher(OUT_DIR, steps=...)`` (CLI: ``kdstore lm-teacher OUT_DIR``) writes

- ``tokenizer.json``: byte-level BPE trained on the training split,
- ``model.safetensors``: the GPT weights,
- ``config.json``: model config, training settings, fingerprints (tokenizer and weights
  sha256) and the held-out evaluation (cross-entropy, perplexity, next-token accuracy,
  and the same for a unigram model fitted on the training tokens).

The run is a fixed number of optimizer steps (not wall time) over a seeded stream of
packed training rows, so the same settings give the same weights. The held-out documents
(:func:`kdstore.pipeline.lm_corpus.is_heldout`) are never seen in training.

``kdstore.pipeline.lm_teacher:gpt`` (with ``path=OUT_DIR``) loads it as a precompute
:class:`~kdstore.pipeline.teacher.Teacher` whose ``forward`` returns per-token logits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdstore.pipeline.lm_corpus import (
    DEFAULT_CORPUS,
    EOS,
    encode_documents,
    file_sha256,
    load_documents,
    load_tokenizer,
    pack,
    read_npy,
    train_tokenizer,
)
from kdstore.pipeline.lm_model import GPT, GPTConfig, next_token_targets
from kdstore.store.errors import InputError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


@torch.no_grad()
def evaluate(model: GPT, ids: np.ndarray, doc: np.ndarray, eos_id: int, *, batch: int = 64) -> dict[str, float]:
    """Held-out next-token cross-entropy (nats), perplexity and top-1 accuracy over ``ids/doc [m, n]``."""
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for start in range(0, len(ids), batch):
        x = torch.from_numpy(ids[start : start + batch]).long()
        d = torch.from_numpy(doc[start : start + batch]).long()
        targets, mask = next_token_targets(x, d, eos_id)
        logits = model(x, d)
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        m = mask.flatten()
        nll += float(ce[m].double().sum())
        correct += int((logits.argmax(-1).flatten() == targets.flatten())[m].sum())
        count += int(m.sum())
    ce_mean = nll / max(count, 1)
    return {"ce": ce_mean, "ppl": math.exp(ce_mean), "acc": correct / max(count, 1), "tokens": count}


def unigram_baseline(train_ids: np.ndarray, train_doc: np.ndarray, ids: np.ndarray, doc: np.ndarray, eos_id: int, vocab: int) -> dict[str, float]:
    """A unigram model (add-one counts of the training targets) scored on the same held-out targets."""
    def targets(i: np.ndarray, d: np.ndarray) -> np.ndarray:
        t, m = next_token_targets(torch.from_numpy(i).long(), torch.from_numpy(d).long(), eos_id)
        return t[m].numpy()

    counts = np.bincount(targets(train_ids, train_doc), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    held = targets(ids, doc)
    ce = float(-logp[held].mean())
    return {"ce": ce, "ppl": math.exp(ce), "acc": float((held == int(np.argmax(counts))).mean()), "tokens": int(len(held))}


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_lm_teacher(
    out_dir: str | os.PathLike[str],
    *,
    steps: int = 1200,
    batch_size: int = 16,
    context: int = 128,
    depth: int = 2,
    width: int = 128,
    heads: int = 4,
    vocab_size: int = 4096,
    lr: float = 3e-3,
    seed: int = 0,
    corpus: str = DEFAULT_CORPUS,
    heldout_fraction: float = 0.05,
    limit: int | None = None,
    eval_rows: int = 256,
    threads: int | None = None,
    log=print,
) -> dict[str, Any]:
    """Train the tokenizer and the GPT teacher; write OUT_DIR/{tokenizer.json, model.safetensors, config.json}.

    ``limit`` keeps the first ``limit`` documents of each split (tests). Returns the config dict.
    """
    from safetensors.torch import save_file

    if steps < 1 or batch_size < 1:
        raise InputError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_docs = load_documents("train", corpus=corpus, heldout_fraction=heldout_fraction, limit=limit)
    held_docs = load_documents("heldout", corpus=corpus, heldout_fraction=heldout_fraction, limit=limit)
    tokenizer = train_tokenizer(train_docs.texts, vocab_size=vocab_size)
    tokenizer.save(str(out / TOKENIZER))
    eos_id = tokenizer.token_to_id(EOS)
    train_ids, train_doc = pack(encode_documents(tokenizer, train_docs.texts), context, pad_id=eos_id)
    held_ids, held_doc = pack(encode_documents(tokenizer, held_docs.texts), context, pad_id=eos_id)
    held_ids, held_doc = held_ids[:eval_rows], held_doc[:eval_rows]
    prep_s = time.perf_counter() - t0
    log(f"tokenizer {tokenizer.get_vocab_size()} tokens; train {len(train_docs.keys)} docs / {len(train_ids)} rows, "
        f"held-out {len(held_docs.keys)} docs ({len(held_ids)} rows evaluated); {prep_s:.0f}s")

    cfg = GPTConfig(vocab_size=tokenizer.get_vocab_size(), context=context, depth=depth, width=width, heads=heads, seed=seed)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(len(train_ids), generator=gen)
    cursor = 0
    t1 = time.perf_counter()
    model.train()
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(train_ids), generator=gen), 0
        rows = order[cursor : cursor + batch_size].numpy()
        cursor += batch_size
        x = torch.from_numpy(train_ids[rows]).long()
        d = torch.from_numpy(train_doc[rows]).long()
        targets, mask = next_token_targets(x, d, eos_id)
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup=max(1, steps // 20))
        logits = model(x, d)
        loss = F.cross_entropy(logits[mask], targets[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - t1:.0f}s")
    train_s = time.perf_counter() - t1
    model.eval()
    held = evaluate(model, held_ids, held_doc, eos_id)
    unigram = unigram_baseline(train_ids, train_doc, held_ids, held_doc, eos_id, cfg.vocab_size)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    config = {
        "model": json.loads(cfg.to_json()),
        "training": {
            "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "corpus": corpus,
            "heldout_fraction": heldout_fraction, "limit": limit, "train_documents": len(train_docs.keys),
            "train_rows": int(len(train_ids)), "tokens_seen": steps * batch_size * context,
            "train_seconds": round(train_s, 1), "prep_seconds": round(prep_s, 1), "threads": torch.get_num_threads(),
        },
        "parameters": model.num_parameters(),
        "eos_id": eos_id,
        "heldout": held,
        "unigram": unigram,
        "tokenizer_sha256": file_sha256(out / TOKENIZER),
        "weights_sha256": file_sha256(out / WEIGHTS),
    }
    tmp = out / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=1))
    os.replace(tmp, out / CONFIG)
    log(f"held-out CE {held['ce']:.3f} (ppl {held['ppl']:.1f}, acc {held['acc']:.3f}) vs unigram "
        f"{unigram['ce']:.3f} (ppl {unigram['ppl']:.1f}, acc {unigram['acc']:.3f}); {train_s:.0f}s training")
    return config


def load_lm(path: str | os.PathLike[str], *, device: str = "cpu") -> tuple[GPT, dict, Any]:
    """``(model in eval mode, config dict, tokenizer)`` from a teacher folder; checks both fingerprints."""
    from safetensors.torch import load_file

    folder = Path(path)
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise InputError(f"{folder} is not an LM teacher folder (no {CONFIG}): train one with `kdstore lm-teacher {folder}`")
    config = json.loads(cfg_path.read_text())
    for name, key in ((WEIGHTS, "weights_sha256"), (TOKENIZER, "tokenizer_sha256")):
        if not (folder / name).is_file():
            raise InputError(f"{folder / name} is missing: retrain with `kdstore lm-teacher {folder}`")
        if file_sha256(folder / name) != config[key]:
            raise InputError(f"{folder / name} does not match the sha256 in {cfg_path}: the folder was modified; retrain it")
    model = GPT(GPTConfig.from_dict(config["model"]))
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model.eval().to(device), config, load_tokenizer(folder / TOKENIZER)


class LMTeacher:
    """The GPT teacher as a precompute :class:`~kdstore.pipeline.teacher.Teacher`.

    ``preprocess`` takes a packed sample (``ids.npy``, ``doc.npy`` from ``kdstore lm-shards``)
    or a raw ``txt`` document (tokenized, ``<|endoftext|>`` appended, cut to the context).
    ``forward`` returns, for ``b`` samples of lengths ``n_i``:

    - ``"tokens/logits"``: ``b`` float32 tensors ``[n_i, vocab]``, position t = the teacher's
      logits for the token at t + 1 (temperature 1, not applied: reduce ops apply theirs).
    - ``"tokens/ids"``: ``b`` int32 tensors ``[n_i]`` (the input tokens, for alignment checks).
    """

    input_key = "ids.npy"

    def __init__(self, *, path: str, device: str | None = None) -> None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.config, self.tokenizer = load_lm(path, device=device)
        self.device = torch.device(device)
        self.name = "gpt"
        self.eos_id = int(self.config["eos_id"])
        self.vocab_size = int(self.config["model"]["vocab_size"])
        self.context = int(self.config["model"]["context"])
        self.fingerprint = hashlib.sha256(
            f"{self.config['weights_sha256']}:{self.config['tokenizer_sha256']}".encode()
        ).hexdigest()
        self.outputs: dict[str, tuple[int, ...]] = {"tokens/logits": (-1, self.vocab_size), "tokens/ids": (-1,)}

    def preprocess(self, sample: dict) -> tuple[np.ndarray, np.ndarray]:
        """One sample → ``(ids int32 [n], doc int32 [n])`` with ``n <= context``."""
        key = sample.get("__key__", "?")
        if "ids.npy" in sample:
            ids = read_npy(sample["ids.npy"]).astype(np.int32)
            doc = read_npy(sample["doc.npy"]).astype(np.int32) if "doc.npy" in sample else np.zeros_like(ids)
        elif "txt" in sample:
            raw = sample["txt"]
            text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8", errors="replace")
            ids = np.array([*self.tokenizer.encode(text).ids, self.eos_id], dtype=np.int32)[: self.context]
            doc = np.zeros_like(ids)
        else:
            raise InputError(f"sample {key!r} has neither ids.npy (kdstore lm-shards) nor txt")
        if ids.ndim != 1 or doc.shape != ids.shape or not 0 < len(ids) <= self.context:
            raise InputError(f"sample {key!r}: ids must be 1-D with 1..{self.context} tokens and doc alike, got {ids.shape}, {doc.shape}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise InputError(f"sample {key!r}: token ids outside [0, {self.vocab_size}): written with another tokenizer?")
        return ids, doc

    @torch.inference_mode()
    def forward(self, inputs: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
        """``b`` preprocessed samples → ``{"tokens/logits": b × [n_i, V], "tokens/ids": b × [n_i]}``."""
        lengths = [len(ids) for ids, _ in inputs]
        n = max(lengths)
        ids = torch.full((len(inputs), n), self.eos_id, dtype=torch.long)
        doc = torch.full((len(inputs), n), -1, dtype=torch.long)
        for i, (x, d) in enumerate(inputs):
            ids[i, : len(x)] = torch.from_numpy(x).long()
            doc[i, : len(d)] = torch.from_numpy(d).long()
        logits = self.model(ids.to(self.device), doc.to(self.device)).float().cpu()
        return {
            "tokens/logits": [logits[i, :m].clone() for i, m in enumerate(lengths)],
            "tokens/ids": [ids[i, :m].to(torch.int32) for i, m in enumerate(lengths)],
        }

    __call__ = forward


def gpt(*, path: str, device: str | None = None) -> LMTeacher:
    """Factory for ``--teacher kdstore.pipeline.lm_teacher:gpt --teacher-arg path=OUT_DIR``."""
    return LMTeacher(path=path, device=device)
