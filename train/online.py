"""Online KD, the baseline a store is measured against: the teacher runs in the training loop.

With ``[online] enabled = true`` the recipe streams the same shards without reading any
stored target, draws a fresh seeded augmentation per sample and epoch (``online.augment``),
and calls :class:`OnlineTargets` on every batch: the teacher's forward on the input the student
sees — through the teacher's recorded ``--transform`` when ``data.transform`` gives the student
another one (``teacher_input``) — reduced to the stored field names, so the losses cannot tell
the difference.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from kdstore.pipeline.reduce import reduce_outputs
from kdstore.pipeline.teacher import TeacherLoad
from kdstore.store.errors import InputError, StoreMismatchError
from kdstore.store.reader import Store
from kdstore.train.config import OnlineConfig


class OnlineTargets:
    """``batch → {teacher: {field: [b, ...], "valid": [b]}}`` from a live teacher.

    Args:
        cfg: ``[online]``: the factory (and its arguments) of the teacher named ``cfg.teacher``.
        store: the store whose teacher spec says how outputs were reduced (top-k, temperature).
        need: ``{teacher: {field, ...}}`` the losses read; only ``cfg.teacher`` may appear.
        device: where the teacher runs.
    """

    def __init__(self, cfg: OnlineConfig, store: Store, need: dict[str, set[str]], device: torch.device) -> None:
        others = sorted(set(need) - {cfg.teacher})
        if others:
            raise InputError(f"online KD runs one teacher ({cfg.teacher!r}); the losses also name {others}")
        spec = store.teacher(cfg.teacher).spec
        load = TeacherLoad(factory=cfg.factory, name=cfg.teacher, input_key=spec.input_key or None,
                           layers=cfg.layers or spec.layers, kwargs=tuple(cfg.teacher_args.items()), device=str(device))
        self.teacher = load.build()
        if cfg.check_fingerprint and self.teacher.fingerprint != spec.fingerprint:
            raise StoreMismatchError(
                f"online teacher {cfg.factory} has fingerprint {self.teacher.fingerprint[:19]}…, the store's "
                f"{cfg.teacher} was computed by {spec.fingerprint[:19]}…: not the same weights"
            )
        self.name = cfg.teacher
        self.fields = sorted(need.get(cfg.teacher, ()))
        self.specs = list(spec.outputs)
        self.temperature = spec.temperature
        self.dtype = np.dtype(spec.dtype)

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict[str, dict[str, Tensor]]:
        # The image as precompute fed it to the teacher (its recorded --transform); the dataset adds
        # ``teacher_input`` only when the student's preprocessing differs from it.
        x: Tensor = batch.get("teacher_input", batch["input"])
        raw = self.teacher.forward(list(x))
        reduced = reduce_outputs(raw, self.specs, batch_size=x.shape[0], temperature=self.temperature, dtype=self.dtype)
        out = {f: torch.from_numpy(reduced[f]).to(x.device) for f in self.fields}
        out["valid"] = ~batch["pad"]
        return {self.name: out}
