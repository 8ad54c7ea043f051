"""The launch form, generated from bncore's RunConfig (one input per field, its description as
the hint), and the presets that reproduce the classic BN comparisons as sweeps."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from dash import dcc, html

from bncore.run.config import RunConfig, get_field, leaf_fields, set_field

PRESETS: dict[str, dict[str, Any]] = {
    "BN vs no BN": {"base": {"steps": 1000}, "grid": {"norm.kind": ["batch", "none"]}},
    "Batch size sweep": {"base": {"steps": 1000}, "grid": {"batch_size": [4, 16, 64, 256]}},
    "BN before vs after the activation": {
        "base": {"steps": 1000},
        "grid": {"norm.placement": ["before_activation", "after_activation"]},
    },
    "Learning-rate sweep": {
        "base": {"steps": 1000},
        "grid": {"optim.lr": [0.003, 0.03, 0.3, 3.0], "norm.kind": ["batch", "none"]},
    },
}


def _is_list(ann: Any) -> bool:
    """A field of several values (optim.milestones): typed as numbers separated by commas."""
    return typing.get_origin(ann) in (list, tuple)


def _choices(ann: Any) -> tuple[list[Any], bool, bool]:
    """Literal values, and whether None / free numbers are allowed too."""
    args = (
        typing.get_args(ann)
        if typing.get_origin(ann) in (typing.Union, types.UnionType)
        else (ann,)
    )
    literals, optional, numeric = [], False, False
    for a in args:
        if a is type(None):
            optional = True
        elif typing.get_origin(a) is Literal:
            literals += list(typing.get_args(a))
        elif a in (int, float):
            numeric = True
    return literals, optional, numeric


def field_input(path: str, field: Any, value: Any) -> html.Div:
    ann = field.annotation
    literals, optional, numeric = _choices(ann)
    ident = {"type": "cfg", "field": path}
    control: dcc.Dropdown | dcc.Input
    if _is_list(ann):
        control = dcc.Input(
            id=ident,
            type="text",
            value=", ".join(map(str, value or [])),
            placeholder="numbers separated by commas",
            debounce=True,
            style={"width": "100%"},
        )
    elif ann is bool or (literals == [] and bool in typing.get_args(ann)):
        options = [{"label": "default", "value": "default"}] * optional + [
            {"label": "on", "value": "true"},
            {"label": "off", "value": "false"},
        ]
        control = dcc.Dropdown(options, _text(value, "default"), id=ident, clearable=False)
    elif literals and not numeric:
        options = [{"label": str(v), "value": v} for v in literals]
        control = dcc.Dropdown(options, value, id=ident, clearable=False)
    elif numeric and not literals and not optional:
        control = dcc.Input(
            id=ident, type="number", value=value, debounce=True, style={"width": "100%"}
        )
    else:  # free text: optional numbers, strings, or a number-or-keyword
        hint = "default" if optional else ""
        if literals:
            hint = " or ".join([hint, *map(str, literals)]).strip(" or")
        control = dcc.Input(
            id=ident,
            type="text",
            value=_text(value, ""),
            placeholder=hint,
            debounce=True,
            style={"width": "100%"},
        )
    return html.Div(
        [
            html.Label(path, htmlFor=str(ident), className="field-name"),
            control,
            html.Div(field.description or "", className="field-hint"),
            html.Div(id={"type": "cfg-err", "field": path}, className="field-error"),
        ],
        className="field",
    )


def _text(value: Any, empty: str) -> str:
    if value is None:
        return empty
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def build_form(config: RunConfig | None = None) -> html.Div:
    config = config or RunConfig()
    data = config.model_dump(mode="json")
    groups: dict[str, list[Any]] = {}
    for path, field in leaf_fields():
        groups.setdefault(path.split(".")[0] if "." in path else "run", []).append(
            field_input(path, field, get_field(data, path))
        )
    return html.Div(
        [
            html.Fieldset([html.Legend(name), *items], className="group")
            for name, items in groups.items()
        ],
        className="form",
    )


def required_numbers() -> dict[str, Any]:
    """The fields drawn as plain number boxes (no "default" choice), with their defaults: a
    blank one is an error, not a silent default."""
    out = {}
    for path, field in leaf_fields():
        literals, optional, numeric = _choices(field.annotation)
        if numeric and not literals and not optional:
            out[path] = field.default
    return out


def blanks(ids: list[dict[str, str]], values: list[Any]) -> dict[str, str]:
    """An error for each number box left blank, naming its default."""
    required = required_numbers()
    return {
        i["field"]: f"required: type a number (the default is {required[i['field']]})"
        for i, v in zip(ids, values, strict=True)
        if i["field"] in required and (v is None or v == "")
    }


def collect(ids: list[dict[str, str]], values: list[Any]) -> dict[str, Any]:
    """The form's values as nested config data; "default" (and a blank optional field) means
    the default."""
    data: dict[str, Any] = {}
    lists = {path for path, field in leaf_fields() if _is_list(field.annotation)}
    for ident, value in zip(ids, values, strict=True):
        if ident["field"] in lists and isinstance(value, str):
            value = [_number(v.strip()) for v in value.split(",") if v.strip()]
        elif value is None or value == "" or value == "default":
            continue
        elif isinstance(value, str):
            value = {"true": True, "false": False}.get(value, _number(value))
        set_field(data, ident["field"], value)
    return data


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
