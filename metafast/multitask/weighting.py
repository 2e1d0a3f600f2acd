"""Loss weighting strategies for multi-task training.

Every strategy is an ``nn.Module`` (its learnable parameters, if any, go into the optimizer with the
model's) with one entry point used by the trainer::

    total = strategy.backward(losses, shared_params)   # fills .grad of the model and the strategy
    optimizer.step(); strategy.after_step()

- :class:`EqualWeighting`: total = sum_i L_i.
- :class:`UncertaintyWeighting` (Kendall, Gal & Cipolla 2018): learnable s_i = log sigma_i^2;
  regression tasks contribute 1/(2 sigma^2) L + log sigma = 0.5 exp(-s) L + 0.5 s, classification
  tasks 1/sigma^2 L + log sigma = exp(-s) L + 0.5 s.
- :class:`GradNorm` (Chen et al. 2018): learnable weights w_i; the network is trained on sum_i w_i L_i
  while w follows the gradient of L_grad = sum_i |G_i - mean(G) r_i^alpha| with
  G_i = ||d(w_i L_i)/dW|| at the last shared layer W, r_i = (L_i/L_i(0)) / mean_j(L_j/L_j(0)) and the
  target mean(G) r_i^alpha held constant. After each optimizer step the weights are renormalised to
  sum to the number of tasks.

In a process group each rank passes its shard's (scaled) losses; equal and uncertainty weighting are
linear in them, so averaging gradients over the ranks is exact. GradNorm is not: its task gradient
norms and loss ratios are computed from the per-task shared-layer gradients and losses averaged over
the ranks (one all_reduce), so every rank derives the same weight update and keeps identical weights
and initial losses.
"""
from typing import List, Sequence, Union

import torch
from torch import Tensor, nn

from .. import distributed

STRATEGIES = ("equal", "uncertainty", "gradnorm")
TASK_KINDS = ("classification", "regression")


def _check_losses(losses: Tensor, num_tasks: int, where: str) -> None:
    if not isinstance(losses, Tensor) or losses.shape != (num_tasks,):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"{where}: losses must be a tensor [{num_tasks}] (one loss per task), got {shape}")


class LossWeighting(nn.Module):
    """Base class: ``combine`` builds the weighted total; ``backward`` back-propagates it."""

    def __init__(self, num_tasks: int):
        super().__init__()
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"{type(self).__name__}: num_tasks must be an integer >= 1, got {num_tasks!r}")
        self.num_tasks = num_tasks

    def weights(self) -> Tensor:
        """The current effective weight of each task's loss (detached), [T]."""
        raise NotImplementedError

    def combine(self, losses: Tensor) -> Tensor:
        raise NotImplementedError

    def backward(self, losses: Tensor, shared_params: Sequence[Tensor] = ()) -> Tensor:
        _check_losses(losses, self.num_tasks, type(self).__name__)
        total = self.combine(losses)
        total.backward()
        return total.detach()

    def after_step(self) -> None:
        pass


class EqualWeighting(LossWeighting):
    def weights(self) -> Tensor:
        return torch.ones(self.num_tasks)

    def combine(self, losses: Tensor) -> Tensor:
        _check_losses(losses, self.num_tasks, "EqualWeighting")
        return losses.sum()


class UncertaintyWeighting(LossWeighting):
    """``kinds``: "classification", "regression" or one of them per task."""

    def __init__(self, num_tasks: int, kinds: Union[str, Sequence[str]] = "classification"):
        super().__init__(num_tasks)
        kinds = [kinds] * num_tasks if isinstance(kinds, str) else list(kinds)
        if len(kinds) != num_tasks or any(k not in TASK_KINDS for k in kinds):
            raise ValueError(f"UncertaintyWeighting: kinds must be one of {TASK_KINDS} or a list of {num_tasks} of "
                             f"them, got {kinds!r}")
        self.kinds = kinds
        self.log_var = nn.Parameter(torch.zeros(num_tasks))  # s_i = log sigma_i^2, sigma = 1 at the start
        self.register_buffer("coef", torch.tensor([0.5 if k == "regression" else 1.0 for k in kinds]))

    def weights(self) -> Tensor:
        return (self.coef * torch.exp(-self.log_var)).detach()

    def combine(self, losses: Tensor) -> Tensor:
        _check_losses(losses, self.num_tasks, "UncertaintyWeighting")
        s = self.log_var.to(losses.dtype)
        return (self.coef.to(losses.dtype) * torch.exp(-s) * losses + 0.5 * s).sum()


class GradNorm(LossWeighting):
    """``alpha``: strength of the pull towards equal training rates (the paper uses 0.12 - 3)."""

    def __init__(self, num_tasks: int, alpha: float = 1.5):
        super().__init__(num_tasks)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"GradNorm: alpha must be a number >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.task_weights = nn.Parameter(torch.ones(num_tasks))
        self.register_buffer("initial_losses", torch.full((num_tasks,), float("nan")))

    def weights(self) -> Tensor:
        return self.task_weights.detach().clone()

    def combine(self, losses: Tensor) -> Tensor:
        _check_losses(losses, self.num_tasks, "GradNorm")
        return (self.task_weights.detach().to(losses.dtype) * losses).sum()

    def grad_norms(self, losses: Tensor, shared_params: Sequence[Tensor]) -> Tensor:
        """||d L_i / d W|| for each task (W: the shared parameters, concatenated), [T]; in a process
        group, of the gradients averaged over the ranks."""
        return self._norms_and_losses(losses, shared_params)[0]

    def _norms_and_losses(self, losses: Tensor, shared_params: Sequence[Tensor]):
        """(norms [T], detached losses [T]), both averaged over the ranks in one all_reduce."""
        params = list(shared_params)
        flat = []
        for i in range(self.num_tasks):
            grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
            flat.append(torch.cat([(torch.zeros_like(p) if g is None else g.detach()).reshape(-1)
                                   for g, p in zip(grads, params)]).double())
        per_task = torch.stack(flat)
        mean_losses = losses.detach().clone()
        distributed.all_reduce_mean_([per_task, mean_losses])
        return per_task.pow(2).sum(1).sqrt().to(self.task_weights.dtype), mean_losses

    def weight_grad(self, losses: Tensor, norms: Tensor) -> Tensor:
        """d L_grad / d w with G_i = w_i ||dL_i/dW|| and the target held constant."""
        losses = losses.detach().to(self.task_weights.dtype)
        if torch.isnan(self.initial_losses).any():
            self.initial_losses.copy_(losses)
        w = self.task_weights.detach().requires_grad_()
        G = w * norms
        ratio = losses / self.initial_losses
        r = ratio / ratio.mean()
        target = (G.mean() * r.pow(self.alpha)).detach()
        (grad,) = torch.autograd.grad((G - target).abs().sum(), w)
        return grad

    def backward(self, losses: Tensor, shared_params: Sequence[Tensor] = ()) -> Tensor:
        _check_losses(losses, self.num_tasks, "GradNorm")
        params: List[Tensor] = list(shared_params)
        if not params:
            raise ValueError("GradNorm.backward: shared_params must name the last shared layer's parameters "
                             "(e.g. MultiTask.last_shared_parameters())")
        norms, mean_losses = self._norms_and_losses(losses, params)
        grad = self.weight_grad(mean_losses, norms)
        self.task_weights.grad = grad if self.task_weights.grad is None else self.task_weights.grad + grad
        total = self.combine(losses)
        total.backward()
        return total.detach()

    @torch.no_grad()
    def after_step(self) -> None:
        # Keep weights positive, then renormalise so that sum_i w_i = T.
        w = self.task_weights
        w.clamp_(min=1e-4)
        w.mul_(self.num_tasks / w.sum())


def make_weighting(name: str, num_tasks: int, alpha: float = 1.5,
                   kinds: Union[str, Sequence[str]] = "classification") -> LossWeighting:
    """A strategy by name: "equal", "uncertainty" or "gradnorm"."""
    if name == "equal":
        return EqualWeighting(num_tasks)
    if name == "uncertainty":
        return UncertaintyWeighting(num_tasks, kinds)
    if name == "gradnorm":
        return GradNorm(num_tasks, alpha)
    raise ValueError(f"weighting must be one of {STRATEGIES}, got {name!r}")
