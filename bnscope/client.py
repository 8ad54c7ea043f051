"""Stream a training script of your own to a BN Scope server.

    import bnscope.client

    client = bnscope.client.Client("http://127.0.0.1:8000")    # token=... if the server has one
    with client.create_run(name="my resnet") as run:
        model = run.watch(model)             # its torch.nn.BatchNorm layers become bncore's
        for step, (x, y) in enumerate(loader, 1):
            loss = loss_fn(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            run.log(step, loss, lr=opt.param_groups[0]["lr"])
    # leaving the block reports the run completed (or failed, with the exception)

``watch`` swaps each ``torch.nn.BatchNorm{1,2,3}d`` for the bncore layer with the same arguments
and state, so the script trains exactly as before while every BN layer records its batch
statistics, running statistics, gamma, beta and gradient sums; ``log`` takes them (on the
device, no sync) and sends them in batches to the server's ingest endpoint. What a plain BN
layer cannot see (the activation after it, the weight before it) is recorded as NaN.

The client can also launch runs that the server trains: ``client.launch(config)``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import httpx
import numpy as np
import torch
from torch import Tensor, nn

import bncore
from bncore.records import Records, bn_output_rows, channel_rows, summarize
from server.worker import HttpSink

__all__ = ["Client", "ClientRun"]

_SWAPS = {
    nn.BatchNorm1d: bncore.BatchNorm1d,
    nn.BatchNorm2d: bncore.BatchNorm2d,
    nn.BatchNorm3d: bncore.BatchNorm3d,
}


class Client:
    """A BN Scope server's API."""

    def __init__(
        self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 30.0
    ) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _json(self, response: httpx.Response) -> Any:
        if response.is_error:
            try:
                detail = response.json().get("message") or response.json().get("detail")
            except ValueError:
                detail = response.text
            raise RuntimeError(
                f"{response.request.method} {response.request.url.path}: "
                f"{response.status_code} {detail}"
            )
        return response.json()

    def launch(self, config: bncore.RunConfig | dict[str, Any]) -> dict[str, Any]:
        """Queue a run for the server to train; returns the run."""
        body = config.model_dump(mode="json") if isinstance(config, bncore.RunConfig) else config
        return self._json(self.http.post("/api/runs", json=body))

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/api/runs/{run_id}"))

    def create_run(
        self,
        name: str | None = None,
        steps_total: int | None = None,
        flush_every: int = 50,
        flush_seconds: float = 0.5,
        channel_interval: int = 10,
    ) -> ClientRun:
        """Register a run that this process trains and reports."""
        run = self._json(
            self.http.post("/api/runs/client", json={"name": name, "steps_total": steps_total})
        )
        return ClientRun(self, run["id"], flush_every, flush_seconds, channel_interval)

    def close(self) -> None:
        self.http.close()


class ClientRun:
    """One run reported by this process; see the module docstring."""

    def __init__(
        self,
        client: Client,
        run_id: str,
        flush_every: int,
        flush_seconds: float,
        channel_interval: int,
    ) -> None:
        self.client, self.id = client, run_id
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.channel_interval = channel_interval
        self.sink = HttpSink(client.http, run_id)
        self.layers: dict[str, bncore.batchnorm._BatchNorm] = {}
        self._rows: list[Tensor] = []
        self._steps: list[dict[str, float]] = []
        self._logged = 0
        self._last_flush = self._last_log = time.time()
        self._finished = False

    def watch(self, model: nn.Module) -> nn.Module:
        """Swap the model's torch.nn BN layers for bncore's (same state), in place; also
        watches bncore layers already there. Call before creating the optimizer."""
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                swap = _SWAPS.get(type(child))
                if swap is not None:
                    new = swap(
                        child.num_features,
                        child.eps,
                        child.momentum,
                        child.affine,
                        child.track_running_stats,
                        bias=child.bias is not None,
                    )
                    new.load_state_dict(child.state_dict())
                    ref = next(iter([*child.parameters(), *child.buffers()]), None)
                    if ref is not None:
                        new = new.to(ref.device, ref.dtype)
                    new.train(child.training)
                    setattr(module, child_name, new)
                    self.layers[full] = new
                elif isinstance(child, bncore.batchnorm._BatchNorm):
                    self.layers[full] = child
        if not self.layers:
            raise ValueError("the model has no BatchNorm layers to watch")
        channels = [layer.num_features for layer in self.layers.values()]
        self.sink.start(
            {
                "layers": list(self.layers),
                "channels": channels,
                "tracked_units": [[] for _ in channels],
                "source": "bnscope.client",
            }
        )
        return model

    @torch.no_grad()
    def log(self, step: int, loss: float | Tensor, lr: float | None = None) -> None:
        """After the backward of ``step``: record every watched layer; sends now and then."""
        if not self.layers:
            raise RuntimeError("call watch(model) before log()")
        now = time.time()
        parts = []
        for layer in self.layers.values():
            s, c = layer.stats, layer.num_features
            nan = torch.full((c,), math.nan, device=_device(layer))
            grad = s.grad.reshape(-1) if s.grad is not None else nan.repeat(4)
            parts += [
                s.mean if s.mean is not None else nan,
                s.var if s.var is not None else nan,
                *(
                    t.detach() if t is not None else nan
                    for t in (layer.running_mean, layer.running_var, layer.weight, layer.bias)
                ),
                grad,
            ]
        loss_t = (
            loss.detach().float().reshape(1)
            if isinstance(loss, Tensor)
            else torch.tensor([float(loss)])
        )
        self._rows.append(
            torch.cat([p.float().reshape(-1).to(loss_t.device) for p in parts] + [loss_t])
        )
        self._steps.append(
            {
                "step": step,
                "lr": math.nan if lr is None else lr,
                "step_time": now - self._last_log,
                "time": now,
            }
        )
        self._last_log = now
        if len(self._rows) >= self.flush_every or now - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Send what was logged since the last flush (one transfer from the device)."""
        if not self._rows:
            return
        raw = torch.stack(self._rows).cpu().numpy().astype(np.float64)
        steps = np.asarray([r["step"] for r in self._steps], np.int64)
        rec = Records(
            steps={
                "step": steps,
                "loss": raw[:, -1].astype(np.float32),
                **{k: np.asarray([r[k] for r in self._steps]) for k in ("lr", "step_time", "time")},
            }
        )
        keep = (self._logged + np.arange(len(steps))) % self.channel_interval == 0
        layers, chans, offset = [], [], 0
        for name, layer in self.layers.items():
            c = layer.num_features
            block = raw[:, offset : offset + 10 * c].reshape(len(steps), 10, c)
            offset += 10 * c
            rows = dict(
                zip(
                    (
                        "pre_mean",
                        "pre_var",
                        "running_mean",
                        "running_var",
                        "gamma",
                        "beta",
                        "gamma_grad",
                        "beta_grad",
                        "grad_out_sq",
                        "grad_in_sq",
                    ),
                    block.transpose(1, 0, 2),
                    strict=True,
                )
            )
            rows["post_mean"], rows["post_var"] = bn_output_rows(
                rows["pre_var"],
                rows["gamma"] if layer.weight is not None else None,
                rows["beta"] if layer.bias is not None else None,
                layer.eps,
            )
            for k in ("act_mean", "act_var", "act_lo", "act_hi"):
                rows[k] = np.full_like(rows["pre_mean"], np.nan)
            nan = np.full(len(steps), np.nan)
            cols = summarize(rows, np.empty((len(steps), 3, 0)), nan, nan)
            layers.append({"step": steps, "layer": np.full(len(steps), name), **cols})
            if keep.any():
                chans.append(
                    {
                        "step": steps[keep],
                        "layer": np.full(int(keep.sum()), name),
                        **channel_rows({k: v[keep] for k, v in rows.items()}),
                    }
                )
        rec.layers = {k: np.stack([t[k] for t in layers], 1).reshape(-1) for k in layers[0]}
        if chans:
            rec.channels = {k: np.concatenate([t[k] for t in chans]) for k in chans[0]}
        self._logged += len(steps)
        self._rows, self._steps, self._last_flush = [], [], time.time()
        self.sink.write(rec)

    def finish(self, status: str = "completed", message: str | None = None) -> None:
        if self._finished:
            return
        self.flush()
        self.sink.finish({"status": status, "message": message, "steps_done": None, "final": None})
        self._finished = True

    def __enter__(self) -> ClientRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.finish()
        else:
            self.finish("failed", f"{type(exc).__name__}: {exc}")


def _device(layer: nn.Module) -> torch.device:
    for t in (*layer.parameters(), *layer.buffers()):
        return t.device
    return torch.device("cpu")
