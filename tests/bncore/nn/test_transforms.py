"""bncore's BatchNorm and SyncBatchNorm are exact under torch.func as torch.nn's BatchNorm is
(issue 30): grad, vmap, jacrev, functional_call and replace_all_batch_norm_modules_, in train and
eval mode, with every kernel (the reference, the fused CPU one, torch.compile's and the automatic
choice); SyncBatchNorm also synchronized, over two gloo processes, against torch.nn's BatchNorm
over the global batch."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, replace_all_batch_norm_modules_, vmap

import bncore
from bncore.nn import kernels
from bncore.nn.sync import SyncBatchNorm
from tests.helpers import on_ranks

TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(params=["reference", "cpu", "compiled", "auto"])
def any_kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    with kernels.use(request.param):
        yield request.param


#: bncore's layers: SyncBatchNorm without a process group is bncore's BatchNorm.
LAYERS = {"BatchNorm1d": bncore.BatchNorm1d, "SyncBatchNorm": SyncBatchNorm}


@pytest.fixture(params=list(LAYERS))
def layer(request: pytest.FixtureRequest) -> type[nn.Module]:
    return LAYERS[request.param]


def _pair(track: bool = True, layer: Callable[..., nn.Module] = bncore.BatchNorm1d,
          ) -> tuple[nn.Module, nn.Module]:  # fmt: skip
    """The same small network, with torch.nn's BatchNorm1d and with bncore's ``layer``."""
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(5, 4, dtype=torch.float64),
                         layer(4, track_running_stats=track, dtype=torch.float64),
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


def _x(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# training with running buffers: refused by torch.func for both (the test below)
@pytest.mark.parametrize("training,track", [(True, False), (False, True), (False, False)])
def test_grad_of_functional_call_matches_torch(any_kernel, layer, training, track):
    x = _x()
    grads = []
    for model in _pair(track, layer):
        model.train(training)
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p: dict, model: nn.Module = model) -> torch.Tensor:
            return functional_call(model, p, (x,)).square().sum()

        grads.append(grad(loss)(params))
    for k in grads[1]:
        torch.testing.assert_close(grads[0][k], grads[1][k], **TOL, msg=k)


@pytest.mark.parametrize("training", [True, False])
def test_jacrev_matches_torch(any_kernel, layer, training):
    x = _x()
    jacs = []
    for model in _pair(False, layer):
        model.train(training)
        jacs.append(jacrev(lambda x, model=model: model(x))(x))
    torch.testing.assert_close(jacs[0], jacs[1], **TOL)


@pytest.mark.parametrize("training", [True, False])
def test_vmap_over_models_after_replace_all_batch_norm_modules_matches_torch(any_kernel, layer,
                                                                            training):  # fmt: skip
    xs = torch.randn(3, 8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    outs = []
    for model in _pair(True, layer):
        replace_all_batch_norm_modules_(model)
        model.train(training)
        outs.append(vmap(model)(xs))
    torch.testing.assert_close(outs[0], outs[1], **TOL)


def test_per_example_gradients_with_vmap_match_torch(any_kernel, layer):
    """vmap(grad(...)) over chunks of a batch, each normalized over its own examples."""
    xs = torch.randn(4, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = []
    for model in _pair(False, layer):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p: dict, x: torch.Tensor, model: nn.Module = model) -> torch.Tensor:
            return functional_call(model, p, (x,)).square().sum()

        grads.append(vmap(grad(loss), in_dims=(None, 0))(params, xs))
    for k in grads[1]:
        torch.testing.assert_close(grads[0][k], grads[1][k], **TOL, msg=k)


def test_running_statistics_under_grad_fail_as_torch_does(any_kernel, layer):
    """Training mode with running buffers mutates a captured tensor: torch.func refuses it for
    torch.nn too (replace_all_batch_norm_modules_ or track_running_stats=False are its ways out)."""
    x = _x()
    for model in _pair(True, layer):
        params = {k: v.detach() for k, v in model.named_parameters()}
        with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
            grad(lambda p, model=model: functional_call(model, p, (x,)).sum())(params)


def _bn_first(layer: Callable[..., nn.Module] = bncore.BatchNorm1d,
              ) -> tuple[nn.Module, nn.Module]:  # fmt: skip
    """BN on the input itself: the input is a plain tensor, only the parameters are transformed."""
    torch.manual_seed(0)
    ours = nn.Sequential(layer(5, track_running_stats=False, dtype=torch.float64),
                         nn.Tanh(), nn.Linear(5, 2, dtype=torch.float64))  # fmt: skip
    theirs = nn.Sequential(nn.BatchNorm1d(5, track_running_stats=False, dtype=torch.float64),
                           nn.Tanh(), nn.Linear(5, 2, dtype=torch.float64))  # fmt: skip
    with torch.no_grad():
        ours[0].weight.uniform_(0.5, 2)
        ours[0].bias.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("training", [True, False])
def test_grad_with_respect_to_the_parameters_of_bn_on_the_input_matches_torch(any_kernel, layer,
                                                                             training):  # fmt: skip
    x = _x()
    grads = []
    for model in _bn_first(layer):
        model.train(training)
        params = {k: v.detach() for k, v in model.named_parameters()}
        grads.append(grad(lambda p, model=model: functional_call(model, p, (x,)).square().sum())(
            params))  # fmt: skip
    for k in grads[1]:
        torch.testing.assert_close(grads[0][k], grads[1][k], **TOL, msg=k)


@pytest.mark.parametrize("training", [True, False])
def test_vmap_over_an_ensemble_of_parameters_matches_torch(any_kernel, layer, training):
    """Model ensembling: the parameters batched, the input shared (not transformed)."""
    x = _x()
    outs = []
    for model in _bn_first(layer):
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


# -- synchronized over two processes ---------------------------------------------------------
# Each rank holds half of one global batch; torch.nn's BatchNorm over the whole batch, computed on
# every rank, is what synchronized BN computes. A rank's parameter gradients are its own share
# (DistributedDataParallel sums them); its input gradient, as its backward, sums every rank's
# cotangent: the jacobian of y_0[i] + y_1[i].

WORLD, ROWS = 2, 4


def _mine(full: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's rows of a global batch (the batch dimension last but one)."""
    return full[..., rank * ROWS : (rank + 1) * ROWS, :]


def _summed(tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in tree.items()}
    for v in out.values():
        torch.distributed.all_reduce(v)
    return out


def _synchronized_checks(rank: int) -> None:
    torch.set_num_threads(1)
    x = _x(WORLD * ROWS)  # every rank makes the same global batch
    xs = torch.randn(3, WORLD * ROWS, 5, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(5))  # fmt: skip
    ours, theirs = _bn_first(SyncBatchNorm)
    params = {k: v.detach() for k, v in ours.named_parameters()}

    def loss(model: nn.Module, p: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (x,)).square().sum()

    # grad of functional_call: the ranks' shares sum to torch.nn's gradient on the whole batch
    got = _summed(grad(functools.partial(loss, ours))(params, _mine(x, rank)))
    want = grad(functools.partial(loss, theirs))(params, x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=k)
    assert ours[0].replica is None  # a transform's statistics are not recorded
    # jacrev with respect to this rank's input
    jac = jacrev(ours)(_mine(x, rank))
    full = jacrev(theirs)(x)  # (8, 2, 8, 5)
    want_jac = _mine(full[:ROWS] + full[ROWS:], rank)  # y_0[i] + y_1[i], by this rank's rows
    torch.testing.assert_close(jac, want_jac, **TOL)
    # vmap over batches (each one split over the ranks)
    torch.testing.assert_close(vmap(ours)(_mine(xs, rank)), _mine(vmap(theirs)(xs), rank), **TOL)
    # vmap over an ensemble of parameters, the input shared
    stacked = {k: torch.stack([v * (1 + i) for i in range(3)]) for k, v in params.items()}
    for model, batch in ((ours, _mine(x, rank)), (theirs, x)):
        out = vmap(lambda p, model=model, batch=batch: functional_call(model, p, (batch,)))(stacked)
        if model is ours:
            got_out = out
    torch.testing.assert_close(got_out, _mine(out, rank), **TOL)
    # per-batch gradients: vmap(grad)
    per = _summed(
        vmap(grad(functools.partial(loss, ours)), in_dims=(None, 0))(params, _mine(xs, rank))
    )
    want_per = vmap(grad(functools.partial(loss, theirs)), in_dims=(None, 0))(params, xs)
    for k in want_per:
        torch.testing.assert_close(per[k], want_per[k], **TOL, msg=k)
    # eval mode: the running statistics, no collective
    ours_eval, theirs_eval = _pair(True, SyncBatchNorm)
    ours_eval.eval()
    theirs_eval.eval()
    p_eval = {k: v.detach() for k, v in ours_eval.named_parameters()}
    g_eval = grad(functools.partial(loss, ours_eval))(p_eval, _mine(x, rank))
    want_eval = grad(functools.partial(loss, theirs_eval))(p_eval, _mine(x, rank))
    for k in want_eval:
        torch.testing.assert_close(g_eval[k], want_eval[k], **TOL, msg=k)
    # after replace_all_batch_norm_modules_, vmap over batches in training mode
    replace_all_batch_norm_modules_(ours_eval)
    replace_all_batch_norm_modules_(theirs_eval)
    ours_eval.train()
    theirs_eval.train()
    torch.testing.assert_close(vmap(ours_eval)(_mine(xs, rank)),
                               _mine(vmap(theirs_eval)(xs), rank), **TOL)  # fmt: skip
    # training with running buffers: refused, as torch.func refuses torch.nn's
    tracked, _ = _pair(True, SyncBatchNorm)
    p_tracked = {k: v.detach() for k, v in tracked.named_parameters()}
    with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
        grad(functools.partial(loss, tracked))(p_tracked, _mine(x, rank))


@pytest.mark.timeout(300)
def test_synchronized_bn_under_transforms_is_torch_nn_over_the_global_batch(tmp_path):
    on_ranks(_synchronized_checks, tmp_path, "gloo", WORLD)
