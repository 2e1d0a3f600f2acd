"""MAML++ (Antoniou et al., "How to train your MAML", ICLR 2019): its schedules as pure functions of
the iteration, and the :func:`MAMLpp` preset (a BatchedMAML with the paper's options on).

Each MAML++ piece is a separate BatchedMAML option, so it can be ablated:

- ``lslr=True``: learned per-step, per-parameter-tensor inner rates (an nn.Parameter
  ``step_lrs`` [inner_steps, adapted tensors], initialised to ``inner_lr``);
- ``multi_step_loss=True, msl_anneal_iters=N``: the query loss after every inner step, weighted by
  :func:`msl_weights` (annealed towards the last step over N iterations; from iteration N on only
  the last step's loss counts, as the paper's code does);
- ``first_order_iters=N``: first order while the iteration is < N, then second order;
- ``per_step_bn=True``: per-step BatchNorm weights and biases (BNWB, an nn.Parameter ``step_bn``
  [inner_steps, BatchNorm weight+bias numel]; autograd path and exact reverse);
- ``per_step_bn_stats=True``: per-step BatchNorm running statistics (BNRS, buffers ``step_running_mean``
  / ``step_running_var`` [inner_steps, channels]): training meta-steps update row k from the mean over
  tasks of inner step k's support-pass batch statistics; after ``maml.eval()`` step k (and predict after
  K steps: row K-1, clamped to the last row) normalises by them instead of batch statistics;
- cosine annealing of the meta-learning rate belongs to the training loop
  (``torch.optim.lr_scheduler.CosineAnnealingLR``; ``metafast train --algorithm mamlpp`` uses it).

The schedules read BatchedMAML's iteration counter (``set_iteration(i)``; a buffer, so a checkpoint
of the module's state_dict resumes the schedules where they were). The paper counts epochs (500
iterations each): call ``set_iteration`` with whatever unit the annealing lengths are given in.
"""
from typing import List

__all__ = ["msl_weights", "step_loss_weights", "is_first_order", "MAMLpp", "check_anneal"]


def check_anneal(value, name: str) -> int:
    """An annealing length: an int >= 0 (ValueError naming ``name`` otherwise)."""
    if type(value) is not int or value < 0:
        raise ValueError(f"{name}: expected an int >= 0 (iterations), got {value!r}")
    return value


def msl_weights(iteration: int, steps: int, anneal_iters: int) -> List[float]:
    """The paper code's ``get_per_step_loss_importance_vector``: start uniform 1/K; every iteration the
    non-final weights decay by 1/K/anneal_iters down to 0.03/K, and the final one grows by (K-1) times
    that, up to 1 - (K-1)*0.03/K."""
    if type(steps) is not int or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    check_anneal(anneal_iters, "anneal_iters")
    if type(iteration) is not int or iteration < 0:
        raise ValueError(f"iteration: expected an int >= 0, got {iteration!r}")
    K = steps
    floor = 0.03 / K
    decay = 1.0 / K / anneal_iters if anneal_iters else float("inf")
    done = iteration * decay if iteration else 0.0
    weights = [max(1.0 / K - done, floor) for _ in range(K - 1)]
    weights.append(min(1.0 / K + (K - 1) * done, 1.0 - (K - 1) * floor))
    return weights


def step_loss_weights(iteration: int, steps: int, anneal_iters: int) -> List[float]:
    """The weights a training step uses: :func:`msl_weights` while ``iteration < anneal_iters``, then
    only the last step's loss (the paper's code stops the multi-step loss after its annealing epochs)."""
    if iteration >= check_anneal(anneal_iters, "anneal_iters"):
        return [0.0] * (steps - 1) + [1.0]
    return msl_weights(iteration, steps, anneal_iters)


def is_first_order(iteration: int, first_order_iters: int) -> bool:
    """Derivative-order annealing: first order for iterations 0 .. first_order_iters-1, then second."""
    return iteration < first_order_iters


def MAMLpp(model, inner_lr: float = 0.1, inner_steps: int = 5, loss="cross_entropy", msl_anneal_iters: int = 15,
           first_order_iters: int = 50, per_step_bn=None, per_step_bn_stats=None, **kwargs):
    """A BatchedMAML with the paper's MAML++ setup: LSLR (initialised to ``inner_lr``), the annealed
    multi-step loss over ``msl_anneal_iters``, first order for ``first_order_iters`` (the paper's 15
    and 50 are epochs: call ``set_iteration(epoch)``), per-step BatchNorm weights (``per_step_bn``
    None: on when the model has an affine BatchNorm) and per-step BatchNorm running statistics
    (``per_step_bn_stats`` None: on when it has a BatchNorm; used after ``maml.eval()``). The
    meta-learning rate's cosine annealing is the training loop's (CosineAnnealingLR). Other BatchedMAML
    arguments pass through."""
    from torch import nn

    from .batched_maml import BatchedMAML
    if per_step_bn is None:
        per_step_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine for m in model.modules())
    if per_step_bn_stats is None:
        per_step_bn_stats = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return BatchedMAML(model, inner_lr=inner_lr, inner_steps=inner_steps, loss=loss, lslr=True, multi_step_loss=True,
                       msl_anneal_iters=msl_anneal_iters, first_order_iters=first_order_iters, per_step_bn=per_step_bn,
                       per_step_bn_stats=per_step_bn_stats,
                       **kwargs)
