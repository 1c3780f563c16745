"""``kdstore lm-teacher`` and ``kdstore lm-shards``: the language-model teacher and its token shards."""

from __future__ import annotations

from pathlib import Path

import click

from kdstore.cli.common import user_errors


@click.command("lm-teacher")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--steps", default=1200, show_default=True, help="Optimizer steps (a fixed budget, not wall time).")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--context", default=128, show_default=True, help="Tokens per training row.")
@click.option("--depth", default=2, show_default=True)
@click.option("--width", default=128, show_default=True)
@click.option("--heads", default=4, show_default=True)
@click.option("--vocab-size", default=4096, show_default=True, help="Byte-level BPE vocabulary.")
@click.option("--lr", default=3e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--corpus", default="20newsgroups+reuters-r52+bbc", show_default=True)
@click.option("--limit", type=int, default=None, help="Use only the first N documents of each split (smoke tests).")
@click.option("--calibrate/--no-calibrate", default=None,
              help="Fit a calibration temperature on the second half of the held-out documents after training "
                   "(default on). On a folder that already holds a teacher, --calibrate (re)fits it without retraining.")
@click.option("--force", is_flag=True, help="Retrain even when OUT_DIR/config.json exists.")
@user_errors
def lm_teacher_cmd(out_dir: Path, force: bool, calibrate: bool | None, **kwargs) -> None:
    """Train a small GPT teacher and its tokenizer on the packaged corpora's training split.

    Writes OUT_DIR/tokenizer.json, model.safetensors and config.json (fingerprints, the held-out
    cross-entropy / accuracy / calibration error next to a unigram model, and the calibration
    temperature). Load it in precompute with
    --teacher kdstore.pipeline.lm_teacher:gpt --teacher-arg path=OUT_DIR (logits divided by the
    calibration temperature; add --teacher-arg calibrated=false for the raw ones).
    """
    import json

    from kdstore.pipeline.lm_teacher import CONFIG, calibrate_lm_teacher, train_lm_teacher

    if (out_dir / CONFIG).is_file() and not force:
        config = json.loads((out_dir / CONFIG).read_text())
        if calibrate:
            calibrate_lm_teacher(out_dir, log=click.echo)
            return
        cal = config.get("calibration")
        note = f", calibration temperature {cal['temperature']:.4f}" if cal else ", not calibrated (--calibrate fits it)"
        click.echo(f"{out_dir} already holds a teacher (held-out CE {config['heldout']['ce']:.3f}{note}); "
                   f"--force retrains it")
        return
    train_lm_teacher(out_dir, log=click.echo, calibrate=calibrate is not False, **kwargs)


@click.command("lm-shards")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tokenizer", "tokenizer_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="tokenizer.json (from kdstore lm-teacher).")
@click.option("--seq-len", required=True, type=int, help="Tokens per packed sample.")
@click.option("--split", type=click.Choice(["train", "heldout"]), default="train", show_default=True)
@click.option("--corpus", default="20newsgroups+reuters-r52+bbc", show_default=True)
@click.option("--samples-per-shard", default=2000, show_default=True)
@click.option("--limit", type=int, default=None, help="Use only the first N documents (smoke tests).")
@user_errors
def lm_shards_cmd(out_dir: Path, tokenizer_path: Path, seq_len: int, split: str, corpus: str, samples_per_shard: int, limit: int | None) -> None:
    """Pack a corpus split into WebDataset token shards: OUT_DIR/SPLIT-NNNNNN.tar (KEY.ids.npy, KEY.doc.npy).

    Resumable: a rerun skips finished shards; other settings in the same OUT_DIR are refused.
    """
    from kdstore.pipeline.lm_corpus import write_lm_shards

    info = write_lm_shards(out_dir, tokenizer_path=tokenizer_path, seq_len=seq_len, split=split, corpus=corpus,
                           samples_per_shard=samples_per_shard, limit=limit)
    n = len(info["shards"])
    click.echo(f"{split}: {info['samples']} samples of {seq_len} tokens ({info['tokens']} tokens) in {n} shards -> "
               f"{out_dir}/{split}-{{000000..{n - 1:06d}}}.tar")
