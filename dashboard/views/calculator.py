"""The BN calculator tab: type a batch, see every step of batch normalization on it
(bncore.science.calculator computes; this module only lays the numbers out)."""

from __future__ import annotations

from typing import Any

import numpy as np
from dash import Input, Output, dcc, html

from bncore.science.calculator import SEED_EXAMPLE, explain, parse_values
from dashboard.wiring import callback

PARAMS = (("gamma", 1.0), ("beta", 0.0), ("eps", 1e-5), ("momentum", 0.1),
          ("running_mean", 0.0), ("running_var", 1.0))  # fmt: skip


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def layout() -> html.Div:
    """The BN calculator tab: the batch, the parameters, and every step."""
    inputs = []
    for name, default in PARAMS:
        inputs += [html.Label(name), dcc.Input(id=f"calc-{name}", type="number", value=default,
                                               debounce=True, style={"width": "90px"})]  # fmt: skip
    return html.Div(
        [
            html.Div(
                [
                    html.Label("Batch (one channel: 1, 4, 6 · or one example per line)"),
                    dcc.Textarea(
                        id="calc-x", value=SEED_EXAMPLE, style={"width": "360px", "height": "60px"}
                    ),
                    *inputs,
                ],
                className="toolbar",
            ),
            html.Div(id="calc-out", className="calc"),
        ]
    )


def _channel(r: dict[str, Any], j: int) -> html.Div:
    n = r["n"]
    cols = [html.Th("")] + [html.Th(f"x{i + 1}") for i in range(n)]
    rows = [
        ("x", r["x"][j]),
        ("x - mean", [v - r["mean"][j] for v in r["x"][j]]),
        ("x_hat = (x - mean) / sqrt(var + eps)", r["x_hat"][j]),
        ("y = gamma * x_hat + beta", r["y"][j]),
    ]
    table = html.Table(
        [html.Tr(cols)]
        + [html.Tr([html.Th(name)] + [html.Td(_fmt(v)) for v in vals]) for name, vals in rows]
    )
    m = r["momentum"]
    lines = [
        f"mean = sum(x) / N = {_fmt(sum(r['x'][j]))} / {n} = {_fmt(r['mean'][j])}",
        f"var = sum((x - mean)^2) / N = {_fmt(r['var'][j])}   (unbiased, / (N - 1): "
        f"{_fmt(r['var_unbiased'][j])})",
        f"x_hat: mean {_fmt(r['x_hat_mean'][j])}, variance {_fmt(r['x_hat_var'][j])} "
        f"(= var / (var + eps))",
        f"running_mean = (1 - {m}) * {_fmt(r['running_mean_before'])} + {m} * "
        f"{_fmt(r['mean'][j])} = {_fmt(r['running_mean'][j])}",
        f"running_var = (1 - {m}) * {_fmt(r['running_var_before'])} + {m} * "
        f"{_fmt(r['var_unbiased'][j])} = {_fmt(r['running_var'][j])}   (PyTorch: the unbiased "
        "variance; Keras: the biased one)",
    ]
    title = f"channel {j + 1}" if r["channels"] > 1 else "the batch"
    return html.Div([html.H3(title), table, html.Pre("\n".join(lines))], className="calc-channel")


def _seed_note(x: np.ndarray) -> html.P | None:
    if x.shape[1] != 1 or not np.array_equal(x[:, 0], parse_values(SEED_EXAMPLE)[:, 0]):
        return None
    mu = x[:, 0].mean()
    seed_hat = (x[:, 0] - 6) / 3
    return html.P(
        f"A common mistake with this batch: normalizing with a guessed mean 6 and variance 9. "
        f"Its mean is 38/6 = {_fmt(mu)} and its variance {_fmt(x[:, 0].var())}; with the "
        f"guessed numbers x_hat would have mean {_fmt(seed_hat.mean())} and variance "
        f"{_fmt(seed_hat.var())} instead of 0 and 1. Each step done right, below.",
        className="claim",
        id="calc-seed-note",
    )


@callback(
    Output("calc-out", "children"),
    Input("calc-x", "value"),
    *(Input(f"calc-{name}", "value") for name, _ in PARAMS),
    service=False,
)
def compute(text: str | None, *params: float | None) -> Any:
    """Every step of batch normalization on the typed batch, or what is wrong with it."""
    given = [p for p in params if p is not None]
    if len(given) < len(params):
        missing = [name for (name, _), p in zip(PARAMS, params, strict=True) if p is None]
        return html.P(f"set {', '.join(missing)} to a number", className="field-error")
    try:
        x = parse_values(text or "")
        r = explain(x, *given)
    except ValueError as exc:
        return html.P(str(exc), className="field-error", id="calc-error")
    return [_seed_note(x), *(_channel(r, j) for j in range(r["channels"]))]
