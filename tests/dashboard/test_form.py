"""The launch form is built from the config model: every field of it, whatever its type, must
come back from an untouched form as the default config, and from an edited one as typed."""

from __future__ import annotations

from typing import Any

from bncore.run.config import RunConfig, parse_config
from dashboard.form import build_form, collect


def _controls(component: Any) -> list[tuple[dict[str, str], Any]]:
    """(id, value) of every config control in the form's component tree."""
    out = []
    ident = getattr(component, "id", None)
    if isinstance(ident, dict) and ident.get("type") == "cfg":
        out.append((ident, getattr(component, "value", None)))
    children = getattr(component, "children", None)
    for child in children if isinstance(children, list) else [children]:
        if child is not None and not isinstance(child, str | int | float):
            out += _controls(child)
    return out


def test_an_untouched_form_is_the_default_config():
    controls = _controls(build_form())
    fields = {i["field"] for i, _ in controls}
    assert {"optim.milestones", "optim.schedule", "model.width", "norm.kind"} <= fields
    ids, values = zip(*controls, strict=True)
    assert parse_config(collect(list(ids), list(values))) == RunConfig()


def test_an_edited_list_field_is_read_as_numbers():
    controls = dict((i["field"], (i, v)) for i, v in _controls(build_form()))
    ident, value = controls["optim.milestones"]
    assert value == "0.5, 0.75"
    data = collect([ident, controls["optim.schedule"][0]], ["0.3, 0.6, 0.9", "step"])
    cfg = parse_config(data)
    assert cfg.optim.milestones == [0.3, 0.6, 0.9] and cfg.optim.schedule == "step"
