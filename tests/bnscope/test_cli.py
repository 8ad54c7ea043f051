"""bnscope train: a config file in, documented Parquet records out, clear errors."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import numpy as np

from bncore.record.sinks import read_parquet


def _bnscope(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bnscope.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_train_writes_records(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "steps: 60\neval_interval: 30\nmodel: {depth: 2, width: 16}\ndata: {name: digits}\n"
    )
    out = tmp_path / "out"
    result = _bnscope("train", str(cfg), "--out", str(out), "--set", "optim.lr=0.1")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and summary["steps"] == 60
    assert "step/s" in result.stderr  # the progress bar
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["layers"] == ["block0", "block1"]
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 0.1
    rec = read_parquet(out)
    assert list(rec.steps["step"]) == list(range(1, 61))
    assert len(rec.layers["step"]) == 120 and rec.channels["pre_var"].shape[1] == 16
    assert list(rec.evals["step"]) == [0, 30, 60]
    assert np.isfinite(rec.layers["grad_in_norm"]).all()


def test_bad_config_names_the_field(tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"optim": {"lr": 0}, "model": {"depht": 3}}))
    result = _bnscope("train", str(cfg), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "optim.lr: Input should be greater than 0" in result.stderr
    assert "model.depht: unknown field (check the spelling)" in result.stderr
    assert "`bnscope train --help` lists the fields" in result.stderr
    assert not (tmp_path / "o").exists()


def test_a_rule_over_two_fields_names_both_once(tmp_path):
    cfg = tmp_path / "ghost.yaml"
    cfg.write_text("norm: {kind: ghost, virtual_batch: 12}\n")
    result = _bnscope("train", str(cfg), "--out", str(tmp_path / "o"), "--set", "batch_size=64")
    assert result.returncode == 2
    line = "bnscope train: norm.virtual_batch, batch_size: norm.virtual_batch=12 must divide"
    assert result.stderr.count(line) == 1, result.stderr


def test_info_says_while_it_builds_the_kernel(tmp_path):
    """A first use compiles the fused kernel (about a minute): bnscope info says so before and
    after. A stand-in compiler that 'builds' at once keeps this fast."""
    fake = tmp_path / "quick-c++"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    result = subprocess.run(
        [sys.executable, "-m", "bnscope.cli", "info"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CXX": str(fake), "BNCORE_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr
    assert "bnscope: building the fused CPU batch-norm kernel (first use" in result.stderr
    assert "bnscope: built the fused CPU batch-norm kernel in" in result.stderr


def test_missing_config_file_and_missing_data(tmp_path):
    result = _bnscope("train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "cannot read" in result.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{name: mnist, path: {tmp_path / 'empty'}}}\n")
    result = _bnscope("train", str(cfg), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "is not a directory" in result.stderr


def test_diverged_run_exits_3_with_its_records(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "steps: 300\nmodel: {activation: linear, depth: 2, width: 16}\n"
        "norm: {kind: none}\noptim: {lr: 50}\ndata: {name: digits}\n"
    )
    result = _bnscope("train", str(cfg), "--out", str(tmp_path / "o"), "--quiet")
    assert result.returncode == 3, result.stderr
    assert json.loads(result.stdout)["status"] == "diverged"
    assert len(read_parquet(tmp_path / "o").steps["step"]) > 0


def test_help_documents_every_field():
    result = _bnscope("train", "--help")
    assert result.returncode == 0
    for field in (
        "model.depth",
        "norm.placement",
        "norm.convention",
        "data.path",
        "optim.weight_decay",
        "stats_interval",
        "seed",
        "device",
    ):
        assert field in result.stdout
    assert "Exit status" in result.stdout


def test_serve_refuses_settings_that_cannot_work(tmp_path):
    """Each bad server setting: a message naming the flag, exit 2, nothing started."""
    for args, words in [
        (["--protect-reads"], "protect_reads needs a token (--token)"),
        (["--max-run-memory", "lots"], "is not a size"),
        (["--durability", "paranoid"], "invalid choice: 'paranoid'"),
        (["--max-queued", "0"], "--max-queued: Input should be greater than or equal to 1"),
    ]:
        r = _bnscope("serve", "--data-dir", str(tmp_path), "--port", "0", *args, timeout=60)
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr)


def test_serve_refuses_a_database_it_cannot_read_and_replaces_nothing(tmp_path):
    """A file that is no database, one cut short, and one whose tables are gone (its header
    page alone, as when the WAL that held everything else is deleted: SQLite reads it as an
    empty database, and the server used to fill it afresh): one line that names the file and
    what to do, exit 2, the file left as it was."""
    import sqlite3

    from server.store import Store

    good = tmp_path / "good"
    Store(f"sqlite:///{good / 'bnscope.db'}").engine.dispose()  # a real, migrated database
    header_only = tmp_path / "header.db"
    with contextlib.closing(sqlite3.connect(header_only)) as db:
        db.execute("PRAGMA user_version = 7")  # a valid database of one page, no table
    for name, content, words in [
        ("garbage", b"this is no database " * 400, "file is not a database"),
        ("cut", (good / "bnscope.db").read_bytes()[:1000], "database disk image is malformed"),
        ("header", header_only.read_bytes(), "holds no tables (cut short, or not BN Scope's)"),
    ]:
        data = tmp_path / name
        data.mkdir()
        (data / "bnscope.db").write_bytes(content)
        r = _bnscope("serve", "--data-dir", str(data), "--port", "0", timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (name, r.stderr[-2000:])
        assert words in lines[0] and str(data / "bnscope.db") in lines[0], lines
        assert "restore it from a backup, or move it aside" in lines[0]
        assert (data / "bnscope.db").read_bytes() == content  # nothing replaced


def _serve_parser():
    import argparse

    from bnscope.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices["serve"]


def test_every_setting_is_a_flag_of_serve_whose_help_shows_its_default():
    """bnscope serve's flags are made from server.settings.Settings: each field has one, read as
    its type says, and its help shows the field's default (taken from the field)."""
    from bnscope.flags import parse_size
    from server.settings import Settings

    _, serve = _serve_parser()
    actions = {a.dest: a for a in serve._actions}
    assert actions["data_dir"].option_strings == ["--data-dir"]
    assert actions["cors_origins"].option_strings == ["--cors-origin"]  # one origin a flag
    for name, field in Settings.model_fields.items():
        action = actions[name]
        assert action.option_strings and action.help, name
        assert "default" in action.help, (name, action.help)
        default = field.get_default(call_default_factory=True)
        shown = action.help.rsplit("default: ", 1)[-1].removesuffix(")")
        if isinstance(default, bool):
            assert shown == ("on" if default else "off"), (name, shown)
        elif action.metavar == "BYTES" and default is not None:
            assert parse_size(shown) == default, (name, shown)
        elif field.default_factory is not None:
            assert shown == (f"{default} on this machine" if default else "none"), (name, shown)
        elif default is not None:
            assert shown == str(default), (name, shown)


def test_serve_passes_only_the_flags_given_so_the_environment_sets_the_rest(monkeypatch):
    from bnscope.flags import given
    from server.settings import GiB, Settings

    parser, _ = _serve_parser()
    args = parser.parse_args(
        ["serve", "--max-run-disk", "1GiB", "--cors-origin", "http://a", "--cors-origin",
         "http://b", "--protect-reads", "--token", "t", "--durability", "full", "--port", "9"]
    )  # fmt: skip
    assert given(args) == {
        "max_run_disk": GiB, "cors_origins": ["http://a", "http://b"], "protect_reads": True,
        "token": "t", "durability": "full", "port": 9,
    }  # fmt: skip
    monkeypatch.setenv("BNSCOPE_MAX_QUEUED", "5")
    monkeypatch.setenv("BNSCOPE_PORT", "7")
    settings = Settings(**given(args))
    assert (settings.max_queued, settings.port, settings.max_run_disk) == (5, 9, GiB)


def test_train_prints_what_the_bn_doctor_found(tmp_path):
    """A torch momentum of 0.7 (Keras' convention given to torch): at the end, on stderr, one
    line for the diagnosis (severity, rule, layers, message) and its fix indented below; the
    JSON summary on stdout carries the diagnoses too."""
    cfg = tmp_path / "keras.yaml"
    cfg.write_text("steps: 40\nmodel: {depth: 2, width: 16}\ndata: {name: digits}\n")
    out = tmp_path / "out"
    result = _bnscope("train", str(cfg), "--out", str(out), "--quiet", "--set", "norm.momentum=0.7")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    at = next(i for i, line in enumerate(lines) if "momentum-convention" in line)
    assert lines[at].startswith("warning momentum-convention in block0, block1: ")
    assert "momentum=0.7 in PyTorch's convention" in lines[at]
    assert lines[at + 1].startswith("    fix: momentum = 1 - keras_momentum")
    summary = json.loads(result.stdout)
    assert "momentum-convention" in [d["rule"] for d in summary["diagnoses"]]
