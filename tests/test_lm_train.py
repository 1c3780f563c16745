"""LM batches from a real store joined with real token shards, and the token loss kinds wired
through the trainer (`kdstore train` with model.arch = "gpt"), checked against hand computation."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from kdstore.cli.main import main
from kdstore.pipeline.lm_corpus import read_npy
from kdstore.pipeline.lm_model import GPT, GPTConfig
from kdstore.store import open_store
from kdstore.store.errors import InputError, StoreMismatchError
from kdstore.store.schema import (
    TOKENS_SAMPLE_COUNTS,
    TOKENS_SAMPLE_IDS,
    TOKENS_TOPK_IDS,
    TOKENS_TOPK_LOGPROBS,
    TOKENS_TOPK_RESIDUAL,
)
from kdstore.train.config import parse_config
from kdstore.train.lm_data import check_tokenizer, lm_batches, pack_batch
from kdstore.train.lm_train import run_lm
from kdstore.train.losses_tokens import taid_topk_kl
from lm_fixture import build_lm, precompute

T, K, S = 2.0, 6, 10
FIELDS = [TOKENS_TOPK_LOGPROBS, TOKENS_TOPK_IDS, TOKENS_TOPK_RESIDUAL, TOKENS_SAMPLE_IDS, TOKENS_SAMPLE_COUNTS]


@pytest.fixture(scope="module")
def lm_store(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("lmt")
    teacher, tars = build_lm(root)
    precompute(root / "store", teacher, tars, (f"tokens:topk:{K}", f"tokens:sample:{S}"), temperature=T, seed=3)
    return root / "store", teacher, tars


def test_batches_join_store_and_token_shards(lm_store):
    store_path, teacher_dir, tars = lm_store
    store = open_store(store_path)
    plan = check_tokenizer(store, "gpt")
    eos = plan["eos_id"]
    t = store.teacher("gpt")
    want_rows = []
    for shard, tar in zip(store.shards, tars):
        cols = {f: t.read_tokens(f, shard.index) for f in FIELDS}
        for i, s in enumerate(wds.WebDataset(str(tar), shardshuffle=False)):
            want_rows.append((read_npy(s["ids.npy"]), read_npy(s["doc.npy"]), {f: cols[f][i] for f in FIELDS}))
    batches = list(lm_batches(store, "gpt", FIELDS, batch_size=4, eos_id=eos, epoch=None))
    assert sum(len(b["ids"]) for b in batches) == store.num_rows == len(want_rows)
    assert [len(b["ids"]) for b in batches][:-1] == [4] * (len(batches) - 1)  # batches cross shard boundaries
    got = [(b, i) for b in batches for i in range(len(b["ids"]))]
    for (b, i), (ids, doc, fields) in zip(got, want_rows):
        np.testing.assert_array_equal(b["ids"][i].numpy(), ids)
        np.testing.assert_array_equal(b["doc"][i].numpy(), doc)
        for f in FIELDS:
            np.testing.assert_array_equal(b[f][i].numpy(), fields[f].astype(b[f].numpy().dtype))
        real = doc >= 0
        np.testing.assert_array_equal(b["kd_mask"][i].numpy(), real & (ids != eos))
        same_doc = np.r_[(doc[1:] == doc[:-1]) & real[:-1], False]
        np.testing.assert_array_equal(b["ce_mask"][i].numpy(), same_doc & (ids != eos))
    # rows of different lengths: padding is eos / doc -1 / zero fields, out of both masks
    short = {"ids": np.array([5, 6, 7]), "doc": np.array([0, 0, 0]), TOKENS_TOPK_IDS: np.ones((3, K), np.uint16)}
    longer = {"ids": np.array([1, 2, eos, 3, 4]), "doc": np.array([0, 0, 0, 1, 1]), TOKENS_TOPK_IDS: np.ones((5, K), np.uint16)}
    packed = pack_batch([short, longer], [TOKENS_TOPK_IDS], eos)
    assert packed["ids"][0].tolist() == [5, 6, 7, eos, eos] and packed["doc"][0].tolist() == [0, 0, 0, -1, -1]
    assert packed["kd_mask"].tolist() == [[True] * 3 + [False] * 2, [True, True, False, True, True]]
    assert packed["ce_mask"].tolist() == [[True, True, False, False, False], [True, True, False, True, False]]
    assert packed[TOKENS_TOPK_IDS].dtype == torch.int64 and packed[TOKENS_TOPK_IDS][0, 3:].sum() == 0
    # a seeded epoch shuffles but keeps every row once
    shuffled = list(lm_batches(store, "gpt", FIELDS, batch_size=5, eos_id=eos, epoch=1, seed=4))
    key = lambda x: tuple(x.tolist())
    assert sorted(key(r) for b in shuffled for r in b["ids"]) == sorted(key(torch.from_numpy(i)) for i, _, _ in want_rows)


def test_tokenizer_mismatch_is_refused(lm_store, tmp_path):
    store_path, _, tars = lm_store
    store = open_store(store_path)
    with pytest.raises(StoreMismatchError, match="student tokenizer"):
        check_tokenizer(store, "gpt", tokenizer=tars[0])
    plan_path = next(tars[0].parent.glob("lm_plan.*.json"))
    saved = plan_path.read_text()
    try:
        plan_path.write_text(json.dumps({**json.loads(saved), "tokenizer_sha256": "0" * 64}))
        with pytest.raises(StoreMismatchError, match="rebuild them"):
            check_tokenizer(store, "gpt")
    finally:
        plan_path.write_text(saved)


def _config(store_path, out, loss, **train):
    return parse_config({
        "data": {"store": str(store_path), "train_shards": ["0..2"], "batch_size": 4},
        "model": {"arch": "gpt", "depth": 1, "width": 16, "heads": 2},
        "optim": {"lr": 1e-3, "weight_decay": 0.0},
        "train": {"out_dir": str(out), "steps": 2, "seed": 11, **train},
        "loss": loss,
    })


def _hand(logits, batch, eos):
    """The three token losses computed by hand (plain loops over positions), at step 0."""
    ce, topk, samp, renorm = [], [], [], []
    for i in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            z = logits[i, t].double()
            if batch["ce_mask"][i, t]:
                ce.append(-(z - torch.logsumexp(z, 0))[batch["targets"][i, t]])
            if not batch["kd_mask"][i, t]:
                continue
            q = torch.softmax(z / T, 0)
            p = batch[TOKENS_TOPK_LOGPROBS][i, t].double().exp()
            ids = batch[TOKENS_TOPK_IDS][i, t]
            r = batch[TOKENS_TOPK_RESIDUAL][i, t].double()
            tail = 1 - q[ids].sum()
            topk.append((p * (p.log() - q[ids].log())).sum() + r * (r.log() - tail.log()))
            pn = p / p.sum()
            renorm.append((pn * (pn.log() - q[ids].log())).sum())
            c = batch[TOKENS_SAMPLE_COUNTS][i, t].double()
            sid = batch[TOKENS_SAMPLE_IDS][i, t]
            samp.append(-(c / c.sum() * q[sid].log()).sum())
    mean = lambda xs: float(torch.stack(xs).mean())
    return {"token_ce": mean(ce), "token_topk_kd": mean(topk) * T * T, "token_sampled_kd": mean(samp) * T * T,
            "renormalized": mean(renorm) * T * T}


def test_token_losses_through_the_trainer_by_hand(lm_store, tmp_path):
    store_path, _, _ = lm_store
    loss = [{"kind": "token_ce", "weight": 0.5}, {"kind": "token_topk_kd", "teacher": "gpt"},
            {"kind": "token_sampled_kd", "teacher": "gpt", "weight": 2.0},
            {"kind": "token_topk_kd", "teacher": "gpt", "renormalize": True, "weight": 0.25}]
    cfg = _config(store_path, tmp_path / "run", loss)
    seen = {}
    summary = run_lm(cfg, on_step=lambda step, info: seen.setdefault(step, info))
    assert summary["steps"] == 2 and summary["teacher"] == "gpt"
    batch = seen[0]["batch"]
    plan = json.loads(next(store_path.parent.glob("shards/lm_plan.*.json")).read_text())
    student = GPT(GPTConfig(vocab_size=plan["vocab_size"], context=plan["seq_len"], depth=1, width=16, heads=2, seed=11))
    with torch.no_grad():
        logits = student(batch["ids"], batch["doc"])
    hand = _hand(logits, batch, plan["eos_id"])
    parts = seen[0]["parts"]
    for i, kind in enumerate(("token_ce", "token_topk_kd", "token_sampled_kd")):
        assert parts[f"loss/{i}.{kind}"] == pytest.approx(hand[kind], rel=1e-4), kind
    assert parts["loss/3.token_topk_kd"] == pytest.approx(hand["renormalized"], rel=1e-4)
    assert float(seen[0]["loss"]) == pytest.approx(0.5 * hand["token_ce"] + hand["token_topk_kd"]
                                                   + 2 * hand["token_sampled_kd"] + 0.25 * hand["renormalized"], rel=1e-4)
    assert (tmp_path / "run" / "student.safetensors").is_file()


def test_kdstore_train_cli_runs_gpt_and_refuses_mixed_kinds(lm_store, tmp_path):
    store_path, _, _ = lm_store
    toml = tmp_path / "lm.toml"
    toml.write_text(f'''[data]
store = "{store_path}"
train_shards = ["0..1"]
eval_shards = ["2"]
batch_size = 4
[model]
arch = "gpt"
depth = 1
width = 16
heads = 2
[train]
out_dir = "{tmp_path / 'cli'}"
steps = 3
[[loss]]
kind = "token_topk_kd"
teacher = "gpt"
''')
    result = CliRunner().invoke(main, ["train", str(toml), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval"]["tokens"] > 0 and 0 <= summary["eval"]["acc"] <= 1
    assert len((tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()) == 3
    with pytest.raises(InputError, match="token losses"):
        run_lm(_config(store_path, tmp_path / "x", [{"kind": "kd", "teacher": "gpt"}]))
    # the stored temperature is used; another one is refused
    with pytest.raises(InputError, match="differs from the temperature"):
        run_lm(_config(store_path, tmp_path / "y", [{"kind": "token_topk_kd", "teacher": "gpt", "temperature": 1.0}]))
    from kdstore.train.recipe import run

    mlp = _config(store_path, tmp_path / "z", [{"kind": "token_ce"}])
    with pytest.raises(InputError, match="arch"):
        run(mlp.replace(model=dataclasses.replace(mlp.model, arch="mlp")))
    shutil.rmtree(tmp_path / "cli")


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "student.safetensors"))


class _Stop(Exception):
    pass


def test_gpt_loop_stops_and_resumes_to_identical_weights(lm_store, tmp_path):
    """Warmup + cosine, TAID's schedule and a checkpoint every 3 steps: a run killed after step 5 and
    resumed from its step-3 checkpoint ends with bit-identical weights, metrics and TAID lambda."""
    store_path, _, _ = lm_store
    loss = [{"kind": "token_ce", "weight": 0.5}, {"kind": "token_taid", "teacher": "gpt"}]

    def cfg(out):
        c = _config(store_path, out, loss, steps=0, epochs=2, checkpoint_every_steps=3)
        return c.replace(optim=dataclasses.replace(c.optim, warmup_steps=2, schedule="cosine", lr=3e-3))

    seen = {}
    full = run_lm(cfg(tmp_path / "full"), on_step=lambda step, info: seen.setdefault(step, info))
    assert full["steps"] == 2 * full["steps_per_epoch"] == 12  # 21 rows in batches of 4 (last one short)
    # TAID through the trainer at step 0: lam = 0.4 (the schedule's start) on the stored top-k, by hand
    plan = json.loads(next(store_path.parent.glob("shards/lm_plan.*.json")).read_text())
    student = GPT(GPTConfig(vocab_size=plan["vocab_size"], context=plan["seq_len"], depth=1, width=16, heads=2, seed=11))
    b = seen[0]["batch"]
    with torch.no_grad():
        hand = taid_topk_kl(student(b["ids"], b["doc"]), b[TOKENS_TOPK_LOGPROBS], b[TOKENS_TOPK_IDS],
                            b[TOKENS_TOPK_RESIDUAL], 0.4, b["kd_mask"], temperature=T)
    assert seen[0]["parts"]["loss/1.token_taid"] == pytest.approx(float(hand), rel=1e-5)
    log = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lams, lrs = [x["taid/lambda"] for x in log], [x["lr"] for x in log]
    assert lams[0] == 0.4 and all(b >= a for a, b in zip(lams, lams[1:])) and lams[-1] > 0.4
    assert lrs[0] == pytest.approx(1.5e-3) and lrs[1] == pytest.approx(3e-3) and lrs[-1] < 3e-4  # warmup, cosine

    def stop(step, info):
        if step == 4:
            raise _Stop

    with pytest.raises(_Stop):
        run_lm(cfg(tmp_path / "cut"), on_step=stop)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-000000003.pt"]
    with pytest.raises(InputError, match="not empty"):
        run_lm(cfg(tmp_path / "cut"))
    after = {}
    resumed = run_lm(cfg(tmp_path / "cut"), resume=True, on_step=lambda step, info: after.setdefault(step, info))
    assert resumed["steps"] == 12 and resumed["taid_lambda"] == full["taid_lambda"]
    # the resumed run reads the same rows and ragged fields at each step (batch 3 spans shards 0 and 1 of 7 rows)
    assert sorted(after) == list(range(3, 12))
    for step, info in after.items():
        want = seen[step]["batch"]
        assert sorted(info["batch"]) == sorted(want)
        for name, value in want.items():
            assert torch.equal(info["batch"][name], value), (step, name)
    a, c = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert sorted(a) == sorted(c) and all(torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
    with pytest.raises(InputError, match="other settings"):
        run_lm(_config(store_path, tmp_path / "cut", loss, steps=0, epochs=3, checkpoint_every_steps=3), resume=True)


def _ddp_worker(rank: int, world: int, port: int, store_path: str, out: str, result: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from pathlib import Path

    cfg = _config(Path(store_path), Path(out), [{"kind": "token_topk_kd", "teacher": "gpt"}], steps=0, epochs=1,
                  device="cpu")
    seen = {}

    def keep(step, info):
        seen[step] = (info["batch"]["ids"].clone(), {k: v.detach().clone() for k, v in info["model"].state_dict().items()})

    summary = run_lm(cfg, on_step=keep)
    torch.save({"summary_steps": summary["steps"], "world": summary["world_size"],
                "ids": [seen[s][0] for s in sorted(seen)], "weights": seen[max(seen)][1]}, result)


def test_gpt_loop_under_ddp_two_cpu_ranks(lm_store, tmp_path):
    """torchrun-style env, gloo: each rank takes every other batch, and the replicas stay identical."""
    import socket

    import torch.multiprocessing as mp

    store_path, _, _ = lm_store
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, str(store_path), str(tmp_path / "ddp"), results[r]))
             for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=600)
    assert [proc.exitcode for proc in procs] == [0, 0]
    got = [torch.load(r, weights_only=True) for r in results]
    # 21 rows in batches of 4 = 6 global batches (the last one short) = 3 per rank
    assert [g["summary_steps"] for g in got] == [3, 3] and [g["world"] for g in got] == [2, 2]
    store = open_store(store_path)
    eos = check_tokenizer(store, None)["eos_id"]
    order = list(lm_batches(store, None, (), batch_size=4, eos_id=eos, epoch=0, seed=11,
                            shards=store.select_shards(["0..2"])))
    for rank, g in enumerate(got):
        for local, ids in enumerate(g["ids"]):
            assert torch.equal(ids, order[2 * local + rank]["ids"])
    assert all(torch.equal(got[0]["weights"][k], got[1]["weights"][k]) for k in got[0]["weights"])
    assert (tmp_path / "ddp" / "student.safetensors").is_file()
