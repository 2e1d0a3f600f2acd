"""Fully connected networks (the MAML paper's sinusoid 1-40-40-1 and Omniglot 256-128-64-64 MLPs)."""
from typing import Sequence

from torch import nn


class MLP(nn.Sequential):
    """Linear/ReLU stack; ``MLP(1, [40, 40], 1)`` is the sinusoid regressor of the MAML paper.

    A plain ``nn.Sequential`` so the batched executor runs it layer by layer over tasks.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, batch_norm: bool = False):
        if in_features <= 0 or out_features <= 0 or any(h <= 0 for h in hidden):
            raise ValueError(f"MLP: sizes must be positive, got in={in_features}, hidden={list(hidden)}, out={out_features}")
        layers = []
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h, track_running_stats=False))
            layers.append(nn.ReLU())
            width = h
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)
