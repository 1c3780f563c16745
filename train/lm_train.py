"""Training a GPT student from stored per-token teacher targets (``model.arch = "gpt"``).

``kdstore train CONFIG`` hands a config with ``model.arch = "gpt"`` here
(:func:`kdstore.train.recipe.run`). The student is :class:`kdstore.pipeline.lm_model.GPT`
(``model.depth``, ``model.width``, ``model.heads``; vocabulary and context from the token
shards' ``lm_plan``). Batches come from :func:`kdstore.train.lm_data.lm_batches` (one teacher
for every KD term; the tokenizer is checked against it), the loss from the token kinds of
:mod:`kdstore.train.objective_tokens` (temperatures resolved from the store). Single process,
no checkpoints or resume (a plain loop: ``train.steps`` or ``train.epochs``).

Writes ``OUT/student.safetensors``, ``OUT/student.json`` (GPT config) and ``OUT/metrics.jsonl``;
returns the summary (``steps``, last ``loss``, held-out ``eval`` on ``data.eval_shards``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from kdstore.pipeline.lm_model import GPT, GPTConfig
from kdstore.store.errors import InputError
from kdstore.store.reader import Store, open_store
from kdstore.train.config import Config
from kdstore.train.lm_data import check_tokenizer, lm_batches
from kdstore.train.objective import KINDS, TermInput, resolve_terms, term_fields
from kdstore.train.objective_tokens import TOKEN_KINDS


def lm_teacher(cfg: Config) -> str | None:
    """The one teacher the token terms read (None for a CE-only run); refuses non-token kinds."""
    other = sorted({t.kind for t in cfg.loss if t.kind not in TOKEN_KINDS})
    if other:
        raise InputError(f"model.arch = \"gpt\" trains with the token losses {TOKEN_KINDS} only; drop {other}")
    teachers = sorted({n for t in cfg.loss for n in t.teacher_names})
    if len(teachers) > 1:
        raise InputError(f"the token losses read one teacher per run, got {teachers}: precompute both outputs "
                         "(--output tokens:topk:K --output tokens:sample:S) with one teacher")
    return teachers[0] if teachers else None


def token_loss(terms: Sequence, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """``(total [], parts)``: the weighted sum of resolved token ``terms`` on one LM batch (``logits [b, n, V]``)."""
    total = logits.new_zeros(())
    parts = {}
    mask = batch["kd_mask"]
    for i, term in enumerate(terms):
        x = TermInput(out={"logits": logits}, proj=None, tg=batch, targets={}, labels=batch["targets"],
                      real=mask, mask=mask, weights=None, rows=torch.zeros(0), mined=None)
        value = KINDS[term.kind].compute(term, x)
        parts[f"loss/{i}.{term.kind}"] = float(value.detach())
        total = total + term.weight * value
    return total, parts


@torch.no_grad()
def evaluate_lm(model: GPT, store: Store, shards, *, eos_id: int, batch_size: int = 16, bins: int = 15) -> dict:
    """Held-out next-token ``ce`` (nats), ``acc`` (top-1) and ``ece`` (top-1 confidence, ``bins`` bins) on ``shards``."""
    model.eval()
    nll, conf, hit = [], [], []
    for batch in lm_batches(store, None, (), batch_size=batch_size, eos_id=eos_id, epoch=None, shards=shards):
        logp = torch.log_softmax(model(batch["ids"], batch["doc"]).float(), dim=-1)
        m = batch["ce_mask"]
        nll.append(-logp.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)[m])
        top = logp.max(-1)
        conf.append(top.values.exp()[m])
        hit.append((top.indices == batch["targets"])[m].float())
    model.train()
    if not nll:
        return {"ce": float("nan"), "acc": float("nan"), "ece": float("nan"), "tokens": 0}
    nll, conf, hit = torch.cat(nll), torch.cat(conf), torch.cat(hit)
    which = torch.clamp((conf * bins).long(), max=bins - 1)
    ece = sum(float((which == b).sum()) * abs(float(hit[which == b].mean()) - float(conf[which == b].mean()))
              for b in range(bins) if bool((which == b).any())) / len(conf)
    return {"ce": float(nll.mean()), "acc": float(hit.mean()), "ece": ece, "tokens": len(nll)}


def run_lm(cfg: Config, *, on_step: Callable[[int, dict], Any] | None = None) -> dict:
    """Train the GPT student of ``cfg``; see the module docstring."""
    teacher = lm_teacher(cfg)
    store = open_store(cfg.data.store)
    plan = check_tokenizer(store, teacher)
    terms = resolve_terms(cfg.loss, store)
    fields = sorted({f for t in terms for f in (term_fields(t) if t.teacher_names else ())})
    shards = store.select_shards(cfg.data.train_shards)
    eval_shards = store.select_shards(cfg.data.eval_shards) if cfg.data.eval_shards else []
    torch.manual_seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    m = cfg.model
    gpt_cfg = GPTConfig(vocab_size=int(plan["vocab_size"]), context=int(plan["seq_len"]), depth=m.depth, width=m.width,
                        heads=m.heads, seed=cfg.train.seed)
    model = GPT(gpt_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos = int(plan["eos_id"])
    steps_cap = cfg.train.steps or math.inf
    step, epoch, t0, last = 0, 0, time.perf_counter(), {}
    with (out / "metrics.jsonl").open("w") as log:
        while step < steps_cap and (cfg.train.steps or epoch < cfg.train.epochs):
            for batch in lm_batches(store, teacher, fields, batch_size=cfg.data.batch_size, eos_id=eos, epoch=epoch,
                                    seed=cfg.train.seed, shards=shards):
                logits = model(batch["ids"], batch["doc"])
                loss, parts = token_loss(terms, logits, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                opt.step()
                last = {"step": step, "epoch": epoch, "loss": float(loss.detach()), **parts}
                log.write(json.dumps(last) + "\n")
                if on_step is not None:
                    on_step(step, {"loss": loss.detach(), "parts": parts, "batch": batch})
                step += 1
                if step >= steps_cap:
                    break
            epoch += 1
    seconds = time.perf_counter() - t0
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "student.safetensors"))
    (out / "student.json").write_text(gpt_cfg.to_json())
    summary = {"steps": step, "epochs": epoch, "seconds": round(seconds, 2), "loss": last.get("loss", float("nan")),
               "teacher": teacher, "fields": fields, "parameters": model.num_parameters(),
               "eval": evaluate_lm(model, store, eval_shards, eos_id=eos) if eval_shards else {}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


__all__ = ["evaluate_lm", "lm_teacher", "run_lm", "token_loss"]
