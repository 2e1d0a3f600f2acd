"""``MultiTaskTrainer``: one optimisation step of a MultiTask model under a loss weighting strategy,
and per-task evaluation.

In a process group (metafast.distributed, e.g. under torchrun) ``step`` takes the whole batch, the same
on every rank; each rank computes the per-task losses on its own contiguous shard of the rows, scaled
so that the mean over ranks is the loss of the whole batch, and model and strategy gradients are
averaged in one bucketed all_reduce. Equal and uncertainty weighting are linear in the per-task
losses, so that is exact; GradNorm reduces its per-task gradient norms' inputs itself
(weighting.GradNorm.backward). Every rank therefore takes the same step and keeps the same strategy
state."""
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import distributed
from ..functional.modes import eval_mode
from .model import Inputs, LossSpec, MultiTask
from .weighting import LossWeighting


class MultiTaskTrainer:
    """Trains ``model`` with ``weighting``; ``optimizer`` must hold the parameters of both (see
    :meth:`parameter_groups`)."""

    def __init__(self, model: MultiTask, weighting: LossWeighting, optimizer: torch.optim.Optimizer,
                 loss: LossSpec = "cross_entropy"):
        if not isinstance(model, MultiTask):
            raise TypeError(f"MultiTaskTrainer: model must be a MultiTask, got {type(model).__name__}")
        if not isinstance(weighting, LossWeighting):
            raise TypeError(f"MultiTaskTrainer: weighting must be a LossWeighting, got {type(weighting).__name__}")
        if weighting.num_tasks != model.num_tasks:
            raise ValueError(f"MultiTaskTrainer: weighting is for {weighting.num_tasks} tasks, the model has "
                             f"{model.num_tasks}")
        self.model, self.weighting, self.optimizer, self.loss = model, weighting, optimizer, loss

    @staticmethod
    def parameter_groups(model: MultiTask, weighting: LossWeighting, lr: float,
                         weighting_lr: Optional[float] = None) -> List[dict]:
        """Optimizer groups: the model at ``lr``, the strategy's own parameters at ``weighting_lr``."""
        groups = [{"params": list(model.parameters()), "lr": lr}]
        own = list(weighting.parameters())
        if own:
            groups.append({"params": own, "lr": lr if weighting_lr is None else weighting_lr})
        return groups

    def step(self, x: Inputs, targets: Union[Tensor, Sequence[Tensor]],
             also: Sequence[Tensor] = ()) -> Dict[str, Tensor]:
        """One step; returns the weighted total, the per-task losses and weights (all detached).
        ``also``: tensors averaged over the ranks in the step's gradient all_reduce (e.g. a stop flag)."""
        self.model.train()
        world = distributed.world_size()
        if world > 1:
            x, targets, scale = _shard(x, targets, self.model.num_tasks)
        losses = self.model.losses(x, targets, self.loss)
        if world > 1:
            losses = losses * scale.to(device=losses.device, dtype=losses.dtype)
        self.optimizer.zero_grad(set_to_none=True)
        shared = self.model.last_shared_parameters()
        total = self.weighting.backward(losses, shared)
        losses = losses.detach()
        if world > 1:
            total, losses = total.clone(), losses.clone()
            distributed.all_reduce_gradients(list(self.model.parameters()) + list(self.weighting.parameters()),
                                             also=[total, losses, *also])
        self.optimizer.step()
        self.weighting.after_step()
        return {"loss": total, "losses": losses, "weights": self.weighting.weights()}


def _shard(x: Inputs, targets: Union[Tensor, Sequence[Tensor]], tasks: int):
    """This rank's rows of (x, targets) and the per-task loss scale [H] (see distributed.shard_scale).
    A shared x [N, ...] with targets [H, N, ...] (or H tensors [N, ...]) is cut along N; per-task inputs
    (a list of H tensors) are each cut along their own rows."""
    if isinstance(x, Tensor):
        n = x.shape[0]
        lo, hi = distributed.shard_bounds(n)
        if isinstance(targets, Tensor):
            t = targets[:, lo:hi]
        else:
            t = [y[lo:hi] for y in targets]
        return x[lo:hi], t, torch.full((tasks,), distributed.shard_scale(hi - lo, n), dtype=torch.float64)
    xs, ys, scale = [], [], []
    for h, xh in enumerate(x):
        n = xh.shape[0]
        lo, hi = distributed.shard_bounds(n)
        xs.append(xh[lo:hi])
        ys.append(targets[h][lo:hi])
        scale.append(distributed.shard_scale(hi - lo, n))
    return xs, ys, torch.tensor(scale, dtype=torch.float64)


@torch.no_grad()
def per_task_accuracy(model: MultiTask, x: Inputs, targets: Union[Tensor, Sequence[Tensor]]) -> List[float]:
    """Fraction of correct arg-max predictions for each task."""
    with eval_mode(model):
        outs = model(x)
    return [(out.argmax(-1) == targets[t]).double().mean().item() for t, out in enumerate(outs)]
