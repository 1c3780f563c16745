"""kdstore.train.config: parsing, validation messages, overrides, TOML and YAML files."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdstore.store.errors import InputError
from kdstore.train.config import apply_overrides, load_config, parse_config

BASE = {
    "data": {"store": "/s", "labels": "per_class:100"},
    "loss": [{"kind": "ce"}, {"kind": "kd", "teacher": "cnn", "temperature": 4}],
}


def test_defaults_and_types():
    cfg = parse_config(BASE)
    assert cfg.data.train_shards == ("train-",)
    assert cfg.loss[1].temperature == 4.0 and isinstance(cfg.loss[1].temperature, float)
    assert cfg.teachers() == {"cnn": {"logits"}}
    assert not cfg.dual_head
    assert cfg.to_dict()["loss"][1]["teacher"] == "cnn"


def test_overrides_reach_nested_fields_and_list_entries():
    cfg = parse_config(BASE, ["optim.lr=0.01", "loss.1.temperature=2", "data.train_shards=['0..3', 'train-']",
                              "train.out_dir=runs/x", "data.cache=true"])
    assert cfg.optim.lr == 0.01
    assert cfg.loss[1].temperature == 2.0
    assert cfg.data.train_shards == ("0..3", "train-")
    assert cfg.train.out_dir == "runs/x"
    assert cfg.data.cache is True
    assert BASE["loss"][1]["temperature"] == 4  # the document itself is not modified


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.batch_size=0"], "data.batch_size must be > 0"),
        (["data.labels=some"], "data.labels must be all | none | per_class:N"),
        (["data.bogus=1"], "unknown setting(s) ['bogus']"),
        (["optim.lr=fast"], "optim.lr must be float"),
        (["loss.1.kind=magic"], "loss.kind must be one of"),
        (["loss.1.teacher="], "loss kd: name its teacher"),
        (["loss.5.weight=1"], "loss has 2 entries, no '5'"),
        (["model.arch=vit"], "model.arch must be one of"),
        (["optimlr"], "--set must look like section.field=value"),
    ],
)
def test_bad_values_are_refused_with_the_field_name(overrides, message):
    with pytest.raises(InputError, match=None) as info:
        parse_config(BASE, overrides)
    assert message in str(info.value)


def test_dho_excludes_separate_ce_and_kd_terms():
    doc = {"data": {"store": "/s"}, "loss": [{"kind": "dho", "teacher": "cnn"}]}
    assert parse_config(doc).dual_head
    with pytest.raises(InputError, match="dho term already holds"):
        parse_config({**doc, "loss": [{"kind": "dho", "teacher": "cnn"}, {"kind": "ce"}]})


def test_missing_store_is_named():
    with pytest.raises(InputError, match=r"data: missing required setting\(s\) \['store'\]"):
        parse_config({"data": {}})


def test_toml_and_yaml_files(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[data]\nstore = "/s"\n\n[[loss]]\nkind = "ce"\n\n[[loss]]\nkind = "topk_kd"\nteacher = "t"\n')
    cfg = load_config(toml, ["train.epochs=3"])
    assert cfg.train.epochs == 3
    assert cfg.teachers() == {"t": {"topk/values", "topk/indices", "topk/residual"}}
    yaml = pytest.importorskip("yaml")
    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump({"data": {"store": "/s"}, "loss": [{"kind": "ce"}]}))
    assert load_config(y).data.store == "/s"
    bad = tmp_path / "c.toml.txt"
    bad.write_text("")
    with pytest.raises(InputError, match="must end in .toml"):
        load_config(bad)
    broken = tmp_path / "b.toml"
    broken.write_text("[data\n")
    with pytest.raises(InputError, match="invalid TOML"):
        load_config(broken)


def test_apply_overrides_creates_missing_sections():
    assert apply_overrides({}, ["online.enabled=true"]) == {"online": {"enabled": True}}


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.loss and cfg.data.store


def test_labels_are_parsed_once_into_a_frozen_spec():
    import subprocess
    import sys

    from kdstore.train.config import LabelsSpec

    cfg = parse_config(BASE)
    assert cfg.data.labels == LabelsSpec(kind="per_class", count=100)
    assert cfg.to_dict()["data"]["labels"] == "per_class:100"  # config.json keeps the text
    assert str(LabelsSpec.parse("keys:/tmp/k.txt")) == "keys:/tmp/k.txt"
    # The dataset takes the parsed spec and needs nothing from the config module.
    code = "import sys, kdstore.train.dataset; print('kdstore.train.config' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_the_loss_kind_table_drives_validation_and_fields():
    from kdstore.train.config import LossConfig
    from kdstore.train.objective import KINDS

    settings = {f for f in LossConfig.__dataclass_fields__}
    for kind in KINDS.values():
        assert set(kind.settings) <= settings and {s for s, _ in kind.required} <= settings, kind.name
    cfg = parse_config({"data": {"store": "/s"}, "loss": [{"kind": "topk_kd", "teacher": "t"},
                                                          {"kind": "embedding", "teacher": "u", "sample_weights": "entropy"}]})
    assert cfg.loss[0].temperature is None  # the stored temperature is looked up at setup
    assert cfg.teachers() == {"t": {"topk/values", "topk/indices", "topk/residual"}, "u": {"embedding", "scores/entropy"}}
    with pytest.raises(InputError, match="loss contrastive: name the mined negatives"):
        parse_config({"data": {"store": "/s"}, "loss": [{"kind": "contrastive", "teacher": "t"}]})
