"""MAML++ per-step BatchNorm running statistics (BNRS): what the batched BatchNorm layers record while
a meta-step trains, and what they normalise by at evaluation.

The statistics live in three buffers of the owner (BatchedMAML): ``step_running_mean`` and
``step_running_var`` [R, C] (R rows, one per inner step; the columns are the BatchNorm layers'
channels, layer after layer in model order) and ``step_running_count`` [R] (updates per row, for
``momentum=None``). A pass hands its BatchNorm layers a hook through ``RunCtx.bn_stats``:

- :meth:`StepStats.recorder` (training): the support pass of inner step k records each task's batch
  mean and unbiased variance; :meth:`Recorder.commit` then moves row k towards their mean over the
  meta-batch's tasks (all task chunks together), with each layer's momentum, as ``nn.BatchNorm``
  does with one batch:  running = (1 - m) running + m mean_t(stat_t)  (m = 1 / count when momentum
  is None). It runs under no_grad: the meta-gradient does not see it.
- :meth:`StepStats.use` (evaluation): every BatchNorm layer normalises by row ``min(k, R - 1)``.

The paper's code updates the statistics task after task, in the support and the target passes alike;
here one update per meta-step from the support passes does not depend on the order of tasks or on how
they are chunked.
"""
from typing import Dict, Optional, Tuple

import torch

from . import layers as L

__all__ = ["StepStats", "Recorder"]


class StepStats:
    """The columns of each BatchNorm layer of an engine in the per-step statistics buffers."""

    def __init__(self, engine):
        self.columns: Dict[L.BatchNorm, Tuple[int, int]] = {}
        at = 0
        for layer in engine.layers:
            if isinstance(layer, L.BatchNorm):
                c = layer.module.num_features
                self.columns[layer] = (at, at + c)
                at += c
        self.channels = at

    def recorder(self, rows: int, device, dtype) -> "Recorder":
        return Recorder(self, rows, device, dtype)

    def use(self, mean: torch.Tensor, var: torch.Tensor, step: int) -> "_Use":
        """The hook of a pass at inner step ``step`` (clamped to the last row) that normalises by the
        running statistics ``mean``/``var`` [R, C]."""
        row = min(max(step, 0), mean.shape[0] - 1)
        return _Use(self.columns, mean[row], var[row])


class _Use:
    """RunCtx.bn_stats of an evaluation pass: each BatchNorm layer's running statistics [C]."""

    def __init__(self, columns, mean, var):
        self.columns, self.mean, self.var = columns, mean, var

    def running(self, layer) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        lo, hi = self.columns[layer]
        return self.mean[lo:hi], self.var[lo:hi]

    def record(self, layer, x, mean, invstd, T) -> None:
        pass


class Recorder:
    """One training meta-step's statistics: per inner step, the sums over tasks of the per-task batch
    means and unbiased variances, and the number of tasks (task chunks add up)."""

    def __init__(self, stats: StepStats, rows: int, device, dtype):
        self.stats = stats
        self.mean = torch.zeros(rows, stats.channels, device=device, dtype=dtype)
        self.var = torch.zeros_like(self.mean)
        self.tasks = [0] * rows

    def at(self, step: int) -> "_Record":
        """The hook of inner step ``step``'s support pass (one per chunk of tasks)."""
        return _Record(self, step)

    @torch.no_grad()
    def commit(self, running_mean: torch.Tensor, running_var: torch.Tensor, count: torch.Tensor) -> None:
        """Move each recorded row of the running statistics towards the mean over tasks."""
        for k, tasks in enumerate(self.tasks):
            if not tasks:
                continue
            count[k] += 1
            for layer, (lo, hi) in self.stats.columns.items():
                momentum = layer.module.momentum
                m = 1.0 / float(count[k]) if momentum is None else momentum
                running_mean[k, lo:hi].mul_(1 - m).add_(self.mean[k, lo:hi].to(running_mean.dtype), alpha=m / tasks)
                running_var[k, lo:hi].mul_(1 - m).add_(self.var[k, lo:hi].to(running_var.dtype), alpha=m / tasks)


class _Record:
    """RunCtx.bn_stats of a training support pass: batch statistics, recorded."""

    def __init__(self, recorder: Recorder, step: int):
        self.recorder, self.step = recorder, step

    def running(self, layer):
        return None

    @torch.no_grad()
    def record(self, layer, x, mean, invstd, T) -> None:
        """x: the layer's input [N, T*C, ...]; mean, invstd [T*C] its per-task batch statistics
        (invstd = 1 / sqrt(biased var + eps)). Adds the task sums of mean and unbiased variance."""
        r, (lo, hi) = self.recorder, self.recorder.stats.columns[layer]
        n = x.numel() // x.shape[1]  # values per channel and task
        var = (invstd.to(r.var.dtype).pow(-2) - layer.eps) * (n / max(n - 1, 1))
        r.mean[self.step, lo:hi] += mean.view(T, -1).sum(0).to(r.mean.dtype)
        r.var[self.step, lo:hi] += var.view(T, -1).sum(0)
        if layer is next(iter(r.stats.columns)):  # count the tasks once per pass
            r.tasks[self.step] += T
