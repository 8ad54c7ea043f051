"""A trainer's place among the replicas of a distributed run (see bncore.run.distributed): its
shard of the global batch, the model under DistributedDataParallel, the decisions every replica
must share, and the record of what BN does across the replicas.

At each flush one all-gather brings every replica's own per-channel batch statistics to rank 0,
which records per layer how far the replicas' batches are from the global batch
(``replica_mean_spread``, ``replica_var_spread``), the global batch's statistics
(``global_pre_mean``, ``global_pre_var``) and each replica's own (``r{k}_pre_mean``,
``r{k}_pre_var``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from bncore.nn.batchnorm import BatchNorm
from bncore.nn.sync import SyncBatchNorm

__all__ = ["Replicas"]


class Replicas:
    """Rank ``rank`` of ``world`` replicas (torch.distributed initialized by the caller)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self._norms: dict[str, nn.Module] = {}
        self._pending: list[Tensor] = []  # per recorded step: every BN's (mean, var), flat
        self._steps: list[int] = []

    def wrap(
        self, model: nn.Module, norms: dict[str, nn.Module], device: torch.device
    ) -> nn.Module:
        """``model`` under DistributedDataParallel (the parameters broadcast from rank 0, the
        gradients averaged); ``norms``: the BN layers whose replica statistics to gather."""
        self._norms = {n: m for n, m in norms.items() if isinstance(m, BatchNorm)}
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """This replica's share of a global batch."""
        n = len(x) // self.world
        return x[self.rank * n : (self.rank + 1) * n], y[self.rank * n : (self.rank + 1) * n]

    def recorded(self, step: int) -> None:
        """After a recorded step's forward: keep this replica's own batch statistics."""
        parts = []
        for norm in self._norms.values():
            assert isinstance(norm, BatchNorm)  # wrap keeps only those
            own = norm.replica if isinstance(norm, SyncBatchNorm) else None
            mean, var = own if own is not None else (norm.stats.mean, norm.stats.var)
            if mean is None or var is None:
                continue
            parts += [mean.detach().float(), var.detach().float()]
        if parts:
            self._pending.append(torch.cat(parts))
            self._steps.append(step)

    def mean_loss(self, losses: Tensor) -> Tensor:
        """The global batch's loss at each step: every replica's averaged (one all-reduce)."""
        out = losses.detach().float().clone()
        dist.all_reduce(out)
        return out / self.world

    def agree(self, stop: bool) -> bool:
        """Rank 0's decision (to stop), made every replica's."""
        flag = torch.tensor([int(stop)])
        dist.broadcast(flag, 0)
        return bool(flag.item())

    def add_columns(self, layers: dict[str, np.ndarray]) -> None:
        """At a flush, on every replica: all-gather the pending statistics; on rank 0, add the
        replica columns to this flush's ``layers`` rows (NaN for blocks without BN)."""
        if not self._pending:
            return
        mine = torch.stack(self._pending)  # (steps, sum of 2C)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine.contiguous())
        self._pending, steps = [], self._steps
        self._steps = []
        if self.rank != 0 or not len(layers.get("step", ())):
            return
        every = torch.stack(parts).double().numpy()  # (replicas, steps, sum of 2C)
        n = len(layers["step"])
        names = [f"r{k}_pre_{s}" for k in range(self.world) for s in ("mean", "var")]
        wanted = ("replica_mean_spread", "replica_var_spread", "global_pre_mean",
                  "global_pre_var", *names)  # fmt: skip
        cols = {c: np.full(n, np.nan, np.float32) for c in wanted}
        pairs = zip(layers["step"].tolist(), layers["layer"].tolist(), strict=True)
        row = {(int(s), str(lay)): i for i, (s, lay) in enumerate(pairs)}
        at = 0
        for name, norm in self._norms.items():
            c = int(norm.num_features)  # type: ignore[arg-type]
            mean, var = every[:, :, at : at + c], every[:, :, at + c : at + 2 * c]
            at += 2 * c
            g_mean = mean.mean(0)  # equal shares: the global batch's statistics
            g_var = (var + np.square(mean - g_mean)).mean(0)
            eps = float(getattr(norm, "eps", 1e-5))
            spread_m = np.sqrt(np.mean(np.square(mean - g_mean) / (g_var + eps), axis=(0, 2)))
            spread_v = np.sqrt(np.mean(np.square((var - g_var) / (g_var + eps)), axis=(0, 2)))
            for j, step in enumerate(steps):
                i = row.get((step, name))
                if i is None:
                    continue
                cols["replica_mean_spread"][i] = spread_m[j]
                cols["replica_var_spread"][i] = spread_v[j]
                cols["global_pre_mean"][i] = g_mean[j].mean()
                cols["global_pre_var"][i] = g_var[j].mean()
                for k in range(self.world):
                    cols[f"r{k}_pre_mean"][i] = mean[k, j].mean()
                    cols[f"r{k}_pre_var"][i] = var[k, j].mean()
        layers.update(cols)
