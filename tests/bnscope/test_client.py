"""bnscope.client against a real server: a user's torchvision model, a server that goes away for a
while, a script that dies or hangs, a Lightning Trainer, and README's start command."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnscope.client import BNScopeDiagnosis, Client
from bnscope.process import ServerProcess, wait_for
from tests.helpers import free_port, one_thread
from tests.third_party import lightning, torchvision_models

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # the doctor on every batch: a warning's timing does not hang on its 5% share of the time
    srv = ServerProcess(
        tmp_path_factory.mktemp("srv"), "--client-timeout", "3", "--doctor-share", "1"
    ).start()
    yield srv
    srv.stop()


def status(server: ServerProcess, run_id: str) -> dict:
    return httpx.get(f"{server.url}/api/runs/{run_id}", timeout=10).json()


def test_readme_example_on_resnet18_shows_every_bn_layer(server):
    models = torchvision_models()
    torch.manual_seed(0)
    model = models.resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # before watch()
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            seen[name] = args[0].detach().var((0, 2, 3), unbiased=False)

        return hook

    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for name in bn_names:
        model.get_submodule(name).register_forward_hook(keep(name))
    client = Client(server.url)
    with client.create_run(name="resnet18", channel_interval=1, flush_every=4) as run:
        assert run.watch(model) is model
        for step in range(1, 7):
            x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.log(step, loss, lr=0.01)
    assert status(server, run.id)["status"] == "completed"
    with server.client() as api:
        layers = api.get(f"/api/runs/{run.id}/layers").json()
        assert layers["layers"] == bn_names  # module paths, in order of execution
        assert layers["channels"][:2] == [64, 64] and layers["channels"][-1] == 512
        assert {"pre_var", "act_dead", "weight_norm", "gamma_grad_norm"} <= set(
            layers["stats"]["layer"]
        )
        rows = api.get(f"/api/runs/{run.id}/channels", params={"step": 6}).json()["layers"]
        assert [r["layer"] for r in rows] == bn_names
        for r in rows:  # every width, as the layer computed it
            np.testing.assert_allclose(r["pre_var"], seen[r["layer"]].numpy(), rtol=1e-4,
                                       atol=1e-6)  # fmt: skip
        notes = status(server, run.id)["meta"]["not_recorded"]
        assert "layer1.0.bn2" in notes["act"]  # a residual sum comes before its ReLU
        export = api.get(f"/api/runs/{run.id}/export", params={"table": "channels"})
        assert export.status_code == 200 and "layer4.1.bn2" in export.text
    client.close()


def test_regnet_layers_named_with_dashes_arrive_end_to_end(server):
    """torchvision's RegNet names its blocks block1-0, block1-1, ...: the server takes any
    module path as a layer name, through every view."""
    models = torchvision_models()
    torch.manual_seed(0)
    model = models.regnet_x_400mf(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    dashed = [n for n in bn_names if "-" in n]
    assert dashed and dashed[0] == "trunk_output.block1.block1-0.proj.1"
    client = Client(server.url)
    with one_thread(), client.create_run(name="regnet", channel_interval=1, warn=False) as run:
        run.watch(model, optimizer=opt)
        for step in range(1, 4):
            x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.log(step, loss, lr=0.01)
    assert status(server, run.id)["status"] == "completed"
    with server.client() as api:
        layers = api.get(f"/api/runs/{run.id}/layers").json()
        assert sorted(layers["layers"]) == sorted(bn_names)
        rows = api.get(f"/api/runs/{run.id}/channels", params={"step": 3}).json()["layers"]
        assert sorted(r["layer"] for r in rows) == sorted(bn_names)
        for name in dashed[:3]:
            assert series(server, run.id, "pre_var", name)["steps"] == [1, 2, 3], name
        export = api.get(f"/api/runs/{run.id}/export", params={"table": "layers"})
        assert export.status_code == 200 and "trunk_output.block4.block4-0.f.c.1" in export.text
    client.close()


class Outage:
    """A TCP relay on 127.0.0.1 in front of the server that can refuse connections for a while:
    the server unreachable from the client's side, as a network blip makes it."""

    def __init__(self, target_port: int) -> None:
        self.target, self.port, self._up = target_port, free_port(), True
        self.refused = 0
        self._open: list[socket.socket] = []
        self._listener = self._listen()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def up(self) -> bool:
        return self._up

    @up.setter
    def up(self, value: bool) -> None:
        self._up = value
        if not value:  # cut the kept-alive connections too
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self._open = []

    def _listen(self) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.settimeout(0.2)
        return s

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            if not self._up:
                self.refused += 1
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._open += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop = True
        self._listener.close()


def test_records_wait_while_the_server_is_unreachable(server):
    port = int(server.url.rsplit(":", 1)[1])
    relay = Outage(port)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    client = Client(f"http://127.0.0.1:{relay.port}", timeout=2.0)
    with client.create_run(name="blip", flush_every=2, flush_seconds=60) as run:
        run.watch(model)
        for step in range(1, 31):
            if step == 10:
                relay.up = False  # refused from here for about two seconds
            if step == 20:
                relay.up = True
            loss = F.cross_entropy(model(torch.randn(16, 6)), torch.randint(0, 2, (16,)))
            loss.backward()
            run.log(step, loss)
            time.sleep(0.1)
    relay.close()
    assert relay.refused > 0  # the client did meet the outage
    with server.client() as api:
        s = api.get(f"/api/runs/{run.id}/metrics", params={"stat": "loss"}).json()
        assert s["series"][0]["steps"] == list(range(1, 31))
    assert status(server, run.id)["status"] == "completed"


SCRIPT = """
import sys, time, torch
from torch import nn
import bnscope.client
model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
run = bnscope.client.Client(sys.argv[1]).create_run(name=sys.argv[2], heartbeat=0.5,
                                                    hang_timeout=float(sys.argv[3]))
run.watch(model)
for step in range(1, 4):
    model(torch.randn(8, 4)).sum().backward()
    run.log(step, 0.5)
run.flush()
print(run.id, flush=True)
time.sleep(120)  # hangs here; or is killed
"""


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_script_that_dies_or_hangs_leaves_its_run_failed(server, tmp_path, how):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    hang = "1.5" if how == "hung" else "600"
    proc = subprocess.Popen(
        [sys.executable, str(script), server.url, how, hang],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        run_id = proc.stdout.readline().strip()
        time.sleep(1.0)
        assert status(server, run_id)["status"] == "running"  # heartbeats keep it alive
        if how == "killed":
            proc.send_signal(signal.SIGKILL)
        done = wait_for(lambda: (r := status(server, run_id))["status"] != "running" and r, 20)
        assert done["status"] == "failed" and "stopped reporting" in done["message"]
    finally:
        proc.kill()
        proc.wait(10)


def test_lightning_callback_streams_a_real_trainer(server):
    L = lightning()
    from bnscope.lightning import BNScopeCallback

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(4 * 36, 3))  # fmt: skip

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,)))
    callback = BNScopeCallback(name="lightning", url=server.url, flush_every=2)
    trainer = L.Trainer(
        max_steps=6,
        accumulate_grad_batches=2,
        callbacks=[callback],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=4))
    assert callback.run is not None
    done = status(server, callback.run.id)
    assert done["status"] == "completed" and done["steps_done"] == 6
    assert done["meta"]["layers"] == ["net.1"]
    with server.client() as api:
        s = api.get(f"/api/runs/{callback.run.id}/metrics", params={"stat": "pre_var"}).json()
        assert s["series"][0]["steps"] == list(range(1, 7))


def test_lightning_manual_optimization_logs_each_batch_with_the_loss_it_logged(server):
    """A GAN-like module: manual optimization, two optimizers stepped per batch, nothing
    returned, the loss logged with self.log: one step per batch, with that loss."""
    L = lightning()
    from bnscope.lightning import BNScopeCallback

    logged: list[float] = []

    class TwoSteps(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.a = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
            self.b = nn.Linear(8, 3)

        def training_step(self, batch, batch_idx):
            x, y = batch
            for opt in self.optimizers():
                loss = F.cross_entropy(self.b(self.a(x)), y)
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
            self.log("train_loss", loss)
            logged.append(loss.item())

        def configure_optimizers(self):
            return [torch.optim.SGD(self.a.parameters(), lr=0.05),
                    torch.optim.SGD(self.b.parameters(), lr=0.05)]  # fmt: skip

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    callback = BNScopeCallback(name="manual", url=server.url, flush_every=2)
    trainer = L.Trainer(max_epochs=1, callbacks=[callback], accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(TwoSteps(), torch.utils.data.DataLoader(data, batch_size=8))
    assert trainer.global_step == 10  # two optimizer steps per batch
    assert callback.run is not None
    done = status(server, callback.run.id)
    assert done["status"] == "completed" and done["steps_done"] == 5
    with server.client() as api:
        s = api.get(f"/api/runs/{callback.run.id}/metrics", params={"stat": "loss"}).json()
    (series,) = s["series"]
    assert series["steps"] == [1, 2, 3, 4, 5]
    assert series["values"] == pytest.approx(logged, rel=1e-6)


def lightning_rank(url: str) -> None:
    """One rank of a Lightning DDP fit on CPU whose processes a launcher made (RANK,
    LOCAL_RANK and WORLD_SIZE set, as torchrun sets them): prints its run's id."""
    L = lightning()
    from bnscope.lightning import BNScopeCallback

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                     nn.Linear(8, 3))  # fmt: skip

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
    callback = BNScopeCallback(name="ddp", url=url, flush_every=2)
    trainer = L.Trainer(max_steps=4, strategy="ddp", devices=2, accelerator="cpu",
                        callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8))
    assert callback.run is not None
    print("run", callback.run.id)


@pytest.mark.slow
def test_lightning_ddp_ranks_report_one_run(server):
    """Under DDP every rank joins the run (create_run waits for all of them: a rank that
    stayed out hung rank 0); rank 1's layer as rank1.<layer>."""
    lightning()  # or a skip
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        code = f"from tests.bnscope.test_client import lightning_rank as r; r({server.url!r})"
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                                      text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))  # fmt: skip
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    ids = {line.split()[1] for out in outs for line in out.splitlines() if line.startswith("run ")}
    assert len(ids) == 1, outs
    done = status(server, ids.pop())
    assert done["status"] == "completed" and done["steps_done"] == 4
    assert done["meta"]["layers"] == ["net.1", "rank1.net.1"] and done["meta"]["replicas"] == 2


def test_readme_start_command_takes_its_arguments(tmp_path):
    port = free_port()
    env = {**os.environ, "BNSCOPE_VENV": sys.prefix, "BNSCOPE_DATA_DIR": str(tmp_path / "d")}
    usage = subprocess.run(["bash", "scripts/serve", "--help"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert usage.returncode == 0 and "--token" in usage.stdout, usage.stderr
    proc = subprocess.Popen(
        ["bash", "scripts/serve", "--port", str(port), "--token", "s3cret"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy():
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None and pytest.fail(proc.stderr.read())

        wait_for(healthy, 90, 0.3)
        assert httpx.post(f"{url}/api/runs", json={}).status_code == 401  # the token holds
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    assert "/bnscope-data/" in (ROOT / ".gitignore").read_text().splitlines()


def test_one_line_helper_and_no_server_import(server):
    import bnscope.client

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with bnscope.client.watch(model, name="one line", url=server.url) as run:
        for step in range(1, 4):
            model(torch.randn(5, 3)).sum().backward()
            run.log(step, 0.0)
    assert status(server, run.id)["status"] == "completed"
    assert (
        F.batch_norm is __import__("bncore.record.watcher").record.watcher._ORIGINAL
    )  # unwatched at the end
    probe = (
        "import sys, bnscope.client; print(sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('server', 'dashboard', 'fastapi')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr  # bncore and the client alone


def test_a_slow_script_stays_running_on_its_heartbeat(server):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    client = Client(server.url)
    with client.create_run(name="slow") as run:  # heartbeat 5 s asked, the server says 0.75
        run.watch(model)
        model(torch.randn(5, 3)).sum().backward()
        run.log(1, 0.0)
        time.sleep(4.5)  # longer than the server's client timeout (3 s), between two logs
        assert status(server, run.id)["status"] == "running"
        model(torch.randn(5, 3)).sum().backward()
        run.log(2, 0.0)
    assert status(server, run.id)["status"] == "completed"
    client.close()


def test_a_script_whose_records_are_refused_ends_its_run_failed(server):
    """A batch the server refuses (a 4xx) is raised by finish(), which still says the run
    failed, and why (it was left running, to be reaped as silent)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    client = Client(server.url)
    try:
        run = client.create_run(name="refused")
        run.watch(model)
        model(torch.randn(5, 3)).sum().backward()
        run.log(-1, 0.0)  # no step of a run is negative: a 422
        with pytest.raises(RuntimeError, match="422"):
            run.finish()
        ended = status(server, run.id)
        assert ended["status"] == "failed", ended
        assert "refused" in ended["message"] and "steps are integers" in ended["message"]
    finally:
        client.close()


def test_errors_read_the_servers_message(server):
    """The client and the sink raise what the server says to fix (its ``message``), not a dump
    of the body."""
    from bncore.record.sinks import HttpSink, error_message

    client = Client(server.url)
    try:
        with pytest.raises(RuntimeError) as info:
            client.launch({"norm": {"kind": "ghost", "virtual_batch": 12}, "batch_size": 64})
        said = str(info.value)
        assert said.startswith("POST /api/runs: 422 norm.virtual_batch, batch_size: ")
        assert "detail" not in said and "{" not in said
    finally:
        client.close()
    with httpx.Client(base_url=server.url) as http:
        run = http.post("/api/runs/client", json={"name": "bad sink"}).json()
        sink = HttpSink(http, run["id"], token=run["write_token"])
        with pytest.raises(RuntimeError, match=r"POST records: 422 unknown keys \['weights'\]"):
            sink.post("records", b'{"weights": {}}')
        sink.post("status", b'{"status": "completed"}')
    for body, said in [
        (b'{"message": "fix this", "detail": []}', "fix this"),
        (b'{"detail": "older servers"}', "older servers"),
        (b"<html>a proxy</html>", "<html>a proxy</html>"),
        (b"[1]", "[1]"),
    ]:
        assert error_message(httpx.Response(400, content=body)) == said


# -- what the client records for the BN doctor (issue 26) ----------------------------------


def doctor_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16),  # a bias before BN
        nn.BatchNorm1d(16, momentum=None),
        nn.ReLU(),
        nn.Dropout(0.2),  # draws in train mode: a probe must put the random state back
        nn.Linear(16, 8, bias=False),
        nn.Dropout(0.25),  # between the weight and its BN
        nn.BatchNorm1d(8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )


def series(server: ServerProcess, run_id: str, stat: str, layer: str | None = None) -> dict:
    params = {"stat": stat, **({"layer": layer} if layer else {})}
    with server.client() as api:
        r = api.get(f"/api/runs/{run_id}/metrics", params=params)
        assert r.status_code == 200, r.text
        found = r.json()["series"][0]
    # a step where another evaluation metric was logged has NaN (null) for this one
    pairs = zip(found["steps"], found["values"], strict=True)
    kept = [(st, v) for st, v in pairs if v is not None and v == v]
    found["steps"], found["values"] = [st for st, _ in kept], [v for _, v in kept]
    return found


def test_meta_reaches_the_server_after_the_first_forward_and_evaluations_fill_test_acc(server):
    model = doctor_net()
    opt = torch.optim.SGD([{"params": [model[0].weight, model[4].weight, model[8].weight,
                                       model[0].bias, model[8].bias], "weight_decay": 5e-4},
                           {"params": [*model[1].parameters(), *model[6].parameters()],
                            "weight_decay": 0.0}], lr=0.05)  # fmt: skip
    client = Client(server.url)
    with client.create_run(name="doctor", flush_seconds=60) as run:
        run.watch(model, optimizer=opt)
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        F.cross_entropy(model(x), y).backward()
        opt.step()
        run.log(1, 1.0)
        meta = wait_for(lambda: (m := status(server, run.id)["meta"]).get("structure") and m, 10)
        assert meta["layers"] == ["1", "6"] and meta["bn_modules"] == ["1", "6"]
        assert meta["layer_config"]["1"]["momentum"] is None
        assert meta["layer_config"]["6"] == {"class": "BatchNorm1d", "momentum": 0.1,
                                             "eps": 1e-5, "affine": True,
                                             "track_running_stats": True, "dtype": "float32",
                                             "input_dtype": "float32"}  # fmt: skip
        assert meta["structure"] == {"dropout_before": {"6": 0.25}, "output_layer": None,
                                     "zero_init_gamma": [], "bias_before": ["1"],
                                     "activation": {"1": "relu", "6": "tanh"}}  # fmt: skip
        assert meta["optimizer"] == {"class": "SGD", "norm_weight_decay": {"1": 0.0, "6": 0.0},
                                     "weight_decay": 5e-4}  # fmt: skip
        assert meta["distributed"] == {"world": 1, "sync_bn": False}
        run.log_eval(1, test_loss=0.9, test_acc=0.5)
        for step in (2, 3):
            F.cross_entropy(model(x), y).backward()
            run.log(step, 0.8)
        run.log_eval(3, test_acc=torch.tensor(0.75), f1=0.6, **{"val/top-5": 0.9})
        with pytest.raises(ValueError, match="1 to 59 characters"):
            run.log_eval(3, **{"x" * 60: 1.0})
    acc = series(server, run.id, "test_acc")
    assert acc["steps"] == [1, 3] and acc["values"] == pytest.approx([0.5, 0.75])
    assert series(server, run.id, "test_loss")["steps"] == [1]
    assert series(server, run.id, "user_f1")["values"] == pytest.approx([0.6])
    assert series(server, run.id, "user_val_top_5")["steps"] == [3]
    forwards = series(server, run.id, "forwards", "6")
    assert forwards["steps"] == [1, 2, 3] and forwards["values"] == [1, 1, 1]
    assert series(server, run.id, "batch_n", "1")["values"] == [16, 16, 16]
    client.close()


def test_the_probe_leaves_training_bit_for_bit_and_sends_the_mode_gap(server):
    x = torch.randn(12, 6) * 3 + 1
    probe = (torch.randn(10, 6), torch.randint(0, 3, (10,)))
    results = {}
    for with_probe in (False, True):
        model = doctor_net()
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        client = Client(server.url)
        torch.manual_seed(5)  # the dropout masks
        losses = []
        with client.create_run(name=f"probe {with_probe}", flush_every=3) as run:
            run.watch(model, **({"probe": probe, "probe_every": 2} if with_probe else {}))
            for step in range(1, 8):
                y = torch.randint(0, 3, (12,))
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                run.log(step, loss)
                losses.append(loss.item())
        client.close()
        results[with_probe] = (losses, copy.deepcopy(model.state_dict()), run.id)
    (plain, plain_state, _), (probed, probed_state, run_id) = results[False], results[True]
    assert probed == plain  # bit for bit: the same losses...
    for k, v in plain_state.items():  # ...weights, running statistics and batch counts
        assert torch.equal(probed_state[k], v), k
    gap = series(server, run_id, "mode_gap")
    assert gap["steps"] == [2, 4, 6] and all(v > 0 for v in gap["values"])
    for layer in ("1", "6"):
        s = series(server, run_id, "eval_mean_gap", layer)
        assert s["steps"] == [2, 4, 6] and all(v > 0 for v in s["values"]), layer
        assert series(server, run_id, "eval_var_gap", layer)["steps"] == [2, 4, 6]
    assert series(server, run_id, "forwards", "1")["values"] == [1] * 7  # not the probe's


def test_lightning_callback_passes_the_optimizer_the_probe_and_the_validation_metrics(server):
    L = lightning()
    from bnscope.lightning import BNScopeCallback

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                     nn.Linear(8, 3))  # fmt: skip

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)  # a training metric: not an evaluation's
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val_loss", F.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean())
            self.log("val/f1", 0.5)

        def configure_optimizers(self):
            return torch.optim.AdamW([
                {"params": self.net[0].parameters(), "weight_decay": 0.1},
                {"params": [*self.net[1].parameters(), *self.net[3].parameters()],
                 "weight_decay": 0.0},
            ], lr=0.01)  # fmt: skip

    torch.manual_seed(0)
    train = torch.utils.data.TensorDataset(torch.randn(32, 5), torch.randint(0, 3, (32,)))
    val = torch.utils.data.TensorDataset(torch.randn(16, 5), torch.randint(0, 3, (16,)))
    callback = BNScopeCallback(name="lightning doctor", url=server.url, flush_every=3,
                               probe=(torch.randn(6, 5), None), probe_every=4)  # fmt: skip
    trainer = L.Trainer(
        max_epochs=2,
        callbacks=[callback],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Net()
    trainer.fit(module, torch.utils.data.DataLoader(train, batch_size=4),
                torch.utils.data.DataLoader(val, batch_size=8))  # fmt: skip
    assert callback.run is not None
    run_id = callback.run.id
    done = status(server, run_id)
    assert done["status"] == "completed" and done["steps_done"] == 16
    meta = done["meta"]
    assert meta["optimizer"] == {"class": "AdamW", "norm_weight_decay": {"net.1": 0.0},
                                 "weight_decay": 0.1}  # fmt: skip
    assert meta["structure"]["bias_before"] == ["net.1"]
    assert meta["structure"]["activation"] == {"net.1": "relu"}
    loss = series(server, run_id, "test_loss")  # after each epoch's 8 steps (not the sanity check)
    assert loss["steps"] == [8, 16] and all(v > 0 for v in loss["values"])
    acc = series(server, run_id, "test_acc")
    assert acc["steps"] == [8, 16] and all(0 <= v <= 1 for v in acc["values"])
    assert series(server, run_id, "user_val_f1")["values"] == [0.5, 0.5]
    with server.client() as api:
        said = api.get(f"/api/runs/{run_id}/metrics", params={"stat": "user_train_loss"})
        assert said.json()["series"][0]["steps"] == []  # the training's metric is not sent
    gap = series(server, run_id, "mode_gap")
    assert gap["steps"] == [4, 8, 12, 16]
    assert series(server, run_id, "eval_mean_gap", "net.1")["steps"] == [4, 8, 12, 16]
    trainer.validate(module, torch.utils.data.DataLoader(val, batch_size=8), verbose=False)
    assert series(server, run_id, "test_acc")["steps"] == [8, 16]  # after the fit: not its run


def test_validation_metric_names_for_log_eval():
    from bnscope.metrics import evaluation_metrics  # both callbacks' rule (bnscope.lightning, .hf)

    t = torch.tensor
    assert evaluation_metrics({"val_loss": t(0.5), "val_acc": t(0.75), "val/f1": 0.25}) == {
        "test_loss": 0.5, "test_acc": 0.75, "val/f1": 0.25,
    }  # fmt: skip
    assert evaluation_metrics({"valid/Accuracy": 0.5, "loss": 1.0}) == {
        "test_acc": 0.5, "test_loss": 1.0,
    }  # fmt: skip
    # two losses: which one is the test loss is not for us to guess; and a module's own
    # test_acc stays, so val_acc is its own metric
    assert evaluation_metrics({"val_loss": 1.0, "val_loss_ce": 2.0, "loss": 3.0,
                               "test_acc": 0.5, "val_acc": 0.25}) == {
        "val_loss": 1.0, "val_loss_ce": 2.0, "loss": 3.0, "test_acc": 0.5, "val_acc": 0.25,
    }  # fmt: skip
    # Hugging Face's Trainer's eval_ prefix, as the others
    assert evaluation_metrics({"eval_loss": 0.5, "eval_accuracy": 0.75, "eval_f1": 0.25}) == {
        "test_loss": 0.5, "test_acc": 0.75, "eval_f1": 0.25,
    }  # fmt: skip
    # Lightning's _epoch copy of a metric logged on steps too; a vector; a flag
    assert evaluation_metrics({"val_loss": 1.0, "val_loss_epoch": 1.0, "hist": t([1.0, 2.0]),
                               "flag": True}) == {"test_loss": 1.0}  # fmt: skip


def _broken_buffers(run_of, layers: tuple[int, int] = (1, 4)) -> list[warnings.WarningMessage]:
    """A script whose BN layers' running means become NaN (the first at step 10, the second
    at step 20) while its loss stays finite, as an overflow under a GradScaler leaves them;
    the warnings it was given."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16),
                          nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with run_of(flush_every=5, channel_interval=5) as run:
            run.watch(model)
            for step in range(1, 41):
                for at, index in zip((10, 20), layers, strict=True):
                    if step == at:
                        with torch.no_grad():
                            model[index].running_mean.fill_(float("nan"))
                x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
                loss = F.cross_entropy(model(x), y)
                assert torch.isfinite(loss)
                opt.zero_grad()
                loss.backward()
                opt.step()
                run.log(step, loss)
                if step == 15:  # the first layer's diagnosis is back before the second's
                    run.flush()
                    run.sink.drain()
    return [w for w in caught if issubclass(w.category, BNScopeDiagnosis)]


def test_a_script_is_warned_once_of_each_diagnosis(server):
    """The server's BN doctor finds the NaN running statistics in the batches it is sent: the
    script gets one BNScopeDiagnosis warning naming the rule, the layer and the fix, though
    the diagnosis changed again (the second layer) later; with warn=False, none."""
    client = Client(server.url)
    try:
        said = _broken_buffers(lambda **kw: client.create_run(name="nan buffers", **kw))
        with server.client() as api:
            run_id = api.get("/api/runs", params={"limit": 1}).json()["items"][0]["id"]
            found = api.get(f"/api/runs/{run_id}/diagnoses").json()["diagnoses"]
        nonfinite = next(d for d in found if d["rule"] == "nonfinite-running-stats")
        assert nonfinite["layers"] == ["1", "4"] and nonfinite["first_step"] == 10
        texts = [str(w.message) for w in said]
        assert sum("nonfinite-running-stats" in t for t in texts) == 1, texts
        (text,) = [t for t in texts if "nonfinite-running-stats" in t]
        assert text.startswith("BN Scope: error nonfinite-running-stats in 1: ")
        assert "became non-finite at step 10" in text and "Fix: reload the BN buffers" in text
        assert len(texts) == len({t.split()[3] for t in texts})  # each rule once
        assert all(w.filename == __file__ for w in said)  # at the script's run.log
        quiet = _broken_buffers(lambda **kw: client.create_run(name="quiet", warn=False, **kw))
        assert quiet == []
    finally:
        client.close()
