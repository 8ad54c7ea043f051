"""bnscope.hf's callback on a real transformers.Trainer, against a real server: a small ResNet
built from its config (nothing downloaded) trains on CPU with gradient accumulation and
evaluations; the run has every step with the Trainer's own loss and learning rate, every BN
layer, the evaluations, and its end; training is bit for bit as without the callback."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from bnscope.process import ServerProcess
from tests.helpers import free_port, one_thread
from tests.third_party import transformers

ROOT = Path(__file__).resolve().parents[2]
# the BN doctor rightly warns of these small batches and of BN under gradient accumulation
pytestmark = pytest.mark.filterwarnings("ignore::bnscope.client.BNScopeDiagnosis")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("hf")).start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():  # (tests/helpers.py: why)
        yield


class Images(torch.utils.data.Dataset):
    """16x16 images of 3 classes, as the Trainer takes them: dicts of pixel_values, labels."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randn(n, 3, 16, 16, generator=g) + self.y[:, None, None, None] * 0.5

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def accuracy(prediction: Any) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def fit(model: nn.Module, out: Path, callbacks: list, **over: Any) -> Any:
    tf = transformers()
    args = {
        "output_dir": str(out),
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 0.05,
        "lr_scheduler_type": "linear",
        "weight_decay": 0.01,
        "logging_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": 3,
        "per_device_eval_batch_size": 8,
        "seed": 0,
        **over,
    }
    trainer = tf.Trainer(
        model=model,
        args=tf.TrainingArguments(**args),
        train_dataset=Images(64, seed=1),
        eval_dataset=Images(16, seed=2),
        compute_metrics=accuracy,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def series(server: ServerProcess, run_id: str, stat: str, layer: str | None = None) -> dict:
    params = {"stat": stat, **({"layer": layer} if layer else {})}
    with server.client() as api:
        r = api.get(f"/api/runs/{run_id}/metrics", params=params)
        assert r.status_code == 200, r.text
        return r.json()["series"][0]


def test_trainer_streams_each_step_layer_and_evaluation_and_trains_as_without(server, tmp_path):
    tf = transformers()
    from bnscope.hf import BNScopeCallback

    torch.manual_seed(0)
    config = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = tf.ResNetForImageClassification(config)
    plain, watched = copy.deepcopy(model), copy.deepcopy(model)
    bn_names = [n for n, m in watched.named_modules() if isinstance(m, nn.BatchNorm2d)]

    probe = Images(6, seed=3).x
    callback = BNScopeCallback(name="hf resnet", url=server.url, flush_every=2, channel_interval=1,
                               probe=probe, probe_every=3)  # fmt: skip
    trainer = fit(watched, tmp_path / "watched", [callback])
    baseline = fit(plain, tmp_path / "plain", [])

    history = trainer.state.log_history
    logged = [h for h in history if "loss" in h and "eval_loss" not in h]
    expected = [h for h in baseline.state.log_history if "loss" in h and "eval_loss" not in h]
    assert [h["loss"] for h in logged] == [h["loss"] for h in expected]  # bit for bit
    for a, b in zip(watched.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert trainer.training_step.__func__ is tf.Trainer.training_step  # the wrapper is gone

    assert callback.run is not None
    run_id = callback.run.id
    with server.client() as api:
        done = api.get(f"/api/runs/{run_id}").json()
        assert done["status"] == "completed"
        assert done["steps_done"] == trainer.state.global_step == 6
        assert sorted(done["meta"]["layers"]) == sorted(bn_names)  # module paths
        assert done["meta"]["optimizer"]["class"] == "AdamW"  # accelerate's wrapper looked through
        rows = api.get(f"/api/runs/{run_id}/channels", params={"step": 6}).json()["layers"]
        assert sorted(r["layer"] for r in rows) == sorted(bn_names)
        for layer in bn_names:  # logged while the step's gradients are there (not zeroed yet)
            grads = series(server, run_id, "gamma_grad_norm", layer)["values"]
            assert all(g > 0 for g in grads) and len(grads) == 6, layer
    # the Trainer's loss of each step, as it logs it with logging_steps=1: exactly (a float32,
    # which the server keeps as such and writes in JSON in its shortest form)
    loss = series(server, run_id, "loss")
    assert loss["steps"] == [h["step"] for h in logged] == list(range(1, 7))
    trainers = np.asarray([h["loss"] for h in logged])
    assert np.array_equal(trainers.astype(np.float32), trainers)  # a float32, as computed
    assert np.array_equal(np.asarray(loss["values"], np.float32), trainers.astype(np.float32))
    lr = series(server, run_id, "lr")
    rates = np.asarray([h["learning_rate"] for h in logged], np.float32)  # kept as float32
    assert np.array_equal(np.asarray(lr["values"], np.float32), rates)
    # the evaluations at steps 3 and 6: eval_loss as test_loss, eval_accuracy as test_acc
    evals = [h for h in history if "eval_loss" in h]
    test_loss = series(server, run_id, "test_loss")
    assert test_loss["steps"] == [3, 6] == [h["step"] for h in evals]
    assert test_loss["values"] == pytest.approx([h["eval_loss"] for h in evals], rel=1e-6)
    test_acc = series(server, run_id, "test_acc")
    assert test_acc["values"] == pytest.approx([h["eval_accuracy"] for h in evals], rel=1e-6)
    assert series(server, run_id, "mode_gap")["steps"] == [3, 6]  # the probe, through logits
    with server.client() as api:  # the Trainer's speed is not a metric of the model
        said = api.get(f"/api/runs/{run_id}/metrics", params={"stat": "user_eval_runtime"})
        assert said.status_code != 200 or not said.json()["series"][0]["steps"]


def test_the_loss_of_each_step_is_the_trainers_when_it_logs_every_few_steps(server, tmp_path):
    """logging_steps=3: the Trainer reports the mean of three steps; the run has each step's
    own loss, whose mean is that report."""
    tf = transformers()
    from bnscope.hf import BNScopeCallback

    torch.manual_seed(0)
    config = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    callback = BNScopeCallback(name="hf every 3", url=server.url)
    trainer = fit(tf.ResNetForImageClassification(config), tmp_path, [callback],
                  logging_steps=3, eval_strategy="no", gradient_accumulation_steps=1)  # fmt: skip
    assert callback.run is not None
    loss = series(server, callback.run.id, "loss")
    assert loss["steps"] == list(range(1, 7)) and all(np.isfinite(loss["values"]))
    reported = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    means = [float(np.mean(loss["values"][i : i + 3], dtype=np.float64)) for i in (0, 3)]
    assert means == pytest.approx(reported, rel=1e-6)


def test_importing_bnscope_needs_no_transformers_and_bnscope_hf_says_what_it_needs():
    code = (
        "import sys; import bnscope, bnscope.client, bnscope.metrics\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
        "sys.modules['transformers'] = None  # as if it were not installed\n"
        "try:\n"
        "    import bnscope.hf\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "install transformers and accelerate" in done.stdout


class Failing(Images):
    """A dataset whose 13th read fails: train() raises in its 4th step (batches of 4)."""

    reads = 0

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.reads += 1
        if self.reads == 13:
            raise OSError("a corrupt image")
        return super().__getitem__(i)


def test_a_train_that_raised_is_reported_failed_when_the_next_one_begins(server, tmp_path):
    """transformers tells callbacks of no exception: the run stays running (its heartbeat
    decides), until the callback's next train() reports it failed."""
    tf = transformers()
    from bnscope.hf import BNScopeCallback

    torch.manual_seed(0)
    config = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = tf.ResNetForImageClassification(config)
    callback = BNScopeCallback(name="hf failing", url=server.url)
    args = tf.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                save_strategy="no", disable_tqdm=True, max_steps=4,
                                per_device_train_batch_size=4)  # fmt: skip
    trainer = tf.Trainer(model=model, args=args, train_dataset=Failing(32, seed=1),
                         callbacks=[callback])  # fmt: skip
    with pytest.raises(OSError, match="a corrupt image"):
        trainer.train()
    assert callback.run is not None
    first = callback.run.id
    with server.client() as api:
        assert api.get(f"/api/runs/{first}").json()["status"] == "running"
    trainer.train_dataset = Images(32, seed=1)
    trainer.train()
    with server.client() as api:
        failed = api.get(f"/api/runs/{first}").json()
        assert failed["status"] == "failed" and "new train()" in failed["message"]
        assert api.get(f"/api/runs/{callback.run.id}").json()["status"] == "completed"
    assert callback.run.id != first


def data_parallel_rank(url: str, out: str) -> None:
    """One process of a data-parallel Trainer (torchrun's environment; gloo on CPU)."""
    tf = transformers()
    from bnscope.hf import BNScopeCallback

    torch.manual_seed(0)
    config = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    callback = BNScopeCallback(name="hf ddp", url=url)
    args = tf.TrainingArguments(
        output_dir=out, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
        max_steps=4, per_device_train_batch_size=4, eval_strategy="steps", eval_steps=2,
        ddp_backend="gloo",
    )  # fmt: skip
    tf.Trainer(model=tf.ResNetForImageClassification(config), args=args,
               train_dataset=Images(64, seed=1), eval_dataset=Images(16, seed=2),
               callbacks=[callback]).train()  # fmt: skip
    assert callback.run is not None and torch.distributed.get_world_size() == 2
    print("run", callback.run.id)


@pytest.mark.slow
def test_a_data_parallel_trainer_reports_one_run_with_every_ranks_layers(server, tmp_path):
    """Under torch.distributed every process joins the run rank 0 opens (create_run is a
    collective: a rank left out would hang rank 0); rank 1's layers are rank1.<layer>."""
    transformers()  # or a skip
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        code = (f"from tests.bnscope.test_hf import data_parallel_rank as run; "
                f"run({server.url!r}, {str(tmp_path)!r})")  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                                      text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))  # fmt: skip
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    ids = {line.split()[1] for out in outs for line in out.splitlines() if line.startswith("run ")}
    assert len(ids) == 1, outs  # one run, both ranks in it
    run_id = ids.pop()
    with server.client() as api:
        done = api.get(f"/api/runs/{run_id}").json()
    assert done["status"] == "completed" and done["steps_done"] == 4
    layers = done["meta"]["layers"]
    assert len(layers) == 16 and done["meta"]["replicas"] == 2
    assert {n.removeprefix("rank1.") for n in layers if n.startswith("rank1.")} == {
        n for n in layers if not n.startswith("rank1.")
    }
    rank1 = "rank1.resnet.embedder.embedder.normalization"
    assert series(server, run_id, "pre_var", rank1)["steps"] == [1, 2, 3, 4]
    assert series(server, run_id, "test_loss")["steps"] == [2, 4]  # rank 0's evaluations
