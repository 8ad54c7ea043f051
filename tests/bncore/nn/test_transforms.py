"""bncore's BatchNorm is exact under torch.func as torch.nn's is (issue 30): grad, vmap, jacrev,
functional_call and replace_all_batch_norm_modules_, in train and eval mode, with the reference
kernel, the fused CPU one and the automatic choice."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, replace_all_batch_norm_modules_, vmap

import bncore
from bncore.nn import kernels

TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(params=["reference", "cpu", "auto"])
def any_kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    with kernels.use(request.param):
        yield request.param


def _pair(track: bool = True) -> tuple[nn.Module, nn.Module]:
    """The same small network, with torch.nn's BatchNorm1d and with bncore's."""
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(5, 4, dtype=torch.float64),
                         bncore.BatchNorm1d(4, track_running_stats=track, dtype=torch.float64),
                         nn.Tanh(), nn.Linear(4, 3, dtype=torch.float64))  # fmt: skip
    theirs = nn.Sequential(nn.Linear(5, 4, dtype=torch.float64),
                           nn.BatchNorm1d(4, track_running_stats=track, dtype=torch.float64),
                           nn.Tanh(), nn.Linear(4, 3, dtype=torch.float64))  # fmt: skip
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(-1, 1)
        ours[1].running_mean.uniform_(-1, 1) if track else None
        ours[1].running_var.uniform_(0.5, 2) if track else None
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _x(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


# training with running buffers: refused by torch.func for both (the test below)
@pytest.mark.parametrize("training,track", [(True, False), (False, True), (False, False)])
def test_grad_of_functional_call_matches_torch(any_kernel, training, track):
    x = _x()
    grads = []
    for model in _pair(track):
        model.train(training)
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p: dict, model: nn.Module = model) -> torch.Tensor:
            return functional_call(model, p, (x,)).square().sum()

        grads.append(grad(loss)(params))
    for k in grads[1]:
        torch.testing.assert_close(grads[0][k], grads[1][k], **TOL, msg=k)


@pytest.mark.parametrize("training", [True, False])
def test_jacrev_matches_torch(any_kernel, training):
    x = _x()
    jacs = []
    for model in _pair(track=False):
        model.train(training)
        jacs.append(jacrev(lambda x, model=model: model(x))(x))
    torch.testing.assert_close(jacs[0], jacs[1], **TOL)


@pytest.mark.parametrize("training", [True, False])
def test_vmap_over_models_after_replace_all_batch_norm_modules_matches_torch(any_kernel, training):
    xs = torch.randn(3, 8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    outs = []
    for model in _pair():
        replace_all_batch_norm_modules_(model)
        model.train(training)
        outs.append(vmap(model)(xs))
    torch.testing.assert_close(outs[0], outs[1], **TOL)


def test_per_example_gradients_with_vmap_match_torch(any_kernel):
    """vmap(grad(...)) over chunks of a batch, each normalized over its own examples."""
    xs = torch.randn(4, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = []
    for model in _pair(track=False):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p: dict, x: torch.Tensor, model: nn.Module = model) -> torch.Tensor:
            return functional_call(model, p, (x,)).square().sum()

        grads.append(vmap(grad(loss), in_dims=(None, 0))(params, xs))
    for k in grads[1]:
        torch.testing.assert_close(grads[0][k], grads[1][k], **TOL, msg=k)


def test_running_statistics_under_grad_fail_as_torch_does(any_kernel):
    """Training mode with running buffers mutates a captured tensor: torch.func refuses it for
    torch.nn too (replace_all_batch_norm_modules_ or track_running_stats=False are its ways out)."""
    x = _x()
    for model in _pair():
        params = {k: v.detach() for k, v in model.named_parameters()}
        with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
            grad(lambda p, model=model: functional_call(model, p, (x,)).sum())(params)


def _bn_first() -> tuple[nn.Module, nn.Module]:
    """BN on the input itself: the input is a plain tensor, only the parameters are transformed."""
    torch.manual_seed(0)
    ours = nn.Sequential(bncore.BatchNorm1d(5, track_running_stats=False, dtype=torch.float64),
                         nn.Tanh(), nn.Linear(5, 2, dtype=torch.float64))  # fmt: skip
    theirs = nn.Sequential(nn.BatchNorm1d(5, track_running_stats=False, dtype=torch.float64),
                           nn.Tanh(), nn.Linear(5, 2, dtype=torch.float64))  # fmt: skip
    with torch.no_grad():
        ours[0].weight.uniform_(0.5, 2)
        ours[0].bias.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("training", [True, False])
def test_grad_with_respect_to_the_parameters_of_bn_on_the_input_matches_torch(any_kernel, training):
    x = _x()
    grads = []
    for model in _bn_first():
        model.train(training)
        params = {k: v.detach() for k, v in model.named_parameters()}
        grads.append(grad(lambda p, model=model: functional_call(model, p, (x,)).square().sum())(
            params))  # fmt: skip
    for k in grads[1]:
        torch.testing.assert_close(grads[0][k], grads[1][k], **TOL, msg=k)


@pytest.mark.parametrize("training", [True, False])
def test_vmap_over_an_ensemble_of_parameters_matches_torch(any_kernel, training):
    """Model ensembling: the parameters batched, the input shared (not transformed)."""
    x = _x()
    outs = []
    for model in _bn_first():
        model.train(training)
        stacked = {k: torch.stack([v.detach() * (1 + i) for i in range(3)])
                   for k, v in model.named_parameters()}  # fmt: skip
        call = lambda p, model=model: functional_call(model, p, (x,))  # noqa: E731
        outs.append(vmap(call)(stacked))
    torch.testing.assert_close(outs[0], outs[1], **TOL)


def test_the_function_under_vmap_and_grad_matches_torch(any_kernel):
    """bncore.nn.functional.batch_norm, training mode, no running buffers."""
    from bncore.nn.functional import batch_norm

    gen = torch.Generator().manual_seed(4)
    xs = torch.randn(3, 6, 4, 5, dtype=torch.float64, generator=gen)
    w = torch.rand(4, dtype=torch.float64, generator=gen) + 0.5
    b = torch.randn(4, dtype=torch.float64, generator=gen)
    results = []
    for bn in (batch_norm, nn.functional.batch_norm):

        def f(x: torch.Tensor, w: torch.Tensor, bn=bn) -> torch.Tensor:
            return bn(x, None, None, w, b, True).tanh().sum()

        per_chunk = vmap(f, in_dims=(0, None))(xs, w)
        results.append((per_chunk, vmap(grad(f, argnums=1), in_dims=(0, None))(xs, w)))
    torch.testing.assert_close(results[0], results[1], **TOL)
