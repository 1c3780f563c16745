"""Training a GPT student from stored per-token teacher targets (``model.arch = "gpt"``).

``kdstore train CONFIG`` hands a config with ``model.arch = "gpt"`` here
(:func:`kdstore.train.recipe.run`). The student is :class:`kdstore.pipeline.lm_model.GPT`
(``model.depth``, ``model.width``, ``model.heads``; vocabulary and context from the token
shards' ``lm_plan``). Batches come from :func:`kdstore.train.lm_data.lm_batches` (one teacher
for every KD term; the tokenizer is checked against it), the loss from the token kinds of
:mod:`kdstore.train.objective_tokens` (temperatures resolved from the store).

What it shares with the main trainer (:mod:`kdstore.train.recipe`): the device, ``torchrun``
and AMP decision (``Recipe._init_distributed``: CUDA autocast in bfloat16, or float16 with a
grad scaler, and the same code path on CPU without it; gloo/nccl DDP under ``torchrun``, each
rank taking every ``world``-th batch), the ``optim.schedule`` / ``optim.warmup_steps`` LR
schedule, and :mod:`kdstore.train.checkpoint` (``out_dir`` rules, atomic
``checkpoints/step-N.pt`` every ``train.checkpoint_every_steps`` holding model, optimizer,
schedule, scaler, RNG and TAID state; ``--resume`` replays the epoch's batches to the saved
step, so a resumed run ends with the same weights as an uninterrupted one). A ``token_taid``
term gets its ``lam`` from one :class:`~kdstore.train.losses_tokens.TaidSchedule` per run,
updated after each step with that term's value.

Writes ``OUT/student.safetensors``, ``OUT/student.json`` (GPT config), ``OUT/config.json``,
``OUT/metrics.jsonl`` (per step: loss parts, ``lr``, ``taid/lambda``) and ``OUT/summary.json``;
returns the summary (``steps``, ``steps_per_epoch``, last ``loss``, held-out ``eval`` on
``data.eval_shards``).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from kdstore.pipeline.lm_model import GPT, GPTConfig, next_token_scores, score_tokens
from kdstore.store.errors import InputError
from kdstore.store.layout import VALID_ARRAY
from kdstore.store.reader import Store, open_store
from kdstore.train import checkpoint as ck
from kdstore.train.config import Config
from kdstore.train.lm_data import check_tokenizer, lm_batches
from kdstore.train.losses_tokens import TaidSchedule, shared_log_probs
from kdstore.train.objective import KINDS, TermInput, resolve_terms, term_fields
from kdstore.train.objective_tokens import TAID_LAMBDA, TOKEN_KINDS
from kdstore.train.recipe import Recipe, _schedule

STUDENT_WEIGHTS = "student.safetensors"


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
def evaluate_lm(model: GPT, store: Store, shards, *, eos_id: int, batch_size: int = 16, bins: int = 15,
                autocast: Callable[[], Any] = contextlib.nullcontext) -> dict:
    """Held-out next-token ``ce`` (nats), ``acc`` (top-1), ``ece`` (top-1 confidence, ``bins`` bins),
    ``ece_se`` (its bootstrap standard error over the tokens, 200 resamples) and ``overconfidence``
    (mean top-1 confidence − accuracy: > 0 over-, < 0 under-confident) on ``shards``."""
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for batch in lm_batches(store, None, (), batch_size=batch_size, eos_id=eos_id, epoch=None, shards=shards):
        batch = _to_device(batch, device)
        with autocast():
            logits = model(batch["ids"], batch["doc"])
        m = batch["ce_mask"]
        scores.append(next_token_scores(logits[m], batch["targets"][m]))
    model.train()
    if not scores:
        return {"ce": float("nan"), "acc": float("nan"), "ece": float("nan"), "ece_se": float("nan"), "overconfidence": float("nan"), "tokens": 0}
    return score_tokens(*(torch.cat(x).cpu() for x in zip(*scores)), bins, bootstrap=200)


class _Runtime:
    """The main trainer's device / ``torchrun`` / AMP decision (``Recipe._init_distributed``), reused as is:
    sets ``device``, ``rank``, ``world_size``, ``amp_dtype`` (None on CPU) and ``started_dist``."""

    _init_distributed = Recipe._init_distributed

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._init_distributed()

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def epoch_rows(store: Store, teacher: str | None, shards) -> int:
    """Rows one epoch of :func:`lm_batches` yields (rows the teacher skipped at precompute left out)."""
    if teacher is None:
        return sum(s.num_rows for s in shards)
    data = store.teacher(teacher)
    return sum(int(data.read_shard(VALID_ARRAY, s.index).sum()) for s in shards)


def _rank_batches(batches: Iterable[dict], rank: int, world: int, per_rank: int, skip: int) -> Iterator[dict]:
    """This rank's batches of one epoch: global batch ``g`` goes to rank ``g % world``; each rank
    gets ``per_rank`` (the remainder is dropped so ranks step together); the first ``skip`` are passed over."""
    for g, batch in enumerate(batches):
        local, owner = divmod(g, world)
        if local >= per_rank:
            return
        if owner == rank and local >= skip:
            yield batch


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_lm(
    cfg: Config,
    *,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    on_step: Callable[[int, dict], Any] | None = None,
    online_term: Callable[[torch.Tensor, dict], torch.Tensor] | None = None,
) -> dict:
    """Train the GPT student of ``cfg``; see the module docstring.

    ``resume``: True (newest checkpoint in ``train.out_dir``) or a checkpoint path; ``overwrite``:
    delete what an earlier run wrote there first (without either, a non-empty folder is refused).
    ``on_step(step, info)`` runs after each optimizer step (and after that step's checkpoint).
    ``online_term(logits [b, n, V], batch) -> []`` (Python API only): an extra loss term added
    with weight 1, e.g. full-vocabulary KD with the teacher in the loop.
    """
    teacher = lm_teacher(cfg)
    taid_terms = [i for i, t in enumerate(cfg.loss) if t.kind == "token_taid"]
    if len(taid_terms) > 1:
        raise InputError("one token_taid term per run (it owns the run's TAID schedule)")
    rt = _Runtime(cfg)
    try:
        return _train(cfg, rt, teacher, taid_terms, resume, overwrite, on_step, online_term)
    finally:
        if rt.started_dist and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, rt, teacher, taid_terms, resume, overwrite, on_step, online_term) -> dict:
    store = open_store(cfg.data.store)
    plan = check_tokenizer(store, teacher)
    terms = resolve_terms(cfg.loss, store)
    fields = sorted({f for t in terms for f in (term_fields(t) if t.teacher_names else ())})
    shards = store.select_shards(cfg.data.train_shards)
    eval_shards = store.select_shards(cfg.data.eval_shards) if cfg.data.eval_shards else []
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    gpt_cfg = GPTConfig(vocab_size=int(plan["vocab_size"]), context=int(plan["seq_len"]), depth=m.depth, width=m.width,
                        heads=m.heads, seed=cfg.train.seed)
    model = GPT(gpt_cfg).to(rt.device)
    net = model
    if rt.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    batch_size, eos = cfg.data.batch_size, int(plan["eos_id"])
    per_rank = math.ceil(epoch_rows(store, teacher, shards) / batch_size) // rt.world_size
    if per_rank < 1:
        raise InputError(f"data.train_shards give fewer than {rt.world_size} batches of {batch_size} rows")
    total = cfg.train.steps or cfg.train.epochs * per_rank
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg.optim, total))
    scaler = torch.amp.GradScaler("cuda", enabled=rt.amp_dtype == torch.float16)
    taid = TaidSchedule(total) if taid_terms else None
    out = Path(cfg.train.out_dir)
    ck.check_out_dir(out, resume=bool(resume), overwrite=overwrite)
    if rt.world_size > 1:
        dist.barrier()
    main_rank = rt.rank == 0
    if main_rank and overwrite:
        ck.clear_run(out)
        (out / STUDENT_WEIGHTS).unlink(missing_ok=True)
    if main_rank:
        (out / ck.CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    step = 0
    if resume:
        step = _resume(out, None if resume is True else Path(resume), cfg, rt, store, model, opt, scheduler, scaler, taid)
    elif main_rank:
        (out / ck.METRICS_FILE).write_text("")
        (out / ck.CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1))

    def checkpoint() -> None:
        if main_rank:
            ck.write_checkpoint(out, step, {
                "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": ck.rng_state(cuda=rt.device.type == "cuda"), "config": cfg.to_dict(),
                "taid": taid.state_dict() if taid else None, "world_size": rt.world_size,
                "input_fingerprint": store.manifest.input_fingerprint, "student": json.loads(gpt_cfg.to_json()),
            }, cfg.train.keep_checkpoints)

    t0, last = time.perf_counter(), {}
    taid_part = f"loss/{taid_terms[0]}.token_taid" if taid_terms else None
    log = (out / ck.METRICS_FILE).open("a") if main_rank else None
    try:
        while step < total:
            epoch, done = divmod(step, per_rank)
            stream = lm_batches(store, teacher, fields, batch_size=batch_size, eos_id=eos, epoch=epoch,
                                seed=cfg.train.seed, shards=shards)
            for batch in _rank_batches(stream, rt.rank, rt.world_size, per_rank, done):
                batch = _to_device(batch, rt.device)
                if taid is not None:
                    batch[TAID_LAMBDA] = torch.tensor(taid.lam)
                with rt.autocast():
                    logits = net(batch["ids"], batch["doc"])
                with shared_log_probs():  # one student log-softmax per T for all terms
                    loss, parts = token_loss(terms, logits, batch)
                    if online_term is not None:
                        extra = online_term(logits, batch)
                        parts["loss/online"] = float(extra.detach())
                        loss = loss + extra
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.optim.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                scaler.step(opt)
                scaler.update()
                lr = opt.param_groups[0]["lr"]
                scheduler.step()
                if taid is not None:
                    parts["taid/lambda"] = taid.lam
                    taid.update(parts[taid_part], step)
                last = {"step": step, "epoch": epoch, "lr": lr, "loss": float(loss.detach()), **parts}
                if log is not None:
                    log.write(json.dumps(last) + "\n")
                step += 1
                if cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0 and step < total:
                    log is not None and log.flush()
                    checkpoint()
                if on_step is not None:
                    on_step(step - 1, {"loss": loss.detach(), "parts": parts, "batch": batch, "model": model})
                if step >= total:
                    break
    finally:
        if log is not None:
            log.close()
    seconds = time.perf_counter() - t0
    summary = {"steps": step, "epochs": round(step / per_rank, 3), "steps_per_epoch": per_rank,
               "seconds": round(seconds, 2), "loss": last.get("loss", float("nan")), "teacher": teacher,
               "fields": fields, "parameters": model.num_parameters(), "world_size": rt.world_size,
               "device": str(rt.device), "amp": str(rt.amp_dtype).replace("torch.", "") if rt.amp_dtype else "off",
               "taid_lambda": taid.lam if taid else None, "eval": {}}
    if main_rank:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / STUDENT_WEIGHTS))
        (out / "student.json").write_text(gpt_cfg.to_json())
        if eval_shards:
            summary["eval"] = evaluate_lm(model, store, eval_shards, eos_id=eos, autocast=rt.autocast)
        (out / ck.SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return summary


def _resume(out: Path, path: Path | None, cfg: Config, rt, store: Store, model, opt, scheduler, scaler, taid) -> int:
    """Load the newest checkpoint (or ``path``) into the run; returns its step."""
    paths = [path] if path else ck.checkpoint_paths(out)
    if not paths or not paths[-1].is_file():
        raise InputError(f"no checkpoint to resume from in {out / ck.CHECKPOINT_DIR}")
    path = paths[-1]
    state = ck.read_checkpoint(path)
    changed = ck.config_differences(state["config"], cfg.to_dict())
    if changed:
        raise InputError(f"checkpoint {path} was written with other settings ({'; '.join(changed[:5])}); "
                         "resume with the same config, or start a new run (another train.out_dir, or --overwrite)")
    if state["world_size"] != rt.world_size:
        raise InputError(f"checkpoint {path} ran on {state['world_size']} ranks, now {rt.world_size}: resume with the same number")
    if state["input_fingerprint"] != store.manifest.input_fingerprint:
        raise InputError(f"checkpoint {path} was trained on another store (input fingerprint differs)")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if taid is not None:
        taid.load_state_dict(state["taid"])
    ck.set_rng_state(state["rng"], cuda=rt.device.type == "cuda")
    step = int(state["step"])
    if rt.rank == 0:  # log lines written after the checkpoint are redone
        metrics = out / ck.METRICS_FILE
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) < step]
        metrics.write_text("".join(ln + "\n" for ln in keep))
    return step


__all__ = ["epoch_rows", "evaluate_lm", "lm_teacher", "run_lm", "token_loss"]
