"""Evaluation: the student over the evaluation shards, accuracy and agreement with the teacher."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from kdstore.store.reader import Store
from kdstore.train import losses as L
from kdstore.train.config import DataConfig, LossConfig, ModelConfig
from kdstore.train.dataset import InputCache, StreamingDataset, collate, select_shards
from kdstore.train.objective import logits_field


def eval_teacher(store: Store, terms: Sequence[LossConfig]) -> str | None:
    """The teacher whose stored logits evaluation compares with: the first of the loss terms'
    that has logits, else the first in the store that has; None when none has."""
    for term in terms:
        for name in term.teacher_names:
            if logits_field() in store.teacher(name).fields:
                return name
    for name in store.teachers:
        if logits_field() in store.teacher(name).fields:
            return name
    return None


def eval_dataset(store: Store, d: DataConfig, teacher: str | None, cache: InputCache | None,
                 verify: str) -> StreamingDataset:
    """``d.eval_shards`` in store order, all labels, no views; with ``teacher``'s logits when it
    covers those shards."""
    shards = select_shards(store, d.eval_shards)
    fields = {}
    if teacher:
        missing = set(store.teacher(teacher).missing_shards())
        if not any(s.index in missing for s in shards):
            fields = {teacher: [logits_field()]}
    return StreamingDataset(store, shards=d.eval_shards, fields=fields, inputs=d.inputs,
                            inputs_root=d.inputs_root or None, input_key=d.input_key,
                            transform=d.transform, tokenizer=d.tokenizer, max_length=d.max_length,
                            labels="all", shuffle=False, replay_views=False, rank=0, world_size=1,
                            loader_workers=0, loader_batch_size=d.batch_size, cache=cache, verify=verify)


@torch.inference_mode()
def predict(student: nn.Module, dataset: StreamingDataset, *, batch_size: int, device: torch.device,
            autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict[str, np.ndarray]:
    """Run the student over an evaluation stream: ``logits [n, k]`` (+ ``kd_logits``), ``labels [n]``,
    ``teacher [n, k]`` (stored logits, mean over views; absent when the stream has none), ``rows [n]``."""
    was = student.training
    student.eval()
    chunks: dict[str, list] = {}
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=0, collate_fn=collate)
    dataset.set_epoch(0)
    dataset.set_resume(0)
    teacher = next(iter(dataset.fields), None)
    for batch in loader:
        keep = ~batch["pad"]
        with autocast():
            out = student(batch["input"].to(device))
        for name in ("logits", "kd_logits"):
            if name in out:
                chunks.setdefault(name, []).append(out[name].float().cpu()[keep])
        chunks.setdefault("labels", []).append(batch["label"][keep])
        chunks.setdefault("rows", []).append(batch["row"][keep])
        if teacher:
            t = batch["targets"][teacher][logits_field()].float()
            chunks.setdefault("teacher", []).append((t.mean(1) if t.dim() == 3 else t)[keep])
    student.train(was)
    return {k: torch.cat(v).numpy() for k, v in chunks.items()}


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
