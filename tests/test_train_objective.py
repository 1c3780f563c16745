"""The trainer's objective wiring on a real store, each loss kind against a hand computation.

The path under test is the trainer's own: a config → ``Recipe.setup`` (the loss-kind table,
the stored temperature, the dataset's field list, the model with its projectors) → one real
batch → ``Recipe.loss``. The expected values are written out here in float64 from the rows
read straight from the store (not through ``kdstore.train.losses``). Also: the online-KD
baseline draws crops other than the stored views, and a second run into one ``out_dir``.
"""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from kdstore.pipeline.augment import apply_view
from kdstore.pipeline.datasets import load_fashion_mnist
from kdstore.pipeline.decode import decode_image
from kdstore.pipeline.shards import iter_samples
from kdstore.pipeline.zoo import FashionCNN
from kdstore.store import open_store
from kdstore.store.errors import InputError
from kdstore.train.config import parse_config
from kdstore.train.recipe import Recipe, run

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
SHARD = 40
STORED_T = 2.0
AUGMENT = "rrc:scale=0.5-1;hflip:p=0.5"
VIEW_SEED = 3


def _write_tar(path, images, labels, keys) -> None:
    with wds.TarWriter(str(path)) as sink:
        for img, lab, key in zip(images, labels, keys):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            sink.write({"__key__": key, "png": buf.getvalue(), "cls": str(int(lab)).encode()})


def _precompute(store, inputs, name, weights, **kw) -> None:
    from kdstore.pipeline.job import PrecomputeConfig, run_precompute
    from kdstore.pipeline.worker import TeacherLoad

    load = TeacherLoad(factory="kdstore.pipeline.zoo:fashion_cnn", name=name, layers=("embed", "features"),
                       kwargs=(("weights", str(weights)),))
    run_precompute(PrecomputeConfig(store=store, inputs=(inputs,), teacher=load, progress=False, workers=1, **kw))


@pytest.fixture(scope="module")
def st(tmp_path_factory, ray_session):
    """2 train shards × 40 images; teachers cnn (T=2: logits, top-3, embedding, features, scores),
    cnn2 (logits, scores) and cnnv (2 stored views); hard negatives ``hn`` mined from cnn's embedding."""
    from kdstore.store.index import IndexSpec
    from kdstore.store.mine import MineSpec
    from kdstore.store.retrieval import mine_store

    root = tmp_path_factory.mktemp("obj")
    data = root / "data"
    data.mkdir()
    images, labels = load_fashion_mnist("train")
    for s in range(2):
        sl = slice(s * SHARD, (s + 1) * SHARD)
        _write_tar(data / f"train-{s:06d}.tar", images[sl], labels[sl], [f"train_{i:05d}" for i in range(sl.start, sl.stop)])
    weights = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        weights.append(root / f"cnn{seed}.pt")
        model = FashionCNN()
        with torch.no_grad():  # confident, row-dependent predictions: sample weights and temperatures matter
            model.head.weight.mul_(30.0)
        torch.save(model.state_dict(), weights[-1])
    inputs = str(data / "train-{000000..000001}.tar")
    store = root / "store"
    _precompute(store, inputs, "cnn", weights[0], temperature=STORED_T,
                outputs=("logits", "topk:3", "embedding:embed", "features:features:mean", "scores"))
    _precompute(store, inputs, "cnn2", weights[1], outputs=("logits", "scores"))
    _precompute(store, inputs, "cnnv", weights[0], outputs=("logits",), views=2, augment=AUGMENT, seed=VIEW_SEED)
    mine_store(store, "cnn", "embedding", MineSpec(num_negatives=3, range_max=10), name="hn",
               index_spec=IndexSpec(kind="flat"), progress=False)
    return {"root": root, "data": data, "store": store, "weights": weights}


def _doc(st, out, losses, **sections) -> dict:
    return {
        "data": {"store": str(st["store"]), "train_shards": ["train-"], "batch_size": 24, "shuffle_buffer": 8,
                 "labels": "per_class:2", "verify_inputs": "quick", **sections.pop("data", {})},
        "model": {"arch": "mlp", "hidden": 16},
        "train": {"out_dir": str(out), "steps": 3, "threads": 1, "checkpoint_every_steps": 2, "log_every_steps": 1,
                  "progress": False, **sections.pop("train", {})},
        "loss": losses,
        **sections,
    }


def _one_batch(st, tmp_path, losses, **sections):
    """``(recipe, batch, (total, parts))`` for the first real batch of the trainer's own stream."""
    recipe = Recipe(parse_config(_doc(st, tmp_path / "run", losses, **sections)))
    recipe.setup()
    recipe.train_set.set_epoch(0)
    recipe.train_set.set_resume(0)
    batch = next(iter(recipe.loader))
    with torch.no_grad():
        result = recipe.loss(batch)
    return recipe, batch, result


# --------------------------------------------------------------------------- hand computations (float64)


def _d(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x)).double()


def _wmean(per_row, w):
    return float((w * per_row).sum() / w.sum())


def _kl(log_p, log_q):
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _teacher(st, name, field, rows):
    return _d(open_store(st["store"]).teacher(name).read(field)[rows.numpy()])


def _student(recipe, batch):
    with torch.no_grad():
        return {k: v.double() for k, v in recipe.model(batch["input"]).items()}


def _linear(module, x):
    return x @ module.weight.detach().double().T + module.bias.detach().double()


def test_each_loss_kind_matches_a_hand_computation_through_the_trainer(st, tmp_path):
    terms = [
        {"kind": "ce"},
        {"kind": "kd", "teacher": "cnn", "temperature": 3.0, "sample_weights": "max_prob", "weight": 0.7},
        {"kind": "topk_kd", "teacher": "cnn", "weight": 0.5},
        {"kind": "feature", "teacher": "cnn", "field": "features/features", "student_layer": "body.fc", "weight": 0.2},
        {"kind": "embedding", "teacher": "cnn", "weight": 0.3},
        {"kind": "multi_kd", "teachers": ["cnn", "cnn2"], "combine": "confidence", "temperature": 2.0, "tau": 0.5,
         "teacher_weights": [1.0, 3.0], "weight": 0.4},
        {"kind": "contrastive", "teacher": "cnn", "negatives": "hn", "temperature": 0.2, "weight": 0.6},
    ]
    recipe, batch, (total, parts) = _one_batch(st, tmp_path, terms)
    real = ~batch["pad"]
    rows = batch["row"][real]
    labels = batch["label"][real]
    assert (labels >= 0).any() and (labels < 0).any()  # a batch with labelled and unlabelled rows
    out = {k: v[real] for k, v in _student(recipe, batch).items()}
    s = out["logits"]
    expected = {}

    lab = labels >= 0
    expected[0] = float(-F.log_softmax(s[lab], -1).gather(1, labels[lab, None]).mean())

    T = 3.0
    t = _teacher(st, "cnn", "logits", rows)
    w = _teacher(st, "cnn", "scores/max_prob", rows).clamp(0, 1)
    expected[1] = _wmean(_kl(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1)) * T * T, w)

    T = STORED_T  # the temperature the residual was recorded at, not the default 1
    v, idx = _teacher(st, "cnn", "topk/values", rows), _teacher(st, "cnn", "topk/indices", rows).long()
    r = _teacher(st, "cnn", "topk/residual", rows)
    p = torch.cat([(1 - r)[:, None] * torch.softmax(v / T, -1), r[:, None]], -1)
    q_all = torch.softmax(s / T, -1)
    q_top = q_all.gather(1, idx)
    q = torch.cat([q_top, (1 - q_top.sum(-1))[:, None]], -1)
    expected[2] = float(((p * (p.log() - q.log())).sum(-1) * T * T).mean())

    fc = recipe.model.student.body.fc
    tap = _linear(fc, batch["input"][real].double().flatten(1))
    proj = _linear(recipe.model.projectors["3"].proj, tap)
    expected[3] = float((proj - _teacher(st, "cnn", "features/features", rows)).pow(2).mean(-1).mean())

    proj = _linear(recipe.model.projectors["4"].proj, out["embedding"])
    expected[4] = float((1 - F.cosine_similarity(proj, _teacher(st, "cnn", "embedding", rows), dim=-1)).mean())

    T, tau = 2.0, 0.5
    z = torch.stack([_teacher(st, "cnn", "logits", rows), _teacher(st, "cnn2", "logits", rows)])
    entropy = -(torch.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1)
    gate = torch.tensor([1.0, 3.0], dtype=torch.float64)[:, None] * torch.exp(-entropy / tau)
    mixed = (gate[..., None] * torch.softmax(z / T, -1)).sum(0) / gate.sum(0)[:, None]
    expected[5] = float((_kl(mixed.log(), F.log_softmax(s / T, -1)) * T * T).mean())

    import pyarrow.parquet as pq

    T = 0.2
    mined = pq.read_table(st["store"] / "negatives" / "hn.parquet").to_pydict()
    by_row = {row: (pos, negs) for row, pos, negs in zip(mined["row"], mined["positive_row"], mined["negative_rows"])}
    table = _d(open_store(st["store"]).teacher("cnn").read("embedding"))
    anchor = _linear(recipe.model.projectors["6"].proj, out["embedding"])
    losses = []
    for a, row in zip(anchor, rows.tolist()):
        pos, negs = by_row.get(row, (-1, []))
        if pos < 0:
            continue  # no positive: the trainer masks the row out
        cands = torch.stack([table[pos]] + [table[n] for n in negs if n >= 0])
        logit = F.cosine_similarity(a[None], cands, dim=-1) / T
        losses.append(float(-(logit[0] - torch.logsumexp(logit, 0))))
    expected[6] = float(np.mean(losses))

    wrong = [(term["kind"], parts[f"loss/{i}.{term['kind']}"], expected[i]) for i, term in enumerate(terms)
             if not math.isclose(parts[f"loss/{i}.{term['kind']}"], expected[i], rel_tol=2e-4, abs_tol=1e-5)]
    assert not wrong, f"wrong kinds {[w[0] for w in wrong]}: {wrong}"
    hand_total = sum(term.get("weight", 1.0) * expected[i] for i, term in enumerate(terms))
    assert math.isclose(float(total), hand_total, rel_tol=2e-4)


def test_dho_matches_a_hand_computation_through_the_trainer(st, tmp_path):
    terms = [{"kind": "dho", "teacher": "cnn", "temperature": 2.5, "alpha": 0.3, "sample_weights": "max_prob"}]
    recipe, batch, (total, parts) = _one_batch(st, tmp_path, terms)
    real = ~batch["pad"]
    rows, labels = batch["row"][real], batch["label"][real]
    out = {k: v[real] for k, v in _student(recipe, batch).items()}
    w = _teacher(st, "cnn", "scores/max_prob", rows).clamp(0, 1)
    lab = labels >= 0
    ce = _wmean(-F.log_softmax(out["logits"][lab], -1).gather(1, labels[lab, None])[:, 0], w[lab])
    T = 2.5
    t = _teacher(st, "cnn", "logits", rows)
    kd = _wmean(_kl(F.log_softmax(t / T, -1), F.log_softmax(out["kd_logits"] / T, -1)) * T * T, w)
    expected = 0.3 * ce + 0.7 * kd
    assert math.isclose(parts["loss/0.dho"], expected, rel_tol=2e-4), (parts["loss/0.dho"], expected)
    assert math.isclose(float(total), expected, rel_tol=2e-4)


def _smooth_l1(a, b):
    diff = (a - b).abs()
    return torch.where(diff < 1, 0.5 * diff * diff, diff - 0.5)


def test_relational_ranking_and_routed_kinds_match_hand_computations_through_the_trainer(st, tmp_path):
    terms = [
        {"kind": "rkd_distance", "teacher": "cnn"},  # the student's embedding vs the stored embedding
        {"kind": "rkd_angle", "teacher": "cnn", "field": "features/features", "student_layer": "body.fc", "weight": 2.0},
        {"kind": "ranking", "teacher": "cnn", "temperature": 0.5, "teacher_temperature": 0.2,
         "sample_weights": "max_prob", "weight": 0.3},
        {"kind": "routed_kd", "teachers": ["cnn", "cnn2"], "temperature": 2.0, "balance_weight": 0.05,
         "sample_weights": "entropy", "weight": 0.4},
        {"kind": "routed_kd", "teachers": ["cnn", "cnn2"], "top_k": 1, "router_input": "embedding",
         "router_hidden": 5, "balance_weight": 0.0},
    ]
    recipe, batch, (total, parts) = _one_batch(st, tmp_path, terms)
    real = ~batch["pad"]
    rows = batch["row"][real]
    out = {k: v[real] for k, v in _student(recipe, batch).items()}
    s, emb = out["logits"], out["embedding"]
    b = len(rows)
    eye = torch.eye(b, dtype=torch.bool)
    t_emb = _teacher(st, "cnn", "embedding", rows)
    expected = {}

    def psi(x):
        d = torch.cdist(x, x)
        return d / d[~eye].mean()

    expected[0] = float(_smooth_l1(psi(emb), psi(t_emb))[~eye].mean())

    def angles(x):  # [j, i, k] = cos of the angle at x_j between x_i and x_k
        e = F.normalize(x[None, :, :] - x[:, None, :], dim=-1)
        return torch.einsum("jid,jkd->jik", e, e)

    fc = _linear(recipe.model.student.body.fc, batch["input"][real].double().flatten(1))
    idx = torch.arange(b)
    distinct = (idx[:, None, None] != idx[None, :, None]) & (idx[:, None, None] != idx[None, None, :]) \
        & (idx[None, :, None] != idx[None, None, :])
    feats = _teacher(st, "cnn", "features/features", rows)
    expected[1] = float(_smooth_l1(angles(fc), angles(feats))[distinct].mean())

    sn, tn = F.normalize(emb, dim=-1), F.normalize(t_emb, dim=-1)
    w = _teacher(st, "cnn", "scores/max_prob", rows).clamp(0, 1)
    per_row = []
    for i in range(b):
        others = idx != i  # every other row of the batch is a candidate
        log_p = F.log_softmax(tn[others] @ tn[i] / 0.2, 0)
        log_q = F.log_softmax(sn[others] @ sn[i] / 0.5, 0)
        per_row.append(float((log_p.exp() * (log_p - log_q)).sum()))
    expected[2] = _wmean(torch.tensor(per_row, dtype=torch.float64), w)

    T = 2.0
    z = torch.stack([_teacher(st, "cnn", "logits", rows), _teacher(st, "cnn2", "logits", rows)])
    kl = (_kl(F.log_softmax(z / T, -1), F.log_softmax(s / T, -1)) * T * T).T  # [b, t]
    router = recipe.model.projectors["3"].net  # fed the student's logits (MST-Distill's gate)
    gate = torch.softmax(_linear(router[2], F.gelu(_linear(router[0], s))), -1)
    H = torch.stack([_teacher(st, t, "scores/entropy", rows) for t in ("cnn", "cnn2")])  # stored, nats
    we = (1 - H / math.log(10)).clamp(0, 1).mean(0)  # entropy weights, mean over the two teachers
    usage = gate.mean(0)
    balance = float((0.5 * (math.log(0.5) - usage.log())).sum())
    expected[3] = _wmean((gate * kl).sum(-1), we) + 0.05 * balance

    router = recipe.model.projectors["4"].net  # fed the embedding; top-1: the best-routed teacher's KL
    assert router[0].out_features == 5
    route = _linear(router[2], F.gelu(_linear(router[0], emb)))
    T = 1.0
    kl1 = (_kl(F.log_softmax(z / T, -1), F.log_softmax(s / T, -1)) * T * T).T
    expected[4] = float(kl1.gather(1, route.argmax(1, keepdim=True)).mean())

    wrong = [(term["kind"], i, parts[f"loss/{i}.{term['kind']}"], expected[i]) for i, term in enumerate(terms)
             if not math.isclose(parts[f"loss/{i}.{term['kind']}"], expected[i], rel_tol=2e-4, abs_tol=1e-6)]
    assert not wrong, f"wrong terms: {wrong}"
    assert math.isclose(float(total), sum(t.get("weight", 1.0) * expected[i] for i, t in enumerate(terms)),
                        rel_tol=2e-4)
    assert len({round(v, 6) for v in w.tolist()}) > 3  # the weights differ between rows: they are tested


def test_the_terms_run_in_float32_under_autocast(st, tmp_path):
    """bfloat16 autocast would round the Gram matrices of the relational losses (a 2-4 % error)."""
    from kdstore.train.objective import compute_loss

    terms = [{"kind": "rkd_distance", "teacher": "cnn"}, {"kind": "rkd_angle", "teacher": "cnn"},
             {"kind": "ranking", "teacher": "cnn", "temperature": 0.1}]
    recipe, batch, (_, parts) = _one_batch(st, tmp_path, terms)
    with torch.no_grad():
        out = recipe.model(batch["input"])  # float32 outputs; only the loss runs under autocast here
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, amp_parts = compute_loss(recipe.terms, out, batch, recipe.num_classes)
    assert amp_parts == pytest.approx(parts, rel=1e-6)


@pytest.mark.parametrize("term, message", [
    ({"kind": "ce", "sample_weights": "max_prob"}, r"loss ce: sample_weights does not apply to this kind \(it takes weight\)"),
    ({"kind": "rkd_angle", "teacher": "t", "sample_weights": "entropy"},
     r"sample_weights does not apply .*takes weight, teacher, field, student_layer"),
    ({"kind": "kd", "teachers": ["t", "u"]}, r"loss kd: name its teacher"),
    ({"kind": "routed_kd", "teachers": ["t", "u"], "top_k": 3}, r"top_k must be in \[0, number of teachers\]"),
    ({"kind": "multi_kd", "teachers": ["t"], "router_input": "embedding"}, r"router_input does not apply"),
])
def test_a_setting_the_kind_does_not_read_is_refused(term, message):
    with pytest.raises(InputError, match=message):
        parse_config({"data": {"store": "/s"}, "loss": [term]})


# Kinds whose value is one weighted mean of independent per-row losses; the others are
# hand-computed above (dho: two means; ranking: rows rank each other).
PER_ROW_WEIGHTED = {
    "kd": {"teacher": "cnn", "temperature": 2.0},
    "topk_kd": {"teacher": "cnn"},
    "feature": {"teacher": "cnn", "field": "features/features", "student_layer": "body.fc"},
    "embedding": {"teacher": "cnn"},
    "multi_kd": {"teachers": ["cnn", "cnn2"], "combine": "confidence"},
    "contrastive": {"teacher": "cnn", "negatives": "hn", "temperature": 0.3},
    "routed_kd": {"teachers": ["cnn", "cnn2"], "balance_weight": 0.0},
}


def test_sample_weights_reach_every_kind_that_takes_them(st, tmp_path):
    from kdstore.train.objective import KINDS

    weighted = {name for name, kind in KINDS.items() if "sample_weights" in kind.settings}
    assert weighted == set(PER_ROW_WEIGHTED) | {"dho", "ranking"}  # a new kind joins one of the two tests
    terms = [{"kind": kind, "sample_weights": "max_prob", "weight_power": 2.0, **extra}
             for kind, extra in PER_ROW_WEIGHTED.items()]
    recipe, batch, (_, parts) = _one_batch(st, tmp_path, terms)
    real = torch.nonzero(~batch["pad"])[:, 0]
    rows = batch["row"][real]
    per_row = []
    with torch.no_grad():
        for i in real.tolist():  # each row alone: every other row is a pad
            alone = dict(batch, pad=torch.arange(len(batch["pad"])) != i)
            per_row.append(recipe.loss(alone)[1])
    for i, term in enumerate(terms):
        name = f"loss/{i}.{term['kind']}"
        teachers = term.get("teachers", [term.get("teacher")])
        w = torch.stack([_teacher(st, t, "scores/max_prob", rows).clamp(0, 1) ** 2 for t in teachers]).mean(0)
        losses = torch.tensor([p[name] for p in per_row], dtype=torch.float64)
        assert float(w.std() / w.mean()) > 0.05  # the weights differ between rows
        off_weighted = abs(parts[name] - _wmean(losses, w))
        off_unweighted = abs(parts[name] - float(losses.mean()))
        assert off_weighted <= 1e-5 * abs(parts[name]) + 1e-7, (term["kind"], off_weighted)
        assert off_unweighted > 10 * off_weighted, (term["kind"], off_unweighted, off_weighted)  # weights matter


# Each loss kind appears in at least one of these (checked below).
CONFIG_EXAMPLES = ["fashion_factory_student.toml", "fashion_relational.toml", "fashion_routed_teachers.toml",
                   "fashion_contrastive.toml", "fashion_few_labels_dho.toml", "losses_tour.toml"]


def test_every_loss_kind_has_a_config_example():
    from pathlib import Path

    from kdstore.train.config import load_config
    from kdstore.train.objective import KINDS

    root = Path(__file__).parents[1] / "configs"
    # the token kinds' examples are the LM configs (parsed here; tests/test_lm_train.py runs those kinds through `kdstore train`)
    names = CONFIG_EXAMPLES + ["lm_ce.toml", "lm_topk.toml", "lm_rskd.toml", "lm_taid.toml"]
    shown = {t.kind for name in names for t in load_config(root / name).loss}
    assert shown == set(KINDS)


@pytest.mark.parametrize("name", CONFIG_EXAMPLES)
def test_config_examples_run(st, tmp_path, monkeypatch, name):
    from pathlib import Path

    from kdstore.train.config import load_config

    root = Path(__file__).parents[1]
    monkeypatch.chdir(root)  # the factory example names its file relative to the repository root
    cfg = load_config(root / "configs" / name, [
        f"data.store={json.dumps(str(st['store']))}", f"train.out_dir={json.dumps(str(tmp_path / 'run'))}",
        "data.eval_shards=[]", 'data.labels="per_class:2"', "data.batch_size=16", "data.workers=0",
        "data.cache=false", "train.steps=2", "train.epochs=1", "train.progress=false",
        "train.checkpoint_every_steps=0"])
    result = run(cfg)
    assert result.steps == 2
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in log if "loss" in r]
    assert losses and all(math.isfinite(r["loss"]) for r in losses)
    assert {f"loss/{i}.{t.kind}" for i, t in enumerate(cfg.loss)} <= set(losses[-1])
    from kdstore.train import load_student

    student = load_student(tmp_path / "run")  # rebuilt from student.json, weights from student.pt
    expected_type = {"fashion_factory_student.toml": "SmallConvNet"}.get(name, "Classifier")
    assert type(student).__name__ == expected_type
    saved = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    state = student.state_dict()
    assert all(torch.equal(v, saved[k if k in saved else f"net.{k}"]) for k, v in state.items())


# --------------------------------------------------------------------------- top-k temperature


def test_topk_kd_takes_the_stored_temperature_and_refuses_another(st, tmp_path):
    recipe, _, _ = _one_batch(st, tmp_path, [{"kind": "topk_kd", "teacher": "cnn"}, {"kind": "kd", "teacher": "cnn"}])
    assert recipe.cfg.loss[0].temperature is None  # not given in the config
    assert recipe.terms[0].temperature == STORED_T  # the one the residual was recorded at
    assert recipe.terms[1].temperature == 1.0  # other kinds keep the default
    same = Recipe(parse_config(_doc(st, tmp_path / "same", [{"kind": "topk_kd", "teacher": "cnn", "temperature": 2}])))
    same.setup()
    assert same.terms[0].temperature == STORED_T
    other = Recipe(parse_config(_doc(st, tmp_path / "other", [{"kind": "topk_kd", "teacher": "cnn", "temperature": 4}])))
    with pytest.raises(InputError, match=r"temperature 4 differs from the temperature 2 teacher cnn's top-k residual"):
        other.setup()
    assert not (tmp_path / "other").exists()  # refused before anything was written


# --------------------------------------------------------------------------- online KD


def test_online_kd_draws_crops_other_than_the_stored_views(st, tmp_path):
    online = {"enabled": True, "teacher": "cnnv", "factory": "kdstore.pipeline.zoo:fashion_cnn",
              "teacher_args": {"weights": str(st["weights"][0])}, "augment": AUGMENT}
    # The worst case: the store's own augmentation and seed.
    doc = _doc(st, tmp_path / "online", [{"kind": "kd", "teacher": "cnnv"}], online=online,
               train={"seed": VIEW_SEED}, data={"labels": "all"})
    recipe = Recipe(parse_config(doc))
    recipe.setup()
    params = open_store(st["store"]).teacher("cnnv").view_params(0)
    plain = {s["__key__"]: decode_image(s["png"]) for s in iter_samples(st["data"] / "train-000000.tar")}
    stored = {key: [apply_view(img, params[i, v]) for v in (0, 1)] for i, (key, img) in enumerate(plain.items())}
    seen, replayed = {}, 0
    for epoch in (0, 1, 2):
        recipe.train_set.set_epoch(epoch)
        for item in recipe.train_set:
            if item["key"] in stored:
                replayed += any(torch.equal(item["input"], view) for view in stored[item["key"]])
                seen.setdefault(item["key"], []).append(item["input"])
    assert len(seen) == SHARD and replayed == 0
    assert all(not torch.equal(a, b) for a, b, _ in seen.values())  # a fresh crop every epoch


# --------------------------------------------------------------------------- one run per out_dir


def _steps(out) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_second_run_into_a_used_out_dir_is_refused_unless_resume_or_overwrite(st, tmp_path):
    out = tmp_path / "run"
    terms = [{"kind": "ce"}, {"kind": "kd", "teacher": "cnn"}]
    doc = _doc(st, out, terms, train={"steps": 5})
    run(parse_config(doc))
    assert _steps(out) == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000000002.pt", "step-000000004.pt"]
    state = torch.load(out / "checkpoints" / "step-000000004.pt", weights_only=True)  # tensors and plain values
    assert state["step"] == 4
    (out / "notes.txt").write_text("mine")

    shorter = _doc(st, out, terms, train={"steps": 3, "checkpoint_every_steps": 1})
    with pytest.raises(InputError, match=r"train.out_dir .* is not empty .*--resume .*--overwrite"):
        run(parse_config(shorter))
    assert _steps(out) == [1, 2, 3, 4, 5]  # untouched

    # --overwrite: a fresh run; the earlier run's files (its higher-numbered checkpoints too) are gone.
    run(parse_config(shorter), overwrite=True)
    assert _steps(out) == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000000002.pt", "step-000000003.pt"]
    assert (out / "notes.txt").read_text() == "mine"  # not written by kdstore: kept

    # --resume: the saved config must match, other than settings that do not change the run.
    with pytest.raises(InputError, match=r"other settings \(optim.lr: 0.003 → 0.01\)"):
        run(parse_config({**shorter, "optim": {"lr": 0.01}}), resume=True)
    longer = _doc(st, out, terms, train={"steps": 3, "checkpoint_every_steps": 1, "log_every_steps": 2})
    assert run(parse_config(longer), resume=True).steps == 3
    with pytest.raises(InputError, match="exclude each other"):
        run(parse_config(shorter), resume=True, overwrite=True)


def test_cli_refuses_a_used_out_dir_in_one_line_and_overwrites_on_request(st, tmp_path):
    from click.testing import CliRunner

    from kdstore.cli.main import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\nstore = "{st["store"]}"\nverify_inputs = "off"\nbatch_size = 40\n\n'
                   f'[train]\nsteps = 1\nthreads = 1\n\n[[loss]]\nkind = "ce"\n')
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    runner = CliRunner()
    res = runner.invoke(main, ["train", str(cfg), "--out", str(out), "--no-progress"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "is not empty" in res.output
    res = runner.invoke(main, ["train", str(cfg), "--out", str(out), "--no-progress", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert _steps(out) == [1]
