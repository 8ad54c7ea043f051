"""The Keras convention: from_keras layers against a NumPy transcription of Keras' formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bncore


class KerasBatchNorm:
    """keras.layers.BatchNormalization(axis=1), transcribed from Keras 3's call():
    training: mean, variance = moments(x)  (biased variance)
              moving_mean = moving_mean * momentum + mean * (1 - momentum)  (same for variance)
    inference: mean, variance = moving_mean, moving_variance
    output:   (x - mean) / sqrt(variance + epsilon) * gamma + beta
    """

    def __init__(self, channels: int, momentum=0.99, epsilon=1e-3, center=True, scale=True):
        self.momentum, self.epsilon = momentum, epsilon
        self.gamma = np.ones(channels) if scale else None
        self.beta = np.zeros(channels) if center else None
        self.moving_mean, self.moving_variance = np.zeros(channels), np.ones(channels)

    def __call__(self, x: np.ndarray, training: bool) -> np.ndarray:
        axes = tuple(d for d in range(x.ndim) if d != 1)
        shape = [1, -1] + [1] * (x.ndim - 2)
        if training:
            mean = x.mean(axis=axes)
            variance = np.square(x - mean.reshape(shape)).mean(axis=axes)
            self.moving_mean = self.moving_mean * self.momentum + mean * (1 - self.momentum)
            self.moving_variance = self.moving_variance * self.momentum + variance * (
                1 - self.momentum
            )
        else:
            mean, variance = self.moving_mean, self.moving_variance
        y = (x - mean.reshape(shape)) / np.sqrt(variance.reshape(shape) + self.epsilon)
        if self.gamma is not None:
            y = y * self.gamma.reshape(shape)
        if self.beta is not None:
            y = y + self.beta.reshape(shape)
        return y


@pytest.mark.parametrize("momentum,epsilon", [(0.99, 1e-3), (0.9, 1e-5), (0.5, 0.1)])
@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False)])
def test_from_keras_behaves_as_keras(kernel: str, momentum, epsilon, center, scale):
    c = 4
    ours = bncore.BatchNorm2d.from_keras(
        c, momentum=momentum, epsilon=epsilon, center=center, scale=scale, dtype=torch.float64
    )
    keras = KerasBatchNorm(c, momentum, epsilon, center, scale)
    rng = np.random.default_rng(0)
    for step in range(10):
        training = step % 3 != 2
        ours.train(training)
        x = rng.normal(step, 1 + step, size=(5, c, 3, 2))
        y_ours = ours(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(y_ours, keras(x, training), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(ours.running_mean.numpy(), keras.moving_mean, rtol=1e-9)
        np.testing.assert_allclose(ours.running_var.numpy(), keras.moving_variance, rtol=1e-9)
    assert (ours.weight is not None) == scale and (ours.bias is not None) == center


def test_keras_defaults_and_mapping():
    layer = bncore.BatchNorm1d.from_keras(8)
    assert layer.eps == 1e-3
    assert layer.momentum == pytest.approx(0.01)
    assert not layer.unbiased_running_var
    assert "Keras" in repr(layer)
    assert bncore.keras_momentum_to_torch(0.9) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="Keras momentum"):
        bncore.keras_momentum_to_torch(1.5)


def test_keras_running_variance_differs_from_torch_by_bessel(kernel: str):
    """Same batch through both conventions: torch stores m/(m-1) * var, Keras var."""
    x = torch.randn(4, 3, dtype=torch.float64)
    t = bncore.BatchNorm1d(3, momentum=1.0, dtype=torch.float64)
    k = bncore.BatchNorm1d.from_keras(3, momentum=0.0, epsilon=1e-5, dtype=torch.float64)
    t(x)
    k(x)
    torch.testing.assert_close(t.running_var, k.running_var * 4 / 3)
