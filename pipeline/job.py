"""The precompute job: plan rows → run whole shards on Ray actors → done records.

One actor per worker loads the teacher once; each task owns whole shards; finished shards
(those with a done record) are never recomputed, so a rerun resumes. A lock keeps a second
job off the same store; ``overwrite`` also takes the readers' lock exclusively, so it is
refused while ``index``, ``mine``, ``query`` or ``train`` reads the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm.auto import tqdm

from kdstore.pipeline.augment import AugmentSpec
from kdstore.pipeline.transform import TransformSpec
from kdstore.pipeline.teacher import TeacherLoad
from kdstore.pipeline.worker import ShardProcessor
from kdstore.store import layout
from kdstore.store.atomic import read_json
from kdstore.store.errors import InputError, KdStoreError, StoreMismatchError
from kdstore.store.lock import StoreLock, store_lock
from kdstore.store.reader import open_store
from kdstore.store.schema import OutputSpec, TeacherSpec
from kdstore.store.shards import expand_urls, list_shard
from kdstore.store.writer import clean_partial, write_plan, write_teacher_spec

DTYPES = ("float16", "float32")


@dataclass(frozen=True, kw_only=True)
class PrecomputeConfig:
    """Everything one ``kdstore precompute`` run needs, validated on construction."""

    store: Path
    inputs: tuple[str, ...]
    teacher: TeacherLoad
    outputs: tuple[str, ...] = ("logits",)
    temperature: float = 1.0
    dtype: str = "float16"
    views: int = 0
    augment: str = ""
    transform: str = ""  # kdstore.pipeline.transform text, applied to each image before the teacher
    seed: int = 0
    batch_size: int = 256
    workers: int = 0  # 0 = auto: one per GPU on cuda, else up to 4 (PNG decoding is serial per worker)
    ray_address: str | None = None
    on_error: str = "fail"
    overwrite: bool = False
    amp: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.inputs:
            raise InputError("give at least one input shard pattern")
        if not self.outputs:
            raise InputError("give at least one --output")
        for text in self.outputs:
            OutputSpec.parse(text)
        AugmentSpec.parse(self.augment)
        TransformSpec.parse(self.transform)
        checks = [
            (self.dtype in DTYPES, f"--dtype must be one of {DTYPES}, got {self.dtype!r}"),
            (self.temperature > 0, f"--temperature must be > 0, got {self.temperature}"),
            (self.views >= 0, f"--views must be >= 0, got {self.views}"),
            (self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}"),
            (self.workers >= 0, f"--workers must be >= 0 (0 = auto), got {self.workers}"),
            (self.on_error in ("fail", "skip"), f"--on-error must be fail or skip, got {self.on_error!r}"),
            (not (self.views and not self.augment), "--views needs --augment (e.g. 'rrc:scale=0.5-1;hflip:p=0.5')"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)


@dataclass(kw_only=True)
class PrecomputeResult:
    """What one run did: ``rows_run`` rows in ``shards_run`` shards, in ``seconds`` end to end."""

    store: Path
    teacher: str
    rows: int
    rows_run: int
    shards_total: int
    shards_run: int
    shards_already_done: int
    samples_skipped: int
    seconds: float
    skipped_shards: list[dict] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return self.rows_run / self.seconds if self.seconds else 0.0


class _Progress:
    """Rows processed so far, told by the workers after each batch (a tiny Ray actor)."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def total(self) -> int:
        return self.rows


def _ensure_ray(address: str | None) -> bool:
    """Start (or join) Ray; returns True when this call started it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=True, configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
    return True


def _auto_workers(cpus: float, gpu: bool) -> int:
    if gpu:
        return max(1, int(ray.cluster_resources().get("GPU", 1)))
    return int(max(1, min(4, cpus)))


def _unwrap(exc: Exception) -> Exception:
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, KdStoreError):
            return cause
    return exc


def _list_or_error(url: str):
    try:
        return list_shard(url)
    except InputError as exc:
        return exc


def plan_store(cfg: PrecomputeConfig, urls: list[str]):
    """Reuse the store's row plan when the inputs match; otherwise list every shard and write one."""
    root = cfg.store
    if layout.store_file(root).exists():
        store = open_store(root)
        if list(store.manifest.input_urls) != urls:
            if not cfg.overwrite:
                raise StoreMismatchError(
                    f"store {root} was planned for other input shards ({len(store.manifest.input_urls)} shards, "
                    f"first {store.manifest.input_urls[0]!r}) than given ({len(urls)}, first {urls[0]!r}); "
                    "use another --store, or --overwrite to delete it and start over"
                )
            shutil.rmtree(layout.teachers_dir(root), ignore_errors=True)
            for path in (layout.store_file(root), layout.samples_path(root)):
                path.unlink(missing_ok=True)
        else:
            return store
    # Listing is I/O (tar headers): threads in the driver, while the actors load the teacher.
    with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        listings = list(pool.map(_list_or_error, urls))
    kept, skipped = [], []
    for url, listing in zip(urls, listings):
        if isinstance(listing, Exception):
            if cfg.on_error == "fail":
                raise listing
            skipped.append({"url": url, "reason": str(listing)})
        else:
            kept.append(listing)
    if not kept:
        raise InputError(f"no readable input shard; first problem: {skipped[0]['reason']}")
    write_plan(
        root,
        urls=[x.url for x in kept],
        keys_per_shard=[x.keys for x in kept],
        labels_per_shard=[x.labels for x in kept],
        skipped_shards=skipped,
        input_urls=urls,
    )
    return open_store(root)


def _teacher_spec(cfg: PrecomputeConfig, described: dict) -> TeacherSpec:
    return TeacherSpec(
        name=described["name"],
        fingerprint=described["fingerprint"],
        factory=cfg.teacher.factory,
        input_key=described["input_key"],
        outputs=tuple(OutputSpec.parse(o) for o in cfg.outputs),
        temperature=cfg.temperature,
        dtype=cfg.dtype,
        views=cfg.views,
        augment=AugmentSpec.parse(cfg.augment).to_text(),
        transform=TransformSpec.parse(cfg.transform).to_text(),
        seed=cfg.seed,
        layers=cfg.teacher.layers,
        factory_args=json.loads(json.dumps(dict(cfg.teacher.kwargs), default=str)),  # as recorded in JSON
    )


def _check_teacher(cfg: PrecomputeConfig, spec: TeacherSpec) -> None:
    path = layout.teacher_file(cfg.store, spec.name)
    if path.exists():
        old = TeacherSpec.from_json(read_json(path, layout.TEACHER_FILE))
        diff = old.differences(spec)
        if diff and not cfg.overwrite:
            doc_old, doc_new = old.to_json(), spec.to_json()
            details = "; ".join(f"{k}: stored {doc_old[k]!r}, now {doc_new[k]!r}" for k in diff)
            raise StoreMismatchError(
                f"teacher {spec.name!r} in {cfg.store} was precomputed differently ({details}); "
                "use another --teacher-name, or --overwrite to recompute it"
            )
        if cfg.overwrite:
            shutil.rmtree(layout.teacher_dir(cfg.store, spec.name))
    write_teacher_spec(cfg.store, spec)


def run_precompute(cfg: PrecomputeConfig) -> PrecomputeResult:
    """Run (or resume) one teacher over the inputs into ``cfg.store``."""
    start = time.perf_counter()
    urls = expand_urls(list(cfg.inputs))
    cfg.store.mkdir(parents=True, exist_ok=True)
    with StoreLock(cfg.store) as lock, _overwrite_lock(cfg):
        started_ray = _ensure_ray(cfg.ray_address)
        try:
            return _run_locked(cfg, urls, start, lock.token)
        finally:
            if started_ray:
                ray.shutdown()


def _overwrite_lock(cfg: PrecomputeConfig):
    """``--overwrite`` deletes stored outputs: no reader may hold the store meanwhile."""
    if cfg.overwrite:
        return store_lock(cfg.store, shared=False, what="kdstore precompute --overwrite")
    return contextlib.nullcontext()


def _run_locked(cfg, urls, start, fence_token: str) -> PrecomputeResult:
    cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)))
    gpu = cfg.teacher.device.startswith("cuda")
    workers = cfg.workers or _auto_workers(cpus, gpu)
    threads = max(1, int(cpus // workers)) if not cfg.ray_address else None
    Actor = ray.remote(num_cpus=min(1.0, cpus / (workers + 1)), num_gpus=1 if gpu else 0)(ShardProcessor)
    actors = [Actor.remote(cfg.teacher, num_threads=threads, amp=cfg.amp) for _ in range(workers)]
    try:
        return _run_with_actors(cfg, urls, start, fence_token, actors)
    finally:  # also when planning or the teacher check fails: no actor outlives the job
        for actor in actors:
            ray.kill(actor)


def _run_with_actors(cfg, urls, start, fence_token: str, actors: list) -> PrecomputeResult:
    try:
        described_ref = actors[0].describe.remote()
        store = plan_store(cfg, urls)
        described = ray.get(described_ref)
    except (RayTaskError, RayActorError) as exc:
        raise _unwrap(exc) from None
    spec = _teacher_spec(cfg, described)
    _check_teacher(cfg, spec)
    clean_partial(cfg.store, spec.name)
    teacher = store.teacher(spec.name)
    done = teacher.done_records()
    todo = [s for s in store.shards if s.index not in done]
    keys = store.keys
    bar = tqdm(
        total=sum(s.num_rows for s in todo),
        unit="sample",
        desc=f"precompute {spec.name}",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    progress = ray.remote(num_cpus=0)(_Progress).remote()
    pending: dict = {}
    queue = list(todo)
    idle = list(actors) * 2  # two shards in flight per actor keeps it busy between tasks
    rows_run = skipped = 0
    try:
        while queue or pending:
            while queue and idle:
                actor, shard = idle.pop(), queue.pop(0)
                ref = actor.run_shard.remote(
                    str(cfg.store), spec, shard, list(keys[shard.row_start : shard.row_stop]),
                    batch_size=cfg.batch_size, on_error=cfg.on_error, fence_token=fence_token, progress=progress,
                )
                pending[ref] = (actor, shard)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            bar.update(max(0, ray.get(progress.total.remote()) - bar.n))
            if not ready:
                continue
            actor, shard = pending.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except (RayTaskError, RayActorError) as exc:
                raise _unwrap(exc) from None
            idle.append(actor)
            rows_run += record.num_rows
            skipped += len(record.skipped)
            bar.set_postfix(shards=f"{len(done) + (len(todo) - len(queue) - len(pending))}/{len(store.shards)}", skipped=skipped)
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref)
        ray.kill(progress)
    return PrecomputeResult(
        store=cfg.store,
        teacher=spec.name,
        rows=store.num_rows,
        shards_total=len(store.shards),
        shards_run=len(todo),
        shards_already_done=len(done),
        samples_skipped=skipped + sum(len(r.skipped) for r in done.values()),
        seconds=time.perf_counter() - start,
        skipped_shards=list(store.manifest.skipped_shards),
        rows_run=rows_run,
    )
