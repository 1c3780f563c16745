"""A newcomer's first day: the fixed-step teacher, the few-labels demo (distillation wins,
finished runs are reused), the pictures (training curves, store statistics), `kdstore keys`,
and the Python API snippet of docs/TRAINING.md, run as written, on a small real store
(Fashion-MNIST tars → a briefly trained CNN teacher → real Ray precompute)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from kdstore.cli.demo import few_labels_demo
from kdstore.cli.main import main
from kdstore.pipeline.zoo import train_fashion_cnn

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SHARDS, PER_SHARD, TEST_ROWS = 2, 500, 500


def test_teacher_trains_a_fixed_number_of_steps_and_is_deterministic(tmp_path):
    a = train_fashion_cnn(tmp_path / "a.pt", steps=3, width=4, progress=False)
    b = train_fashion_cnn(tmp_path / "b.pt", steps=3, width=4, progress=False)
    assert a["steps"] == b["steps"] == 3 and not a["stopped_by_time"]
    wa = torch.load(tmp_path / "a.pt", weights_only=True)
    wb = torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["test_accuracy"] == b["test_accuracy"]
    assert json.loads((tmp_path / "a.json").read_text())["steps"] == 3
    c = train_fashion_cnn(tmp_path / "c.pt", steps=3, width=4, seed=1, progress=False)
    wc = torch.load(tmp_path / "c.pt", weights_only=True)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa), "the seed must matter"
    assert c["steps"] == 3


@pytest.fixture(scope="module")
def small(tmp_path_factory, ray_session):
    """1,000 train + 500 test Fashion-MNIST images as tars, a CNN teacher trained 150 steps
    (width 8), precomputed into a store as teacher ``cnn`` (logits, scores, embedding)."""
    from kdstore.pipeline.datasets import _png, load_fashion_mnist, write_shards
    from kdstore.pipeline.job import PrecomputeConfig, run_precompute
    from kdstore.pipeline.worker import TeacherLoad

    root = tmp_path_factory.mktemp("firstday")
    data = root / "data"
    for split, n in (("train", TRAIN_SHARDS * PER_SHARD), ("test", TEST_ROWS)):
        images, labels = load_fashion_mnist(split)
        samples = ({"__key__": f"{split}_{i:05d}", "png": _png(images[i]), "cls": str(int(labels[i])).encode()}
                   for i in range(n))
        write_shards(samples, data, split, PER_SHARD, n, progress=False)
    weights = root / "teacher.pt"
    info = train_fashion_cnn(weights, steps=150, width=8, progress=False)
    assert info["test_accuracy"] > 0.7, info
    load = TeacherLoad(factory="kdstore.pipeline.zoo:fashion_cnn", name="cnn", layers=("embed",),
                       kwargs=(("weights", str(weights)), ("width", 8)))
    store = root / "store"
    run_precompute(PrecomputeConfig(store=store, inputs=(str(data / "{train-{000000..000001},test-000000}.tar"),),
                                    teacher=load, outputs=("logits", "scores", "embedding:embed"), workers=1,
                                    progress=False))
    return {"root": root, "data": data, "store": store, "teacher_accuracy": info["test_accuracy"]}


def test_few_labels_demo_distillation_beats_labels_only_and_reuses_finished_runs(small, tmp_path):
    lines: list[str] = []
    kw = dict(seeds=(0,), workdir=tmp_path / "demo", epochs=8, labels="per_class:3", echo=lines.append)
    result = few_labels_demo(small["store"], small["data"], **kw)
    # 30 labels: the labels-only student is weak; the teacher's targets on all 1,000 rows lift it.
    assert result["distilled_mean"] - result["labels_only_mean"] >= 0.08, result
    assert result["steps"] == 8 * -(-TRAIN_SHARDS * PER_SHARD // 256)
    assert result["reused"] == []
    assert "labels-only" in lines[-1] and "distilled from the store" in lines[-1]
    summaries = {}
    for name in ("labels_only-seed0", "distilled-seed0"):
        path = tmp_path / "demo" / name / "summary.json"
        assert json.loads(path.read_text())["steps"] == result["steps"]
        summaries[name] = path.stat().st_mtime_ns
    again = few_labels_demo(small["store"], small["data"], **kw)
    assert again["reused"] == ["labels_only-seed0", "distilled-seed0"]
    assert again["labels_only"] == result["labels_only"] and again["distilled"] == result["distilled"]
    assert all((tmp_path / "demo" / n / "summary.json").stat().st_mtime_ns == t for n, t in summaries.items())
    # Another distillation weight: the labels-only run is still the same run, the distilled one is not.
    other = few_labels_demo(small["store"], small["data"], **{**kw, "alpha": 0.5})
    assert other["reused"] == ["labels_only-seed0"]


def _png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("L"), dtype=np.float32)


def test_train_command_draws_the_training_curves(small, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "kd.toml"
    config.write_text(f"""
[data]
store = "{small['store']}"
inputs = ["{small['data']}/*.tar"]
eval_shards = ["test-"]
labels = "per_class:10"
batch_size = 128
verify_inputs = "quick"
[model]
arch = "mlp"
[train]
out_dir = "{out}"
epochs = 3
threads = 1
eval_every_epochs = 1
log_every_steps = 2
checkpoint_every_steps = 0
progress = false
[[loss]]
kind = "ce"
weight = 0.1
[[loss]]
kind = "kd"
teacher = "cnn"
weight = 0.9
""")
    result = CliRunner().invoke(main, ["train", str(config)])
    assert result.exit_code == 0, result.output
    png = out / "training.png"
    assert f"training curves -> {png}" in result.output
    pixels = _png_pixels(png)
    assert pixels.shape == (750, 1100) and pixels.std() > 20  # a drawn figure, not a blank canvas
    from kdstore.cli.plots import plot_training

    drawn = plot_training(out, tmp_path / "again.png")
    assert drawn["titles"] == ["loss terms", "eval accuracy", "agreement with the teacher (eval)", "learning rate"]
    if importlib.util.find_spec("tensorboard") is not None:  # optional; the dev extra installs it
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        assert f"tensorboard --logdir {out / 'tensorboard'}" in result.output
        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        evals = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
        assert [(e.step, round(e.value, 5)) for e in events.Scalars("eval/accuracy")] == \
            [(r["step"], round(r["accuracy"], 5)) for r in evals]
        assert {"train/loss", "train/loss/0.ce", "train/loss/1.kd", "eval/teacher_agreement"} <= set(events.Tags()["scalars"])


def test_info_plot_draws_the_store_statistics(small, tmp_path):
    png = tmp_path / "store.png"
    result = CliRunner().invoke(main, ["info", str(small["store"]), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert f"store statistics -> {png}" in result.output
    assert _png_pixels(png).std() > 20
    from kdstore.cli.plots import plot_store

    drawn = plot_store(small["store"], tmp_path / "again.png")
    assert drawn["titles"] == ["bytes per sample on disk, by field", "teacher confidence (max softmax prob.)",
                               "label distribution"]


def test_keys_lists_rows_shards_labels_and_keys(small):
    from kdstore.pipeline.datasets import load_fashion_mnist

    _, labels = load_fashion_mnist("train")
    result = CliRunner().invoke(main, ["keys", str(small["store"]), "--limit", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["row", "shard", "label", "key"]
    assert [ln.split() for ln in lines[1:4]] == [[str(i), "0", str(labels[i]), f"train_{i:05d}"] for i in range(3)]
    assert "3 of 1,500 rows shown" in lines[4]
    result = CliRunner().invoke(main, ["keys", str(small["store"]), "--shard", "2", "--json", "--limit", "0"])
    rows = [json.loads(ln) for ln in result.output.splitlines()]
    assert len(rows) == TEST_ROWS and {r["shard"] for r in rows} == {2}
    assert rows[0] == {"row": 1000, "key": "test_00000", "shard": 2, "label": rows[0]["label"]}
    # The listed key is what `query --key` takes.
    assert CliRunner().invoke(main, ["info", str(small["store"]), "--keys"]).output.count("train_000") >= 3


def test_training_doc_python_snippet_runs_and_trains(small, tmp_path):
    doc = (ROOT / "docs" / "TRAINING.md").read_text()
    section = doc[doc.index("## Python API"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"runs/quickstart/store"' in snippet
    # The small store has 1,000 training rows: fewer labels per class than the doc's 100.
    snippet = snippet.replace('"runs/quickstart/store"', repr(str(small["store"]))).replace("per_class:100", "per_class:10")
    check = f"""
from kdstore.train.dataset import StreamingDataset as _SD
_test = _SD({str(small['store'])!r}, shards=["test-"], labels="all", shuffle=False)
with torch.no_grad():
    _n = _hit = 0
    for _b in DataLoader(_test, batch_size=250, collate_fn=collate):
        _hit += int((student(_b["input"]).argmax(1) == _b["label"]).sum()); _n += len(_b["label"])
print("ACCURACY", _hit / _n)
"""
    proc = subprocess.run([sys.executable, "-c", snippet + check], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"epoch 2: loss [0-9.]+", proc.stdout)
    accuracy = float(proc.stdout.split("ACCURACY")[1])
    assert accuracy > 0.5, proc.stdout  # an untrained student is at ~0.1


def test_query_echoes_the_row_it_searched_for_and_leaves_it_out(small):
    runner = CliRunner()
    built = runner.invoke(main, ["index", str(small["store"]), "--teacher", "cnn", "--kind", "flat"])
    assert built.exit_code == 0, built.output
    result = runner.invoke(main, ["query", str(small["store"]), "--teacher", "cnn", "--key", "train_00007", "-k", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("query: row 7, key train_00007, label ") and "left out" in lines[0]
    assert len(lines) == 5 and all(ln.split()[1] != "7" for ln in lines[2:])
    help_text = runner.invoke(main, ["query", "--help"]).output
    assert "to index" not in help_text and "leaves that row itself out" in help_text
