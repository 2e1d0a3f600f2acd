"""Capture BatchedMAML's whole meta-step (inner loop + query loss, and its backward) in CUDA graphs.

Few-shot models are small: on a GPU their meta-step is dominated by kernel launches. With static
shapes, torch.cuda.make_graphed_callables records the forward (which already contains the hand-written
inner backward of every inner step) and the outer backward once, and replays them afterwards.
"""
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import nn


class _MetaStep(nn.Module):
    """The meta-step as a module: its parameters are the meta-parameters the graph differentiates."""

    def __init__(self, maml, steps: int):
        super().__init__()
        self.maml = maml
        self.steps = steps

    def forward(self, sx, sy, qx, qy):
        losses, acc, support, _ = self.maml._meta_forward(sx, sy, qx, qy, self.steps)
        support = support.detach()  # reported only: no backward graph for it
        return (losses, support) if acc is None else (losses, support, acc)


class GraphedMetaSteps:
    """One captured graph per input signature; past ``max_graphs`` signatures, eager with one warning."""

    def __init__(self, maml, max_graphs: int = 8):
        self.maml = maml
        self.max_graphs = max_graphs
        self.graphs: Dict[Tuple, nn.Module] = {}
        self._warned = set()

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, stacklevel=4)

    def __call__(self, sx, sy, qx, qy, steps: int) -> Optional[Tuple[torch.Tensor, ...]]:
        """Outputs of the graphed step, or None when the caller should run eagerly."""
        if not sx.is_cuda:
            self._warn_once("cpu", "BatchedMAML(cuda_graph=True): inputs are not on a CUDA device; running eagerly")
            return None
        if not torch.is_grad_enabled():
            return None
        key = (steps,) + tuple((tuple(t.shape), t.dtype, t.device) for t in (sx, sy, qx, qy))
        graphed = self.graphs.get(key)
        if graphed is None:
            if len(self.graphs) >= self.max_graphs:
                self._warn_once("many", f"BatchedMAML(cuda_graph=True): more than {self.max_graphs} distinct input "
                                "shapes; new shapes run eagerly (keep shapes static to benefit from graphs)")
                return None
            if self.graphs:
                self._warn_once("recapture", "BatchedMAML(cuda_graph=True): input shapes changed; capturing a new "
                                "graph for them (each new shape costs a capture)")
            graphed = torch.cuda.make_graphed_callables(_MetaStep(self.maml, steps), (sx, sy, qx, qy),
                                                        allow_unused_input=True)
            self.graphs[key] = graphed
        return graphed(sx, sy, qx, qy)
