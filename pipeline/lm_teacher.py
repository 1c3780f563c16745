"""A causal LM teacher trained here: a small GPT on the packaged corpora's training split.

``train_lm_teacher(OUT_DIR, steps=...)`` (CLI: ``kdstore lm-teacher OUT_DIR``) writes

- ``tokenizer.json``: byte-level BPE trained on the training split,
- ``model.safetensors``: the GPT weights,
- ``config.json``: model config, training settings, fingerprints (tokenizer and weights
  sha256) and the held-out evaluation (cross-entropy, perplexity, next-token accuracy,
  and the same for a unigram model fitted on the training tokens), and (unless
  ``calibrate=False``) the ``calibration``: a temperature fitted on held-out tokens.

**Calibration.** A language model is rarely calibrated (this one comes out under-confident:
its top-1 probability is below its accuracy), and a faithful student inherits whatever the
teacher's probabilities say. :func:`calibrate_lm_teacher` fits one temperature ``T`` by
minimising next-token NLL (temperature scaling, Guo et al., 2017) on the **second half** of
the held-out documents (the first half is what the held-out figures here and the
benchmark's students are scored on), and records it with the NLL / expected calibration
error before and after. :func:`load_lm` then divides the logits by ``T`` (the teacher *is*
the calibrated model; ``calibrated=False`` loads the raw one), and the precompute teacher's
fingerprint includes ``T``.

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
from kdstore.pipeline.lm_model import GPT, GPTConfig, next_token_scores, next_token_targets, score_tokens, top1_calibration
from kdstore.store.errors import InputError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


@torch.no_grad()
def evaluate(model: GPT, ids: np.ndarray, doc: np.ndarray, eos_id: int, *, batch: int = 64) -> dict[str, float]:
    """Held-out next-token cross-entropy (nats), perplexity, top-1 accuracy and calibration
    (:func:`~kdstore.pipeline.lm_model.top1_calibration`) over ``ids/doc [m, n]``."""
    model.eval()
    scores = []
    for start in range(0, len(ids), batch):
        x = torch.from_numpy(ids[start : start + batch]).long()
        d = torch.from_numpy(doc[start : start + batch]).long()
        targets, mask = next_token_targets(x, d, eos_id)
        scores.append(next_token_scores(model(x, d)[mask], targets[mask]))
    out = score_tokens(*(torch.cat(s) for s in zip(*scores))) if scores else {}
    if not out.get("tokens"):
        out = {"ce": 0.0, "acc": 0.0, "tokens": 0, "ece": float("nan"), "overconfidence": float("nan")}
    return {**out, "ppl": math.exp(out["ce"])}


@torch.no_grad()
def fit_temperature(model: GPT, ids: np.ndarray, doc: np.ndarray, eos_id: int, *, max_tokens: int = 32768,
                    batch: int = 32, lo: float = 0.2, hi: float = 5.0, iters: int = 60) -> dict[str, float]:
    """The temperature ``T`` minimising next-token NLL of ``softmax(logits / T)`` on ``ids/doc [m, n]``.

    NLL is convex in ``1 / T``, so a golden-section search over ``1/T`` in ``[1/hi, 1/lo]`` finds
    the minimum (to ~1e-6 relative). Uses at most ``max_tokens`` scored positions (their logits
    are held in memory: ``max_tokens × vocab × 4`` bytes). Returns ``temperature``, ``tokens``,
    ``nll_before``/``nll_after`` and ``ece_before``/``ece_after``/``overconfidence_*`` on those tokens.
    """
    was = model.temperature
    model.temperature = 1.0
    model.eval()
    logits, targets = [], []
    have = 0
    try:
        for start in range(0, len(ids), batch):
            if have >= max_tokens:
                break
            x = torch.from_numpy(ids[start : start + batch]).long()
            d = torch.from_numpy(doc[start : start + batch]).long()
            t, m = next_token_targets(x, d, eos_id)
            logits.append(model(x, d).float()[m])
            targets.append(t[m])
            have += int(m.sum())
    finally:
        model.temperature = was
    if not have:
        raise InputError("no held-out tokens to fit a calibration temperature on (is the held-out split empty?)")
    z, y = torch.cat(logits)[:max_tokens], torch.cat(targets)[:max_tokens]
    z_y = z.gather(-1, y.unsqueeze(-1)).squeeze(-1)

    def nll(beta: float) -> float:
        return float((torch.logsumexp(z * beta, dim=-1) - z_y * beta).double().mean())

    a, b = 1.0 / hi, 1.0 / lo
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d_ = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d_)
    for _ in range(iters):
        if fc < fd:
            b, d_, fd = d_, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d_, fd
            d_ = a + g * (b - a)
            fd = nll(d_)
    beta = (a + b) / 2.0

    def calib(scale: float) -> dict[str, float]:
        _, conf, hit = next_token_scores(z * scale, y)
        return top1_calibration(conf, hit)

    before, after = calib(1.0), calib(beta)
    return {"temperature": 1.0 / beta, "tokens": int(len(y)), "nll_before": nll(1.0), "nll_after": nll(beta),
            "ece_before": before["ece"], "ece_after": after["ece"],
            "overconfidence_before": before["overconfidence"], "overconfidence_after": after["overconfidence"]}


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
    calibrate: bool = True,
    threads: int | None = None,
    log=print,
) -> dict[str, Any]:
    """Train the tokenizer and the GPT teacher; write OUT_DIR/{tokenizer.json, model.safetensors, config.json}.

    ``limit`` keeps the first ``limit`` documents of each split (tests). The held-out figures
    are on the first ``eval_rows`` packed rows of the first half of the held-out documents;
    ``calibrate`` then fits the calibration temperature on the second half
    (:func:`calibrate_lm_teacher`). Returns the config dict.
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
    eval_texts, _ = _heldout_halves(held_docs.texts)
    held_ids, held_doc = pack(encode_documents(tokenizer, eval_texts), context, pad_id=eos_id)
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
    config["training"]["eval_rows"] = int(len(held_ids))
    _write_config(out, config)
    log(f"held-out CE {held['ce']:.3f} (ppl {held['ppl']:.1f}, acc {held['acc']:.3f}, ECE {held['ece']:.4f}) vs unigram "
        f"{unigram['ce']:.3f} (ppl {unigram['ppl']:.1f}, acc {unigram['acc']:.3f}); {train_s:.0f}s training")
    if calibrate:
        config = calibrate_lm_teacher(out, log=log)
    return config


def _write_config(folder: Path, config: dict) -> None:
    tmp = folder / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=1))
    os.replace(tmp, folder / CONFIG)


def _heldout_halves(texts: Sequence[str]) -> tuple[Sequence[str], Sequence[str]]:
    """The held-out documents split in order: the first half is scored, the second calibrates."""
    half = (len(texts) + 1) // 2
    return texts[:half], texts[half:]


def calibrate_lm_teacher(path: str | os.PathLike[str], *, max_tokens: int = 32768, log=print) -> dict[str, Any]:
    """Fit the teacher's calibration temperature on the second half of its held-out documents.

    Writes ``config["calibration"]`` (:func:`fit_temperature`'s figures, the documents used) and
    ``config["heldout_calibrated"]`` (the held-out evaluation rows scored again at that
    temperature: the fit never saw them) into OUT_DIR/config.json; returns the config. Refitting
    replaces an earlier calibration.
    """
    folder = Path(path)
    model, config, tokenizer = load_lm(folder, calibrated=False)
    tr = config["training"]
    held_docs = load_documents("heldout", corpus=tr["corpus"], heldout_fraction=tr["heldout_fraction"], limit=tr["limit"])
    eval_texts, cal_texts = _heldout_halves(held_docs.texts)
    if not cal_texts:
        raise InputError(f"{folder}: the held-out split has {len(held_docs.texts)} document(s); calibration needs at least 2")
    context, eos_id = int(config["model"]["context"]), int(config["eos_id"])
    cal_ids, cal_doc = pack(encode_documents(tokenizer, cal_texts), context, pad_id=eos_id)
    t0 = time.perf_counter()
    fit = fit_temperature(model, cal_ids, cal_doc, eos_id, max_tokens=max_tokens)
    model.temperature = fit["temperature"]
    ev_ids, ev_doc = pack(encode_documents(tokenizer, eval_texts), context, pad_id=eos_id)
    rows = int(tr.get("eval_rows", 256))
    config["calibration"] = {**fit, "documents": len(cal_texts), "first_document": len(eval_texts),
                             "split": "second half of the held-out documents",
                             "seconds": round(time.perf_counter() - t0, 1)}
    config["heldout_calibrated"] = evaluate(model, ev_ids[:rows], ev_doc[:rows], eos_id)
    _write_config(folder, config)
    h, c = config["heldout_calibrated"], config["calibration"]
    log(f"calibration temperature {c['temperature']:.4f} on {c['tokens']} tokens of {c['documents']} held-out docs "
        f"(NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}, ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}); "
        f"scored rows: CE {h['ce']:.3f}, ECE {h['ece']:.4f}, confidence - accuracy {h['overconfidence']:+.4f}")
    return config


def load_lm(path: str | os.PathLike[str], *, device: str = "cpu", calibrated: bool = True) -> tuple[GPT, dict, Any]:
    """``(model in eval mode, config dict, tokenizer)`` from a teacher folder; checks both fingerprints.

    With ``calibrated`` (default) and a recorded ``calibration``, the model's logits are divided by
    its temperature (``model.temperature``); otherwise the raw logits."""
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
    model.temperature = loaded_temperature(config, calibrated)
    return model.eval().to(device), config, load_tokenizer(folder / TOKENIZER)


def teacher_fingerprint(config: dict, temperature: float = 1.0) -> str:
    """The precompute fingerprint of a teacher folder's ``config`` loaded at calibration ``temperature``
    (1: the raw logits; the same value as before calibration existed)."""
    calibration = f":T={float(temperature)!r}" if temperature != 1.0 else ""
    return hashlib.sha256(f"{config['weights_sha256']}:{config['tokenizer_sha256']}{calibration}".encode()).hexdigest()


def loaded_temperature(config: dict, calibrated: bool = True) -> float:
    """The temperature :func:`load_lm` divides the logits by: the recorded calibration's, or 1."""
    return float(config["calibration"]["temperature"]) if calibrated and "calibration" in config else 1.0


class LMTeacher:
    """The GPT teacher as a precompute :class:`~kdstore.pipeline.teacher.Teacher`.

    ``preprocess`` takes a packed sample (``ids.npy``, ``doc.npy`` from ``kdstore lm-shards``)
    or a raw ``txt`` document (tokenized, ``<|endoftext|>`` appended, cut to the context).
    ``forward`` returns, for ``b`` samples of lengths ``n_i``:

    - ``"tokens/logits"``: ``b`` float32 tensors ``[n_i, vocab]``, position t = the teacher's
      logits for the token at t + 1, divided by the folder's calibration temperature when it has
      one and ``calibrated`` (the precompute ``--temperature`` is applied on top by the reduce ops).
    - ``"tokens/ids"``: ``b`` int32 tensors ``[n_i]`` (the input tokens, for alignment checks).
    """

    input_key = "ids.npy"

    def __init__(self, *, path: str, device: str | None = None, calibrated: bool = True) -> None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if not isinstance(calibrated, bool):
            raise InputError(f"calibrated must be true or false, got {calibrated!r}")
        self.model, self.config, self.tokenizer = load_lm(path, device=device, calibrated=calibrated)
        self.device = torch.device(device)
        self.name = "gpt"
        self.eos_id = int(self.config["eos_id"])
        self.vocab_size = int(self.config["model"]["vocab_size"])
        self.context = int(self.config["model"]["context"])
        self.fingerprint = teacher_fingerprint(self.config, self.model.temperature)
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


def gpt(*, path: str, device: str | None = None, calibrated: bool = True) -> LMTeacher:
    """Factory for ``--teacher kdstore.pipeline.lm_teacher:gpt --teacher-arg path=OUT_DIR``
    (``--teacher-arg calibrated=false``: the raw logits of a calibrated folder)."""
    return LMTeacher(path=path, device=device, calibrated=calibrated)
