"""LM batches from a store: the token shards joined with a teacher's per-token (ragged) fields.

One store shard at a time (seeded shard order per epoch): the input tar is read once in tar
order, each needed ragged field of that shard is read once as ``values + offsets``
(:meth:`~kdstore.store.reader.TeacherData.read_tokens`), and rows are joined by key (the
tar key must equal the store's key of that row) and by position (row ``i`` of a ragged field
has one entry per token of sample ``i``). No per-row random reads. Rows are shuffled inside
the shard, then packed into batches:

- ``ids``, ``doc`` int64 ``[b, n]`` (padding: ``<|endoftext|>`` / doc ``-1``; the student's
  attention stops at document boundaries and padding through ``doc``),
- ``targets`` int64 ``[b, n]`` and ``ce_mask`` bool ``[b, n]``
  (:func:`~kdstore.pipeline.lm_model.next_token_targets`), ``kd_mask`` bool ``[b, n]``
  (:func:`~kdstore.pipeline.lm_model.kd_mask`),
- each requested field ``[b, n, ...]``: ids int64, counts int64, floats float32, zero-padded.

:func:`check_tokenizer` refuses token shards (or a student tokenizer) whose tokenizer is not
the one the store's teacher was trained with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from kdstore.pipeline.lm_model import kd_mask, next_token_targets
from kdstore.pipeline.lm_teacher import loaded_temperature, teacher_fingerprint
from kdstore.store.errors import InputError, StoreMismatchError
from kdstore.store.layout import VALID_ARRAY
from kdstore.store.reader import Store
from kdstore.store.schema import ShardInfo
from kdstore.store.shards import iter_samples
from kdstore.train.dataset import shard_order

PLAN_PREFIX = "lm_plan."  # lm_plan.SPLIT.json next to the token shards (kdstore lm-shards)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def teacher_tokenizer_sha256(store: Store, teacher: str) -> str:
    """The tokenizer hash of the LM teacher that wrote ``teacher``'s outputs.

    Read from the teacher folder recorded in ``teacher.json`` (``factory_args.path``); the
    folder's weights and tokenizer hashes must give the stored teacher fingerprint.
    """
    spec = store.teacher(teacher).spec
    folder = spec.factory_args.get("path")
    config_path = Path(str(folder)) / "config.json" if folder else None
    if config_path is None or not config_path.is_file():
        raise InputError(f"teacher {teacher} of {store.path} records no readable LM teacher folder "
                         f"(factory_args.path = {folder!r}); token batches need it to check the tokenizer")
    config = json.loads(config_path.read_text())
    calibrated = spec.factory_args.get("calibrated", True)
    if spec.fingerprint != teacher_fingerprint(config, loaded_temperature(config, calibrated)):
        hint = "point factory_args.path at the right folder or recompute"
        if calibrated and "calibration" in config and spec.fingerprint == teacher_fingerprint(config):
            hint = (f"the folder was calibrated (temperature {config['calibration']['temperature']:.4f}) after this "
                    "store was written from its raw logits; recompute the store (it now would hold the calibrated "
                    "teacher's targets), or precompute with --teacher-arg calibrated=false to keep the raw ones")
        raise StoreMismatchError(f"{folder} is not the teacher that wrote teacher {teacher} of {store.path} "
                                 f"(fingerprints differ): {hint}")
    return config["tokenizer_sha256"]


def token_plan(store: Store) -> dict:
    """The ``lm_plan.*.json`` of the store's token shards (``vocab_size``, ``eos_id``, ``tokenizer_sha256``).

    Every input shard's folder must hold one (written by ``kdstore lm-shards``), all with the
    same tokenizer.
    """
    plans = {}
    for folder in sorted({str(Path(s.url).parent) for s in store.shards}):
        found = sorted(Path(folder).glob(PLAN_PREFIX + "*.json"))
        if not found:
            raise InputError(f"{folder} has no {PLAN_PREFIX}*.json: LM training reads token shards from `kdstore lm-shards`")
        for path in found:
            plans[str(path)] = json.loads(path.read_text())
    hashes = {p["tokenizer_sha256"] for p in plans.values()}
    if len(hashes) != 1:
        raise StoreMismatchError(f"the store's token shards were written with {len(hashes)} different tokenizers: {sorted(plans)}")
    return next(iter(plans.values()))


def check_tokenizer(store: Store, teacher: str | None, *, tokenizer: str | Path | None = None) -> dict:
    """Refuse token shards, or a student ``tokenizer`` file, made with another tokenizer than the teacher's.

    Returns the token plan (:func:`token_plan`). With ``teacher`` None only the shards' own
    agreement (and ``tokenizer``, if given) is checked.
    """
    plan = token_plan(store)
    got = plan["tokenizer_sha256"]
    if teacher is not None:
        want = teacher_tokenizer_sha256(store, teacher)
        if got != want:
            raise StoreMismatchError(f"the token shards of {store.path} were written with tokenizer {got[:12]}…, teacher "
                                     f"{teacher}'s is {want[:12]}…: rebuild them with the teacher's tokenizer.json")
    if tokenizer is not None and _sha256(Path(tokenizer)) != got:
        raise StoreMismatchError(f"student tokenizer {tokenizer} differs from the token shards' (sha256 {got[:12]}…)")
    return plan


def _torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype.kind == "f":
        return torch.from_numpy(array.astype(np.float32))
    return torch.from_numpy(array.astype(np.int64))


def _read_npy(data: bytes) -> np.ndarray:
    from kdstore.pipeline.lm_corpus import read_npy

    return read_npy(data)


def shard_rows(store: Store, teacher: str | None, shard: ShardInfo, fields: Sequence[str]) -> list[dict]:
    """The valid rows of one shard as ``{"key", "ids" [n], "doc" [n], field: [n, ...]}``, in tar order.

    One sequential pass over the tar and one read of each field's values + offsets. With
    ``teacher`` None (CE only) every row is used and ``fields`` must be empty.
    """
    keys = store.samples().column("key").to_pylist()[shard.row_start : shard.row_stop]
    if teacher is None:
        if fields:
            raise InputError(f"fields {list(fields)} need a teacher")
        valid, columns = np.ones(shard.num_rows, bool), {}
    else:
        data = store.teacher(teacher)
        valid = data.read_shard(VALID_ARRAY, shard.index)
        columns = {f: data.read_tokens(f, shard.index) for f in fields}
    rows = []
    for i, sample in enumerate(iter_samples(shard.url)):
        key = sample.get("__key__", "")
        if i >= shard.num_rows or key != keys[i]:
            raise StoreMismatchError(f"token shard {shard.url} row {i} is {key!r}, the store planned "
                                     f"{keys[i] if i < shard.num_rows else '<end of shard>'!r}: the shard changed")
        if not valid[i]:
            continue
        ids = _read_npy(sample["ids.npy"]).astype(np.int64)
        doc = _read_npy(sample["doc.npy"]).astype(np.int64) if "doc.npy" in sample else np.zeros_like(ids)
        row = {"key": key, "ids": ids, "doc": doc}
        for f, col in columns.items():
            if len(col[i]) != len(ids):
                raise StoreMismatchError(f"teacher {teacher} field {f} has {len(col[i])} positions for {key!r}, "
                                         f"the token shard {len(ids)}: recompute this shard")
            row[f] = col[i]
        rows.append(row)
    return rows


def pack_batch(rows: Sequence[dict], fields: Sequence[str], eos_id: int) -> dict[str, torch.Tensor]:
    """Rows of possibly different lengths → the batch tensors described in the module docstring."""
    b, n = len(rows), max(len(r["ids"]) for r in rows)
    ids = torch.full((b, n), eos_id, dtype=torch.long)
    doc = torch.full((b, n), -1, dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    for f in fields:
        template = _torch(rows[0][f][:0])
        out[f] = torch.zeros((b, n, *rows[0][f].shape[1:]), dtype=template.dtype)
    for i, r in enumerate(rows):
        m = len(r["ids"])
        ids[i, :m] = torch.from_numpy(r["ids"])
        doc[i, :m] = torch.from_numpy(r["doc"])
        for f in fields:
            out[f][i, :m] = _torch(r[f])
    targets, ce_mask = next_token_targets(ids, doc, eos_id)
    return {"ids": ids, "doc": doc, "targets": targets, "ce_mask": ce_mask, "kd_mask": kd_mask(ids, doc, eos_id), **out}


def lm_batches(
    store: Store,
    teacher: str | None,
    fields: Sequence[str],
    *,
    batch_size: int,
    eos_id: int,
    epoch: int | None = 0,
    seed: int = 0,
    shards: Sequence[ShardInfo] | None = None,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of one epoch: shards in seeded order, rows shuffled within each shard (none when ``epoch`` is None)."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    shards = list(store.shards if shards is None else shards)
    pending: list[dict] = []
    for s in shard_order(len(shards), seed, epoch):
        rows = shard_rows(store, teacher, shards[int(s)], fields)
        if epoch is not None:
            perm = np.random.default_rng([int(seed), int(epoch), int(shards[int(s)].index), 0x4C4D]).permutation(len(rows))
            rows = [rows[j] for j in perm]
        pending.extend(rows)
        while len(pending) >= batch_size:
            yield pack_batch(pending[:batch_size], fields, eos_id)
            pending = pending[batch_size:]
    if pending and not drop_last:
        yield pack_batch(pending, fields, eos_id)
