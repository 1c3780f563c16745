"""The training recipe: setup / train / cleanup, driven by one validated :class:`Config`.

Owns the run: distributed setup (``torchrun`` → DDP, gloo on CPU, nccl on CUDA), AMP on
CUDA, the optimiser and schedule, the train loop, checkpoints that hold the stream position
(file I/O and the ``out_dir`` rules in :mod:`~kdstore.train.checkpoint`), the JSONL metrics
log and evaluation (:mod:`~kdstore.train.evaluate`). The objective is
:mod:`~kdstore.train.objective`, the model :func:`~kdstore.train.models.build_model`. The step is the stream
position: every rank runs the same number of batches per epoch (``StreamingDataset``), so
``epoch, batches_done = divmod(step, steps_per_epoch)``, and resuming replays the exact stream.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kdstore.store.errors import InputError
from kdstore.store.reader import open_store
from kdstore.store.schema import write_json_atomic
from kdstore.train import checkpoint as ck
from kdstore.train.checkpoint import CHECKPOINT_DIR, METRICS_FILE  # noqa: F401 (re-exported)
from kdstore.train.config import Config, OptimConfig
from kdstore.train.dataset import InputCache, StreamingDataset, collate
from kdstore.train.evaluate import eval_dataset, eval_teacher, predict, summarize_predictions
from kdstore.train.mined import MinedNegatives
from kdstore.train.models import build_model
from kdstore.train.objective import KINDS, compute_loss, logits_field, resolve_terms, target_field


# --------------------------------------------------------------------------- helpers


def _schedule(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        span = max(1, total_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        if optim.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if optim.schedule == "linear":
            return 1.0 - progress
        return 1.0

    return factor


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    epochs: float
    seconds: float
    samples_per_s: float
    eval: dict = field(default_factory=dict)
    history: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "steps": self.steps, "epochs": self.epochs, "seconds": self.seconds,
                "samples_per_s": self.samples_per_s, "eval": self.eval, "history": self.history}


# --------------------------------------------------------------------------- the recipe


class Recipe:
    """One training run: ``setup()``, ``train()``, ``cleanup()`` (or :func:`run`).

    Args:
        cfg: the validated config.
        callbacks: ``fn(recipe, step, parts)`` called on every rank after each optimiser step.
        cache: an :class:`InputCache` to share decoded inputs between runs in one process.
    """

    def __init__(self, cfg: Config, *, callbacks: Sequence[Callable] = (), cache: InputCache | None = None) -> None:
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.shared_cache = cache
        self.step = 0
        self.history: list[dict] = []
        self.targets_fn: Callable[[dict], dict] | None = None

    # ----------------------------------------------------------------- setup

    def setup(self, resume: bool | str | Path = False, overwrite: bool = False) -> None:
        """Build everything, then claim ``train.out_dir``: a non-empty one only with ``resume``
        (a checkpoint in it, or a path) or ``overwrite`` (deletes what a run writes there first)."""
        cfg = self.cfg
        self._init_distributed()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self._seed_everything(cfg.train.seed)
        self.store = open_store(cfg.data.store)
        self.out_dir = Path(cfg.train.out_dir)
        self.terms = resolve_terms(cfg.loss, self.store)
        cache = self.shared_cache or (InputCache() if cfg.data.cache else None)
        need = {} if cfg.online.enabled else {t: sorted(f) for t, f in cfg.teachers().items()}
        d = cfg.data
        self.train_set = StreamingDataset(
            self.store, shards=d.train_shards, fields=need, inputs=d.inputs, inputs_root=d.inputs_root or None,
            input_key=d.input_key,
            transform=d.transform, tokenizer=d.tokenizer, max_length=d.max_length,
            labels=d.labels, labels_seed=d.labels_seed, only_labeled=d.only_labeled, shuffle=True,
            shuffle_buffer=d.shuffle_buffer, seed=cfg.train.seed,
            augment=cfg.online.augment if cfg.online.enabled else "",
            teacher_transform=self.store.teacher(cfg.online.teacher).spec.transform if cfg.online.enabled else None,
            rank=self.rank, world_size=self.world_size, loader_workers=d.workers, loader_batch_size=d.batch_size,
            cache=cache, verify=d.verify_inputs if self.is_main else "off",
        )
        self.eval_set = self._eval_set(cache) if d.eval_shards else None
        self.num_classes = self._num_classes()
        self.input_shape = self.train_set.input_shape()
        teacher_shapes = {name: {f: spec.shape[1:] if self.store.teacher(name).views else spec.shape
                                 for f, spec in self.store.teacher(name).fields.items()}
                          for name in cfg.teachers()}
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg, self.input_shape, self.num_classes, teacher_shapes).to(self.device)
        self.mined = {i: MinedNegatives.load(self.store, t.teacher, target_field(t), t.negatives).to(self.device)
                      for i, t in enumerate(cfg.loss) if "negatives" in KINDS[t.kind].settings}
        self.ddp = self.model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = self._optimizer(cfg.optim)
        self.steps_per_epoch = self.train_set.batches_per_rank()
        self.total_steps = cfg.train.steps or cfg.train.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(cfg.optim, self.total_steps))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        workers = d.workers
        self.loader = DataLoader(self.train_set, batch_size=d.batch_size, num_workers=workers, collate_fn=collate,
                                 persistent_workers=workers > 0, pin_memory=self.device.type == "cuda",
                                 worker_init_fn=_worker_init if workers else None)
        if cfg.online.enabled:
            from kdstore.train.online import OnlineTargets

            self.targets_fn = OnlineTargets(cfg.online, self.store, cfg.teachers(), self.device)
        # Checked last, on every rank, and before any rank writes to out_dir.
        ck.check_out_dir(self.out_dir, resume=bool(resume), overwrite=overwrite)
        if self.world_size > 1:
            dist.barrier()
        if self.is_main and overwrite:
            ck.clear_run(self.out_dir)
        if self.is_main:
            (self.out_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume(None if resume is True else Path(resume))
        elif self.is_main:
            (self.out_dir / METRICS_FILE).write_text("")
            write_json_atomic(self.out_dir / ck.CONFIG_FILE, cfg.to_dict())

    def _init_distributed(self) -> None:
        cfg = self.cfg.train
        world = int(os.environ.get("WORLD_SIZE", "1"))
        want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"train.device={cfg.device} but torch sees no CUDA device")
        self.started_dist = False
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if want_cuda else "gloo")
            self.started_dist = True
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            index = local if cfg.device in ("auto", "cuda") else torch.device(cfg.device).index or 0
            self.device = torch.device("cuda", index)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if cfg.amp == "on" and self.device.type != "cuda":
            raise InputError("train.amp=on needs a CUDA device; use auto (off on CPU)")
        self.amp_dtype = None
        if self.device.type == "cuda" and cfg.amp != "off":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if self.cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.benchmark = False

    def _eval_teacher(self) -> str | None:
        return eval_teacher(self.store, self.cfg.loss)

    def _eval_set(self, cache: InputCache | None) -> StreamingDataset:
        return eval_dataset(self.store, self.cfg.data, self._eval_teacher(), cache,
                            verify=self.cfg.data.verify_inputs if self.is_main else "off")

    def _num_classes(self) -> int:
        eval_teacher = self._eval_teacher()
        for name in list(self.cfg.teachers()) + ([eval_teacher] if eval_teacher else []):
            spec = self.store.teacher(name).fields.get(logits_field())
            if spec is not None:
                return int(spec.shape[-1])
        labels = self.store.labels
        if (labels >= 0).sum() == 0:
            raise InputError("cannot tell the number of classes: no teacher logits and no labels in the store")
        return int(labels.max()) + 1

    def _optimizer(self, o: OptimConfig) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if o.name == "sgd":
            return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)

    # ----------------------------------------------------------------- checkpoints

    def checkpoint_paths(self) -> list[Path]:
        return ck.checkpoint_paths(self.out_dir)

    def position(self, step: int | None = None) -> dict:
        """Where the stream is: epoch, batches done in it, and per (rank, worker) slot the shard cursor and offset."""
        step = self.step if step is None else step
        epoch, done = divmod(step, self.steps_per_epoch)
        workers = max(1, self.cfg.data.workers)
        slots = []
        for slot in range(self.world_size * workers):
            rank, worker = divmod(slot, workers)
            plan = self.train_set.plan(epoch, slot, self.world_size * workers)
            skipped = min(len(plan.order), max(0, -(-(done - worker) // workers)) * self.cfg.data.batch_size)
            # Shards the slot has fully yielded vs. the first it still needs.
            pos = plan.order[skipped:].min() if skipped < len(plan.order) else len(plan.order)
            bounds = np.cumsum([len(s.rows) for s in plan.segments])
            cursor = int(np.searchsorted(bounds, pos, side="right"))
            slots.append({"rank": rank, "worker": worker, "samples_done": int(skipped), "shard_cursor": cursor,
                          "offset": int(pos - (bounds[cursor - 1] if cursor else 0))})
        return {"epoch": epoch, "batches_done": done, "step": step, "slots": slots}

    def save_checkpoint(self) -> Path | None:
        if not self.is_main:
            return None
        state = {
            "step": self.step,
            "position": self.position(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ck.rng_state(cuda=self.device.type == "cuda"),
            "config": self.cfg.to_dict(),
            "student": self.model.record,  # how to rebuild the student (kdstore.train.load_student)
            "world_size": self.world_size,
            "input_fingerprint": self.store.manifest.input_fingerprint,
            "history": self.history,
        }
        return ck.write_checkpoint(self.out_dir, self.step, state, self.cfg.train.keep_checkpoints)

    def _resume(self, path: Path | None) -> None:
        paths = [path] if path else self.checkpoint_paths()
        if not paths or not paths[-1].is_file():
            raise InputError(f"no checkpoint to resume from in {self.out_dir / CHECKPOINT_DIR}")
        path = paths[-1]
        state = ck.read_checkpoint(path)
        changed = ck.config_differences(state["config"], self.cfg.to_dict())
        if changed:
            raise InputError(f"checkpoint {path} was written with other settings ({'; '.join(changed[:5])}); "
                             "resume with the same config, or start a new run (another train.out_dir, or --overwrite)")
        if state["world_size"] != self.world_size:
            raise InputError(f"checkpoint {path} ran on {state['world_size']} ranks, now {self.world_size}: "
                             "the stream is split per rank, resume with the same number")
        if state["input_fingerprint"] != self.store.manifest.input_fingerprint:
            raise InputError(f"checkpoint {path} was trained on another store (input fingerprint differs)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ck.set_rng_state(state["rng"], cuda=self.device.type == "cuda")
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        if self.is_main:
            # Drop log lines the interrupted run wrote after this checkpoint: they are redone.
            log = self.out_dir / METRICS_FILE
            lines = log.read_text().splitlines() if log.exists() else []
            keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            log.write_text("".join(ln + "\n" for ln in keep))
            self.log({"event": "resume", "step": self.step, "checkpoint": str(path), **self.position()})

    # ----------------------------------------------------------------- training

    def log(self, record: dict) -> None:
        if self.is_main:
            with open(self.out_dir / METRICS_FILE, "a") as fh:
                fh.write(json.dumps({"time": time.time(), **record}) + "\n")

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def loss(self, batch: dict) -> tuple[Tensor, dict[str, float]]:
        """The objective on one batch: ``(total [], {"loss/<i>.<kind>": value})`` (the batch is
        moved to the device; online KD fills its targets)."""
        batch = _to_device(batch, self.device)
        if self.targets_fn is not None:
            batch["targets"] = self.targets_fn(batch)
        with self._autocast():
            out = self.ddp(batch["input"])
            return compute_loss(self.terms, out, batch, self.num_classes, self.mined)

    def train_step(self, batch: dict) -> dict[str, float]:
        loss, parts = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        parts["loss"] = float(loss.detach())
        return parts

    def train(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.cfg.train
        start_step, start = self.step, time.perf_counter()
        samples = 0
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="train", dynamic_ncols=True,
                   disable=not (cfg.progress and self.is_main))
        window_start, window_samples = time.perf_counter(), 0
        self.ddp.train()
        while self.step < self.total_steps:
            epoch, done = divmod(self.step, self.steps_per_epoch)
            self.train_set.set_epoch(epoch)
            self.train_set.set_resume(done)
            for batch in self.loader:
                parts = self.train_step(batch)
                self.step += 1
                n = int((~batch["pad"]).sum()) * self.world_size
                samples += n
                window_samples += n
                for fn in self.callbacks:
                    fn(self, self.step, parts)
                if self.step % cfg.log_every_steps == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    rate = window_samples / max(now - window_start, 1e-9)
                    window_start, window_samples = now, 0
                    self.log({"step": self.step, "epoch": self.step / self.steps_per_epoch,
                              "lr": self.scheduler.get_last_lr()[0], "samples_per_s": rate, **parts})
                    bar.set_postfix({"loss": f"{parts['loss']:.4f}", f"samples/s, last {cfg.log_every_steps} steps": f"{rate:,.0f}"},
                                    refresh=False)
                bar.update(1)
                if cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0:
                    self.save_checkpoint()
                if self.step >= self.total_steps:
                    break
            epochs_done, rest = divmod(self.step, self.steps_per_epoch)
            due = cfg.eval_every_epochs and rest == 0 and epochs_done % cfg.eval_every_epochs == 0
            if self.eval_set is not None and due and self.step < self.total_steps:
                self.evaluate_and_log()  # the last evaluation runs after the loop
        bar.close()
        seconds = time.perf_counter() - start
        final = self.evaluate_and_log() if self.eval_set is not None else {}
        if self.is_main:
            ck.save_student(self.out_dir, self.model)
        rate = samples / max(seconds, 1e-9) if self.step > start_step else 0.0
        result = TrainResult(out_dir=self.out_dir, steps=self.step, epochs=self.step / self.steps_per_epoch,
                             seconds=seconds, samples_per_s=rate, eval=final, history=self.history)
        if self.is_main:
            write_json_atomic(self.out_dir / ck.SUMMARY_FILE, result.to_dict())
        return result

    # ----------------------------------------------------------------- evaluation

    def evaluate_and_log(self) -> dict:
        result = self.evaluate() if self.is_main else {}
        if self.is_main:
            record = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "split": "eval", **result}
            self.history.append(record)
            self.log(record)
        if self.world_size > 1:
            dist.barrier()
        return result

    def predict(self, dataset: StreamingDataset | None = None) -> dict[str, np.ndarray]:
        """The student over an evaluation stream (default: ``data.eval_shards``); see :func:`predict`."""
        return predict(self.model.student, dataset or self.eval_set, batch_size=self.cfg.data.batch_size,
                       device=self.device, autocast=self._autocast)

    def evaluate(self, dataset: StreamingDataset | None = None) -> dict:
        """Accuracy (and, with a teacher in the store, agreement with it and its own accuracy)."""
        p = self.predict(dataset)
        return summarize_predictions(p, self.cfg.model if self.cfg.dual_head else None)

    def cleanup(self) -> None:
        if getattr(self, "started_dist", False) and dist.is_initialized():
            dist.destroy_process_group()


def run(cfg: Config, *, resume: bool | str | Path = False, overwrite: bool = False,
        callbacks: Sequence[Callable] = (), cache: InputCache | None = None,
        on_done: Callable[["Recipe", TrainResult], Any] | None = None) -> TrainResult:
    """setup → train → (``on_done(recipe, result)`` on the main rank) → cleanup.

    ``resume``: True (newest checkpoint in ``train.out_dir``) or a checkpoint path;
    ``overwrite``: delete what an earlier run wrote in ``train.out_dir`` first. Without either
    a non-empty ``train.out_dir`` is refused.
    """
    from kdstore.train.objective_tokens import TOKEN_KINDS

    if cfg.model.arch == "gpt":  # LM student on per-token targets: its own loop (train/lm_train.py)
        from kdstore.train.lm_train import run_lm

        return run_lm(cfg, resume=resume, overwrite=overwrite)
    if any(t.kind in TOKEN_KINDS for t in cfg.loss):
        raise InputError(f"the token losses {TOKEN_KINDS} train an LM student: set model.arch = \"gpt\"")
    recipe = Recipe(cfg, callbacks=callbacks, cache=cache)
    try:
        recipe.setup(resume=resume, overwrite=overwrite)
        result = recipe.train()
        if on_done is not None and recipe.is_main:
            on_done(recipe, result)
        return result
    finally:
        recipe.cleanup()
