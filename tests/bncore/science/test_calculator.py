"""The BN calculator: every step equals torch.nn.BatchNorm1d's, the seed's example done right,
bad input explained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bncore.science.calculator import SEED_EXAMPLE, explain, parse_values


def test_seed_example_done_right():
    r = explain(parse_values(SEED_EXAMPLE))
    assert r["mean"] == [pytest.approx(38 / 6)]  # the seed says 6
    assert r["var"] == [pytest.approx(np.var([1, 4, 6, 8, 10, 9]))]  # the seed says 9
    assert r["var"][0] == pytest.approx(9.5556, abs=1e-4)
    assert abs(r["x_hat_mean"][0]) < 1e-12 and r["x_hat_var"][0] == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("text", [SEED_EXAMPLE, "1 2 3\n4 5 7\n-1 0 2.5\n3 3 3"])
def test_every_step_equals_torch(text):
    x = parse_values(text)
    kw = {"gamma": 1.5, "beta": -0.5, "eps": 1e-3, "momentum": 0.3}
    r = explain(x, running_mean=0.2, running_var=2.0, **kw)
    ref = torch.nn.BatchNorm1d(x.shape[1], eps=kw["eps"], momentum=kw["momentum"]).double()
    with torch.no_grad():
        ref.weight.fill_(kw["gamma"])
        ref.bias.fill_(kw["beta"])
        ref.running_mean.fill_(0.2)
        ref.running_var.fill_(2.0)
        y = ref(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(r["y"]).T, y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r["running_mean"], ref.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(r["running_var"], ref.running_var.numpy(), rtol=1e-12)
    x_hat = np.asarray(r["x_hat"]).T
    np.testing.assert_allclose(kw["gamma"] * x_hat + kw["beta"], y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "type some numbers"), ("5", "at least 2 examples"), ("1, 2, x", "line 1"),
     ("1 2\n3", "same number of channels"), ("1, inf", "finite")],
)  # fmt: skip
def test_bad_batches_are_explained(text, message):
    with pytest.raises(ValueError, match=message):
        parse_values(text)
