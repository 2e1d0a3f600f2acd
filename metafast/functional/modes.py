"""Train/eval mode switches that put the previous mode back."""
import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``module`` in eval mode (Dropout off, BatchNorm on running statistics), then put
    its previous mode back, also when the block raises. Both switches go through ``module.train`` (so an
    override such as BatchedMAML's runs), which sets every submodule to the module's own mode."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
