"""The CUDA-graph path: BatchedMAML's whole meta-step (inner loop + query loss, and its backward)
captured in CUDA graphs and replayed.

Few-shot models are small: on a GPU their meta-step is dominated by kernel launches. With static
shapes, torch.cuda.make_graphed_callables records the forward (which already contains the hand-written
inner backward of every inner step) and the outer backward once, and replays them afterwards. The
captured step is whichever of the other paths would run eagerly (fused, exact reverse or autograd).

It applies when cuda_graph=True, the inputs are on a CUDA device and a meta-gradient is wanted. One
graph per input signature; a new signature captures again (a warning), and past ``max_graphs``
signatures the step runs eagerly (a fallback). cuda_graph=True with CPU inputs is a fallback too.
"""
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .base import MetaStepPath, StepOutput, Support, Where, choose


class _CapturedStep(nn.Module):
    """The meta-step as a module: its parameters are the meta-parameters the graph differentiates."""

    def __init__(self, owner: nn.Module, inner: MetaStepPath, steps: int, prepared):
        super().__init__()
        self.owner = owner
        self.inner = inner
        self.steps = steps
        self.prepared = prepared

    def forward(self, sx, sy, qx, qy):
        out = self.inner.run((sx, sy, qx, qy), self.steps, self.prepared)
        support = out.support_losses.detach()  # reported only: no backward graph for it
        return (out.task_losses, support) if out.accuracies is None else (out.task_losses, support, out.accuracies)


class CudaGraphPath(MetaStepPath):
    name = "cuda_graph"
    title = "CUDA graph capture"
    flag = "cuda_graph=True"

    def __init__(self, setup, inner: List[MetaStepPath], max_graphs: int = 8):
        super().__init__(setup)
        self.inner = inner
        self.max_graphs = max_graphs
        self.graphs: Dict[Tuple, nn.Module] = {}
        self._warned = set()

    def required(self) -> Optional[bool]:
        return False if self.setup.cuda_graph else None

    def supports(self, where: Where) -> Support:
        if not self.setup.cuda_graph:
            return Support(False, "cuda_graph=False", quiet=True)
        if where.adapt:
            return Support(False, "adapt() runs eagerly", quiet=True)
        if self.setup.multi_step_loss:
            return Support(False, "multi_step_loss (its weights change with the iteration; a graph would freeze them)")
        if self.setup.step_stats is not None:
            return Support(False, "per_step_bn_stats (a replayed graph would not update the running statistics "
                                  "once per step)")
        if where.device.type != "cuda":
            return Support(False, "inputs are not on a CUDA device")
        if not where.grad:
            return Support(False, "no meta-gradient is recorded (no_grad / inference mode)", quiet=True)
        return Support(True, f"the whole meta-step captured per input shape (up to {self.max_graphs}) and replayed")

    def prepare(self, batch, steps):
        """The eager path the graph captures, and its own preparation."""
        buffer = self.setup.flat.buffer
        inner, _ = choose(self.inner, Where(buffer.device, buffer.dtype, steps, True))
        return inner, inner.prepare(batch, steps)

    def run(self, batch, steps, prepared) -> StepOutput:
        inner, inner_prepared = prepared
        graphed = self._graph(batch, steps, inner, inner_prepared)
        if graphed is None:
            return inner.run(batch, steps, inner_prepared)
        out = graphed(*batch)
        s = self.setup
        s.guard.overflow = None  # recorded at capture, not by the replay
        s.guard.check(out[0], "query loss", out[1])
        return StepOutput(out[0], out[2] if len(out) > 2 else None, out[1])

    def _graph(self, batch, steps, inner, inner_prepared) -> Optional[nn.Module]:
        key = (steps,) + tuple((tuple(t.shape), t.dtype, t.device) for t in batch)
        graphed = self.graphs.get(key)
        if graphed is None:
            if len(self.graphs) >= self.max_graphs:
                if "many" not in self._warned:
                    self._warned.add("many")
                    self.setup.fallback("maml_path.cuda_graph", f"BatchedMAML(cuda_graph=True): more than "
                                        f"{self.max_graphs} distinct input shapes; new shapes run eagerly (keep "
                                        "shapes static to benefit from graphs)")
                return None
            if self.graphs and "recapture" not in self._warned:
                self._warned.add("recapture")
                warnings.warn("BatchedMAML(cuda_graph=True): input shapes changed; capturing a new graph for them "
                              "(each new shape costs a capture)", stacklevel=5)
            step = _CapturedStep(self.setup.owner, inner, steps, inner_prepared)
            graphed = self.graphs[key] = torch.cuda.make_graphed_callables(step, tuple(batch),
                                                                           allow_unused_input=True)
        return graphed
