"""LM distillation from stored per-token targets vs CE only vs online full-vocabulary KD (GPT students).

End to end through the CLI pieces: a GPT teacher (``kdstore lm-teacher``, or ``--teacher-dir``
for one trained before), train and held-out token shards (``kdstore lm-shards``), one
precompute storing ``tokens:topk:32`` + ``tokens:sample:12`` (teacher ``gpt``) over both splits (``topk8`` reads
the first 8 of the stored 32, ``token_topk_kd`` ``top_k = 8``; ``--topk8-precompute`` stores
``tokens:topk:8`` with a second precompute, teacher ``gpt8``, instead), then per seed one GPT student per
variant through :func:`kdstore.train.lm_train.run_lm` (the loop ``kdstore train`` runs), all
with the same optimiser steps, batches (train shards in the same seeded order) and warmup +
cosine schedule:

- ``ce``: next-token CE only;
- ``topk8`` / ``topk32``: top-k KD, residual as a tail bucket (+ CE, weight ``--ce-weight``);
- ``topk32_renorm``: the common renormalised top-k (residual dropped), a biased baseline (+ CE);
- ``rskd12``: RS-KD, 12 draws (+ CE);
- ``taid``: TAID from the store (``token_taid`` on ``tokens:topk:32``, adaptive lambda) (+ CE);
- ``online_kd``: full-vocabulary forward KL with the teacher in the loop (+ CE).

Reported per variant (mean and spread over seeds): held-out next-token CE (nats), accuracy,
ECE (15 bins of top-1 confidence), training seconds; the teacher's own figures on the same
held-out tokens; bytes/token per stored field (on disk = compressed Zarr chunks, and
uncompressed); epoch time store / online per seed (the variants run in alternating order
from seed to seed). Writes ``--result`` (benchmarks/results/lm.json).

    python benchmarks/lm.py --out /tmp/lmbench --teacher-dir DIR [--train-docs 900] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
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
from kdstore.train.lm_train import evaluate_lm, lm_teacher, run_lm, token_loss
from kdstore.train.objective import resolve_terms, term_fields
from kdstore.train.objective_tokens import TAID_LAMBDA

STORE_VARIANTS = {
    "topk8": {"kind": "token_topk_kd", "teacher": "gpt", "top_k": 8},
    "topk32": {"kind": "token_topk_kd", "teacher": "gpt"},
    "rskd12": {"kind": "token_sampled_kd", "teacher": "gpt"},
    "taid": {"kind": "token_taid", "teacher": "gpt", "field": "topk"},
    "topk32_renorm": {"kind": "token_topk_kd", "teacher": "gpt", "renormalize": True},
}
ORDER = ["ce", "topk8", "topk32", "rskd12", "taid", "topk32_renorm", "online_kd"]
# the stored fields each store variant needs (bytes/token of the setting = their sum, lse included)
SETTING_FIELDS = {"topk8": ("gpt8", "tokens/topk/"), "topk32": ("gpt", "tokens/topk/"),
                  "rskd12": ("gpt", "tokens/sample/"), "taid": ("gpt", "tokens/topk/"),
                  "topk32_renorm": ("gpt", "tokens/topk/")}


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    if result.exit_code != 0:
        raise SystemExit(f"kdstore {' '.join(args)} failed:\n{result.output}")
    return result.output


def _config(args, store_path: Path, out: Path, loss: list[dict], seed: int, steps_per_epoch: int) -> object:
    warmup = max(1, round(args.warmup_frac * steps_per_epoch * args.epochs))
    return parse_config({
        "data": {"store": str(store_path), "train_shards": ["train-"], "eval_shards": ["heldout-"],
                 "batch_size": args.batch_size},
        "model": {"arch": "gpt", "depth": args.student_depth, "width": args.student_width, "heads": args.student_heads},
        "optim": {"lr": args.lr, "weight_decay": 0.0, "schedule": "cosine", "warmup_steps": warmup, "grad_clip": 1.0},
        "train": {"out_dir": str(out), "epochs": args.epochs, "seed": seed, "threads": args.threads,
                  "checkpoint_every_steps": 0, "progress": False},
        "loss": loss,
    })


def _run(name: str, args, store_path: Path, seed: int, steps_per_epoch: int, teacher) -> dict:
    out = args.out / "runs" / f"{name}-s{seed}"
    loss, online = _variant(name, args, teacher)
    s = run_lm(_config(args, store_path, out, loss, seed, steps_per_epoch), overwrite=True, online_term=online)
    return {"seconds": s["seconds"], "steps": s["steps"], "epochs": s["epochs"], **s["eval"],
            **({"taid_lambda_end": s["taid_lambda"]} if name == "taid" else {})}


def step_times(args, store_path: Path, teacher, steps: int, rounds: int = 2) -> dict:
    """Seconds per optimizer step of each variant: ``steps`` steps (no evaluation), the variants in
    alternating order over ``rounds`` rounds, one process; median ms/step and store ÷ online."""
    per: dict[str, list[float]] = {name: [] for name in ORDER}
    for i in range(rounds):
        for name in ORDER if i % 2 == 0 else ORDER[::-1]:
            loss, online = _variant(name, args, teacher)
            doc = _config(args, store_path, args.out / "step_times" / name, loss, 0, steps).to_dict()
            cfg = parse_config({**doc, "train": {**doc["train"], "steps": steps}, "data": {**doc["data"], "eval_shards": []}})
            s = run_lm(cfg, overwrite=True, online_term=online)
            per[name].append(1000 * s["seconds"] / s["steps"])
            print(f"round {i} {name:10s} {per[name][-1]:.0f} ms/step", flush=True)
    med = {n: statistics.median(v) for n, v in per.items()}
    return {"steps": steps, "rounds": rounds, "ms_per_step": per, "median_ms_per_step": med,
            "store_over_online": {n: round(med[n] / med["online_kd"], 3) for n in STORE_VARIANTS},
            "over_ce_only": {n: round(med[n] / med["ce"], 3) for n in ORDER},
            "loadavg_end": [round(x, 2) for x in os.getloadavg()]}


def loss_times(args, store_path: Path, reps: int = 15) -> dict:
    """The token terms' forward + backward on one real batch of the store, each store variant (and
    CE) with and without :func:`~kdstore.train.losses_tokens.shared_log_probs`, alternating,
    ``reps`` times; median ms and unshared ÷ shared (the gain of computing the student's
    log-softmax once per step)."""
    store = open_store(store_path)
    eos = token_plan(store)["eos_id"]
    gen = torch.Generator().manual_seed(0)
    out: dict[str, dict] = {}
    for name in ["ce", *STORE_VARIANTS]:
        loss, _ = _variant(name, args, None)
        cfg = _config(args, store_path, args.out / "loss_times", loss, 0, 1)
        terms = resolve_terms(cfg.loss, store)
        teacher = lm_teacher(cfg)
        fields = sorted({f for t in terms for f in (term_fields(t) if t.teacher_names else ())})
        batch = next(iter(lm_batches(store, teacher, fields, batch_size=args.batch_size, eos_id=eos, epoch=0,
                                     shards=store.select_shards(["train-"]))))
        batch[TAID_LAMBDA] = torch.tensor(0.5)
        ids = batch["ids"]
        base = torch.randn(*ids.shape, token_plan(store)["vocab_size"], generator=gen)
        ms = {"unshared": [], "shared": []}
        for i in range(2 * reps):
            mode = ("shared", "unshared")[(i + i // 2) % 2]  # ABBA order
            logits = base.clone().requires_grad_(True)
            t0 = time.perf_counter()
            with LT.shared_log_probs() if mode == "shared" else contextlib.nullcontext():
                total, _ = token_loss(terms, logits, batch)
            total.backward()
            ms[mode].append(1000 * (time.perf_counter() - t0))
        med = {k: statistics.median(v) for k, v in ms.items()}
        out[name] = {"median_ms": {k: round(v, 2) for k, v in med.items()},
                     "unshared_over_shared": round(med["unshared"] / med["shared"], 3),
                     "ms": {k: [round(x, 2) for x in v] for k, v in ms.items()}}
        print(f"loss {name:8s} unshared {med['unshared']:.1f} ms, shared {med['shared']:.1f} ms", flush=True)
    return {"reps": reps, "batch_size": args.batch_size, "per_variant": out}


def _raw_eval(teacher: GPT, store, held, eos_id: int) -> dict:
    """:func:`evaluate_lm` of the teacher's raw logits (its calibration temperature set aside)."""
    was, teacher.temperature = teacher.temperature, 1.0
    try:
        return evaluate_lm(teacher, store, held, eos_id=eos_id)
    finally:
        teacher.temperature = was


def _variant(name: str, args, teacher) -> tuple[list[dict], object]:
    """The loss terms of variant ``name`` and its online term (None unless ``online_kd``)."""
    online = None
    if name == "ce":
        loss = [{"kind": "token_ce"}]
    elif name == "online_kd":
        loss = [{"kind": "token_ce", "weight": args.ce_weight}]

        def online(logits, batch):
            with torch.no_grad():
                t_logits = teacher(batch["ids"], batch["doc"])
            return LT.forward_kl(logits, t_logits, batch["kd_mask"])
    else:
        term = dict(STORE_VARIANTS[name])
        if name == "topk8" and args.topk8_precompute:
            term = {"kind": "token_topk_kd", "teacher": "gpt8"}
        loss = [{"kind": "token_ce", "weight": args.ce_weight}, term]
    return loss, online


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def main_(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--teacher-dir", type=Path, default=None, help="a `kdstore lm-teacher` folder (else one is trained)")
    p.add_argument("--teacher-steps", type=int, default=4000)
    p.add_argument("--teacher-depth", type=int, default=2)
    p.add_argument("--teacher-width", type=int, default=128)
    p.add_argument("--teacher-batch", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--train-docs", type=int, default=900, help="first N training documents for the students")
    p.add_argument("--heldout-docs", type=int, default=150)
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--student-depth", type=int, default=1)
    p.add_argument("--student-width", type=int, default=64)
    p.add_argument("--student-heads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-frac", type=float, default=0.05)
    p.add_argument("--ce-weight", type=float, default=0.5)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=",".join(ORDER),
                   help=f"comma-separated subset of {','.join(ORDER)} (a later run of more variants merges with --merge)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--topk8-precompute", action="store_true",
                   help="store tokens:topk:8 with a second precompute (teacher gpt8) instead of cutting topk:32 to 8")
    p.add_argument("--reuse-store", action="store_true", help="skip lm-shards / precompute: the store in --out exists")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="only merge per-seed result files (runs of this script with one --seeds each) into --result")
    p.add_argument("--reeval", type=Path, default=None,
                   help="only evaluate the students a finished run saved under --out again (metrics added since) and "
                        "rewrite this report (a --result or --merge output) into --result")
    p.add_argument("--eval-store", type=Path, default=None,
                   help="with --reeval: score the students on this store's held-out shards (more documents) into "
                        "large_heldout instead")
    p.add_argument("--step-times", type=int, default=0, metavar="STEPS",
                   help="only time STEPS optimizer steps of each variant on the store in --out (alternating order, 2 "
                        "rounds, one process; a quiet machine gives the store / online cost ratio), then the token "
                        "terms' forward + backward on one batch with and without the shared student log-softmax "
                        "(15 ABBA repetitions), into --result")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a check that it runs, not a measurement)")
    p.add_argument("--result", type=Path, default=Path(__file__).parent / "results" / "lm.json")
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(ORDER)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {ORDER}")
    if args.eval_store and not args.reeval:
        p.error("--eval-store only acts with --reeval")
    if args.variants != ",".join(ORDER) and (args.merge or args.reeval or args.step_times):
        p.error("--variants selects the variants a training run trains; --merge, --reeval and --step-times take "
                "what the reports / ORDER hold")
    if args.merge:
        return merge(args.merge, args.result)
    if args.reeval:
        return reevaluate(args.out, args.reeval, args.result, args.eval_store, args.teacher_dir)
    if args.step_times:
        torch.set_num_threads(args.threads)
        teacher, _, _ = load_lm(args.teacher_dir or args.out / "teacher", device="cpu")
        teacher.eval()
        report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "machine": platform.platform(), "threads": torch.get_num_threads(),
                  **step_times(args, args.out / "store", teacher, args.step_times),
                  "loss_times": loss_times(args, args.out / "store")}
        args.result.parent.mkdir(parents=True, exist_ok=True)
        args.result.write_text(json.dumps(report, indent=1))
        print(json.dumps({k: report[k] for k in ("median_ms_per_step", "store_over_online", "over_ce_only")}, indent=1))
        return report
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    out = args.out
    t_start = time.perf_counter()
    teacher_dir = args.teacher_dir or out / "teacher"
    if args.teacher_dir is None:
        _cli("lm-teacher", str(teacher_dir), "--steps", str(args.teacher_steps), "--context", str(args.seq_len),
             "--depth", str(args.teacher_depth), "--width", str(args.teacher_width), "--heads", "4",
             "--batch-size", str(args.teacher_batch), "--vocab-size", str(args.vocab_size),
             *(["--limit", str(args.train_docs)] if args.smoke else []))
    calibration = json.loads((teacher_dir / "config.json").read_text()).get("calibration")
    if calibration and args.heldout_docs > calibration["first_document"]:
        raise SystemExit(f"--heldout-docs {args.heldout_docs}: the teacher's calibration temperature was fitted on "
                         f"held-out documents from #{calibration['first_document']} on; score at most that many")
    shards = out / "shards"
    for split, limit in (("train", args.train_docs), ("heldout", args.heldout_docs)) if not args.reuse_store else ():
        _cli("lm-shards", str(shards), "--tokenizer", str(teacher_dir / "tokenizer.json"), "--seq-len",
             str(args.seq_len), "--split", split, "--limit", str(limit), "--samples-per-shard", str(args.samples_per_shard))
    tars = sorted(shards.glob("*.tar"))
    store_path = out / "store"
    common = ["--store", str(store_path), "--teacher", "kdstore.pipeline.lm_teacher:gpt", "--teacher-arg",
              f"path={teacher_dir}", "--temperature", "1", "--seed", "0", "--batch-size", "32", "--workers", "1",
              "--no-progress", *[a for t in tars for a in ("--inputs", str(t))]]
    t0 = time.perf_counter()
    if not args.reuse_store:
        _cli("precompute", *common, "--teacher-name", "gpt", "--output", "tokens:topk:32", "--output", "tokens:sample:12")
    t1 = time.perf_counter()
    if args.topk8_precompute and not args.reuse_store:
        _cli("precompute", *common, "--teacher-name", "gpt8", "--output", "tokens:topk:8")
    t2 = time.perf_counter()
    store = open_store(store_path)
    per_field = {t["name"]: {f["field"]: {"on_disk": round(f["bytes_per_token"], 2), "uncompressed": f["raw_bytes_per_token"]}
                             for f in t["fields"] if f.get("ragged")}
                 for t in summarize(store)["teachers"]}
    settings = {}
    for name, (tname, prefix) in SETTING_FIELDS.items():
        if name == "topk8" and not args.topk8_precompute:  # cut from topk:32: float16 + uint16 per id, residual, lse
            settings[name] = {"on_disk": None, "uncompressed": 8 * 2 + 8 * 2 + 4 + 4, "on_disk_without_lse": None,
                              "note": "read as the first 8 of the stored topk:32 (token_topk_kd top_k = 8); "
                                      "bytes are those a tokens:topk:8 store holds uncompressed; on disk not measured"}
            continue
        fs = {k: v for k, v in per_field[tname].items() if k.startswith(prefix)}
        settings[name] = {"on_disk": round(sum(v["on_disk"] for v in fs.values()), 2),
                          "uncompressed": sum(v["uncompressed"] for v in fs.values()),
                          "on_disk_without_lse": round(sum(v["on_disk"] for k, v in fs.items() if not k.endswith("/lse")), 2)}
    plan = token_plan(store)
    held = store.select_shards(["heldout-"])
    teacher, teacher_cfg, _ = load_lm(teacher_dir, device="cpu")
    teacher_eval = evaluate_lm(teacher, store, held, eos_id=plan["eos_id"])
    teacher_raw_eval = _raw_eval(teacher, store, held, plan["eos_id"])
    teacher.eval()
    print(f"teacher on the students' held-out tokens (calibration temperature {teacher.temperature:.4f}): "
          f"{teacher_eval}; raw logits: {teacher_raw_eval}", flush=True)

    steps_per_epoch = _steps_per_epoch(args, store_path)  # the same for every variant (all rows valid)
    variants = [n for n in ORDER if n in args.variants.split(",")]
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for i, seed in enumerate(seeds):
        order = variants if seed % 2 == 0 else variants[::-1]  # alternate sides from seed to seed: time drift hits both
        for name in order:
            r = _run(name, args, store_path, seed, steps_per_epoch, teacher)
            r["seed"] = seed
            runs[name].append(r)
            print(f"seed {seed} {name:14s} ce {r['ce']:.4f} acc {r['acc']:.4f} ece {r['ece']:.4f} "
                  f"{r['steps']} steps {r['seconds']:.0f}s", flush=True)
    load = os.getloadavg()
    report = {
        "size": "smoke (not a measurement)" if args.smoke else "real (CPU, shared machine)",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": platform.platform(), "threads": torch.get_num_threads(), "loadavg_end": [round(x, 2) for x in load],
        "teacher": {"parameters": teacher_cfg["parameters"], "model": teacher_cfg["model"],
                    "training": teacher_cfg["training"], "heldout_first_256_rows": teacher_cfg["heldout"],
                    "unigram_first_256_rows": teacher_cfg["unigram"], "heldout_students_set": teacher_eval,
                    "calibration": teacher_cfg.get("calibration"), "heldout_students_set_raw_logits": teacher_raw_eval},
        "student": {"depth": args.student_depth, "width": args.student_width, "heads": args.student_heads,
                    "parameters": GPT(GPTConfig(vocab_size=plan["vocab_size"], context=plan["seq_len"],
                                                depth=args.student_depth, width=args.student_width,
                                                heads=args.student_heads)).num_parameters()},
        "data": {"train_rows": sum(s.num_rows for s in store.select_shards(["train-"])),
                 "heldout_rows": sum(s.num_rows for s in held), "heldout_tokens_scored": teacher_eval["tokens"],
                 "seq_len": plan["seq_len"]},
        "precompute_seconds": None if args.reuse_store else {
            "topk32+sample12": round(t1 - t0, 1), "topk8": round(t2 - t1, 1) if args.topk8_precompute else None},
        "bytes_per_token_fields": per_field, "bytes_per_token_settings": settings,
        "runs": runs, "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    _derive(report)
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(report, indent=1))
    _print(report)
    return report


def _derive(report: dict) -> None:
    """Add the per-variant table, store/online time ratios and the acceptance checks from ``report["runs"]``."""
    runs, settings = report["runs"], report["bytes_per_token_settings"]
    metrics = ("ce", "acc", "ece", "seconds") + tuple(m for m in ("overconfidence", "ece_se")
                                                      if all(m in r for rs in runs.values() for r in rs))
    table = {name: {m: _stats([r[m] for r in rs]) for m in metrics} for name, rs in runs.items()}
    report["seeds"] = sorted({r["seed"] for rs in runs.values() for r in rs})
    report["steps"] = sorted({r["steps"] for rs in runs.values() for r in rs})
    report["variants"] = table
    if "ce" not in table or "online_kd" not in table:
        report["acceptance"] = "partial run (--variants without ce and online_kd): merge it with a full one (--merge)"
        report["store_over_online_time"] = {}
        return
    stores = [n for n in STORE_VARIANTS if n in table]
    if all("large_heldout" in r for rs in runs.values() for r in rs):
        large = {name: {m: _stats([r["large_heldout"][m] for r in rs]) for m in ("ce", "acc", "ece", "ece_se", "overconfidence")}
                 for name, rs in runs.items()}
        report["variants_large_heldout"] = large
        report["acceptance_large_heldout"] = {
            "relative_ce_gap_to_online": {n: round((large[n]["ce"]["mean"] - large["online_kd"]["ce"]["mean"])
                                                   / large["online_kd"]["ce"]["mean"], 5) for n in stores},
            **_ece_checks(large, runs, lambda r: r["large_heldout"])}
    online = {r["seed"]: r for r in runs["online_kd"]}
    # time ratios only between runs of the same process (a variant added by a later run is not comparable)
    ratios = {name: [r["seconds"] / online[r["seed"]]["seconds"] for r in runs[name]
                     if r["seed"] in online and r.get("part") == online[r["seed"]].get("part")] for name in stores}
    ratios = {name: v for name, v in ratios.items() if v}
    online_ce = table["online_kd"]["ce"]["mean"]
    store_best = min(stores, key=lambda n: table[n]["ce"]["mean"])
    within = {n: (table[n]["ce"]["mean"] - online_ce) / online_ce for n in stores}
    bar = {n: within[n] <= 0.01 and table[n]["ce"]["mean"] < table["ce"]["ce"]["mean"] for n in stores}
    report["store_over_online_time"] = {n: {"per_seed": [round(x, 3) for x in v], **_stats(v)} for n, v in ratios.items()}
    report["acceptance"] = {
        "best_store_setting": store_best,
        "best_store_within_1pct_of_online_ce": within[store_best] <= 0.01,
        "best_store_better_than_ce_only": table[store_best]["ce"]["mean"] < table["ce"]["ce"]["mean"],
        **_ece_checks(table, runs, lambda r: r),
        "settings_meeting_bar_at_most_64_bytes_per_token": sorted(
            n for n in stores if bar[n] and n in settings and settings[n]["uncompressed"] <= 64),
        "relative_ce_gap_to_online": {n: round(v, 5) for n, v in within.items()},
    }


def _ece_checks(table: dict, runs: dict, metrics) -> dict:
    """RS-KD's ECE against each top-k variant's: mean no worse, and the per-seed difference;
    ``metrics(run)`` is the run's metrics dict (the run itself, or its ``large_heldout``)."""
    ks = [k for k in ("topk8", "topk32", "topk32_renorm") if k in table] if "rskd12" in table else []
    by_seed = lambda name: sorted(runs[name], key=lambda r: r["seed"])
    return {"rskd_ece_no_worse_than_topk": {k: table["rskd12"]["ece"]["mean"] <= table[k]["ece"]["mean"] for k in ks},
            "rskd_minus_topk_ece_per_seed": {k: [round(metrics(a)["ece"] - metrics(b)["ece"], 5)
                                                 for a, b in zip(by_seed("rskd12"), by_seed(k))] for k in ks}}


def merge(paths: list[Path], result: Path) -> dict:
    """One report from per-seed reports of the same store and settings (seeds run as separate processes)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    report = dict(parts[0])
    report["runs"] = {name: [{**r, "part": i} for i, part in enumerate(parts) for r in part["runs"].get(name, [])]
                      for name in ORDER}
    report["bytes_per_token_settings"] = {k: v for part in parts for k, v in part["bytes_per_token_settings"].items()}
    missing = [name for name, rs in report["runs"].items() if not rs]
    if missing:
        raise SystemExit(f"--merge: no runs of {missing} in {[str(p) for p in paths]}")
    report["loadavg_end"] = [part["loadavg_end"] for part in parts]
    report["total_seconds"] = [part["total_seconds"] for part in parts]
    report["merged_from"] = [str(p) for p in paths]
    report["args"] = {**report["args"], "seeds": ",".join(str(r["seed"]) for r in report["runs"]["ce"])}
    _derive(report)
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(report, indent=1))
    _print(report)
    return report


def reevaluate(out: Path, report_path: Path, result: Path, eval_store: Path | None = None,
               teacher_dir: Path | None = None) -> dict:
    """Evaluate each saved student (``OUT/runs/NAME-sSEED/student.safetensors``) on the held-out
    shards again and update its run's metrics (the training figures are kept).

    With ``eval_store`` (a store over more held-out documents of the same tokenizer, e.g. the
    whole first half): the students are scored on its shards instead, into each run's
    ``large_heldout`` (and the teacher, raw and calibrated, into ``teacher.large_heldout``)."""
    from safetensors.torch import load_file

    report = json.loads(Path(report_path).read_text())
    store = open_store(eval_store or out / "store")
    held, eos = store.select_shards(["heldout-"]), token_plan(store)["eos_id"]
    for name, runs in report["runs"].items():
        for r in runs:
            folder = out / "runs" / f"{name}-s{r['seed']}"
            model = GPT(GPTConfig.from_dict(json.loads((folder / "student.json").read_text())))
            model.load_state_dict(load_file(str(folder / "student.safetensors")))
            again = evaluate_lm(model, store, held, eos_id=eos)
            if eval_store is not None:
                r["large_heldout"] = again
                print(f"{name} seed {r['seed']}: {again}", flush=True)
                continue
            if abs(again["ce"] - r["ce"]) > 1e-4:
                raise SystemExit(f"{folder}: held-out CE {again['ce']:.5f} now, {r['ce']:.5f} in the report")
            r.update(again)
    if eval_store is not None:
        teacher_dir = teacher_dir or Path(report["args"]["teacher_dir"] or Path(report["args"]["out"]) / "teacher")
        teacher = load_lm(teacher_dir)[0]
        report["teacher"]["large_heldout"] = {"calibrated": evaluate_lm(teacher, store, held, eos_id=eos),
                                              "raw_logits": _raw_eval(teacher, store, held, eos)}
        report["large_heldout_store"] = {"path": str(eval_store), "rows": sum(s.num_rows for s in held)}
    else:
        report["reevaluated"] = True
    _derive(report)
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(report, indent=1))
    _print(report)
    return report


def _steps_per_epoch(args, store_path: Path) -> int:
    from kdstore.train.lm_train import epoch_rows

    store = open_store(store_path)
    rows = epoch_rows(store, None, store.select_shards(["train-"]))
    return -(-rows // args.batch_size)


def _print(report: dict) -> None:
    t = report["teacher"]
    print(f"\nteacher {t['parameters']:,} params, {t['training']['steps']} steps: held-out CE "
          f"{t['heldout_students_set']['ce']:.3f} acc {t['heldout_students_set']['acc']:.3f} "
          f"(first 256 rows: {t['heldout_first_256_rows']['ce']:.3f} vs unigram {t['unigram_first_256_rows']['ce']:.3f})")
    b = report["bytes_per_token_settings"]
    over = all("overconfidence" in row for row in report["variants"].values())
    se = all("ece_se" in row for row in report["variants"].values())
    print(f"\n{'variant':14s} {'held-out CE':>16s} {'acc':>14s} {'ECE':>14s}" + (f" {'ECE boot. se':>12s}" if se else "")
          + (f" {'conf - acc':>15s}" if over else "") + f" {'train s':>9s} {'B/tok disk':>10s} {'B/tok raw':>9s}")
    for name, row in report["variants"].items():
        f = lambda m, d=4: f"{row[m]['mean']:.{d}f}±{row[m]['sd']:.{d}f}"
        disk = b[name]["on_disk"] if name in b and b[name]["on_disk"] is not None else "-"
        print(f"{name:14s} {f('ce'):>16s} {f('acc'):>14s} {f('ece'):>14s}"
              + (f" {row['ece_se']['mean']:12.4f}" if se else "") + (f" {f('overconfidence'):>15s}" if over else "")
              + f" {row['seconds']['mean']:9.0f} {disk:>10} {b[name]['uncompressed'] if name in b else '-':>9}")
    print("\nstore / online epoch time:", {n: f"{v['mean']:.2f} ({v['min']:.2f}-{v['max']:.2f})"
                                          for n, v in report["store_over_online_time"].items()})
    print("acceptance:", json.dumps(report["acceptance"], indent=1))
    if "variants_large_heldout" in report:
        print(f"\nlarger held-out set ({report['large_heldout_store']['rows']} rows):")
        for name, row in report["variants_large_heldout"].items():
            print(f"{name:14s} " + " ".join(f"{m} {row[m]['mean']:.4f}±{row[m]['sd']:.4f}" for m in row))
        print("acceptance (larger held-out set):", json.dumps(report["acceptance_large_heldout"], indent=1))


if __name__ == "__main__":
    main_()
