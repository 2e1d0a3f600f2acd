"""``MultiTaskTrainer``: one optimisation step of a MultiTask model under a loss weighting strategy,
and per-task evaluation."""
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

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

    def step(self, x: Inputs, targets: Union[Tensor, Sequence[Tensor]]) -> Dict[str, Tensor]:
        """One step; returns the weighted total, the per-task losses and weights (all detached)."""
        self.model.train()
        losses = self.model.losses(x, targets, self.loss)
        self.optimizer.zero_grad(set_to_none=True)
        shared = self.model.last_shared_parameters()
        total = self.weighting.backward(losses, shared)
        self.optimizer.step()
        self.weighting.after_step()
        return {"loss": total, "losses": losses.detach(), "weights": self.weighting.weights()}


@torch.no_grad()
def per_task_accuracy(model: MultiTask, x: Inputs, targets: Union[Tensor, Sequence[Tensor]]) -> List[float]:
    """Fraction of correct arg-max predictions for each task."""
    was_training = model.training
    model.eval()
    try:
        outs = model(x)
    finally:
        model.train(was_training)
    return [(out.argmax(-1) == targets[t]).double().mean().item() for t, out in enumerate(outs)]
