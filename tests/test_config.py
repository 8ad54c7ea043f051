"""The run config: defaults, ranges, and errors that name the field."""

from __future__ import annotations

import json

import pytest

from bncore.config import ConfigError, RunConfig, describe_fields, load_config, parse_config


def test_defaults_are_a_valid_run():
    cfg = RunConfig()
    assert cfg.norm.kind == "batch" and cfg.model.kind == "mlp" and cfg.data.name == "mnist1d"
    assert cfg.norm.resolved() == (0.1, 1e-5)


@pytest.mark.parametrize(
    "data,field,words",
    [
        ({"optim": {"lr": -1}}, "optim.lr", "greater than 0"),
        ({"batch_size": 1}, "batch_size", "greater than or equal to 2"),
        ({"model": {"depth": 0}}, "model.depth", "greater than or equal to 1"),
        ({"model": {"activation": "gelu"}}, "model.activation", "'relu', 'tanh'"),
        ({"norm": {"momentum": 1.5}}, "norm", "momentum must lie in [0, 1]"),
        (
            {"norm": {"convention": "keras", "momentum": "cumulative"}},
            "norm",
            "only in the pytorch convention",
        ),
        ({"model": {"widht": 3}}, "model.widht", "unknown field"),
        ({"data": {"name": "mnist"}}, "data", "set data.path"),
        ({"model": {"kind": "cnn"}, "data": {"name": "blobs"}}, "config", "spatial structure"),
        ({"model": {"width": 4096, "depth": 100}}, "config", "parameters; the limit"),
        (
            {"steps": 1_000_000, "channel_interval": 1, "model": {"width": 512, "depth": 50}},
            "config",
            "raise one of them",
        ),
    ],
)
def test_errors_name_the_field(data, field, words):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    fields = dict(info.value.errors)
    assert field in fields, fields
    assert words in fields[field]


def test_keras_convention_resolves_to_torch_momentum():
    cfg = parse_config({"norm": {"convention": "keras"}})
    momentum, eps = cfg.norm.resolved()
    assert momentum == pytest.approx(0.01) and eps == 1e-3
    assert parse_config({"norm": {"momentum": "cumulative"}}).norm.resolved()[0] is None


def test_load_yaml_json_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("steps: 50\nmodel:\n  depth: 2\n")
    cfg = load_config(tmp_path / "a.yaml", ["optim.lr=0.5", "norm.kind=none"])
    assert (cfg.steps, cfg.model.depth, cfg.optim.lr, cfg.norm.kind) == (50, 2, 0.5, "none")
    (tmp_path / "b.json").write_text(json.dumps({"batch_size": 16}))
    assert load_config(tmp_path / "b.json").batch_size == 16
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == RunConfig()


@pytest.mark.parametrize("text,words", [("[1, 2]", "mapping"), ("{bad", "not valid")])
def test_bad_files(tmp_path, text, words):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "ok.yaml").write_text("steps: 5\n")
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        load_config(tmp_path / "ok.yaml", ["oops"])


def test_config_round_trips_through_json():
    cfg = parse_config({"norm": {"placement": "after_activation"}, "seed": 4})
    assert parse_config(json.loads(cfg.model_dump_json())) == cfg


def test_every_field_is_described():
    text = "\n".join(describe_fields())
    for name in [
        "model.depth",
        "norm.convention",
        "data.split_seed",
        "optim.lr",
        "stats_interval",
        "channel_interval",
        "device",
    ]:
        assert name in text
    assert all("\n      " in line and line.split("\n")[1].strip() for line in describe_fields())
