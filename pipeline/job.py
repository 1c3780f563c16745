"""The precompute job: record the input shards → run whole shards on Ray actors → listings and
done records → seal the row plan.

No input byte is read before the teacher runs: each worker lists its shard's keys while it
reads the shard for the teacher, and writes that listing with the shard's outputs
(:mod:`kdstore.store.listing`); once every shard is listed the job seals the store's rows.
One actor per worker loads the teacher once; each task owns whole shards; finished shards
(those with a done record) are never recomputed, so a rerun resumes. A lock keeps a second
job off the same store; ``overwrite`` also takes the readers' lock exclusively, so it is
refused while ``index``, ``mine``, ``query`` or ``train`` reads the store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm.auto import tqdm

from kdstore.pipeline.actor_pool import WorkerPool, _unwrap, shard_lost
from kdstore.pipeline.augment import AugmentSpec
from kdstore.pipeline.ingest import CLASSES as CLASSES_FILE
from kdstore.pipeline.teacher import TeacherLoad, load_factory
from kdstore.pipeline.token_reduce import SAMPLER
from kdstore.pipeline.transform import TransformSpec
from kdstore.pipeline.worker import ShardProcessor
from kdstore.store import layout
from kdstore.store.atomic import read_json
from kdstore.store.errors import InputError, StoreMismatchError
from kdstore.store.inputs import has_scheme, missing_local, normalize_url, recorded_to_absolute
from kdstore.store.fs import is_remote, remote_errors
from kdstore.store.listing import read_listing, seal, start_plan
from kdstore.store.lock import StoreLock, store_lock
from kdstore.store.reader import Store, open_store
from kdstore.store.schema import FORMAT_VERSION, OutputSpec, ShardInfo, TeacherSpec, check_format_version
from kdstore.store.shards import expand_urls
from kdstore.store.writer import clean_partial, write_teacher_spec

DTYPES = ("float16", "float32")
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"  # "Token authentication is enabled ..."
# A GPU number is refused: inside a Ray actor only the actor's own GPU is visible (as cuda:0).
DEVICE_RE = re.compile(r"cpu|cuda|mps")


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
    cpus_per_worker: float | None = None  # Ray CPUs each actor reserves (None: min(1, CPUs / (workers + 1)))
    gpus_per_worker: float | None = None  # Ray GPUs each actor reserves (None: 1 with --device cuda, else 0)
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
            (self.cpus_per_worker is None or self.cpus_per_worker > 0,
             f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}"),
            (self.gpus_per_worker is None or self.gpus_per_worker >= 0,
             f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}"),
            (not (self.gpus_per_worker and not self.teacher.device.startswith("cuda")),
             f"--gpus-per-worker {self.gpus_per_worker} reserves GPUs for workers that run on {self.teacher.device}: "
             "add --device cuda, or drop --gpus-per-worker"),
            (not (self.gpus_per_worker == 0 and self.teacher.device.startswith("cuda")),
             "--device cuda with --gpus-per-worker 0: Ray would show the workers no GPU; give a fraction such as 0.5 "
             "to share a GPU between workers"),
            (self.on_error in ("fail", "skip"), f"--on-error must be fail or skip, got {self.on_error!r}"),
            (not (self.views and not self.augment), "--views needs --augment (e.g. 'rrc:scale=0.5-1;hflip:p=0.5')"),
            (DEVICE_RE.fullmatch(self.teacher.device) is not None,
             f"--device must be cpu, cuda or mps, got {self.teacher.device!r}" + (
                 f"; Ray gives each worker its own GPU (it sets CUDA_VISIBLE_DEVICES per worker), so GPU "
                 f"{self.teacher.device.partition(':')[2]} inside a worker would not be the GPU you mean: use --device cuda "
                 f"(one GPU per worker; --workers N for N GPUs) and choose the GPUs with "
                 f"CUDA_VISIBLE_DEVICES={self.teacher.device.partition(':')[2]} kdstore precompute ..."
                 if self.teacher.device.startswith("cuda:") else "")),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        # a local Path, or a UPath on object storage (s3://bucket/prefix), parsed once here
        object.__setattr__(self, "store", layout.root_of(self.store))


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
    shards_lost: list[int] = field(default_factory=list)  # handed out again after their worker or node died
    workers_lost: int = 0
    warnings: list[str] = field(default_factory=list)

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
        # Ray 2.60 turns token authentication on for a new local cluster and logs a warning
        # saying so on every start (unless RAY_AUTH_MODE is set before Ray is imported). The
        # embedded cluster keeps that default, without the warning; a joined cluster
        # (--ray-address) keeps its own settings and warnings.
        auth_log = logging.getLogger(RAY_AUTH_LOGGER)
        level = auth_log.level
        auth_log.setLevel(logging.ERROR)
        try:
            ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
        finally:
            auth_log.setLevel(level)
    return True


def _auto_workers(cpus: float, gpu: bool, gpus_per_worker: float = 1.0) -> int:
    if gpu:
        return max(1, int(ray.cluster_resources().get("GPU", 1) / gpus_per_worker))
    return int(max(1, min(4, cpus)))


def plan_store(cfg: PrecomputeConfig, urls: list[str]) -> Store:
    """Reuse the store when the inputs match; otherwise record the input shards (``store.json``).

    Nothing is read from the inputs here: the workers list each shard as they read it for the
    teacher (:mod:`kdstore.store.listing`). A format 1 store is refused (``--overwrite`` starts it over).
    """
    root = cfg.store
    if layout.store_file(root).exists():
        old_format = check_format_version(read_json(layout.store_file(root), layout.STORE_FILE)) < FORMAT_VERSION
        store = open_store(root)
        planned = [recorded_to_absolute(store, u) for u in store.manifest.input_urls]
        given = [normalize_url(u) for u in urls]  # a/b/../x.tar and a/x.tar name the same shard
        if planned != given or old_format:
            if not cfg.overwrite:
                if old_format:
                    raise StoreMismatchError(
                        f"store {root} is format {store.manifest.format_version} (kdstore {store.manifest.kdstore_version}); "
                        f"this kdstore reads it but precomputes into format {FORMAT_VERSION} stores only: use another "
                        "--store, or --overwrite to delete it and start over"
                    )
                first = next((i for i, (p, g) in enumerate(zip(planned, given)) if p != g), min(len(planned), len(given)) - 1)
                raise StoreMismatchError(
                    f"store {root} was planned for other input shards ({len(planned)} shards, "
                    f"#{first} {planned[first]!r}) than given ({len(given)}, #{first} {given[first]!r}); "
                    "use another --store, or --overwrite to delete it and start over"
                )
            shutil.rmtree(layout.teachers_dir(root), ignore_errors=True)
            shutil.rmtree(layout.listings_dir(root), ignore_errors=True)
            for path in (layout.store_file(root), layout.samples_path(root)):
                path.unlink(missing_ok=True)
        else:
            return store
    start_plan(root, urls)
    return open_store(root)


def _work(store: Store) -> list[ShardInfo]:
    """Every input shard that is not skipped, in input order, with its absolute URL (the recorded
    one made absolute; store-relative ones under the store). Pending shards have ``row_start=None``."""
    out = [replace(s, url=recorded_to_absolute(store, s.url)) for s in store.shards]
    for i in store.pending_shards:
        url = recorded_to_absolute(store, store.manifest.input_urls[i])
        out.append(ShardInfo(index=i, url=url, row_start=None, num_rows=0))
    return sorted(out, key=lambda s: s.index)


def _listed_keys(store: Store, shard: ShardInfo) -> list[str] | None:
    """The keys a worker must find in ``shard`` (listed by an earlier teacher or run), or None."""
    if shard.row_start is not None:
        return list(store.keys[shard.row_start : shard.row_stop])
    table = read_listing(store.path, shard.index)
    return None if table is None else table.column("key").to_pylist()


def input_label_names(urls: Sequence[str]) -> tuple[tuple[str, ...], str]:
    """The label names of the input shards: ``classes.json`` beside them (written by ``kdstore
    shards``), ``((), "")`` when there is none. Folders that disagree are refused: one label id
    would mean two classes in one store."""
    found: dict[tuple[str, ...], str] = {}
    for folder in sorted({os.path.dirname(u) for u in urls if not has_scheme(u)}):
        path = os.path.join(folder or ".", CLASSES_FILE)
        if os.path.isfile(path):
            try:
                names = tuple(str(c) for c in json.loads(Path(path).read_text(encoding="utf-8"))["classes"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise InputError(f"{path}: not a kdstore classes.json ({exc})") from None
            found.setdefault(names, path)
    if len(found) > 1:
        (a, pa), (b, pb) = list(found.items())[:2]
        raise InputError(f"the input shards number their labels differently: {pa} has {list(a)}, {pb} has {list(b)}; "
                         "write them with one order (kdstore shards folder --classes)")
    return next(iter(found.items()), ((), ""))


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def check_class_names(teacher: str, class_names: Sequence[str], label_names: Sequence[str], source: str) -> list[str]:
    """Refuse when the teacher's declared classes and the inputs' label names name the same
    classes in another order (label id i would be compared with the teacher's logit i); a
    warning (returned) when they differ otherwise. Names compare case- and punctuation-blind
    (``T-shirt-top`` is ``T-shirt/top``)."""
    if not class_names or not label_names:
        return []
    t, l = [_norm(c) for c in class_names], [_norm(c) for c in label_names]
    if t == l:
        return []
    moved = [name for i, name in enumerate(label_names) if l[i] in t and t.index(l[i]) != i]
    order = ",".join(class_names)
    if moved:
        raise StoreMismatchError(
            f"teacher {teacher} numbers its classes {list(class_names)}, but the input shards' {source} numbers the "
            f"labels {list(label_names)}: label {moved[0]!r} is id {label_names.index(moved[0])} there and logit "
            f"{t.index(_norm(moved[0]))} for the teacher. Write the shards in the teacher's order: "
            f"kdstore shards folder DIR OUT --classes {shlex.quote(order)} --overwrite (folder names; or a file, "
            "one name per line)")
    return [f"teacher {teacher} declares classes {list(class_names)}; the input shards' {source} names the labels "
            f"{list(label_names)}: check that label id i is the teacher's class i"]


def _teacher_spec(cfg: PrecomputeConfig, described: dict) -> TeacherSpec:
    outputs = tuple(OutputSpec.parse(o) for o in cfg.outputs)
    return TeacherSpec(
        name=described["name"],
        fingerprint=described["fingerprint"],
        factory=cfg.teacher.factory,
        input_key=described["input_key"],
        outputs=outputs,
        temperature=cfg.temperature,
        dtype=cfg.dtype,
        views=cfg.views,
        augment=AugmentSpec.parse(cfg.augment).to_text(),
        transform=TransformSpec.parse(cfg.transform).to_text(),
        sampler=SAMPLER if any(o.token_reduce == "sample" for o in outputs) else "",
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
            details = "; ".join(f"{k}: stored {doc_old.get(k, '')!r}, now {doc_new.get(k, '')!r}" for k in diff)
            raise StoreMismatchError(
                f"teacher {spec.name!r} in {cfg.store} was precomputed differently ({details}); "
                "use another --teacher-name, or --overwrite to recompute it"
            )
        if cfg.overwrite:
            shutil.rmtree(layout.teacher_dir(cfg.store, spec.name))
    write_teacher_spec(cfg.store, spec)


def preflight(cfg: PrecomputeConfig) -> list[str]:
    """Everything checkable before any file or Ray process exists; returns the expanded inputs.

    The factory is imported in the driver (a typo fails here, in milliseconds), the inputs
    expand to at least one shard and local ones exist (with ``--on-error skip``, at least one),
    the store path is not a file. Outputs and options were checked by :class:`PrecomputeConfig`.
    """
    load_factory(cfg.teacher.factory)
    urls = expand_urls(list(cfg.inputs))
    missing = [u for u in urls if missing_local(u)]
    if missing and (cfg.on_error == "fail" or len(missing) == len(urls)):
        more = f" ({len(missing)} of {len(urls)} input shards are missing)" if len(missing) > 1 else ""
        raise InputError(f"shard {missing[0]}: not found{more}")
    with remote_errors(f"store {cfg.store}"):  # an object store answers here first: missing credentials are one line
        if cfg.store.exists() and not cfg.store.is_dir():
            raise InputError(f"--store {cfg.store} is a file; give a folder (created if missing)")
    return urls


def run_precompute(cfg: PrecomputeConfig) -> PrecomputeResult:
    """Run (or resume) one teacher over the inputs into ``cfg.store``."""
    start = time.perf_counter()
    urls = preflight(cfg)
    created = not cfg.store.exists()
    if not is_remote(cfg.store):
        cfg.store.mkdir(parents=True, exist_ok=True)
    try:
        with StoreLock(cfg.store) as lock, _overwrite_lock(cfg):
            started_ray = _ensure_ray(cfg.ray_address)
            try:
                _check_cluster(cfg, urls)
                return _run_locked(cfg, urls, start, lock.token)
            finally:
                if started_ray:
                    ray.shutdown()
    except ClusterError:
        if created and not is_remote(cfg.store):  # a refused cluster leaves no half-made store behind
            _remove_if_only_locks(cfg.store)
        raise


class ClusterError(InputError):
    """The Ray cluster cannot run this job (no GPU for --device cuda, no shared filesystem)."""


def _remove_if_only_locks(root: Path) -> None:
    if all(p.name in (layout.LOCK_FILE, layout.READERS_LOCK_FILE) for p in root.iterdir()):
        shutil.rmtree(root, ignore_errors=True)


def _check_cluster(cfg: PrecomputeConfig, urls: list[str]) -> None:
    if cfg.teacher.device == "cuda" and ray.cluster_resources().get("GPU", 0) < 1:
        raise ClusterError(
            "--device cuda: the Ray cluster has no GPU (Ray found none; check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES), so no worker could start; use --device cpu"
        )
    gpus = ray.cluster_resources().get("GPU", 0)
    per = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else 1
    if cfg.teacher.device == "cuda" and cfg.workers * per > gpus:
        raise ClusterError(
            f"--workers {cfg.workers} with --device cuda needs {per:g} GPU per worker; the Ray cluster has {gpus:g}: "
            f"use --workers {int(gpus / per)} (or 0 = as many as fit)"
        )
    if cfg.ray_address and not is_remote(cfg.store):  # an object store needs no shared filesystem
        check_shared_filesystem(cfg.store, [u for u in urls if not has_scheme(u)][:1])


def _probe(paths: list[str], probe: str, token: str) -> tuple[str, str | None]:
    """On one node: ``(hostname, None)`` when ``probe`` holds ``token`` and ``paths`` exist, else the problem."""
    import socket

    host = socket.gethostname()
    try:
        with open(probe) as fh:
            if fh.read() != token:
                return host, f"{probe} holds another job's token"
    except OSError as exc:
        return host, f"cannot read {probe} ({exc.strerror or exc})"
    for path in paths:
        if not os.path.exists(path):
            return host, f"input shard {path} does not exist there"
    return host, None


def check_shared_filesystem(store: Path, local_inputs: list[str], *, timeout_s: float = 120.0) -> None:
    """Refuse a cluster where some node cannot see the store (and the first local input) at the
    same path: the workers write shard arrays into the store themselves.

    The driver writes a probe file into the store; one task pinned to each alive node reads it.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    probe = store.resolve() / f".kdstore-probe-{token}"
    probe.write_text(token)
    try:
        check = ray.remote(num_cpus=0)(_probe)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = {
            check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                [normalize_url(p) for p in local_inputs], str(probe), token
            ): n.get("NodeManagerAddress", n["NodeID"])
            for n in nodes
        }
        ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            host, problem = ray.get(ref)
            if problem:
                raise ClusterError(
                    f"--ray-address: node {host} ({refs[ref]}) does not see the store at {store.resolve()}: {problem}. "
                    "kdstore needs the store and the input shards on a filesystem mounted at the same path on every "
                    "node ; give a --store (and --inputs) on such a filesystem, or put them in object storage (--store s3://...)"
                )
        if not_ready:
            raise ClusterError(
                f"--ray-address: {len(not_ready)} node(s) (first {refs[not_ready[0]]}) did not answer a filesystem check "
                f"within {timeout_s:.0f}s; check the cluster with `ray status`"
            )
    finally:
        probe.unlink(missing_ok=True)


def _overwrite_lock(cfg: PrecomputeConfig):
    """``--overwrite`` deletes stored outputs: no reader may hold the store meanwhile."""
    if cfg.overwrite:
        return store_lock(cfg.store, shared=False, what="kdstore precompute --overwrite")
    return contextlib.nullcontext()


def _run_locked(cfg, urls, start, fence_token: str) -> PrecomputeResult:
    cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)))
    gpu = cfg.teacher.device.startswith("cuda")
    gpus_per_worker = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1.0 if gpu else 0.0)
    workers = cfg.workers or _auto_workers(cpus, gpu, gpus_per_worker or 1.0)
    cpus_per_worker = cfg.cpus_per_worker if cfg.cpus_per_worker is not None else min(1.0, cpus / (workers + 1))
    if cfg.cpus_per_worker is not None:
        threads = max(1, int(cfg.cpus_per_worker))
    else:
        threads = max(1, int(cpus // workers)) if not cfg.ray_address else None
    Actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(ShardProcessor)
    # KDSTORE_PREFETCH: decoded batches each actor's reader thread keeps ready (0: no reader thread;
    # benchmarks/precompute.py compares both)
    prefetch = int(os.environ.get("KDSTORE_PREFETCH", "2"))
    pool = WorkerPool(lambda: Actor.remote(cfg.teacher, num_threads=threads, amp=cfg.amp, prefetch=prefetch), workers)
    try:
        return _run_with_actors(cfg, urls, start, fence_token, pool)
    finally:  # also when planning or the teacher check fails: no actor outlives the job
        pool.kill_all()


def _driver_pinned(remote_cls):
    """``remote_cls`` placed on the driver's own node (it lives and dies with the job, not with a worker node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return remote_cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))


def _run_with_actors(cfg, urls, start, fence_token: str, pool: WorkerPool) -> PrecomputeResult:
    label_names, source = input_label_names(urls)
    warnings: list[str] = []
    try:
        if label_names:  # checked before the plan records the inputs (a refusal leaves no store behind)
            described = pool.describe()
            warnings = check_class_names(described["name"], described["class_names"], label_names, source)
        store = plan_store(cfg, urls)  # while the actors load the teacher
        described = pool.describe()
    except (RayTaskError, RayActorError) as exc:
        raise _unwrap(exc) from None
    spec = replace(_teacher_spec(cfg, described), class_names=tuple(described["class_names"]), label_names=label_names)
    _check_teacher(cfg, spec)
    clean_partial(cfg.store, spec.name)
    teacher = store.teacher(spec.name)
    done = teacher.done_records()
    work = _work(store)
    todo = [s for s in work if s.index not in done]
    skipped_shards = list(store.manifest.skipped_shards)
    bar = tqdm(
        total=None if store.pending_shards else sum(s.num_rows for s in todo),  # unknown until listed
        unit="sample",
        desc=f"precompute {spec.name}",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    progress = _driver_pinned(ray.remote(num_cpus=0)(_Progress)).remote()
    # a worker's working directory may differ from the driver's: give it an absolute path or the URL
    root = str(cfg.store) if is_remote(cfg.store) else os.path.abspath(cfg.store)
    pending: dict = {}
    queue = list(todo)
    losses: dict[int, int] = {}
    lost_shards: list[int] = []
    rows_run = skipped = 0
    try:
        while queue or pending:
            pool.poll()
            while queue and pool.free:
                actor, shard = pool.free.pop(), queue.pop(0)
                ref = actor.run_shard.remote(
                    root, spec, shard, _listed_keys(store, shard),
                    batch_size=cfg.batch_size, on_error=cfg.on_error, fence_token=fence_token, progress=progress,
                )
                pending[ref] = (actor, shard)
            waiting = list(pending) or pool.wait_refs()
            ready, _ = ray.wait(waiting, num_returns=1, timeout=0.5) if waiting else ([], [])
            with contextlib.suppress(RayActorError):
                bar.update(max(0, ray.get(progress.total.remote()) - bar.n))
            if not ready or ready[0] not in pending:
                continue
            actor, shard = pending.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except RayTaskError as exc:
                raise _unwrap(exc) from None
            except RayActorError:  # its process or node is gone: the shard goes to another actor
                shard_lost(losses, shard.index, urls[shard.index])
                lost_shards.append(shard.index)
                queue.insert(0, shard)
                pool.lost(actor)
                continue
            pool.free.append(actor)
            if isinstance(record, dict):  # an unreadable shard, skipped for the whole store (--on-error skip)
                skipped_shards.append(record)
                continue
            rows_run += record.num_rows
            skipped += len(record.skipped)
            bar.set_postfix(shards=f"{len(done) + (len(todo) - len(queue) - len(pending))}/{len(work)}", skipped=skipped)
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref)
        ray.kill(progress)
    sealed = seal(cfg.store)  # every shard listed now: samples.parquet and the sealed store.json
    if sealed is None:
        raise InputError(f"store {cfg.store}: some input shards are still unlisted after the run; rerun precompute")
    if not sealed.shards:
        raise InputError(f"no readable input shard; first problem: {skipped_shards[0]['reason'] if skipped_shards else '?'}")
    return PrecomputeResult(
        store=cfg.store,
        teacher=spec.name,
        rows=sealed.num_rows,
        shards_total=len(sealed.shards),
        shards_run=len(todo) - (len(sealed.skipped_shards) - len(store.manifest.skipped_shards)),
        shards_already_done=len(done),
        samples_skipped=skipped + sum(len(r.skipped) for r in done.values()),
        seconds=time.perf_counter() - start,
        skipped_shards=list(sealed.skipped_shards),
        rows_run=rows_run,
        shards_lost=sorted(lost_shards),
        workers_lost=pool.workers_lost,
        warnings=warnings,
    )
