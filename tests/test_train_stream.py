"""The streaming trainer on a real store: Fashion-MNIST tars → real Ray precompute → training.

Covers the join (keys, labels, targets), exactly-once epochs across ranks × workers (in
process and under torchrun/gloo), augmentation replay, the mismatch refusal, exact resume
after SIGKILL, every loss kind end to end, online KD and the CLI.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from kdstore.pipeline.augment import apply_view
from kdstore.pipeline.datasets import load_fashion_mnist
from kdstore.pipeline.decode import decode_image
from kdstore.pipeline.shards import iter_samples
from kdstore.pipeline.zoo import FashionCNN, fashion_cnn
from kdstore.store import open_store
from kdstore.store.errors import InputError, StoreMismatchError
from kdstore.train.config import parse_config
from kdstore.train.dataset import InputCache, StreamingDataset, collate, shuffle_order, split_contiguous
from kdstore.train.recipe import run

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
SHARD = 100
TRAIN_SHARDS = 4


def _write_tar(path: Path, images, labels, keys) -> None:
    with wds.TarWriter(str(path)) as sink:
        for img, lab, key in zip(images, labels, keys):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            sink.write({"__key__": key, "png": buf.getvalue(), "cls": str(int(lab)).encode()})


def _precompute(store: Path, inputs: str, name: str, weights: Path, **kw) -> None:
    from kdstore.pipeline.job import PrecomputeConfig, run_precompute
    from kdstore.pipeline.teacher import TeacherLoad

    load = TeacherLoad(factory="kdstore.pipeline.zoo:fashion_cnn", name=name, layers=("embed", "features"),
                       kwargs=(("weights", str(weights)),))
    run_precompute(PrecomputeConfig(store=store, inputs=(inputs,), teacher=load, progress=False, **kw))


@pytest.fixture(scope="module")
def kd(tmp_path_factory, ray_session):
    """Shards (4 train × 100 + 1 test × 100) and a store with teachers cnn, cnn2 and cnnv (2 views)."""
    root = tmp_path_factory.mktemp("kd")
    data = root / "data"
    data.mkdir()
    images, labels = load_fashion_mnist("train")
    for s in range(TRAIN_SHARDS):
        sl = slice(s * SHARD, (s + 1) * SHARD)
        _write_tar(data / f"train-{s:06d}.tar", images[sl], labels[sl], [f"train_{i:05d}" for i in range(sl.start, sl.stop)])
    test_images, test_labels = load_fashion_mnist("test")
    _write_tar(data / "test-000000.tar", test_images[:SHARD], test_labels[:SHARD], [f"test_{i:05d}" for i in range(SHARD)])
    weights = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        weights.append(root / f"cnn{seed}.pt")
        torch.save(FashionCNN().state_dict(), weights[-1])
    inputs = str(data / "{train-{000000..000003},test-000000}.tar")
    outputs = ("logits", "topk:3", "embedding:embed", "features:features:mean", "scores")
    _precompute(root / "store", inputs, "cnn", weights[0], outputs=outputs)
    _precompute(root / "store", inputs, "cnn2", weights[1], outputs=("logits",))
    _precompute(root / "store", inputs, "cnnv", weights[0], outputs=("logits",), views=2,
                augment="rrc:scale=0.5-1;hflip:p=0.5", seed=3)
    return {"root": root, "data": data, "store": root / "store", "weights": weights}


def _keys(batches) -> list[str]:
    return [k for b in batches for k, pad in zip(b["key"], b["pad"].tolist()) if not pad]


def _epoch(ds: StreamingDataset, epoch: int, workers: int, batch_size: int) -> list[dict]:
    ds.set_epoch(epoch)
    return list(DataLoader(ds, batch_size=batch_size, num_workers=workers))


# --------------------------------------------------------------------------- planning (pure)


def test_split_contiguous_and_shuffle_order_cover_everything_once():
    parts = split_contiguous([5, 0, 7, 3], 4)
    sizes = [sum(b - a for _, a, b in p) for p in parts]
    assert sizes == [3, 4, 4, 4]
    covered = sorted((i, r) for p in parts for i, a, b in p for r in range(a, b))
    assert covered == [(i, r) for i, n in enumerate([5, 0, 7, 3]) for r in range(n)]
    order = shuffle_order(1000, 64, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(1000))
    assert not np.array_equal(order, np.arange(1000))
    # The buffer bound: item t of the output was read at most 64 items earlier.
    assert (order - np.arange(1000)).max() <= 64
    assert np.array_equal(shuffle_order(10, 1, np.random.default_rng(0)), np.arange(10))


# --------------------------------------------------------------------------- the join


def test_items_join_tar_inputs_with_their_store_rows(kd):
    store = open_store(kd["store"])
    ds = StreamingDataset(store, shards=["train-"], fields={"cnn": ["logits", "topk/values", "scores/max_prob"]},
                          shuffle_buffer=50, seed=1)
    items = list(ds)
    assert len(items) == TRAIN_SHARDS * SHARD
    assert sorted(i["key"] for i in items) == sorted(store.keys[: TRAIN_SHARDS * SHARD])
    assert [i["row"] for i in items] != sorted(i["row"] for i in items)  # shuffled
    images, labels = load_fashion_mnist("train")
    logits = store.teacher("cnn").read("logits")
    for item in items[::37]:
        row = item["row"]
        assert item["key"] == store.keys[row]
        assert item["label"] == labels[row]
        np.testing.assert_array_equal(item["input"][0].mul(255).round().byte().numpy(), images[row])
        np.testing.assert_array_equal(item["targets"]["cnn"]["logits"], logits[row])
        assert item["valid"] and not item["pad"]


def test_collate_equals_default_collate(kd):
    from torch.utils.data import default_collate

    ds = StreamingDataset(kd["store"], shards=["0", "4"], fields={"cnn": ["logits", "topk/indices", "topk/residual"]},
                          labels="per_class:2", verify="off", world_size=3, rank=0)
    items = list(ds)  # 67 items, one of them a pad
    ours, theirs = collate(items), default_collate(items)

    def same(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, torch.Tensor):
            return a.dtype == b.dtype and torch.equal(a, b)
        return a == b

    assert same(ours, theirs)


def test_exactly_once_per_epoch_across_ranks_and_workers(kd):
    seen_orders = []
    for epoch in (0, 1):
        keys = []
        for rank in (0, 1):
            ds = StreamingDataset(kd["store"], shards=["0..2"], rank=rank, world_size=2, loader_workers=2,
                                  loader_batch_size=16, shuffle_buffer=32, seed=5, verify="off")
            batches = _epoch(ds, epoch, workers=2, batch_size=16)
            assert len(batches) == ds.batches_per_rank()
            keys += _keys(batches)
        counts = Counter(keys)
        assert len(counts) == 3 * SHARD and set(counts.values()) == {1}
        seen_orders.append(keys)
    assert seen_orders[0] != seen_orders[1]


def test_uneven_slots_get_masked_pads(kd):
    # 300 samples over 7 slots: 43 or 42 each; the short ones get one pad.
    ds = StreamingDataset(kd["store"], shards=["0..2"], fields={"cnn": ["logits"]}, rank=0, world_size=7, verify="off")
    items = list(ds)
    assert len(items) == ds.slot_size() == 43
    pads = [i for i in items if i["pad"]]
    assert len(pads) == 1 and pads[0]["label"] == -1 and not pads[0]["valid"]
    assert pads[0]["targets"]["cnn"]["logits"].shape == (10,) and not pads[0]["targets"]["cnn"]["valid"]


def test_resume_mid_epoch_replays_the_rest_of_the_stream(kd):
    def make():
        return StreamingDataset(kd["store"], shards=["train-"], fields={"cnn": ["logits"]}, loader_workers=2,
                                loader_batch_size=8, shuffle_buffer=40, seed=2, verify="off")

    full = _epoch(make(), 1, workers=2, batch_size=8)
    for done in (5, 6):
        ds = make()
        ds.set_resume(done)
        rest = _epoch(ds, 1, workers=2, batch_size=8)
        assert len(rest) == len(full) - done
        assert [b["key"] for b in rest] == [b["key"] for b in full[done:]]
        assert torch.equal(torch.cat([b["input"] for b in rest]), torch.cat([b["input"] for b in full[done:]]))


def test_labeled_subset_is_seeded_and_masks_the_rest(kd):
    def make(seed):
        return StreamingDataset(kd["store"], shards=["train-"], labels="per_class:3", labels_seed=seed, verify="off")

    a, b, c = make(0), make(0), make(1)
    assert np.array_equal(a.labeled, b.labeled) and not np.array_equal(a.labeled, c.labeled)
    items = list(a)
    labeled = [i for i in items if i["label"] >= 0]
    assert Counter(i["label"] for i in labeled) == {k: 3 for k in range(10)}
    assert {i["row"] for i in labeled} == set(np.nonzero(a.labeled)[0].tolist())
    only = StreamingDataset(kd["store"], shards=["train-"], labels="per_class:3", only_labeled=True, verify="off")
    assert sorted(i["row"] for i in only) == sorted(np.nonzero(a.labeled)[0].tolist())


def test_cache_gives_identical_inputs(kd):
    cache = InputCache()
    ds = StreamingDataset(kd["store"], shards=["0"], cache=cache, shuffle_buffer=1, verify="off")
    first, second = [i["input"] for i in ds], [i["input"] for i in ds]
    assert cache.has_all(ds.urls[0], np.arange(SHARD))
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_views_replay_gives_the_student_what_the_teacher_saw(kd):
    store = open_store(kd["store"])
    teacher = fashion_cnn(weights=str(kd["weights"][0]))
    params = store.teacher("cnnv").view_params(1)
    ds = StreamingDataset(store, shards=["1"], fields={"cnnv": ["logits"]}, seed=4, verify="off")
    items = {i["key"]: i for i in ds}
    views = Counter()
    for i, sample in enumerate(iter_samples(kd["data"] / "train-000001.tar")):
        item = items[sample["__key__"]]
        views[item["view"]] += 1
        expected = apply_view(decode_image(sample["png"]), params[i, item["view"]])
        assert torch.equal(item["input"], expected)
        if i % 20 == 0:
            with torch.no_grad():
                logits = teacher(item["input"][None])[0]
            np.testing.assert_allclose(item["targets"]["cnnv"]["logits"].astype(np.float32), logits.numpy(), atol=2e-2, rtol=1e-2)
    assert set(views) == {0, 1}  # both stored views are used
    ds.set_epoch(1)
    later = {i["key"]: i["view"] for i in ds}
    assert all(later[k] == (item["view"] + 1) % 2 for k, item in items.items())  # each row cycles its views
    with pytest.raises(InputError, match="different views"):
        StreamingDataset(store, fields={"cnnv": ["logits"], "cnn": ["logits"]}, verify="off")


# --------------------------------------------------------------------------- mismatch refusal


def _altered_inputs(kd, tmp_path, drop_last: bool) -> str:
    """A copy of the input shards where shard 1 lost its last sample or holds other images."""
    images, labels = load_fashion_mnist("train")
    out = tmp_path / "moved"
    out.mkdir()
    for p in kd["data"].glob("*.tar"):
        (out / p.name).write_bytes(p.read_bytes())
    if drop_last:
        keys = [f"train_{i:05d}" for i in range(SHARD, 2 * SHARD - 1)]
        _write_tar(out / "train-000001.tar", images[SHARD : 2 * SHARD - 1], labels[SHARD : 2 * SHARD - 1], keys)
    else:
        keys = [f"other_{i:05d}" for i in range(SHARD)]
        _write_tar(out / "train-000001.tar", images[-SHARD:], labels[-SHARD:], keys)
    return str(out / "*.tar")


def test_mismatched_shards_are_refused_at_start(kd, tmp_path):
    other = _altered_inputs(kd, tmp_path, drop_last=False)
    for mode in ("full", "quick"):
        with pytest.raises(StoreMismatchError, match=r"train-000001.tar does not match store .*'other_00000'"):
            StreamingDataset(kd["store"], shards=["train-"], inputs=[other], verify=mode)
    # Relocated but identical shards are accepted.
    same = tmp_path / "same"
    same.mkdir()
    for p in kd["data"].glob("*.tar"):
        (same / p.name).write_bytes(p.read_bytes())
    StreamingDataset(kd["store"], inputs=[str(same / "*.tar")], verify="full")


def test_a_shortened_shard_is_refused_at_start_and_while_streaming(kd, tmp_path):
    short = _altered_inputs(kd, tmp_path, drop_last=True)
    with pytest.raises(StoreMismatchError, match="it has 99 samples, the store 100"):
        StreamingDataset(kd["store"], shards=["train-"], inputs=[short], verify="full")
    ds = StreamingDataset(kd["store"], shards=["1"], inputs=[short], verify="off")
    with pytest.raises(StoreMismatchError, match="it ends after 99 samples"):
        list(ds)


def test_cli_prints_one_line_for_a_mismatch(kd, tmp_path):
    other = _altered_inputs(kd, tmp_path, drop_last=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\nstore = "{kd["store"]}"\ninputs = ["{other}"]\n\n[[loss]]\nkind = "ce"\n')
    kdstore = shutil.which("kdstore") or pytest.skip("the kdstore script is not on PATH")
    proc = subprocess.run([kdstore, "train", str(cfg), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: input shard") and "does not match store" in lines[0]


# --------------------------------------------------------------------------- training


def _config(kd, out: Path, losses: list[dict], **sections) -> dict:
    doc = {
        "data": {"store": str(kd["store"]), "train_shards": ["train-"], "eval_shards": ["test-"], "batch_size": 16,
                 "shuffle_buffer": 64, "verify_inputs": "quick", **sections.pop("data", {})},
        "model": {"arch": "mlp", "hidden": 32, **sections.pop("model", {})},
        "optim": {"lr": 3e-3, **sections.pop("optim", {})},
        "train": {"out_dir": str(out), "epochs": 2, "threads": 1, "checkpoint_every_steps": 10, "log_every_steps": 5,
                  "progress": False, **sections.pop("train", {})},
        "loss": losses,
    }
    doc.update(sections)
    return doc


def test_labels_only_training_learns_from_correctly_joined_labels(kd, tmp_path):
    result = run(parse_config(_config(kd, tmp_path / "ce", [{"kind": "ce"}], train={"epochs": 4})))
    # 400 training images, 100 test images: chance is 0.1; a wrong join of inputs and labels stays there.
    assert result.eval["accuracy"] >= 0.45
    assert result.steps == 4 * 25
    log = [json.loads(line) for line in (tmp_path / "ce" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("split") == "eval"] == [25, 50, 75, 100]
    assert (tmp_path / "ce" / "student.pt").is_file() and (tmp_path / "ce" / "summary.json").is_file()


def test_every_loss_kind_trains_end_to_end(kd, tmp_path):
    cache = InputCache()
    terms = [
        {"kind": "ce"},
        {"kind": "kd", "teacher": "cnn", "temperature": 2.0, "sample_weights": "max_prob"},
        {"kind": "topk_kd", "teacher": "cnn", "weight": 0.5},
        {"kind": "feature", "teacher": "cnn", "field": "features/features", "student_layer": "body.fc", "weight": 0.1},
        {"kind": "embedding", "teacher": "cnn", "weight": 0.1},
        {"kind": "multi_kd", "teachers": ["cnn", "cnn2"], "combine": "confidence", "weight": 0.5},
    ]
    result = run(parse_config(_config(kd, tmp_path / "all", terms, train={"epochs": 1})), cache=cache)
    log = [json.loads(line) for line in (tmp_path / "all" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert {f"loss/{i}.{t['kind']}" for i, t in enumerate(terms)} <= set(steps[0])
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert result.eval["teacher_agreement"] is not None
    dho = [{"kind": "dho", "teacher": "cnn", "temperature": 2.0}, {"kind": "embedding", "teacher": "cnn", "weight": 0.1}]
    result = run(parse_config(_config(kd, tmp_path / "dho", dho, train={"epochs": 1}, model={"arch": "cnn", "width": 4})),
                 cache=cache)
    assert {"accuracy_ce_head", "accuracy_kd_head"} <= set(result.eval)


def test_online_kd_runs_the_teacher_on_fresh_augmentations(kd, tmp_path):
    online = {"enabled": True, "teacher": "cnn", "factory": "kdstore.pipeline.zoo:fashion_cnn",
              "teacher_args": {"weights": str(kd["weights"][0])}, "augment": "rrc:scale=0.5-1;hflip:p=0.5"}
    doc = _config(kd, tmp_path / "online", [{"kind": "ce"}, {"kind": "kd", "teacher": "cnn"}], online=online,
                  train={"epochs": 1})
    assert run(parse_config(doc)).steps == 25
    wrong = {**online, "teacher_args": {"weights": str(kd["weights"][1])}}
    with pytest.raises(StoreMismatchError, match="not the same weights"):
        run(parse_config({**doc, "online": wrong}))


KILL_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from kdstore.train.config import parse_config
    from kdstore.train.recipe import run

    doc, kill_at, resume = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"

    def kill(recipe, step, parts):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    run(parse_config(doc), resume=resume, callbacks=[kill])
    """
)


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(kd, tmp_path):
    terms = [{"kind": "ce"}, {"kind": "kd", "teacher": "cnn", "temperature": 2.0}]
    # Checkpoints every 9 steps: the last before the kill is step 27, an odd batch into epoch 1,
    # so the DataLoader's round-robin over the 2 workers must resume on the second one.
    extra = {"data": {"workers": 2, "labels": "per_class:5"}, "train": {"checkpoint_every_steps": 9}}
    ref = run(parse_config(_config(kd, tmp_path / "ref", terms, **extra)))
    doc = _config(kd, tmp_path / "killed", terms, **extra)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), json.dumps(doc), "33", "0"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").glob("*.pt"))
    assert ckpts[-1] == "step-000000027.pt" and not (tmp_path / "killed" / "student.pt").exists()
    state = torch.load(tmp_path / "killed" / "checkpoints" / ckpts[-1], weights_only=True)
    # 2 workers × ceil(200 / 16) = 26 steps per epoch: step 27 is 1 batch into epoch 1.
    assert state["position"]["epoch"] == 1 and state["position"]["batches_done"] == 1
    proc = subprocess.run([sys.executable, str(script), json.dumps(doc), "-1", "1"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = torch.load(tmp_path / "ref" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "student.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == ref.steps  # no step logged twice
    # Resuming under other stream settings is refused.
    with pytest.raises(InputError, match="other settings"):
        run(parse_config({**doc, "data": {**doc["data"], "batch_size": 8}}), resume=True)


DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from torch.utils.data import DataLoader
    from kdstore.train.config import parse_config
    from kdstore.train.dataset import StreamingDataset
    from kdstore.train.recipe import Recipe

    doc, out = json.loads(sys.argv[1]), sys.argv[2]
    recipe = Recipe(parse_config(doc))
    recipe.setup()  # initialises gloo from the torchrun environment
    rank = dist.get_rank()
    ds = StreamingDataset(doc["data"]["store"], shards=["train-"], loader_workers=2, loader_batch_size=16, verify="off")
    keys = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        keys[epoch] = [k for b in DataLoader(ds, batch_size=16, num_workers=2)
                       for k, pad in zip(b["key"], b["pad"].tolist()) if not pad]
    result = recipe.train()
    flat = torch.cat([p.detach().flatten() for p in recipe.model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"keys": keys, "steps": result.steps, "same_weights": all(torch.equal(g, flat) for g in gathered),
                   "world": dist.get_world_size()}, fh)
    recipe.cleanup()
    """
)


def test_torchrun_two_ranks_two_workers_sees_every_key_once_and_trains_in_sync(kd, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    doc = _config(kd, tmp_path / "ddp", [{"kind": "ce"}, {"kind": "kd", "teacher": "cnn"}],
                  data={"workers": 2}, train={"epochs": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), json.dumps(doc), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["same_weights"] for r in ranks)
    assert ranks[0]["steps"] == ranks[1]["steps"] == -(-TRAIN_SHARDS * SHARD // 4 // 16) * 2
    all_keys = {f"train_{i:05d}" for i in range(TRAIN_SHARDS * SHARD)}
    for epoch in ("0", "1"):
        keys = ranks[0]["keys"][epoch] + ranks[1]["keys"][epoch]
        assert len(keys) == len(all_keys) and set(keys) == all_keys


def test_contrastive_term_uses_mined_negatives_from_the_config(kd, tmp_path):
    """`kdstore mine` output feeds a config-selected contrastive term; the value the recipe
    computes equals contrastive_distill on the rows' stored positive / negative vectors."""
    import pyarrow.parquet as pq

    from kdstore.store import open_store
    from kdstore.store.index import IndexSpec
    from kdstore.store.mine import MineSpec
    from kdstore.store.retrieval import mine_store
    from kdstore.train import losses as L
    from kdstore.train.config import LossConfig
    from kdstore.train.mined import MinedNegatives
    from kdstore.train.objective import compute_loss

    path, _ = mine_store(kd["store"], "cnn", "embedding", MineSpec(num_negatives=4, range_max=20), name="hn",
                         index_spec=IndexSpec(kind="flat"), progress=False)
    store = open_store(kd["store"])
    mined = MinedNegatives.load(store, "cnn", "embedding", "hn")
    table = pq.read_table(path).to_pydict()
    row = table["row"][7]
    assert mined.positive[row] == table["positive_row"][7]
    assert mined.negatives[row, : len(table["negative_rows"][7])].tolist() == table["negative_rows"][7]
    term = LossConfig(kind="contrastive", teacher="cnn", negatives="hn", temperature=0.1)
    rows = torch.tensor([3, 250, -1, 42])
    anchor = torch.randn(4, mined.table.shape[1], requires_grad=True)
    batch = {"pad": rows < 0, "label": torch.full((4,), -1), "row": rows,
             "targets": {"cnn": {"valid": torch.ones(4, dtype=torch.bool)}}}
    total, parts = compute_loss([term], {"logits": torch.zeros(4, 10), "proj/0": anchor}, batch, 10, {0: mined})
    keep = torch.tensor([0, 1, 3])
    r = rows[keep]
    expected = L.contrastive_distill(anchor[keep], mined.table[mined.positive[r]], mined.table[mined.negatives[r].clamp(min=0)],
                                     temperature=0.1, neg_mask=mined.negatives[r] >= 0)
    torch.testing.assert_close(total, expected)
    total.backward()
    assert anchor.grad[2].abs().sum() == 0 and anchor.grad[0].abs().sum() > 0

    terms = [{"kind": "ce"}, {"kind": "contrastive", "teacher": "cnn", "negatives": "hn", "temperature": 0.1, "weight": 0.5}]
    run(parse_config(_config(kd, tmp_path / "c", terms, train={"epochs": 1})))
    log = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss/1.contrastive" in r]
    assert steps and all(np.isfinite(r["loss/1.contrastive"]) for r in steps)
    with pytest.raises(InputError, match="kdstore mine"):
        run(parse_config(_config(kd, tmp_path / "d", [{"kind": "contrastive", "teacher": "cnn", "negatives": "nope"}])))
