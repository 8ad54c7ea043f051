"""The run config: defaults, ranges, and errors that name the field."""

from __future__ import annotations

import json

import pytest

from bncore.run.config import ConfigError, RunConfig, describe_fields, load_config, parse_config


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
        ({"norm": {"momentum": 1.5}}, "norm.momentum", "momentum must lie in [0, 1]"),
        (
            {"norm": {"convention": "keras", "momentum": "cumulative"}},
            "norm.momentum",
            "only in the pytorch convention",
        ),
        ({"model": {"widht": 3}}, "model.widht", "unknown field (check the spelling)"),
        ({"data": {"name": "mnist"}}, "data.path", "set data.path"),
        ({"model": {"kind": "cnn"}, "data": {"name": "blobs"}}, "model.kind", "spatial structure"),
        ({"model": {"width": 4096, "depth": 100}}, "model.width", "parameters; the limit"),
        (
            {"steps": 1_000_000, "channel_interval": 1, "model": {"width": 512, "depth": 50}},
            "channel_interval",
            "raise one of them",
        ),
        ({"batch_size": "64"}, "batch_size", "not the string '64' (write numbers without quotes)"),
        ({"optim": {"lr": "0.1"}}, "optim.lr", "expected a number"),
        ({"landscape": "yes"}, "landscape", "expected true or false"),
    ],
)
def test_errors_name_the_field(data, field, words):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    fields = dict(info.value.errors)
    assert field in fields, fields
    assert words in fields[field]


@pytest.mark.parametrize(
    "data,fields",
    [
        ({"norm": {"kind": "ghost", "virtual_batch": 12}}, ["norm.virtual_batch", "batch_size"]),
        ({"norm": {"convention": "keras", "momentum": "cumulative"}},
         ["norm.momentum", "norm.convention"]),
        ({"data": {"name": "mnist"}}, ["data.path", "data.name"]),
        ({"model": {"kind": "cnn"}, "data": {"name": "blobs"}}, ["model.kind", "data.name"]),
        ({"stats_interval": 10, "ics_interval": 15}, ["ics_interval", "stats_interval"]),
        ({"model": {"width": 24}, "norm": {"kind": "group", "groups": 5}},
         ["norm.groups", "model.width"]),
        ({"model": {"width": 4096, "depth": 100}}, ["model.width", "model.depth"]),
    ],
)  # fmt: skip
def test_a_rule_over_several_fields_names_each_of_them(data, fields):
    """One entry per field, the same message: a form shows it beside each field; the one-line
    form says it once."""
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    errors = info.value.errors
    assert [f for f, _ in errors] == fields
    assert len({m for _, m in errors}) == 1
    message = errors[0][1]
    assert str(info.value) == f"{', '.join(fields)}: {message}"


def test_strict_in_json_lenient_in_text():
    """A JSON "64" is refused (API, dashboard); ints are floats still; files and --set, which
    are text, read numbers leniently."""
    cfg = parse_config({"optim": {"lr": 1, "momentum": 0}, "norm": {"momentum": 0, "eps": 1}})
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0 and cfg.norm.momentum == 0.0
    assert RunConfig.model_validate_json('{"optim": {"lr": 1}, "steps": 5}').optim.lr == 1.0
    with pytest.raises(ConfigError, match="batch_size"):
        parse_config({"batch_size": "64"})
    lenient = parse_config({"batch_size": "64", "optim": {"lr": "1e-3"}}, strict=False)
    assert (lenient.batch_size, lenient.optim.lr) == (64, 0.001)


def test_keras_convention_resolves_to_torch_momentum():
    cfg = parse_config({"norm": {"convention": "keras"}})
    momentum, eps = cfg.norm.resolved()
    assert momentum == pytest.approx(0.01) and eps == 1e-3
    assert parse_config({"norm": {"momentum": "cumulative"}}).norm.resolved()[0] is None


def test_load_yaml_json_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("steps: 50\nmodel:\n  depth: 2\n")
    cfg = load_config(tmp_path / "a.yaml", ["optim.lr=0.5", "norm.kind=none"])
    assert (cfg.steps, cfg.model.depth, cfg.optim.lr, cfg.norm.kind) == (50, 2, 0.5, "none")
    # YAML reads 1e-3 as a string and "64" is quoted: text, so read as the numbers they say
    (tmp_path / "q.yaml").write_text("batch_size: '64'\noptim: {lr: 1e-3}\n")
    cfg = load_config(tmp_path / "q.yaml", ["steps=7", "optim.momentum=1e-1"])
    assert (cfg.batch_size, cfg.optim.lr, cfg.steps, cfg.optim.momentum) == (64, 1e-3, 7, 0.1)
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
