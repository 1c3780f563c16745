"""The training recipe: setup / train / cleanup, driven by one validated :class:`Config`.

Owns the run around the losses: distributed setup (``torchrun`` → DDP, gloo on CPU, nccl on
CUDA), AMP on CUDA, the optimiser and schedule, atomic checkpoints that hold the stream
position, the JSONL metrics log, evaluation, and the summary. The step is the stream
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

from kdstore.pipeline.decode import decode_field
from kdstore.pipeline.shards import iter_samples
from kdstore.store.errors import InputError
from kdstore.store.reader import open_store
from kdstore.store.schema import write_json_atomic
from kdstore.train import losses as L
from kdstore.train.config import Config, LossConfig, ModelConfig, OptimConfig, parse_config
from kdstore.train.dataset import InputCache, StreamingDataset, collate, select_shards
from kdstore.train.models import FeatureTap, build_student, output_shape

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
# Settings that change the stream or the model: a checkpoint resumes only under the same ones.
RESUME_KEYS = ("data", "model", "optim", "loss", "online", "train.seed", "train.steps", "train.epochs")


# --------------------------------------------------------------------------- model + objective


class DistillModel(nn.Module):
    """The student plus the learned projectors of its feature terms: everything DDP syncs.

    ``forward(x)`` returns the student's outputs and ``proj/<i>`` = projector i applied to
    the tapped student layer of loss term i.
    """

    def __init__(self, student: nn.Module, taps: dict[int, str], projectors: dict[int, nn.Module]) -> None:
        super().__init__()
        self.student = student
        self.taps = taps
        self.projectors = nn.ModuleDict({str(i): p for i, p in projectors.items()})
        layers = sorted({layer for layer in taps.values() if layer != "embedding"})
        self._tap = FeatureTap(student, layers) if layers else None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.student(x)
        for i, layer in self.taps.items():
            feat = out["embedding"] if layer == "embedding" else self._tap.features[layer]
            out[f"proj/{i}"] = self.projectors[str(i)](feat)
        return out


def build_model(cfg: Config, input_shape: Sequence[int], num_classes: int, teacher_shapes: dict) -> DistillModel:
    """The student of ``cfg.model`` with a :class:`~kdstore.train.losses.Projector` per feature/embedding term."""
    student = build_student(cfg.model.arch, input_shape, num_classes, hidden=cfg.model.hidden,
                            width=cfg.model.width, dual_head=cfg.dual_head)
    taps, projectors = {}, {}
    for i, term in enumerate(cfg.loss):
        if term.kind not in ("feature", "embedding", "contrastive"):
            continue
        layer = term.student_layer
        s_shape = output_shape(student, layer, input_shape)
        t_shape = teacher_shapes[term.teacher][term.field or "embedding"]
        try:
            projectors[i] = L.Projector(s_shape, t_shape)
        except ValueError as exc:
            raise InputError(f"loss.{i} ({term.kind}): {exc}") from None
        taps[i] = layer
    return DistillModel(student, taps, projectors)


@dataclass(frozen=True)
class MinedNegatives:
    """What a contrastive term looks up per batch row: ``positive [N]`` and ``negatives [N, n]``
    store rows (-1 = none) and the teacher's stored vectors ``table [N, d]`` float32."""

    positive: Tensor
    negatives: Tensor
    table: Tensor

    @classmethod
    def load(cls, store, teacher: str, field: str, name: str) -> "MinedNegatives":
        import pyarrow.parquet as pq

        path = store.path / "negatives" / f"{name}.parquet"
        if not path.is_file():
            raise InputError(f"no mined negatives {path}; create them with `kdstore mine {store.path} --teacher {teacher} --name {name}`")
        tbl = pq.read_table(path, columns=["row", "positive_row", "negative_rows"])
        rows = tbl.column("row").to_numpy()
        lists = tbl.column("negative_rows").to_pylist()
        width = max((len(x) for x in lists), default=0)
        positive = np.full(store.num_rows, -1, dtype=np.int64)
        negatives = np.full((store.num_rows, max(1, width)), -1, dtype=np.int64)
        positive[rows] = tbl.column("positive_row").to_numpy()
        for row, negs in zip(rows, lists):
            negatives[row, : len(negs)] = negs
        table = store.teacher(teacher).read(field).astype(np.float32)
        return cls(torch.from_numpy(positive), torch.from_numpy(negatives), torch.from_numpy(table))

    def to(self, device: torch.device) -> "MinedNegatives":
        return MinedNegatives(self.positive.to(device), self.negatives.to(device), self.table.to(device))


def compute_loss(
    terms: Sequence[LossConfig], out: dict[str, Tensor], batch: dict, num_classes: int,
    mined: dict[int, MinedNegatives] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """``(total, {part: value})``: the weighted sum of the config's loss terms on one batch.

    Pads and rows a teacher could not score are masked out of that teacher's terms; labels
    are -1 outside the labelled subset, which the CE parts ignore. ``mined[i]`` serves the
    contrastive term ``i`` (rows without a positive are masked out, missing negatives too).
    """
    real = ~batch["pad"]
    labels = batch["label"]
    targets = batch.get("targets", {})
    total = out["logits"].new_zeros(())
    parts: dict[str, float] = {}
    for i, term in enumerate(terms):
        tg = targets.get(term.teacher, {})
        mask = real & tg["valid"] if term.teacher else real
        weights = _sample_weights(term, targets, num_classes)
        T = term.temperature
        if term.kind == "ce":
            value = L.cross_entropy(out["logits"], labels, mask=real)
        elif term.kind == "kd":
            value = L.soft_kl(out["logits"], tg["logits"], T, weights=weights, mask=mask)
        elif term.kind == "topk_kd":
            value = L.topk_kl(out["logits"], tg["topk/values"], tg["topk/indices"], tg["topk/residual"], T,
                              weights=weights, mask=mask)
        elif term.kind == "feature":
            value = L.feature_match(out[f"proj/{i}"], tg[term.field], None, term.metric, weights=weights, mask=mask)
        elif term.kind == "embedding":
            value = L.embedding_cosine(out[f"proj/{i}"], tg[term.field or "embedding"], weights=weights, mask=mask)
        elif term.kind == "contrastive":
            neg = mined[i]
            row = batch["row"].clamp(min=0)
            pos_rows, neg_rows = neg.positive[row], neg.negatives[row]
            value = L.contrastive_distill(
                out[f"proj/{i}"], neg.table[pos_rows.clamp(min=0)], neg.table[neg_rows.clamp(min=0)],
                temperature=T, neg_mask=neg_rows >= 0, weights=weights,
                mask=mask & (batch["row"] >= 0) & (pos_rows >= 0),
            )
        elif term.kind == "dho":
            value = L.dho_loss(out["logits"], out["kd_logits"], labels, tg["logits"], T, term.alpha,
                               weights=weights, mask=mask)
        else:  # multi_kd
            valid = torch.stack([targets[t]["valid"] for t in term.teachers]) & real
            probs = L.combine_teachers([targets[t]["logits"] for t in term.teachers], T, term.combine,
                                       term.teacher_weights or None, term.tau, teacher_mask=valid)
            value = L.multi_teacher_kl(out["logits"], probs, T, weights=weights, mask=valid.any(0))
        parts[f"loss/{i}.{term.kind}"] = float(value.detach())
        total = total + term.weight * value
    return total, parts


def _sample_weights(term: LossConfig, targets: dict, num_classes: int) -> Tensor | None:
    if not term.sample_weights:
        return None
    field_name = f"scores/{term.sample_weights}"
    ws = [L.confidence_weights(targets[t][field_name].float(), term.sample_weights, num_classes, term.weight_power)
          for t in term.teacher_names]
    return torch.stack(ws).mean(0)


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


def _flatten(doc: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "teacher_args":
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def first_input_shape(url: str, input_key: str) -> tuple[int, ...]:
    """``[C, H, W]`` of the first sample of a shard (decoded once, at setup)."""
    for sample in iter_samples(url):
        x = decode_field(sample, input_key)
        if not isinstance(x, Tensor):
            raise InputError(f"data.input_key {input_key!r} is not an image; the trainer streams images")
        return tuple(x.shape)
    raise InputError(f"shard {url} is empty")


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

    def setup(self, resume: bool | str | Path = False) -> None:
        cfg = self.cfg
        self._init_distributed()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self._seed_everything(cfg.train.seed)
        self.store = open_store(cfg.data.store)
        self.out_dir = Path(cfg.train.out_dir)
        if self.is_main:
            (self.out_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        cache = self.shared_cache or (InputCache() if cfg.data.cache else None)
        need = {} if cfg.online.enabled else {t: sorted(f) for t, f in cfg.teachers().items()}
        d = cfg.data
        self.train_set = StreamingDataset(
            self.store, shards=d.train_shards, fields=need, inputs=d.inputs, inputs_root=d.inputs_root or None,
            input_key=d.input_key,
            labels=d.labels, labels_seed=d.labels_seed, only_labeled=d.only_labeled, shuffle=True,
            shuffle_buffer=d.shuffle_buffer, seed=cfg.train.seed,
            augment=cfg.online.augment if cfg.online.enabled else "",
            rank=self.rank, world_size=self.world_size, loader_workers=d.workers, loader_batch_size=d.batch_size,
            cache=cache, verify=d.verify_inputs if self.is_main else "off",
        )
        self.eval_set = self._eval_set(cache) if d.eval_shards else None
        self.num_classes = self._num_classes()
        shard0 = self.train_set.shards[0]
        self.input_shape = first_input_shape(self.train_set.urls[shard0.index], self.train_set.input_key)
        teacher_shapes = {name: {f: spec.shape[1:] if self.store.teacher(name).views else spec.shape
                                 for f, spec in self.store.teacher(name).fields.items()}
                          for name in cfg.teachers()}
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg, self.input_shape, self.num_classes, teacher_shapes).to(self.device)
        self.mined = {i: MinedNegatives.load(self.store, t.teacher, t.field or "embedding", t.negatives).to(self.device)
                      for i, t in enumerate(cfg.loss) if t.kind == "contrastive"}
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
        if resume:
            self._resume(None if resume is True else Path(resume))
        elif self.is_main:
            (self.out_dir / METRICS_FILE).write_text("")
            write_json_atomic(self.out_dir / "config.json", cfg.to_dict())

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
        for term in self.cfg.loss:
            for name in term.teacher_names:
                if "logits" in self.store.teacher(name).fields:
                    return name
        for name in self.store.teachers:
            t = self.store.teacher(name)
            if "logits" in t.fields:
                return name
        return None

    def _eval_set(self, cache: InputCache | None) -> StreamingDataset:
        d = self.cfg.data
        shards = select_shards(self.store, d.eval_shards)
        teacher = self._eval_teacher()
        fields = {}
        if teacher:
            missing = set(self.store.teacher(teacher).missing_shards())
            if not any(s.index in missing for s in shards):
                fields = {teacher: ["logits"]}
        return StreamingDataset(self.store, shards=d.eval_shards, fields=fields, inputs=d.inputs,
                                inputs_root=d.inputs_root or None, input_key=d.input_key,
                                labels="all", shuffle=False, replay_views=False, rank=0, world_size=1,
                                loader_workers=0, loader_batch_size=d.batch_size, cache=cache,
                                verify=d.verify_inputs if self.is_main else "off")

    def _num_classes(self) -> int:
        eval_teacher = self._eval_teacher()
        for name in list(self.cfg.teachers()) + ([eval_teacher] if eval_teacher else []):
            spec = self.store.teacher(name).fields.get("logits")
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
        return sorted((self.out_dir / CHECKPOINT_DIR).glob("step-*.pt"))

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
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None},
            "config": self.cfg.to_dict(),
            "world_size": self.world_size,
            "input_fingerprint": self.store.manifest.input_fingerprint,
            "history": self.history,
        }
        path = self.out_dir / CHECKPOINT_DIR / f"step-{self.step:09d}.pt"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # a reader (or a resume after SIGKILL) never sees half a checkpoint
        for old in self.checkpoint_paths()[: -self.cfg.train.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def _resume(self, path: Path | None) -> None:
        paths = [path] if path else self.checkpoint_paths()
        if not paths or not paths[-1].is_file():
            raise InputError(f"no checkpoint to resume from in {self.out_dir / CHECKPOINT_DIR}")
        path = paths[-1]
        state = torch.load(path, map_location="cpu", weights_only=False)
        old, new = _flatten(state["config"]), _flatten(self.cfg.to_dict())
        changed = [k for k in sorted(set(old) | set(new)) if k.startswith(RESUME_KEYS) and old.get(k) != new.get(k)]
        if changed:
            raise InputError(f"checkpoint {path} was written with other settings ({', '.join(changed[:5])}); "
                             "resume with the same config or start a new train.out_dir")
        if state["world_size"] != self.world_size:
            raise InputError(f"checkpoint {path} ran on {state['world_size']} ranks, now {self.world_size}: "
                             "the stream is split per rank, resume with the same number")
        if state["input_fingerprint"] != self.store.manifest.input_fingerprint:
            raise InputError(f"checkpoint {path} was trained on another store (input fingerprint differs)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
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

    def train_step(self, batch: dict) -> dict[str, float]:
        batch = _to_device(batch, self.device)
        if self.targets_fn is not None:
            batch["targets"] = self.targets_fn(batch)
        with self._autocast():
            out = self.ddp(batch["input"])
            loss, parts = compute_loss(self.cfg.loss, out, batch, self.num_classes, self.mined)
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
                    bar.set_postfix(loss=f"{parts['loss']:.4f}", samples_s=f"{rate:,.0f}", refresh=False)
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
            torch.save(self.model.student.state_dict(), self.out_dir / "student.pt")
        rate = samples / max(seconds, 1e-9) if self.step > start_step else 0.0
        result = TrainResult(out_dir=self.out_dir, steps=self.step, epochs=self.step / self.steps_per_epoch,
                             seconds=seconds, samples_per_s=rate, eval=final, history=self.history)
        if self.is_main:
            write_json_atomic(self.out_dir / "summary.json", result.to_dict())
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

    @torch.inference_mode()
    def predict(self, dataset: StreamingDataset | None = None) -> dict[str, np.ndarray]:
        """Run the student over an evaluation stream: ``logits [n, k]`` (+ ``kd_logits``), ``labels [n]``,
        ``teacher [n, k]`` (stored logits, mean over views; absent when the store has none), ``rows [n]``."""
        dataset = dataset or self.eval_set
        was = self.model.training
        self.model.eval()
        chunks: dict[str, list] = {}
        loader = DataLoader(dataset, batch_size=self.cfg.data.batch_size, num_workers=0, collate_fn=collate)
        dataset.set_epoch(0)
        dataset.set_resume(0)
        teacher = next(iter(dataset.fields), None)
        for batch in loader:
            keep = ~batch["pad"]
            with self._autocast():
                out = self.model.student(batch["input"].to(self.device))
            for name in ("logits", "kd_logits"):
                if name in out:
                    chunks.setdefault(name, []).append(out[name].float().cpu()[keep])
            chunks.setdefault("labels", []).append(batch["label"][keep])
            chunks.setdefault("rows", []).append(batch["row"][keep])
            if teacher:
                t = batch["targets"][teacher]["logits"].float()
                chunks.setdefault("teacher", []).append((t.mean(1) if t.dim() == 3 else t)[keep])
        self.model.train(was)
        return {k: torch.cat(v).numpy() for k, v in chunks.items()}

    def evaluate(self, dataset: StreamingDataset | None = None) -> dict:
        """Accuracy (and, with a teacher in the store, agreement with it and its own accuracy)."""
        p = self.predict(dataset)
        return summarize_predictions(p, self.cfg.model if self.cfg.dual_head else None)

    def cleanup(self) -> None:
        if getattr(self, "started_dist", False) and dist.is_initialized():
            dist.destroy_process_group()


def summarize_predictions(p: dict[str, np.ndarray], dho: ModelConfig | None = None) -> dict:
    """Accuracy of the student's prediction (DHO: the heads combined with ``dho.dho_alpha/beta``)."""
    labels = p["labels"]
    if dho is not None and "kd_logits" in p:
        ce, kd = torch.from_numpy(p["logits"]), torch.from_numpy(p["kd_logits"])
        probs = L.dho_combine(ce, kd, dho.dho_alpha, dho.dho_beta)
        pred = probs.argmax(1).numpy()
    else:
        pred = p["logits"].argmax(1)
    has = labels >= 0
    out = {"samples": int(len(labels)), "accuracy": float((pred[has] == labels[has]).mean()) if has.any() else None}
    if "kd_logits" in p:
        out["accuracy_ce_head"] = float((p["logits"].argmax(1)[has] == labels[has]).mean())
        out["accuracy_kd_head"] = float((p["kd_logits"].argmax(1)[has] == labels[has]).mean())
    if "teacher" in p:
        t_pred = p["teacher"].argmax(1)
        out["teacher_agreement"] = float((pred == t_pred).mean())
        out["teacher_accuracy"] = float((t_pred[has] == labels[has]).mean()) if has.any() else None
    return out


def run(cfg: Config, *, resume: bool | str | Path = False, callbacks: Sequence[Callable] = (),
        cache: InputCache | None = None) -> TrainResult:
    """setup → train → cleanup; returns the final evaluation and timing."""
    recipe = Recipe(cfg, callbacks=callbacks, cache=cache)
    try:
        recipe.setup(resume=resume)
        return recipe.train()
    finally:
        recipe.cleanup()


def print_summary(recipe: Recipe, result: TrainResult) -> None:
    """The final table: run size, speed, and the last evaluation."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kdstore train: {recipe.out_dir}")
    table.add_column("")
    table.add_column("value", justify="right")
    losses = " + ".join(f"{t.weight:g}·{t.kind}" + (f"[{','.join(t.teacher_names)}]" if t.teacher_names else "")
                        for t in recipe.cfg.loss)
    rows = [("objective", losses), ("student", recipe.cfg.model.arch), ("ranks × workers",
            f"{recipe.world_size} × {max(1, recipe.cfg.data.workers)}"), ("device", str(recipe.device)),
            ("steps", f"{result.steps:,}"), ("epochs", f"{result.epochs:.2f}"), ("train time", f"{result.seconds:.1f} s"),
            ("samples/s", f"{result.samples_per_s:,.0f}")]
    for key, value in result.eval.items():
        rows.append((f"eval {key}", f"{value:.4f}" if isinstance(value, float) else str(value)))
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def few_labels_demo(
    store_path: str | Path,
    shards_dir: str | Path | None = None,
    teacher: str = "cnn",
    seeds: Sequence[int] = (0,),
    *,
    workdir: str | Path = "runs/few_labels",
    epochs: int = 10,
    temperature: float = 1.0,
    alpha: float = 0.9,
    labels: str = "per_class:100",
    echo: Callable[[str], Any] = print,
) -> dict:
    """The few-labels result on a Fashion-MNIST store: labels-only vs distilled test accuracy.

    Both students (MLP 784-32-10) stream the same 60,000 training rows in the same order
    with the same optimiser, steps and cosine schedule; the labels-only one learns from the
    1,000 labelled rows alone (CE; every other row has label -1), the distilled one adds
    KD from the stored logits of ``teacher`` on every row (weights ``1 - alpha`` and
    ``alpha``; ``temperature`` and ``alpha`` are the values chosen on a validation split,
    docs/TRAINING.md). Decoded inputs are cached in memory and shared by the runs;
    ``shards_dir`` relocates the input shards (matched by file name).

    Returns ``{"labels_only": [acc per seed], "distilled": [...], "labels_only_mean",
    "distilled_mean", "gain_points", "steps"}``.
    """
    cache = InputCache()
    inputs = [str(Path(shards_dir) / "*.tar")] if shards_dir else []
    result: dict[str, Any] = {"labels_only": [], "distilled": [], "teacher": teacher}
    runs = (("labels_only", [{"kind": "ce"}]),
            ("distilled", [{"kind": "ce", "weight": 1.0 - alpha},
                           {"kind": "kd", "teacher": teacher, "temperature": temperature, "weight": alpha}]))
    first = True
    for seed in seeds:
        for name, losses in runs:
            doc = {
                "data": {"store": str(store_path), "train_shards": ["train-"], "eval_shards": ["test-"], "inputs": inputs,
                         "labels": labels, "batch_size": 256, "cache": True, "verify_inputs": "full" if first else "quick"},
                "model": {"arch": "mlp", "hidden": 32},
                "train": {"out_dir": str(Path(workdir) / f"{name}-seed{seed}"), "epochs": epochs, "seed": seed,
                          "threads": 1, "checkpoint_every_steps": 0, "eval_every_epochs": 0, "progress": False},
                "loss": losses,
            }
            first = False
            start = time.perf_counter()
            res = run(parse_config(doc), cache=cache)
            result[name].append(res.eval["accuracy"])
            result["steps"] = res.steps
            echo(f"    seed {seed} {name.replace('_', '-'):12s} test accuracy {res.eval['accuracy']:.4f}  "
                 f"({time.perf_counter() - start:.0f}s, {res.steps} steps)")
    lo, kd = float(np.mean(result["labels_only"])), float(np.mean(result["distilled"]))
    result.update(labels_only_mean=lo, distilled_mean=kd, gain_points=100 * (kd - lo))
    echo(f"    1,000 labels: labels-only {lo:.4f} -> distilled from the store {kd:.4f} ({100 * (kd - lo):+.1f} points)")
    return result
