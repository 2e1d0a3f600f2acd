"""MAML as a drop-in for ``learn2learn.algorithms.MAML``: same API, same numbers.

``MAML(model, lr)`` wraps a module; ``clone()`` returns a differentiable copy whose ``adapt(loss)``
takes one SGD step on the copy's parameters. Back-propagating a loss computed with the adapted copy
yields the (second-order unless ``first_order``) meta-gradient on the original parameters.
"""
import numbers
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from .. import _backend
from ..ops.inner_update_multi import inner_update_multi
from .module_utils import clone_module, update_module

__all__ = ["MAML", "maml_update", "inner_sgd_step"]


def _wants_fused(params: Sequence[torch.Tensor], lr) -> bool:
    """True when the fused multi-tensor op applies: CUDA tensors, and a float lr or one lr tensor per
    parameter of the params' dtype and device. The per-tensor loop stays the CPU path because it is
    learn2learn's exact arithmetic (bit-for-bit identical results)."""
    if not params or _backend.requested() == "torch":
        return False
    if not all(p.is_cuda for p in params):
        return False
    if isinstance(lr, (list, tuple)):
        dtype, device = params[0].dtype, params[0].device
        return (len(lr) == len(params) and all(p.dtype == dtype for p in params)
                and all(isinstance(l, torch.Tensor) and l.dtype == dtype and l.device == device for l in lr))
    return isinstance(lr, numbers.Real) and not isinstance(lr, bool)


def inner_sgd_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   lr: Union[float, torch.Tensor, Sequence[torch.Tensor]]) -> List[torch.Tensor]:
    """New tensors ``p - lr * g`` for each pair, differentiable (twice) w.r.t. ``p``, ``g`` and ``lr``.

    ``lr``: one scalar (float or tensor) for all tensors, or a sequence with one learning rate per
    tensor (Meta-SGD: shaped like it, or 0-dim). On CUDA, the fused multi-tensor op
    (``metafast.ops.inner_update.inner_update_multi``) updates all tensors in one launch; otherwise
    each tensor is updated with learn2learn's own expression.
    """
    params, grads = list(params), list(grads)
    if len(params) != len(grads):
        raise ValueError(f"grads: expected one gradient per parameter ({len(params)}), got {len(grads)}")
    per_tensor = isinstance(lr, (list, tuple, nn.ParameterList))
    if per_tensor:
        lr = list(lr)
        if len(lr) != len(params):
            raise ValueError(f"lr: expected one learning rate per parameter ({len(params)}), got {len(lr)}")
    if _wants_fused(params, lr):
        return list(inner_update_multi(params, grads, lr if per_tensor else float(lr)))
    if per_tensor:
        # Meta-SGD: learn2learn writes p - lr_p * g_p.
        return [p - lr_p * g for p, lr_p, g in zip(params, lr, grads)]
    # MAML: learn2learn writes update = -lr * g, then p + update.
    return [p + (-lr * g) for p, g in zip(params, grads)]


def inner_gradients(module: nn.Module, loss: torch.Tensor, second_order: bool,
                    allow_unused: bool, allow_nograd: bool) -> List[Optional[torch.Tensor]]:
    """d loss / d p for each entry of ``module.parameters()``; None where a parameter is skipped.

    Parameters with ``requires_grad=False`` are skipped when ``allow_nograd``, otherwise they are an
    error; parameters the loss does not depend on get None when ``allow_unused``, otherwise they are
    an error. Both errors name the parameters.
    """
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss: expected a scalar torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss: expected a scalar (one element), got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError("loss: does not require grad; it must be computed with the parameters of the "
                         "learner being adapted (call adapt on the clone whose forward produced it)")
    named = list(module.named_parameters())
    frozen = [name for name, p in named if not p.requires_grad]
    if frozen and not allow_nograd:
        raise RuntimeError(f"adapt: parameters {frozen} have requires_grad=False; pass allow_nograd=True "
                           f"to leave them unadapted")
    diff = [(name, p) for name, p in named if p.requires_grad]
    # allow_unused=True always: the unused ones are reported below by name, with no effect on values.
    grads = torch.autograd.grad(loss, [p for _, p in diff], retain_graph=second_order,
                                create_graph=second_order, allow_unused=True)
    unused = [name for (name, _), g in zip(diff, grads) if g is None]
    if unused and not allow_unused:
        raise RuntimeError(f"adapt: the loss does not depend on parameters {unused}; pass allow_unused=True "
                           f"to leave them unadapted")
    by_param = {id(p): g for (_, p), g in zip(diff, grads)}
    return [by_param.get(id(p)) for _, p in named]


def install_updated(module: nn.Module, params: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]],
             lr) -> nn.Module:
    """Swap each parameter that has a gradient for its SGD-updated tensor, module-wide (tied stay tied)."""
    if isinstance(lr, (list, tuple, nn.ParameterList)):
        lr = list(lr)
        kept = [(p, g, l) for p, g, l in zip(params, grads, lr) if g is not None]
        step_lr = [l for _, _, l in kept]
    else:
        kept = [(p, g, None) for p, g in zip(params, grads) if g is not None]
        step_lr = lr
    new = inner_sgd_step([p for p, _, _ in kept], [g for _, g, _ in kept], step_lr)
    return update_module(module, memo={p: n for (p, _, _), n in zip(kept, new)})


def maml_update(model: nn.Module, lr, grads: Optional[Sequence[Optional[torch.Tensor]]] = None) -> nn.Module:
    """One SGD step ``p <- p - lr * g`` on ``model``'s parameters, swapping tensors (no in-place writes).

    ``grads``: one entry per ``model.parameters()`` (None skips that parameter). Without ``grads``,
    the ``.update`` attributes already set on the parameters are applied (learn2learn's behaviour).
    """
    if grads is None:
        return update_module(model)
    params = list(model.parameters())
    grads = list(grads)
    if len(grads) != len(params):
        raise ValueError(f"grads: expected one entry per parameter of the model ({len(params)}), "
                         f"got {len(grads)}")
    return install_updated(model, params, grads, lr)


class Learner(nn.Module):
    """Wraps ``self.module``; attributes it does not have are looked up on the wrapped module."""

    def __getattr__(self, attr):
        try:
            return super().__getattr__(attr)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if not modules or modules.get("module") is None:   # e.g. mid-unpickling
                raise
            return getattr(modules["module"], attr)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _check_lr(lr):
    if isinstance(lr, bool) or not isinstance(lr, (numbers.Real, torch.Tensor)):
        raise TypeError(f"lr: expected a float or a scalar tensor, got {type(lr).__name__}")
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"lr: expected a scalar tensor, got shape {tuple(lr.shape)}")


class MAML(Learner):
    """Model-Agnostic Meta-Learning (Finn et al., 2017), API-compatible with learn2learn's MAML.

    Args:
        model: the module to meta-learn.
        lr: inner-loop (fast adaptation) learning rate.
        first_order: drop second-order terms (FOMAML): ``adapt`` does not differentiate the gradient.
        allow_unused: allow parameters the adaptation loss does not use (they are left as is).
            Defaults to ``allow_nograd``.
        allow_nograd: allow parameters with ``requires_grad=False`` (they are left as is).

    Example::

        maml = MAML(net, lr=0.01)
        learner = maml.clone()
        learner.adapt(loss_fn(learner(x_support), y_support))
        loss_fn(learner(x_query), y_query).backward()   # meta-gradient on net's parameters
    """

    def __init__(self, model: nn.Module, lr, first_order: bool = False, allow_unused: Optional[bool] = None,
                 allow_nograd: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        _check_lr(lr)
        self.module = model
        self.lr = lr
        self.first_order = first_order
        self.allow_nograd = allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused

    def adapt(self, loss: torch.Tensor, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> None:
        """One SGD step on ``loss``, replacing this learner's parameters (keep the graph unless first order)."""
        first_order = self.first_order if first_order is None else first_order
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        second_order = not first_order
        grads = inner_gradients(self.module, loss, second_order, allow_unused, allow_nograd)
        self.module = install_updated(self.module, list(self.module.parameters()), grads, self.lr)

    def clone(self, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> "MAML":
        """A MAML-wrapped differentiable copy (see ``clone_module``); flags default to this learner's."""
        return MAML(clone_module(self.module), lr=self.lr,
                    first_order=self.first_order if first_order is None else first_order,
                    allow_unused=self.allow_unused if allow_unused is None else allow_unused,
                    allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd)
