"""Meta-SGD as a drop-in for ``learn2learn.algorithms.MetaSGD``.

Like MAML, but every parameter has its own learned, element-wise inner learning rate:
``p <- p - lr_p * g_p``. The learning rates are parameters of the MetaSGD module, so the outer
optimiser trains them together with the model.
"""
import numbers
from typing import List, Optional, Sequence

import torch
from torch import nn

from .maml import Learner, install_updated, inner_gradients
from .module_utils import clone_module, clone_parameters

__all__ = ["MetaSGD", "meta_sgd_update"]


def _check_lrs(lrs, params: List[torch.Tensor]) -> None:
    if not isinstance(lrs, (list, tuple, nn.ParameterList)):
        raise TypeError(f"lrs: expected a list of tensors (one per parameter), got {type(lrs).__name__}")
    if len(lrs) != len(params):
        raise ValueError(f"lrs: expected one learning-rate tensor per parameter ({len(params)}), got {len(lrs)}")
    for i, (lr, p) in enumerate(zip(lrs, params)):
        if not isinstance(lr, torch.Tensor):
            raise TypeError(f"lrs[{i}]: expected a tensor, got {type(lr).__name__}")
        # A 0-dim tensor is an explicit per-tensor rate; anything else must match element-wise.
        if lr.dim() != 0 and lr.shape != p.shape:
            raise ValueError(f"lrs[{i}]: expected shape {tuple(p.shape)} (its parameter's) or a 0-dim "
                             f"tensor, got {tuple(lr.shape)}")


def meta_sgd_update(model: nn.Module, lrs: Sequence[torch.Tensor],
                    grads: Sequence[Optional[torch.Tensor]]) -> nn.Module:
    """One Meta-SGD step ``p <- p - lr_p * g_p`` on ``model`` (one lr and grad per ``model.parameters()``)."""
    params = list(model.parameters())
    _check_lrs(lrs, params)
    grads = list(grads)
    if len(grads) != len(params):
        raise ValueError(f"grads: expected one entry per parameter of the model ({len(params)}), "
                         f"got {len(grads)}")
    return install_updated(model, params, grads, list(lrs))


class MetaSGD(Learner):
    """Meta-SGD (Li et al., 2017), API-compatible with learn2learn's MetaSGD.

    Args:
        model: the module to meta-learn.
        lr: initial value of every per-element learning rate.
        first_order: drop second-order terms in ``adapt``.
        lrs: learning rates to use instead (one tensor per parameter, shaped like it or 0-dim).
            A list of ``nn.Parameter`` is registered (trained by the outer optimiser); other tensors
            (e.g. a clone's, still attached to the original's graph) are kept as a plain list.

    Unlike learn2learn 0.2.0, tied parameters stay tied after ``adapt`` and RNNs run on the adapted
    weights (both identical to learn2learn for models without tied weights or RNNs).
    """

    def __init__(self, model: nn.Module, lr: float = 1.0, first_order: bool = False, lrs=None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        params = list(model.parameters())
        self.module = model
        if lrs is None:
            if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
                raise TypeError(f"lr: expected a float, got {type(lr).__name__}")
            lrs = nn.ParameterList([nn.Parameter(torch.ones_like(p) * lr) for p in params])
        else:
            _check_lrs(lrs, params)
            if not isinstance(lrs, nn.ParameterList) and all(isinstance(l, nn.Parameter) for l in lrs):
                lrs = nn.ParameterList(lrs)
            elif not isinstance(lrs, nn.ParameterList):
                # Wrapping non-leaf tensors in a ParameterList would cut them from their graph.
                lrs = list(lrs)
        self.lrs = lrs
        self.first_order = first_order

    def adapt(self, loss: torch.Tensor, first_order: Optional[bool] = None, allow_unused: bool = False,
              allow_nograd: bool = False) -> None:
        """One Meta-SGD step on ``loss``; the step is differentiable w.r.t. the parameters and ``lrs``.

        ``allow_unused`` / ``allow_nograd``: leave parameters the loss does not use / that do not
        require grad unadapted instead of raising (learn2learn's MetaSGD always raises).
        """
        first_order = self.first_order if first_order is None else first_order
        grads = inner_gradients(self.module, loss, not first_order, allow_unused, allow_nograd)
        self.module = install_updated(self.module, list(self.module.parameters()), grads, list(self.lrs))

    def clone(self) -> "MetaSGD":
        """A differentiable copy of the module and of the learning rates (gradients reach both)."""
        return MetaSGD(clone_module(self.module), lrs=clone_parameters(self.lrs), first_order=self.first_order)
