"""The BN doctor on users' scripts, end to end: each pitfall, made in a small model the way a
user makes it, trained through bnscope.client against a real server, is diagnosed there with
its rule and layer, at its step; the same script without it is not. (The data-parallel rules:
tests/bnscope/test_client.py's DDP script.)"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnscope.client import BNScopeDiagnosis, Client, ClientRun
from bnscope.process import ServerProcess

Script = Callable[[ClientRun, int], None]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("doctor"), "--doctor-share", "1").start()
    yield srv
    srv.stop()


def mlp(momentum: float | None = 0.1, bias: bool = False, **kw: Any) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32, bias=bias), nn.BatchNorm1d(32, momentum=momentum, **kw), nn.ReLU(),
        nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32, momentum=momentum), nn.ReLU(),
        nn.Linear(32, 3),
    )  # fmt: skip


def batch(step: int, n: int = 64, drift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffled examples of 3 classes (``drift``: the inputs' mean moves with the step)."""
    g = torch.Generator().manual_seed(step)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) + F.one_hot(y, 8).float() * 2 + drift * step
    return x, y


def train(
    server: ServerProcess,
    model: nn.Module,
    steps: int,
    *,
    before: Callable[[int], tuple[torch.Tensor, torch.Tensor]] = batch,
    micro: int = 1,
    after: Callable[[int], None] | None = None,
    opt: torch.optim.Optimizer | None = None,
    probe: bool = False,
    **options: Any,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Train ``model`` through a run on ``server``; its diagnoses and the warnings the script
    was given."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    client = Client(server.url)
    options = {"channel_interval": 10, "measure_interval": 5, "steps_total": steps} | options
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with client.create_run(name="doctor", **options) as run:
                run.watch(model, optimizer=opt, probe=before(0)[0] if probe else None,
                          probe_every=10)  # fmt: skip
                for step in range(1, steps + 1):
                    opt.zero_grad()
                    for k in range(micro):
                        x, y = before(step * micro + k)
                        F.cross_entropy(model(x), y).div(micro).backward()
                    opt.step()
                    run.log(step, 0.0, lr=opt.param_groups[0]["lr"])
                    if after is not None:
                        after(step)
        with server.client() as api:
            found = api.get(f"/api/runs/{run.id}/diagnoses").json()["diagnoses"]
    finally:
        client.close()
    said = [str(w.message) for w in caught if issubclass(w.category, BNScopeDiagnosis)]
    return found, said


def the(found: list[dict[str, Any]], rule: str) -> dict[str, Any]:
    hit = [d for d in found if d["rule"] == rule]
    assert hit, f"{rule} not diagnosed; found {[d['rule'] for d in found]}"
    return hit[0]


def serious(found: list[dict[str, Any]]) -> set[str]:
    return {d["rule"] for d in found if d["severity"] != "info"}


def test_a_healthy_script_is_silent_and_warned_of_nothing(server):
    found, said = train(server, mlp(), 150, probe=True)
    assert serious(found) == set() and said == []


def test_the_setup_pitfalls_are_named_at_the_first_step(server):
    cases = {
        "momentum-convention": mlp(momentum=0.9),
        "bias-before-bn": mlp(bias=True),
        "dropout-before-bn": nn.Sequential(nn.Linear(8, 32, bias=False), nn.Dropout(0.5),
                                           nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3)),
        "bn-before-output": nn.Sequential(nn.Linear(8, 32, bias=False), nn.BatchNorm1d(32),
                                          nn.ReLU(), nn.Linear(32, 3), nn.BatchNorm1d(3)),
    }  # fmt: skip
    for rule, model in cases.items():
        found, said = train(server, model, 12)
        d = the(found, rule)
        assert d["first_step"] == 1 and d["layers"], (rule, d)
        if d["severity"] != "info":
            assert any(rule in s for s in said), (rule, said)


def test_momentum_none_in_training(server):
    d = the(train(server, mlp(momentum=None), 70)[0], "cumulative-momentum-in-training")
    assert d["layers"][0] == "1" and 51 <= d["first_step"] <= 53


def test_frozen_layers_in_train_mode_still_move(server):
    model = mlp()
    for p in model[1].parameters():
        p.requires_grad_(False)  # "frozen" the way people freeze a backbone
    d = the(train(server, model, 15)[0], "frozen-but-updating")
    assert d["layers"] == ["1"] and d["first_step"] <= 5


def test_running_statistics_switched_off_on_a_layer_that_has_them(server):
    model = mlp()

    def toggle(step: int) -> None:
        if step == 10:
            model[4].track_running_stats = False  # Lightning's BaseFinetuning.freeze does it

    d = the(train(server, model, 25, after=toggle)[0], "running-stats-not-updating")
    assert d["layers"] == ["4"] and 11 <= d["first_step"] <= 14


def test_validation_in_train_mode(server):
    model = mlp()

    def validate(step: int) -> None:
        if step % 10 == 0:
            with torch.no_grad():  # model.eval() forgotten
                model(batch(10_000 + step)[0])

    found, said = train(server, model, 25, after=validate)
    d = the(found, "validation-in-train-mode")
    assert d["first_step"] == 11 and "1" in d["layers"]
    assert sum("validation-in-train-mode" in s for s in said) == 1


def test_left_in_eval_mode_after_validation(server):
    model = mlp()

    def validate(step: int) -> None:
        if step == 20:
            model.eval()  # and no model.train() at the next epoch

    d = the(train(server, model, 30, after=validate)[0], "bn-eval-during-training")
    assert 21 <= d["first_step"] <= 23 and d["layers"][0] == "1"


def test_small_batches_a_batch_of_one_and_micro_batches(server):
    d = the(train(server, mlp(), 20, before=lambda s: batch(s, n=8))[0], "small-batch")
    assert d["first_step"] <= 6
    d = the(train(server, mlp(), 15, before=lambda s: batch(s, n=8), micro=4)[0],
            "grad-accumulation-micro-batch")  # fmt: skip
    assert d["first_step"] <= 4
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))  # fmt: skip

    def images(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = 1 if step == 30 else 32  # the last, short batch of an epoch
        return torch.randn(n, 3, 6, 6), torch.randint(0, 3, (n,))

    d = the(train(server, conv, 35, before=images)[0], "batch-of-one")
    assert d["first_step"] == 30 and d["severity"] == "error"


def test_a_running_mean_that_lags_and_a_train_eval_gap(server):
    """Momentum 0.001 on inputs far from mean 0 and variance 1: the running statistics never
    catch up, and with the probe on, eval-mode outputs stay far from train-mode ones."""

    def far(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch(step)
        return x * 4 + 8, y

    found, _ = train(server, mlp(momentum=0.001), 240, before=far, probe=True)
    stale = the(found, "stale-running-stats")
    assert 60 <= stale["first_step"] <= 160
    gap = the(found, "train-eval-gap")
    assert gap["layers"] == ["1"] and gap["first_step"] >= 60
    assert "stale-running-stats" in gap["evidence"].get("causes", ""), gap["evidence"]


def test_unshuffled_batches(server):
    def by_class(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = batch(step)
        c = (step // 8) % 3  # sorted by class: 8 batches of each in turn
        return x + 3.0 * F.one_hot(torch.tensor(c), 8).float(), torch.full((64,), c)

    d = the(train(server, mlp(), 130, before=by_class)[0], "non-iid-batches")
    assert d["layers"] == ["1"] and 96 <= d["first_step"] <= 130


def test_dead_and_constant_channels(server):
    model = mlp()
    with torch.no_grad():
        model[4].bias[:4] = -8.0  # 4 of 32 channels: the ReLU after them never fires
    d = the(train(server, model, 30)[0], "dead-channels")
    assert d["layers"] == ["4"] and d["first_step"] <= 25
    model = mlp()

    def dead_filter(step: int) -> None:
        with torch.no_grad():
            model[0].weight[0] = 0.0  # a filter upstream that gives nothing

    dead_filter(0)
    d = the(train(server, model, 20, after=dead_filter)[0], "constant-channel")
    assert d["layers"] == ["1"] and d["first_step"] <= 11


def test_weight_decay_on_gamma_and_the_effective_learning_rate(server):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, weight_decay=5.0)
    d = the(train(server, model, 140, opt=opt)[0], "weight-decay-on-norm")
    assert d["severity"] == "info" and d["first_step"] <= 130
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # no weight decay

    def grows(step: int) -> None:
        with torch.no_grad():
            model[0].weight.mul_(1.03)  # a scale-invariant weight's norm, growing (BN hides it)

    d = the(train(server, model, 60, opt=opt, after=grows)[0], "effective-lr-decay")
    assert d["layers"] == ["1"] and d["severity"] == "info"
