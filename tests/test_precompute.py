"""The precompute job against real tars, real Zarr and a real local Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdstore.pipeline.augment import AugmentSpec, apply_view, view_params
from kdstore.pipeline.decode import decode_image
from kdstore.pipeline.job import PrecomputeConfig, run_precompute
from kdstore.pipeline.shards import iter_samples
from kdstore.pipeline.teacher import TeacherLoad
from kdstore.pipeline.zoo import fashion_cnn
from kdstore.store import open_store
from kdstore.store.errors import InputError, StoreLockedError, StoreMismatchError, TeacherOutputError
from kdstore.store.lock import StoreLock
from kdstore.store.verify import verify_store

CNN = "kdstore.pipeline.zoo:fashion_cnn"


def cfg(store: Path, shards, **kw) -> PrecomputeConfig:
    teacher = kw.pop("teacher", TeacherLoad(factory=CNN, name="cnn", layers=("embed", "features")))
    defaults = dict(outputs=("logits",), batch_size=16, progress=False, workers=1)
    defaults.update(kw)
    return PrecomputeConfig(store=store, inputs=tuple(str(s) for s in shards), teacher=teacher, **defaults)


def direct(shards) -> tuple[list[str], torch.Tensor, dict]:
    """Keys, inputs and a plain forward of the same teacher, no kdstore in the loop."""
    model = fashion_cnn(seed=0)
    captured = {}
    model.embed.register_forward_hook(lambda m, i, o: captured.__setitem__("embed", o))
    model.features.register_forward_hook(lambda m, i, o: captured.__setitem__("features", o))
    keys, images = [], []
    for url in shards:
        for sample in iter_samples(str(url)):
            keys.append(sample["__key__"])
            images.append(decode_image(sample["png"]))
    x = torch.stack(images)
    with torch.inference_mode():
        logits = model(x)
    return keys, x, {"logits": logits, **captured}


def test_outputs_equal_direct_computation(tmp_path, fmnist_shards, ray_session):
    outputs = ("logits", "topk:3", "features:features:mean", "embedding:embed:l2", "scores")
    result = run_precompute(cfg(tmp_path / "s", fmnist_shards, outputs=outputs, temperature=2.0))
    assert result.rows == 200 and result.shards_run == 4
    store = open_store(tmp_path / "s")
    keys, _, ref = direct(fmnist_shards)
    assert list(store.keys) == keys
    t = store.teacher("cnn")
    tol = dict(rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(t.read("logits"), ref["logits"].numpy(), **tol)
    assert t.read("logits").dtype == np.float16
    top_vals, top_idx = torch.topk(ref["logits"], 3, dim=1)
    sorted_logits = ref["logits"].sort(dim=1, descending=True).values
    untied = (sorted_logits[:, 2] - sorted_logits[:, 3]).abs() > 1e-4
    np.testing.assert_array_equal(t.read("topk/indices")[untied.numpy()], top_idx[untied].numpy())
    np.testing.assert_allclose(t.read("topk/values"), top_vals.numpy(), **tol)
    probs = F.softmax(ref["logits"] / 2.0, dim=1)
    residual = 1 - probs.gather(1, top_idx).sum(1)
    np.testing.assert_allclose(t.read("topk/residual"), residual.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t.read("features/features"), ref["features"].mean((2, 3)).numpy(), **tol)
    np.testing.assert_allclose(t.read("embedding"), F.normalize(ref["embedding" if "embedding" in ref else "embed"].flatten(1), dim=1).numpy(), **tol)
    logp = F.log_softmax(ref["logits"], 1)
    np.testing.assert_allclose(t.read("scores/entropy"), -(logp.exp() * logp).sum(1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t.read("scores/max_prob"), logp.exp().max(1).values.numpy(), rtol=1e-5)
    rows = np.array([150, 3, 77, 3])
    np.testing.assert_array_equal(t.read("logits", rows), t.read("logits")[rows])
    assert t.valid().all()
    assert verify_store(store).ok


def test_views_replay_exactly(tmp_path, fmnist_shards, ray_session):
    augment = "rrc:scale=0.3-1;hflip:p=0.5"
    run_precompute(cfg(tmp_path / "s", fmnist_shards[:2], views=3, augment=augment, seed=7, dtype="float32"))
    t = open_store(tmp_path / "s").teacher("cnn")
    stored = t.read("logits")
    assert stored.shape == (100, 3, 10)
    model = fashion_cnn(seed=0)
    spec = AugmentSpec.parse(augment)
    flips = 0
    for shard in (0, 1):
        params = t.view_params(shard)
        samples = list(iter_samples(str(fmnist_shards[shard])))
        for i in (0, 17, 49):
            image = decode_image(samples[i]["png"])
            for v in range(3):
                expected = view_params(spec, seed=7, key=samples[i]["__key__"], view=v, height=28, width=28)
                np.testing.assert_array_equal(params[i, v], expected)
                flips += int(expected[4])
                with torch.inference_mode():
                    replayed = model(apply_view(image, params[i, v])[None])[0]
                np.testing.assert_allclose(stored[shard * 50 + i, v], replayed.numpy(), rtol=1e-5, atol=1e-5)
    views = t.view_params(0)
    assert len({tuple(p) for p in views.reshape(-1, 5)}) > 100  # views really differ
    assert 0 < flips < 18


def test_two_workers_equal_one(tmp_path, fmnist_shards, ray_session):
    run_precompute(cfg(tmp_path / "one", fmnist_shards, outputs=("logits", "topk:2"), workers=1))
    run_precompute(cfg(tmp_path / "two", fmnist_shards, outputs=("logits", "topk:2"), workers=2))
    one, two = open_store(tmp_path / "one").teacher("cnn"), open_store(tmp_path / "two").teacher("cnn")
    assert sorted(two.done_records()) == [0, 1, 2, 3]
    # the actors' thread counts differ (2 vs 1), so float sums may differ in the last bits
    for field in ("logits", "topk/values", "topk/residual"):
        np.testing.assert_allclose(one.read(field), two.read(field), rtol=1e-3, atol=1e-5)
    assert (one.read("topk/indices") == two.read("topk/indices")).mean() > 0.99
    assert one.valid().all() and two.valid().all()
    assert verify_store(open_store(tmp_path / "two")).ok


def test_rerun_skips_done_and_refuses_changes(tmp_path, fmnist_shards, ray_session):
    store = tmp_path / "s"
    first = run_precompute(cfg(store, fmnist_shards))
    again = run_precompute(cfg(store, fmnist_shards))
    assert (first.shards_run, again.shards_run, again.shards_already_done) == (4, 0, 4)
    with pytest.raises(StoreMismatchError, match="fingerprint"):
        other = TeacherLoad(factory=CNN, name="cnn", kwargs=(("seed", 1),))
        run_precompute(cfg(store, fmnist_shards, teacher=other))
    with pytest.raises(StoreMismatchError, match="outputs"):
        run_precompute(cfg(store, fmnist_shards, outputs=("topk:2",)))
    with pytest.raises(StoreMismatchError, match="other input shards"):
        run_precompute(cfg(store, fmnist_shards[:3]))
    # a second teacher adds to the same rows
    second = TeacherLoad(factory=CNN, name="cnn2", kwargs=(("seed", 1),))
    run_precompute(cfg(store, fmnist_shards, teacher=second))
    s = open_store(store)
    assert s.teachers == ["cnn", "cnn2"]
    assert not np.allclose(s.teacher("cnn").read("logits"), s.teacher("cnn2").read("logits"))
    # --overwrite starts the teacher over with the new spec
    run_precompute(cfg(store, fmnist_shards, outputs=("topk:2",), overwrite=True))
    assert set(open_store(store).teacher("cnn").fields) == {"topk/values", "topk/indices", "topk/residual"}


def test_lock_refuses_second_job(tmp_path, fmnist_shards, ray_session):
    store = tmp_path / "s"
    with StoreLock(store):
        with pytest.raises(StoreLockedError, match="locked by pid"):
            run_precompute(cfg(store, fmnist_shards))
    run_precompute(cfg(store, fmnist_shards[:1]))  # the lock is released


def test_verify_names_field_and_shard_after_byte_flip(tmp_path, fmnist_shards, ray_session):
    store = tmp_path / "s"
    run_precompute(cfg(store, fmnist_shards, outputs=("logits", "topk:2")))
    chunk = next((store / "teachers/cnn/shards/000002.zarr/topk/values/c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = verify_store(open_store(store))
    assert not report.ok
    assert "topk/values" in report.problems[0] and "shard 2" in report.problems[0]
    assert len(report.problems) == 1


def test_verify_reports_missing_rows_and_changed_inputs(tmp_path, make_shards, ray_session):
    shards = make_shards(3, 10)
    store = tmp_path / "s"
    run_precompute(cfg(store, shards))
    (store / "teachers/cnn/done/000001.json").unlink()
    problems = verify_store(open_store(store)).problems
    assert any("shard 1" in p and "missing" in p for p in problems)
    shards[2].write_bytes(make_shards(1, 9, name="other")[0].read_bytes())
    problems = verify_store(open_store(store), shards=["2"]).problems
    assert any("keys differ" in p for p in problems)


# ---- bad input -------------------------------------------------------------------


def test_missing_shard_fails_with_its_name(tmp_path, fmnist_shards, ray_session):
    missing = tmp_path / "nope-000000.tar"
    with pytest.raises(InputError, match="nope-000000.tar: not found"):
        run_precompute(cfg(tmp_path / "s", [fmnist_shards[0], missing]))


def test_truncated_and_garbage_tars(tmp_path, make_shards, ray_session):
    shards = make_shards(3, 10)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2 + 100])
    shards[2].write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(InputError, match=f"{shards[1].name}: truncated tar"):
        run_precompute(cfg(tmp_path / "s", shards))
    result = run_precompute(cfg(tmp_path / "skip", shards, on_error="skip"))
    assert result.rows == 10 and len(result.skipped_shards) == 2
    assert {Path(s["url"]).name for s in result.skipped_shards} == {shards[1].name, shards[2].name}


def _rewrite(path: Path, edit) -> None:
    import webdataset as wds

    samples = list(iter_samples(str(path)))
    with wds.TarWriter(str(path)) as writer:
        for i, s in enumerate(samples):
            s = {k: v for k, v in s.items() if k != "__url__"}
            writer.write(edit(i, s))


def test_bad_samples_fail_or_skip(tmp_path, make_shards, ray_session):
    shards = make_shards(2, 10)

    def edit(i, s):
        if i == 3:
            s["png"] = b"\x89PNG garbage"
        if i == 5:
            s = {"__key__": s["__key__"], "cls": s["cls"]}
        return s

    _rewrite(shards[1], edit)
    with pytest.raises(InputError, match=r"in-000001.tar key 'train_00013': undecodable image"):
        run_precompute(cfg(tmp_path / "s", shards))
    # nothing already written is lost: shard 0 finished before the failure or is redone cleanly
    result = run_precompute(cfg(tmp_path / "s", shards, on_error="skip"))
    assert result.samples_skipped == 2
    t = open_store(tmp_path / "s").teacher("cnn")
    valid = t.valid()
    assert valid.sum() == 18 and not valid[13] and not valid[15]
    reasons = {s["key"]: s["reason"] for s in t.skipped()}
    assert "undecodable image" in reasons["train_00013"] and "no 'png' field" in reasons["train_00015"]
    assert np.all(t.read("logits")[~valid] == 0)


def test_teacher_nan_and_bad_shape(tmp_path, make_shards, ray_session):
    shards = make_shards(2, 10)
    nan = TeacherLoad(factory="kd_test_teachers:nan_teacher", name="nan")
    # the first row of every batch is NaN: the error names the first bad key of the shard that failed
    with pytest.raises(TeacherOutputError, match=r"in-00000[01].tar key 'train_000[01]0': teacher output has NaN or inf"):
        run_precompute(cfg(tmp_path / "a", shards, teacher=nan))
    result = run_precompute(cfg(tmp_path / "b", shards, teacher=nan, on_error="skip", batch_size=4))
    assert result.samples_skipped == 6  # the first row of each batch of 4: 3 batches per shard
    bad = TeacherLoad(factory="kd_test_teachers:bad_shape_teacher", name="bad")
    with pytest.raises(TeacherOutputError, match=r"logits must be \[batch, classes\]"):
        run_precompute(cfg(tmp_path / "c", shards, teacher=bad))
    with pytest.raises(InputError, match="not a Teacher or torch.nn.Module"):
        run_precompute(cfg(tmp_path / "d", shards, teacher=TeacherLoad(factory="kd_test_teachers:not_a_teacher")))


def test_config_validation(tmp_path):
    with pytest.raises(InputError, match="--output 'topk' not understood"):
        cfg(tmp_path, ["x.tar"], outputs=("topk",))
    with pytest.raises(InputError, match="--views needs --augment"):
        cfg(tmp_path, ["x.tar"], views=2)
    with pytest.raises(InputError, match="unknown transform 'blur'"):
        cfg(tmp_path, ["x.tar"], views=2, augment="blur:p=1")


def test_per_token_outputs_are_stored_ragged(tmp_path, make_shards, ray_session):
    shards = make_shards(2, 10)
    teacher = TeacherLoad(factory="kd_test_teachers:row_tokens")
    run_precompute(cfg(tmp_path / "s", shards, teacher=teacher, outputs=("embedding", "tokens:rows"), dtype="float32"))
    store = open_store(tmp_path / "s")
    t = store.teacher("rows")
    assert t.fields["tokens/rows"].ragged and t.fields["tokens/rows"].shape == (28,)
    tokens = t.read_tokens("tokens/rows", 1)
    samples = list(iter_samples(str(shards[1])))
    assert len(tokens) == 10
    for sample, got in zip(samples, tokens):
        image = decode_image(sample["png"])[0]
        n = 3 + int(sample["__key__"].split("_")[-1]) % 5
        np.testing.assert_allclose(got, (image[:n] * 2).numpy(), rtol=1e-6)
    with pytest.raises(InputError, match="per-token"):
        t.read("tokens/rows")
    assert verify_store(store).ok
