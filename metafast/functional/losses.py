"""Per-task losses over batched outputs [T, N, ...], each with its closed-form d(loss)/d(output).

``value(out, y) -> [T]``; ``value_and_grad(out, y, create_graph) -> ([T], d sum_t loss_t / d out)``.
The gradient is built from differentiable ops so second-order MAML differentiates through it.
"""
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from ..ops.task_cross_entropy import task_cross_entropy, task_cross_entropy_with_grad


class TaskLoss:
    classification = False

    def check_target(self, out: torch.Tensor, y: torch.Tensor, name: str) -> None:
        pass

    def value(self, out, y) -> torch.Tensor:
        raise NotImplementedError

    def value_and_grad(self, out, y, create_graph: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class MSE(TaskLoss):
    """Mean squared error per task: mean over the task's samples and output dims."""

    def check_target(self, out, y, name):
        if not y.is_floating_point():
            raise TypeError(f"{name}: mse needs floating-point targets, got dtype {y.dtype}")
        if y.shape != out.shape:
            raise ValueError(f"{name}: expected shape {tuple(out.shape)} (the model's output), got {tuple(y.shape)}")

    def value(self, out, y):
        return (out - y).pow(2).flatten(1).mean(1)

    def value_and_grad(self, out, y, create_graph):
        diff = out - y
        m = diff[0].numel()
        return diff.pow(2).flatten(1).mean(1), diff * (2.0 / m)

    def rgrad(self, out, y, rout):
        """R-operator of the output gradient: R(2 (out - y) / m) = 2 R(out) / m."""
        return rout * (2.0 / out[0].numel())


class CrossEntropy(TaskLoss):
    """Softmax cross-entropy per task: logits [T, N, C], labels [T, N] int64, mean over N."""

    classification = True

    def check_target(self, out, y, name):
        if y.dtype != torch.long:
            raise TypeError(f"{name}: cross_entropy needs int64 class labels, got dtype {y.dtype}")
        if out.dim() != 3 or y.shape != out.shape[:2]:
            raise ValueError(f"{name}: expected labels of shape {tuple(out.shape[:2])} for logits "
                             f"{tuple(out.shape)} ([T, N, C]), got {tuple(y.shape)}")
        if y.numel() and y.device.type == "cpu":
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= out.shape[-1]:
                raise ValueError(f"{name}: labels must lie in [0, {out.shape[-1]}) for {out.shape[-1]} classes, "
                                 f"got values in [{lo}, {hi}]")

    def value(self, out, y):
        if out.is_cuda:
            return task_cross_entropy(out, y)
        lsm = torch.log_softmax(out, -1)
        return -lsm.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(1)

    def value_and_grad(self, out, y, create_graph):
        if out.is_cuda:  # fused loss + dlogits; its own backward is the fused softmax JVP
            return task_cross_entropy_with_grad(out, y)
        # CPU: the lean closed form (no ignore_index/smoothing bookkeeping).
        # d/dz mean_n CE(z_n, y_n) = (softmax(z_n) - onehot(y_n)) / N
        lsm = torch.log_softmax(out, -1)
        loss = -lsm.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(1)
        onehot = F.one_hot(y, out.shape[-1]).to(out.dtype)
        return loss, (lsm.exp() - onehot) * (1.0 / out.shape[1])

    def rgrad(self, out, y, rout):
        """R-operator of (softmax(z) - onehot) / N: the softmax Jacobian applied to R(z), over N."""
        p = torch.softmax(out, -1)
        return p * (rout - (p * rout).sum(-1, keepdim=True)) * (1.0 / out.shape[1])

    @staticmethod
    def accuracy(out, y) -> torch.Tensor:
        return (out.argmax(-1) == y).to(out.dtype).mean(1)


class Custom(TaskLoss):
    """A user loss ``fn(out [T, N, ...], target) -> [T]``; its gradient comes from autograd."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def value(self, out, y):
        loss = self.fn(out, y)
        if loss.shape != out.shape[:1]:
            raise ValueError(f"loss: a callable loss must return one value per task, shape {tuple(out.shape[:1])}, "
                             f"got {tuple(loss.shape)}")
        return loss

    def value_and_grad(self, out, y, create_graph):
        with torch.enable_grad():
            if not (create_graph and out.requires_grad):
                out = out.detach().requires_grad_(True)
            loss = self.value(out, y)
            (g,) = torch.autograd.grad(loss.sum(), out, create_graph=create_graph)
        return loss, g


def make_loss(loss) -> TaskLoss:
    if isinstance(loss, TaskLoss):
        return loss
    if loss == "mse":
        return MSE()
    if loss in ("cross_entropy", "ce"):
        return CrossEntropy()
    if callable(loss):
        return Custom(loss)
    raise ValueError(f"loss: expected 'mse', 'cross_entropy' or a callable returning per-task losses, got {loss!r}")
