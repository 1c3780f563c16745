"""Any student: ``[model] factory`` on a real precomputed store, through the trainer's own path.

The factories live outside the package, in tests/support/students.py: imported as
``students:NAME`` (tests/support is on PYTHONPATH, conftest) and by the file form
``path/to/students.py:NAME``. Checked: a tensor-returning and a dict-returning student train;
feature terms hook any named layer (hand-computed); DHO adds its head on a named layer;
``kdstore.train.load_student`` rebuilds the trained module from student.json + student.pt
and from a checkpoint; each user mistake is one clear ``InputError`` before anything is written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdstore.store import open_store
from kdstore.store.errors import InputError
from kdstore.train import load_student
from kdstore.train.config import parse_config
from kdstore.train.recipe import Recipe, run

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
STUDENTS_FILE = Path(__file__).parent / "support" / "students.py"


@pytest.fixture(scope="module")
def store(tmp_path_factory, fmnist_shards, ray_session):
    """4 real Fashion-MNIST shards × 50, teacher ``cnn`` (seeded FashionCNN): logits and its ``embed`` layer."""
    from kdstore.pipeline.job import PrecomputeConfig, run_precompute
    from kdstore.pipeline.worker import TeacherLoad

    path = tmp_path_factory.mktemp("factory") / "store"
    load = TeacherLoad(factory="kdstore.pipeline.zoo:fashion_cnn", name="cnn", layers=("embed",), kwargs=(("seed", 0),))
    run_precompute(PrecomputeConfig(store=path, inputs=tuple(str(p) for p in fmnist_shards), teacher=load,
                                    progress=False, workers=1, outputs=("logits", "embedding:embed")))
    return path


def _doc(store, out, model, losses, **train) -> dict:
    return {
        "data": {"store": str(store), "train_shards": ["0..1"], "batch_size": 16, "shuffle_buffer": 4,
                 "labels": "per_class:2", "verify_inputs": "quick"},
        "model": model,
        "train": {"out_dir": str(out), "steps": 3, "threads": 1, "checkpoint_every_steps": 2, "progress": False,
                  **train},
        "loss": losses,
    }


def _first_batch(recipe):
    recipe.train_set.set_epoch(0)
    recipe.train_set.set_resume(0)
    return next(iter(recipe.loader))


def _d(x):
    return torch.as_tensor(np.asarray(x)).double()


def test_a_factory_student_trains_and_load_student_rebuilds_it(store, tmp_path):
    out = tmp_path / "run"
    model = {"factory": "students:conv_logits", "args": {"width": 4}}  # num_classes comes from the store
    terms = [{"kind": "ce"}, {"kind": "kd", "teacher": "cnn", "temperature": 2.0},
             {"kind": "embedding", "teacher": "cnn", "student_layer": "body.4", "weight": 0.5}]
    held = []
    run(parse_config(_doc(store, out, model, terms)), on_done=lambda recipe, result: held.append(recipe))
    record = json.loads((out / "student.json").read_text())
    assert record["factory"] == "students:conv_logits" and record["args"] == {"width": 4}
    assert record["num_classes"] == 10 and record["input_shape"] == [1, 28, 28]
    saved = torch.load(out / "checkpoints" / "step-000000002.pt", weights_only=True)
    assert saved["student"] == record and saved["config"]["model"]["factory"] == "students:conv_logits"

    student = load_student(out)
    assert type(student).__name__ == "ConvNet" and not student.training  # the factory's own module
    trained = torch.load(out / "student.pt", weights_only=True)
    assert trained.keys() == {f"net.{k}" for k in student.state_dict()}
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        want = held[0].model.student.eval()(x)["logits"]
        assert torch.equal(student(x), want)
        assert not torch.equal(load_student(out, checkpoint=out / "checkpoints" / "step-000000002.pt")(x), want)

    (out / "student.pt").unlink()  # an unfinished run: the newest checkpoint's student
    from_ckpt = load_student(out)
    state = saved["model"]  # step 2: the final step 3 is not a checkpoint step
    assert all(torch.equal(v, state[f"student.net.{k}"]) for k, v in from_ckpt.state_dict().items())


def test_feature_terms_hook_any_named_layer_of_a_factory_student(store, tmp_path):
    model = {"factory": "students:conv_logits", "args": {"width": 4}}
    terms = [{"kind": "feature", "teacher": "cnn", "field": "embedding", "student_layer": "body.4"},
             {"kind": "rkd_distance", "teacher": "cnn", "student_layer": "body.1", "weight": 2.0}]
    recipe = Recipe(parse_config(_doc(store, tmp_path / "run", model, terms)))
    recipe.setup()
    assert tuple(recipe.model.projectors["0"].proj.weight.shape) == (128, 24)  # sized by the dry run
    batch = _first_batch(recipe)
    with torch.no_grad():
        _, parts = recipe.loss(batch)
    real = ~batch["pad"]
    x = batch["input"][real].double()
    net = recipe.model.student.net
    lin = lambda m, v: v @ m.weight.detach().double().T + m.bias.detach().double()  # noqa: E731
    h = torch.relu(F.conv2d(x, net.body[0].weight.detach().double(), net.body[0].bias.detach().double(), padding=1))  # body.1
    pre = lin(net.body[4], F.max_pool2d(h, 4).flatten(1))  # body.4, the Linear (before its ReLU)
    teacher = _d(open_store(store).teacher("cnn").read("embedding")[batch["row"][real].numpy()])
    proj = lin(recipe.model.projectors["0"].proj, pre)
    assert math.isclose(parts["loss/0.feature"], float((proj - teacher).pow(2).mean()), rel_tol=1e-4)
    # rkd_distance: body.1's output [w, 28, 28], flattened, against the stored embedding
    flat = h.flatten(1)
    eye = torch.eye(len(flat), dtype=torch.bool)

    def psi(v):
        d = torch.cdist(v, v)
        return d / d[~eye].mean()

    want = F.smooth_l1_loss(psi(flat), psi(teacher), reduction="none")[~eye].mean()
    assert math.isclose(parts["loss/1.rkd_distance"], float(want), rel_tol=1e-4)


def test_the_file_form_and_a_dho_head_on_a_named_layer(store, tmp_path):
    out = tmp_path / "dho"
    model = {"factory": f"{STUDENTS_FILE}:dict_mlp", "args": {"hidden": 6}, "embedding": "encoder.1"}
    terms = [{"kind": "dho", "teacher": "cnn", "alpha": 0.3}]
    held = []
    run(parse_config(_doc(store, out, model, terms, eval_every_epochs=0)),
        on_done=lambda recipe, result: held.append(recipe))
    student = held[0].model.student
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        got = student.eval()(x)
        pre = student.net.encoder[1](student.net.encoder[0](x))  # the hooked layer (pre-Tanh Linear)
        assert torch.allclose(got["kd_logits"], student.kd_head(pre), atol=1e-6)
        assert torch.equal(got["embedding"], pre) and got["feat"].shape == (4, 6)
    record = json.loads((out / "student.json").read_text())
    assert record["factory_file"] == str(STUDENTS_FILE.resolve()) and record["kd_head"] == [6, 10]
    loaded = load_student(out)
    assert type(loaded).__name__ == "FactoryStudent" and type(loaded.net).__name__ == "DictMLP"
    moved = load_student(out, factory="students:dict_mlp")  # the module form instead of the recorded file
    assert type(moved.net).__module__ == "students"
    with torch.no_grad():
        again = loaded(x)
    assert all(torch.equal(again[k], got[k]) for k in ("logits", "kd_logits", "embedding"))


@pytest.mark.parametrize("model, losses, message", [
    ({"factory": "no_such_pkg.students:f"}, [{"kind": "ce"}], r"cannot import 'no_such_pkg.students'.*PYTHONPATH"),
    ({"factory": "students:conv_logit"}, [{"kind": "ce"}], r"has no function 'conv_logit'; did you mean conv_logits"),
    ({"factory": "no/such/file.py:f"}, [{"kind": "ce"}], r"file .*no/such/file.py not found"),
    ({"factory": "students:not_a_module"}, [{"kind": "ce"}], r"returned list, not a torch.nn.Module"),
    ({"factory": "students:conv_logits", "args": {"depth": 3}}, [{"kind": "ce"}], r"unexpected keyword argument 'depth'"),
    ({"factory": "students:embedding_only"}, [{"kind": "kd", "teacher": "cnn"}],
     r"output has no 'logits' \(a dict with keys \['embedding'\]\), but loss kd trains them"),
    ({"factory": "students:conv_logits", "args": {"num_classes": 7}}, [{"kind": "ce"}],
     r"logits are \[b, 7\], but the store's teachers / labels have 10 classes"),
    ({"factory": "students:conv_logits"}, [{"kind": "embedding", "teacher": "cnn", "student_layer": "body.44"}],
     r"loss.0 \(embedding\) student_layer: the student has no layer 'body.44'; close matches: \['body.4'"),
    ({"factory": "students:conv_logits"}, [{"kind": "dho", "teacher": "cnn"}],
     r"the dho term needs the student's embedding, but its output has none"),
    ({"factory": "students:dict_mlp", "embedding": "encodr"}, [{"kind": "ce"}],
     r"model.embedding .*no layer 'encodr'; close matches: \['encoder'"),
])
def test_factory_mistakes_are_one_clear_error_before_anything_is_written(store, tmp_path, model, losses, message):
    out = tmp_path / "never"
    with pytest.raises(InputError, match=message):
        Recipe(parse_config(_doc(store, out, model, losses))).setup()
    assert not out.exists()


def test_config_refuses_mixing_a_factory_with_preset_settings():
    base = {"data": {"store": "/s"}}
    with pytest.raises(InputError, match="a model.factory student replaces them"):
        parse_config({**base, "model": {"factory": "students:conv_logits", "arch": "cnn"}})
    with pytest.raises(InputError, match="apply to a factory student"):
        parse_config({**base, "model": {"args": {"width": 3}}})
    with pytest.raises(InputError, match="must look like package.module:function"):
        parse_config({**base, "model": {"factory": "students.conv_logits"}})


def test_a_checkpoint_config_from_before_the_new_settings_still_resumes():
    from kdstore.train.checkpoint import config_differences

    doc = {"data": {"store": "/s"}, "loss": [{"kind": "ce"}, {"kind": "kd", "teacher": "t"}]}
    new = parse_config(doc).to_dict()
    old = json.loads(json.dumps(new))  # as an older kdstore wrote it: no factory, args, embedding, router_*
    for key in ("factory", "args", "embedding"):
        del old["model"][key]
    for term in old["loss"]:
        for key in ("teacher_temperature", "router_input", "router_hidden", "top_k", "balance_weight"):
            del term[key]
    assert config_differences(old, new) == []
    old["model"]["hidden"] = 64
    assert config_differences(old, new) == ["model.hidden: 64 → 32"]
