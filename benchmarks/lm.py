"""LM distillation from stored per-token targets vs CE only vs online KD (GPT student).

One run, end to end through the CLI pieces: a GPT teacher (``kdstore lm-teacher``), train and
held-out token shards in one folder (``kdstore lm-shards``), one precompute storing
``tokens:topk:8``, ``tokens:topk:32`` and ``tokens:sample:12`` over both splits, then one GPT
student per variant, same seed, same batches (train shards in the same seeded order), same
number of epochs:

- ``ce``: next-token CE only;
- ``topk8`` / ``topk32``: top-k KD with the residual as a tail bucket (+ CE, weight ``--ce-weight``);
- ``rskd12``: RS-KD with 12 draws (+ CE);
- ``online_kd``: full-vocabulary forward KL, the teacher running in the loop (+ CE);
- ``taid``: TAID (online only: the teacher in the loop, adaptive lambda) (+ CE).

Reported per variant: held-out next-token CE (nats), accuracy, ECE (15 bins), training
seconds; and for the stored fields bytes/token on disk (``kdstore info``). ``online / store``
is the training-time ratio of ``online_kd`` to ``topk32``. Single runs, one seed: small
differences are noise at the tiny default size.

    python benchmarks/lm.py --out /tmp/lmbench [--teacher-steps 120] [--epochs 2]
Writes benchmarks/results/lm.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from click.testing import CliRunner
from kdstore.cli.main import main
from kdstore.pipeline.lm_model import GPT, GPTConfig
from kdstore.pipeline.lm_teacher import load_lm
from kdstore.store import open_store
from kdstore.store.verify import summarize
from kdstore.train import losses_tokens as LT
from kdstore.train.config import parse_config
from kdstore.train.lm_data import lm_batches, token_plan
from kdstore.train.lm_train import evaluate_lm, run_lm

VARIANTS = {
    "ce": [],
    "topk8": [{"kind": "token_topk_kd", "teacher": "gpt8"}],
    "topk32": [{"kind": "token_topk_kd", "teacher": "gpt"}],
    "rskd12": [{"kind": "token_sampled_kd", "teacher": "gpt"}],
}


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    if result.exit_code != 0:
        raise SystemExit(f"kdstore {' '.join(args)} failed:\n{result.output}")
    return result.output


def _online(store, teacher_dir: Path, kind: str, args, student_cfg: GPTConfig, eos: int) -> dict:
    """The teacher in the loop: full-vocabulary forward KL or TAID, + CE; same batches as the stored variants."""
    teacher, _, _ = load_lm(teacher_dir, device="cpu")
    student = GPT(student_cfg)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = LT.TaidSchedule(total_steps=args.max_steps) if kind == "taid" else None
    train = store.select_shards(["train-"])
    t0, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        for batch in lm_batches(store, None, (), batch_size=args.batch_size, eos_id=eos, epoch=epoch, seed=0, shards=train):
            with torch.no_grad():
                t_logits = teacher(batch["ids"], batch["doc"])
            logits = student(batch["ids"], batch["doc"])
            ce = LT.next_token_ce(logits, batch["targets"], batch["ce_mask"])
            if schedule is None:
                kd = LT.forward_kl(logits, t_logits, batch["kd_mask"])
            else:
                kd = LT.taid_kl(logits, t_logits, schedule.lam, batch["kd_mask"])
            loss = args.ce_weight * ce + kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if schedule is not None:
                schedule.update(kd.detach(), step)
            step += 1
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "steps": step,
            **evaluate_lm(student, store, store.select_shards(["heldout-"]), eos_id=eos)}


def main_(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--teacher-steps", type=int, default=120)
    p.add_argument("--teacher-width", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--train-docs", type=int, default=300)
    p.add_argument("--heldout-docs", type=int, default=60)
    p.add_argument("--student-width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ce-weight", type=float, default=0.5)
    p.add_argument("--result", type=Path, default=Path(__file__).parent / "results" / "lm.json")
    args = p.parse_args(argv)
    out = args.out
    teacher_dir, shards = out / "teacher", out / "shards"
    _cli("lm-teacher", str(teacher_dir), "--steps", str(args.teacher_steps), "--context", str(args.seq_len),
         "--depth", "2", "--width", str(args.teacher_width), "--heads", "4", "--vocab-size", str(args.vocab_size),
         "--limit", str(args.train_docs))
    for split, limit in (("train", args.train_docs), ("heldout", args.heldout_docs)):
        _cli("lm-shards", str(shards), "--tokenizer", str(teacher_dir / "tokenizer.json"), "--seq-len",
             str(args.seq_len), "--split", split, "--limit", str(limit), "--samples-per-shard", "200")
    tars = sorted(shards.glob("*.tar"))
    store_path = out / "store"
    common = ["--store", str(store_path), "--teacher", "kdstore.pipeline.lm_teacher:gpt", "--teacher-arg",
              f"path={teacher_dir}", "--batch-size", "32", "--workers", "1", "--no-progress",
              *[a for t in tars for a in ("--inputs", str(t))]]
    t0 = time.perf_counter()
    _cli("precompute", *common, "--teacher-name", "gpt", "--output", "tokens:topk:32", "--output", "tokens:sample:12")
    precompute_s = time.perf_counter() - t0
    _cli("precompute", *common, "--teacher-name", "gpt8", "--output", "tokens:topk:8")
    store = open_store(store_path)
    per_token = {t["name"]: {f["field"]: round(f["bytes_per_token"], 2) for f in t["fields"] if f.get("ragged")}
                 for t in summarize(store)["teachers"]}
    plan = token_plan(store)
    student_cfg = GPTConfig(vocab_size=plan["vocab_size"], context=plan["seq_len"], depth=1,
                            width=args.student_width, heads=2, seed=0)
    steps_per_epoch = sum(1 for _ in lm_batches(store, None, (), batch_size=args.batch_size, eos_id=plan["eos_id"],
                                                epoch=None, shards=store.select_shards(["train-"])))
    args.max_steps = steps_per_epoch * args.epochs
    results = {}
    for name, kd in VARIANTS.items():
        loss = [{"kind": "token_ce", "weight": args.ce_weight if kd else 1.0}, *kd]
        cfg = parse_config({
            "data": {"store": str(store_path), "train_shards": ["train-"], "eval_shards": ["heldout-"],
                     "batch_size": args.batch_size},
            "model": {"arch": "gpt", "depth": 1, "width": args.student_width, "heads": 2},
            "optim": {"lr": args.lr, "weight_decay": 0.0},
            "train": {"out_dir": str(out / "runs" / name), "epochs": args.epochs, "seed": 0},
            "loss": loss,
        })
        s = run_lm(cfg)
        results[name] = {"seconds": s["seconds"], "steps": s["steps"], **s["eval"]}
        print(name, results[name], flush=True)
    for name in ("online_kd", "taid"):
        results[name] = _online(store, teacher_dir, name, args, student_cfg, plan["eos_id"])
        print(name, results[name], flush=True)
    teacher_eval = json.loads((teacher_dir / "config.json").read_text())["heldout"]
    report = {
        "size": "tiny (CPU smoke size; not a quality claim)",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": platform.platform(), "threads": torch.get_num_threads(),
        "teacher_heldout": teacher_eval, "precompute_seconds_topk32_sample12": round(precompute_s, 1),
        "tokens": {"train_rows": sum(s.num_rows for s in store.select_shards(["train-"])), "seq_len": plan["seq_len"]},
        "bytes_per_token": per_token, "variants": results,
        "online_over_store_time": round(results["online_kd"]["seconds"] / results["topk32"]["seconds"], 2),
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("bytes_per_token", "online_over_store_time")}, indent=1))
    return report


if __name__ == "__main__":
    main_()
