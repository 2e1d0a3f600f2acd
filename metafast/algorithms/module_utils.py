"""Differentiable copies and in-place updates of nn.Modules, with learn2learn's semantics.

A clone's parameters are ``torch.clone``s of the original's, so a loss computed through the clone
back-propagates into the original. Updates swap a module's parameter tensors for new (non-leaf)
tensors instead of writing in place, which keeps the whole inner loop differentiable.
"""
import warnings
from typing import Dict, Optional, Sequence

from torch import nn

__all__ = ["clone_module", "update_module", "detach_module", "clone_parameters"]


def clone_parameters(param_list):
    """``[p.clone() for p in param_list]``: differentiable copies of a list of tensors."""
    return [p.clone() for p in param_list]


def _refresh_flat_weights(module: nn.Module) -> None:
    """Point an RNN's cached weight list at its current parameter tensors.

    RNNs run on ``_flat_weights``, a list cached from ``_parameters`` (and, on cuDNN, flattened into
    one buffer). After the parameters are swapped, the cache must be rebuilt or the RNN keeps running
    on the old tensors. learn2learn calls ``module._apply(lambda x: x)``, whose only effect on an RNN
    is this rebuild; calling it directly avoids _apply's read of ``.grad`` on non-leaf tensors.
    """
    if hasattr(module, "_init_flat_weights") and hasattr(module, "_flat_weights_names"):
        module._init_flat_weights()
    elif hasattr(module, "flatten_parameters"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*non-leaf Tensor.*")
            module._apply(lambda x: x)


def clone_module(module, memo: Optional[Dict] = None):
    """Copy ``module`` with every parameter (and every buffer that requires grad) ``torch.clone``d.

    The clone shares the autograd graph with ``module``: gradients of a loss computed with the clone
    flow back to the original parameters. Everything else is shared as learn2learn shares it:

    - a tensor used by several submodules (tied weights) is cloned once and stays shared (``memo``
      maps each original tensor to its clone);
    - buffers that do not require grad (e.g. BatchNorm running statistics) are the same tensors in
      the clone and the original, so in-place updates of running statistics reach the original;
    - RNN modules get their cached flat weights rebuilt so they run on the cloned tensors.

    Anything that is not an ``nn.Module`` is returned as is.
    """
    if memo is None:
        memo = {}
    if not isinstance(module, nn.Module):
        return module
    # Shallow copy of the instance (as nn.Module._replicate_for_data_parallel does), then fresh
    # containers so that swapping tensors in the clone leaves the original untouched.
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = clone._parameters.copy()
    clone._buffers = clone._buffers.copy()
    clone._modules = clone._modules.copy()

    for key, param in module._parameters.items():
        if param is None:
            continue
        # Tensors hash by identity, so the memo keeps tied tensors tied.
        if param not in memo:
            memo[param] = param.clone()
        clone._parameters[key] = memo[param]

    for key, buff in module._buffers.items():
        if buff is None or not buff.requires_grad:
            continue
        if buff not in memo:
            memo[buff] = buff.clone()
        clone._buffers[key] = memo[buff]

    for key, child in module._modules.items():
        clone._modules[key] = clone_module(child, memo=memo)

    _refresh_flat_weights(clone)
    return clone


def update_module(module, updates: Optional[Sequence] = None, memo: Optional[Dict] = None):
    """Replace each parameter ``p`` of ``module`` by ``p + u`` without in-place writes.

    ``updates``: one tensor (or None for "leave as is") per entry of ``module.parameters()``, in that
    order. Without it, each parameter's (and buffer's) ``.update`` attribute is used when set, and
    reset to None once applied. ``memo`` maps original tensors to their new values: a tensor that
    appears in several submodules is updated once and stays shared; pre-filling it installs given new
    tensors directly. Returns ``module`` (modified in place).
    """
    if memo is None:
        memo = {}
    if updates is not None:
        params = list(module.parameters())
        updates = list(updates)
        if len(updates) != len(params):
            raise ValueError(f"updates: expected one entry per parameter of the module ({len(params)}), "
                             f"got {len(updates)}")
        for i, (p, u) in enumerate(zip(params, updates)):
            if u is not None and u.shape != p.shape:
                raise ValueError(f"updates[{i}]: expected shape {tuple(p.shape)} (the parameter's), "
                                 f"got {tuple(u.shape)}")
            p.update = u

    for key, p in module._parameters.items():
        if p is None:
            continue
        if p in memo:
            module._parameters[key] = memo[p]
        elif getattr(p, "update", None) is not None:
            updated = p + p.update
            p.update = None
            memo[p] = updated
            module._parameters[key] = updated

    for key, buff in module._buffers.items():
        if buff is None:
            continue
        if buff in memo:
            module._buffers[key] = memo[buff]
        elif getattr(buff, "update", None) is not None:
            updated = buff + buff.update
            buff.update = None
            memo[buff] = updated
            module._buffers[key] = updated

    for key, child in module._modules.items():
        module._modules[key] = update_module(child, updates=None, memo=memo)

    _refresh_flat_weights(module)
    return module


def detach_module(module, keep_requires_grad: bool = False) -> None:
    """Cut every parameter and grad-requiring buffer of ``module`` from its graph, in place.

    Parameters end up with ``requires_grad=False`` unless ``keep_requires_grad`` is set, in which case
    those that required grad before keep requiring it (as new leaves). Returns None, as learn2learn.
    """
    if not isinstance(module, nn.Module):
        return
    for key, p in module._parameters.items():
        if p is None:
            continue
        requires_grad = p.requires_grad
        p.detach_()
        if keep_requires_grad and requires_grad:
            p.requires_grad_()

    for key, buff in module._buffers.items():
        if buff is not None and buff.requires_grad:
            module._buffers[key] = buff.detach_()
            if keep_requires_grad:
                module._buffers[key].requires_grad_()

    for child in module._modules.values():
        detach_module(child, keep_requires_grad=keep_requires_grad)
