"""The ``bnscope`` command line: ``train`` a run from a config file, run an ``experiment`` here,
``serve`` the product, ``info`` about this machine."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import bncore
from bncore.nn import kernels
from bncore.nn.kernels import cpu
from bncore.run.config import UNKNOWN_FIELD, ConfigError, describe_fields, grouped, load_config
from bnscope.flags import add_settings, flag_name, given

if TYPE_CHECKING:
    from bncore.diagnose import Diagnosis

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DIVERGED = 0, 1, 2, 3


def _info(_: argparse.Namespace) -> int:
    """Versions, devices, and which batch-norm kernel runs here (building it if needed)."""
    print(
        f"bnscope {bncore.__version__}  python {platform.python_version()}  "
        f"torch {torch.__version__}"
    )
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"devices: cpu ({torch.get_num_threads()} threads), cuda: {cuda}")
    fused = "available" if cpu.available() else f"unavailable ({cpu.unavailable_reason()})"
    print(f"fused CPU kernel: {fused}")
    chosen = kernels.select(torch.zeros(2, 2), None, None).NAME
    forced = " (forced by BNCORE_KERNEL)" if kernels.forced() else ""
    print(f"kernel used for float32 CPU input: {chosen}{forced}")
    return EXIT_OK


def diagnosis_lines(found: Sequence[Diagnosis], steps: int) -> list[str]:
    """What the BN doctor found (bncore.diagnose), one line each: severity, rule, layers,
    message, its fix indented on the next; or the one line that says it found nothing."""
    if not found:
        return [f"BN doctor: no BN problem found in {steps} steps"]
    lines = [f"BN doctor: {len(found)} finding{'s' * (len(found) > 1)}"]
    for d in found:
        layers = ", ".join(d.layers) or "the run"
        silenced = " (silenced)" if d.silenced else ""
        lines += [f"{d.severity} {d.rule}{silenced} in {layers}: {d.message}", f"    fix: {d.fix}"]
    return lines


def _diagnoses_of(records: Any, meta: dict[str, Any]) -> list[Diagnosis]:
    """What the BN doctor finds in a run's records (empty where it cannot read them: a note
    on stderr)."""
    from bncore.diagnose import diagnose

    try:
        return diagnose(records, meta).diagnoses
    except Exception as exc:  # the doctor's failure is not the run's
        print(f"bnscope: the BN doctor could not read the run: {exc}", file=sys.stderr)
        return []


def _train(args: argparse.Namespace) -> int:
    """Train the run a config file describes, writing its records to --out."""
    from tqdm import tqdm

    from bncore.record.sinks import ParquetSink
    from bncore.run.data import DatasetError, load_dataset
    from bncore.run.distributed import train_replicas
    from bncore.run.engine import Trainer

    try:
        config = load_config(args.config, args.set)
        # a distributed run's replicas build their trainers; its data is checked here first
        trainer = Trainer(config) if config.distributed.replicas == 1 else None
        if trainer is None:
            load_dataset(config.data)
    except ConfigError as exc:
        for fields, message in grouped(exc.errors):
            print(f"bnscope train: {', '.join(fields)}: {message}", file=sys.stderr)
        if any(message == UNKNOWN_FIELD for _, message in exc.errors):
            print("bnscope train: `bnscope train --help` lists the fields", file=sys.stderr)
        return EXIT_USAGE
    except (DatasetError, ValueError) as exc:
        print(f"bnscope train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if trainer is None or trainer.device.type == "cpu":
        # builds the fused kernel now, if this is its first use, so that its progress lines
        # come before the progress bar rather than inside it
        kernels.select(torch.zeros(2, 2), None, None)
    bar = tqdm(total=config.steps, unit="step", disable=args.quiet, dynamic_ncols=True)

    def progress(t: Trainer, rec) -> None:
        if rec.steps:
            bar.update(len(rec.steps["step"]))
            bar.set_postfix(loss=f"{float(rec.steps['loss'][-1]):.4f}")

    try:
        sink = ParquetSink(args.out)
        if trainer is None:
            result = train_replicas(config, sink, on_flush=progress)
        else:
            result = trainer.run(sink, on_flush=progress)
    except KeyboardInterrupt:
        print("\nbnscope train: interrupted", file=sys.stderr)
        return EXIT_FAILED
    finally:
        bar.close()
    from bncore.record.sinks import read_parquet

    # the BN doctor over what the run wrote (its records and meta): on stderr, beside the
    # progress bar; stdout stays the JSON summary
    meta = json.loads((Path(args.out) / "run.json").read_text())
    found = _diagnoses_of(read_parquet(args.out), meta)
    print("\n".join(diagnosis_lines(found, result.steps_done)), file=sys.stderr)
    print(
        json.dumps(
            {
                "status": result.status,
                "steps": result.steps_done,
                "message": result.message,
                "final": result.final,
                "out": str(Path(args.out).resolve()),
                "diagnoses": [d.to_dict() for d in found],
            },
            indent=2,
        )
    )
    return EXIT_DIVERGED if result.status == "diverged" else EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    """Start the server: REST API, live stream and dashboard, on one port."""
    from pydantic import ValidationError

    from bnscope.app import serve
    from server.settings import Settings

    try:
        settings = Settings(**given(args))
    except ValidationError as exc:
        for e in exc.errors():
            named = e["loc"] and str(e["loc"][0]) in Settings.model_fields
            where = f"{flag_name(str(e['loc'][0]))}: " if named else ""
            print(f"bnscope serve: {where}{e['msg']}", file=sys.stderr)
        return EXIT_USAGE
    if settings.executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            print("bnscope serve: --executor ray needs Ray: pip install 'bnscope[ray]'",
                  file=sys.stderr)  # fmt: skip
            return EXIT_USAGE
    from server.store import StoreUnreadable

    try:
        serve(settings, log_level=args.log_level, parent_pid=args.parent_pid)
    except StoreUnreadable as exc:  # corrupt, cut short, unreachable: nothing replaced
        print(f"bnscope serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConnectionError as exc:  # Ray's cluster not reachable at --ray-address
        print(f"bnscope serve: cannot reach the Ray cluster: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        # a file's error names its file (the data directory); a socket's names none
        where = (
            f"use {exc.filename}" if exc.filename else f"listen on {settings.host}:{settings.port}"
        )
        print(f"bnscope serve: cannot {where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _experiment(args: argparse.Namespace) -> int:
    """Run one of the experiments (or --all) here, without a server, and say whether each
    measurement agrees with its paper."""
    import yaml

    from bncore.run.config import get_field
    from bncore.run.engine import RunResult
    from bncore.science.experiments import EXPERIMENTS, result
    from bncore.science.experiments.local import points
    from bncore.science.experiments.report import results_table, with_results

    if bool(args.key) == args.all:
        print("bnscope experiment: name one experiment, or give --all", file=sys.stderr)
        return EXIT_USAGE
    if args.key and args.key not in EXPERIMENTS:
        known = ", ".join(EXPERIMENTS)
        print(
            f"bnscope experiment: no experiment {args.key!r}; there are: {known}", file=sys.stderr
        )
        return EXIT_USAGE
    target = None if args.markdown in (None, "-") else Path(args.markdown)
    if target is not None:
        if not args.all:  # the document's table has a row for every experiment
            print("bnscope experiment: --markdown FILE writes every experiment's row: add --all",
                  file=sys.stderr)  # fmt: skip
            return EXIT_USAGE
        try:
            with_results(target.read_text(), "")  # its markers, checked before hours of runs
        except (OSError, ValueError) as exc:
            print(f"bnscope experiment: {target}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    overrides = {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            print(f"bnscope experiment: --set expects FIELD=VALUE, got {item!r}", file=sys.stderr)
            return EXIT_USAGE
        overrides[key.strip()] = yaml.safe_load(raw)

    quiet = args.quiet or args.json or args.markdown == "-"
    done_all = []
    for exp in [EXPERIMENTS[k] for k in (EXPERIMENTS if args.all else [args.key])]:
        arms: list[tuple[str, list[Diagnosis], int]] = []  # each run's label, diagnoses, steps

        def progress(config: dict, done: RunResult, found: list[Diagnosis], exp=exp, arms=arms):
            where = ", ".join(f"{k}={get_field(config, k)}" for k in exp.grid)
            arms.append((where, found, done.steps_done))
            if not quiet:
                acc = done.final.get("test_acc", float("nan"))
                key = f"{exp.key}: " if args.all else ""
                print(f"  {key}{where}: {done.status}, test accuracy {acc:.3f}", flush=True)

        try:
            res = result(exp, points(exp, args.size, overrides, on_run=progress))
        except ConfigError as exc:
            print(f"bnscope experiment: {exc}", file=sys.stderr)
            return EXIT_USAGE
        res["diagnoses"] = [
            {"run": where, "diagnoses": [d.to_dict() for d in found]} for where, found, _ in arms
        ]
        done_all.append((exp, res))
        if quiet or args.markdown:
            continue
        v = res["verdict"]
        said = f"{'agrees' if v['agrees'] else 'DISAGREES'}: {v['text']}" if v else "not measured"
        print(f"{res['title']}\nPaper: {res['claim']}\nThis measurement {said}")
        for where, found, steps in arms:  # the BN doctor, per run
            print(f"{where}: " + "\n    ".join(diagnosis_lines(found, steps)))
    if args.json:
        print(json.dumps([res for _, res in done_all] if args.all else done_all[0][1]))
    if args.markdown:
        table = results_table(done_all, args.size)
        if target is None:
            print(table, end="")
        else:
            target.write_text(with_results(target.read_text(), table))
            print(f"bnscope experiment: wrote the results of {len(done_all)} experiments into "
                  f"{target}", file=sys.stderr)  # fmt: skip
    return EXIT_OK


def _add_set(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    """The repeatable ``--set FIELD=VALUE`` of train and experiment."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help=f"override {what}, e.g. --set {example} (repeatable)",
    )


def _train_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help=_train.__doc__,
        description=(_train.__doc__ or "")
        + " Output: DIR/{steps,layers,channels,evals,layer_evals}.parquet, config.json and "
        "run.json "
        "(the columns are documented in bncore/record/tables.py). Exit status: 0 completed, "
        "3 diverged, 2 bad config or data.",
        epilog="Config fields (JSON or YAML; nested keys as in the dotted names):\n"
        + "\n".join(describe_fields()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", help="run config, .json or .yaml (an empty file: all defaults)")
    train.add_argument("--out", required=True, help="directory for the records")
    _add_set(train, "a field", "optim.lr=0.1")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)


def _experiment_parser(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("experiment", help=_experiment.__doc__, description=_experiment.__doc__)
    exp.add_argument(
        "key", nargs="?", help="the experiment (the dashboard's Experiments tab lists them)"
    )
    exp.add_argument("--all", action="store_true", help="run every experiment, one after another")
    exp.add_argument(
        "--size",
        choices=("quick", "full"),
        default="quick",
        help="quick: minutes on a CPU (default); full: the paper's sizes, for a GPU",
    )
    _add_set(exp, "a field of every run", "device=cuda")
    exp.add_argument("--json", action="store_true", help="print the result (panels, verdict)")
    exp.add_argument(
        "--markdown",
        nargs="?",
        const="-",
        metavar="FILE",
        help="print the results table (experiment, claim, measurement with its spread over "
        "seeds, test and margin, verdict); with FILE and --all, write it between FILE's results "
        "markers (docs/experiments.md: bnscope experiment --all --markdown docs/experiments.md)",
    )
    exp.add_argument("--quiet", action="store_true", help="no line per finished run")
    exp.set_defaults(func=_experiment)


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help=_serve.__doc__,
        description=(_serve.__doc__ or "") + " Every flag can also be set "
        "as an environment variable BNSCOPE_<NAME> (BNSCOPE_TOKEN, BNSCOPE_DATA_DIR, ...).",
    )
    add_settings(serve)  # one flag per field of server.settings.Settings
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    # how long this process lives, not how the server behaves: a flag, never a setting
    serve.add_argument(
        "--parent-pid",
        type=int,
        metavar="PID",
        help="shut down when process PID ends (the local server bnscope.client starts for a "
        "script, a notebook's kernel: see bnscope.local)",
    )
    serve.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnscope",
        description="BN Scope: see what batch normalization does inside a network while it trains.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help=_info.__doc__, description=_info.__doc__)
    info.set_defaults(func=_info)
    _train_parser(sub)
    _experiment_parser(sub)
    _serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
