"""The flags of ``bnscope serve``, made from the fields of server.settings.Settings: one a field,
named after it (``data_dir``: ``--data-dir``), read as its annotation says (a Literal's values
are the choices, a bool is a switch, a list a repeatable flag, a number of bytes reads 4GiB or
500MB), its help the field's description and default. A new setting needs no edit here; where a
flag is named or read otherwise, the field says so (server.settings.Flag)."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic.fields import FieldInfo

from server.settings import Flag, Settings

#: What a size may end with (any case), in bytes.
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """A size: bytes, or with a unit (KB, MB, GB, KiB, MiB, GiB)."""
    number = text.strip().lower().rstrip("ibkmgt ")
    unit = text.strip().lower()[len(number) :].strip()
    try:
        return int(float(number) * UNITS[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: give bytes or a number with KB, MB, GB, KiB, MiB or GiB"
        ) from None


def size_text(n: int) -> str:
    """Bytes as a size flag takes them: 4GiB, 32MiB; plain bytes where no binary unit fits."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if n and n % UNITS[unit.lower()] == 0:
            return f"{n // UNITS[unit.lower()]}{unit}"
    return str(n)


def _flag(field: FieldInfo) -> Flag:
    """What the field says of its flag (server.settings.Flag), if anything."""
    return next((m for m in field.metadata if isinstance(m, Flag)), Flag())


def flag_name(setting: str) -> str:
    """The flag of a setting: ``--data-dir`` for ``data_dir``, or the name its field gives."""
    return "--" + (_flag(Settings.model_fields[setting]).name or setting.replace("_", "-"))


def _kind(field: FieldInfo) -> Any:
    """The setting's type, less None (a setting is one type, or None for "not set")."""
    ann = field.annotation
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        (ann,) = [a for a in typing.get_args(ann) if a is not type(None)]
    return ann


def _reading(setting: str, field: FieldInfo) -> dict[str, Any]:
    """How argparse reads the flag (text is left to pydantic: a path, a URL)."""
    kind = _kind(field)
    if _flag(field).size:
        return {"type": parse_size, "metavar": "BYTES"}
    if kind is bool:
        return {"action": "store_true"}
    if typing.get_origin(kind) is Literal:
        return {"choices": typing.get_args(kind)}
    if typing.get_origin(kind) is list:  # one item a flag: --cors-origin ORIGIN
        return {"action": "append", "metavar": flag_name(setting).split("-")[-1].upper()}
    if kind in (int, float):
        return {"type": kind}
    return {}


def default_text(field: FieldInfo) -> str:
    """The field's default as its flag's help says it; "" where the field's description says
    what it is (a default worked out when the server starts)."""
    if field.default_factory is not None:  # worked out on this machine
        value = field.get_default(call_default_factory=True)
        return f"{value} on this machine" if value else "none"
    value = field.default
    if value is None:
        return "" if "default" in (field.description or "") else "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return size_text(value) if _flag(field).size else str(value)


def help_text(field: FieldInfo) -> str:
    """The field's description, then whether its flag repeats and its default."""
    notes = ["repeatable"] if typing.get_origin(_kind(field)) is list else []
    default = default_text(field)
    notes += [f"default: {default}"] if default else []
    text = f"{field.description or ''} ({'; '.join(notes)})" if notes else field.description or ""
    return text.replace("%", "%%")  # argparse formats help with %


def add_settings(parser: argparse.ArgumentParser) -> None:
    """A flag for each setting. A flag left out sets nothing (not even its default), so that a
    ``BNSCOPE_*`` environment variable still sets it: :func:`given` reads those given."""
    for name, field in Settings.model_fields.items():
        parser.add_argument(
            flag_name(name),
            dest=name,
            default=argparse.SUPPRESS,
            help=help_text(field),
            **_reading(name, field),
        )


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, for ``Settings(**given(args))``."""
    return {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
