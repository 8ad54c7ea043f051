"""Callbacks as plain functions. A view declares each of its callbacks with :func:`callback`:
the Dash outputs, inputs and states stand beside the function, recorded on it, registered
nowhere. :func:`bind` registers the views' callbacks on the Dash app when the dashboard is
mounted, each called with the service as its first argument (and, where it asks for it, the id
of the input that fired it). A test calls the same functions with a service of its own, and no
browser. A callback whose drawing the page's layout already holds (:func:`fill`: a link's run
view, drawn before the page is sent) is declared ``prevent_initial_call``, so it is not asked
for it again."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from dash import ClientsideFunction, Dash, Input, Output, State, ctx, no_update
from dash.development.base_component import Component

from server.service import Service

F = TypeVar("F", bound=Callable[..., Any])
_WIRING = "__dash_wiring__"


@dataclass(frozen=True)
class Wiring:
    """How a callback is wired: its Dash dependencies, and what it is called with besides
    their values."""

    dependencies: tuple[Output | Input | State, ...]
    prevent_initial_call: bool | str | None
    service: bool
    trigger: bool


def callback(
    *dependencies: Output | Input | State,
    prevent_initial_call: bool | str | None = None,
    service: bool = True,
    trigger: bool = False,
) -> Callable[[F], F]:
    """Record a view's callback. ``dependencies``: its Outputs, Inputs and States, as
    ``Dash.callback`` takes them; ``service``: called with the service first; ``trigger``: then
    with the id of the input that fired it (``dash.ctx.triggered_id``; None on the page's first
    call). The function itself is returned unchanged."""
    wiring = Wiring(tuple(dependencies), prevent_initial_call, service, trigger)

    def record(fn: F) -> F:
        setattr(fn, _WIRING, wiring)
        return fn

    return record


@dataclass(frozen=True)
class Clientside:
    """A callback that runs in the browser: a function of assets/live.js."""

    function: ClientsideFunction
    output: Output
    inputs: tuple[Input, ...]


def callbacks(view: ModuleType) -> list[tuple[Callable[..., Any], Wiring]]:
    """A view module's own callbacks (not those it imports), in the order they are written."""
    return [
        (fn, wiring)
        for fn in vars(view).values()
        if inspect.isfunction(fn)
        and fn.__module__ == view.__name__
        and isinstance(wiring := getattr(fn, _WIRING, None), Wiring)
    ]


def bind(app: Dash, svc: Service, views: Iterable[ModuleType]) -> None:
    """Register every callback of the views on the Dash app, with the service."""
    for view in views:
        for fn, wiring in callbacks(view):
            when = {} if wiring.prevent_initial_call is None else {
                "prevent_initial_call": wiring.prevent_initial_call
            }  # fmt: skip
            app.callback(*wiring.dependencies, **when)(_bound(fn, wiring, svc))
        for value in vars(view).values():
            if isinstance(value, Clientside):
                app.clientside_callback(value.function, value.output, *value.inputs)


def _bound(fn: Callable[..., Any], wiring: Wiring, svc: Service) -> Callable[..., Any]:
    """``fn`` as Dash calls it: with the dependencies' values only."""
    lead = (svc,) if wiring.service else ()

    def call(*values: Any) -> Any:
        fired = (ctx.triggered_id,) if wiring.trigger else ()
        return fn(*lead, *fired, *values)

    call.__name__, call.__qualname__, call.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    call.__module__ = fn.__module__
    return call


def fill(page: Component, fn: Callable[..., Any], values: Any) -> None:
    """Set on ``page``'s components what the callback ``fn`` returned (``values``: one per
    Output it declares, in order; ``no_update`` leaves a property as the layout has it), so the
    page arrives drawn: no round of callbacks before the first paint."""
    outputs = [d for d in getattr(fn, _WIRING).dependencies if isinstance(d, Output)]
    values = values if len(outputs) > 1 else (values,)
    for output, value in zip(outputs, values, strict=True):
        if value is not no_update:
            setattr(page[output.component_id], output.component_property, value)
