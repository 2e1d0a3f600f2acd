"""BatchedMAML's meta-step paths: one strategy object per way of computing a meta-step.

BatchedMAML validates a batch, then asks its paths in this order whether they support the call; the
first that does runs it (``describe()`` and ``metafast info`` print every path's reason):

==============  ==========================  =====================================================
path            module                      runs when
==============  ==========================  =====================================================
cuda_graph      paths/cuda_graph.py         cuda_graph=True, CUDA inputs, a meta-gradient is
                                            wanted; captures whichever path below would run
fused           paths/fused.py              a Linear/ReLU MLP (<= 4 layers, widths <= 256), every
                                            layer adapted, built-in mse / cross_entropy loss, no
                                            clipping, fp32 precision, a fused kernel on the device
                                            (metafast._C CPU/CUDA, Triton on a GPU); fused != False
exact_reverse   paths/exact_reverse.py      every adapted layer has R-operators (MLPs, Conv4,
                                            ResNet-12; ANIL's body by autograd, fp32), no
                                            clipping, built-in loss, a meta-gradient is wanted;
                                            exact_reverse != False
autograd        paths/autograd.py           always (autograd through the unrolled inner loop)
==============  ==========================  =====================================================

``adapt()`` (evaluation) asks the same paths with ``Where.adapt`` set: fused where it applies, else
autograd (which then keeps no graph across steps).

The strategy interface (:class:`MetaStepPath`, paths/base.py). A path is built from a
:class:`Setup` (BatchedMAML's settings as public fields: network, flat parameters, batched engine,
loss, precision, rates, flags, finiteness guard); BatchedMAML rebuilds the setup and every path when
a setting changes, so a path may cache whatever it derives from it. A path implements:

- ``supports(where) -> Support(ok, reason, quiet)``: whether it runs a call described by
  :class:`Where` (device, dtype, inner steps, grad mode, adapt) and why. Cheap after the first call
  for a given ``where`` (BatchedMAML caches the choice per ``where`` and setup); a one-time cost such
  as the fused kernel's self-check belongs here, never in ``run``. ``quiet``: not applying is no
  fallback (nothing to do, e.g. zero inner steps).
- ``required() -> True | False | None``: True when a setting requires the path (fused=True: not
  supporting a call raises ValueError with the reason); False when a setting asks for it
  (cuda_graph=True: not supporting is a fallback, FallbackWarning through metafast.fallback, counted
  in ``describe()``, FallbackError under METAFAST_STRICT=1); None otherwise.
- ``prepare(batch, steps) -> prepared``: once per batch signature (shapes, dtypes, devices, steps,
  grad mode), after BatchedMAML's validation; the checks that hold for every batch with that
  signature. BatchedMAML caches ``(path, steps, prepared)`` under the signature, and later calls with
  it skip validation and choice and go straight to ``run``.
- ``run(batch, steps, prepared) -> StepOutput``: the meta-step (per-task query losses, accuracies,
  support losses, optionally their mean); resets and fills ``setup.guard`` and calls
  ``setup.guard.check`` once (finite losses).
- ``adapt(sx, sy, steps) -> FastWeights``: optional; only for paths that support ``Where.adapt``.

A new path is a sibling module with such a class, placed in :func:`make_paths`'s order; a setting
that selects it is a :class:`Setup` field (and a BatchedMAML setting, so that assigning it rebuilds
the paths), and every path's ``supports`` says whether it covers that setting. Two shapes exist:

- a path that computes the step itself (fused, exact_reverse, autograd): e.g. a step-checkpointed
  exact reverse for ``memory="low"``, placed before exact_reverse, supporting what it covers;
  exact_reverse and fused then answer "no, memory='low'" where they keep every step's activations;
- a path that wraps the eager paths (cuda_graph): it picks its inner path with :func:`choose` in
  ``prepare`` and runs it, e.g. ``task_chunk=N`` running the inner path per chunk of tasks and adding
  the meta-gradients.

Options that change the step itself (MAML++'s per-step rates, multi-step loss, per-step BatchNorm)
are Setup fields too; a path that does not implement one says so in ``supports`` (the reason names
the option), and autograd stays the path that runs everything.
"""
from typing import List

from .autograd import AutogradPath
from .base import FastWeights, FiniteGuard, MetaStepPath, Setup, StepOutput, Support, Where, choose
from .cuda_graph import CudaGraphPath
from .exact_reverse import ExactReversePath
from .fused import FusedPath

__all__ = ["make_paths", "choose", "MetaStepPath", "Setup", "Where", "Support", "StepOutput", "FastWeights",
           "FiniteGuard", "AutogradPath", "CudaGraphPath", "ExactReversePath", "FusedPath"]


def make_paths(setup: Setup) -> List[MetaStepPath]:
    """The paths of one setup, in order of preference (the first that supports a call runs it)."""
    eager = [FusedPath(setup), ExactReversePath(setup), AutogradPath(setup)]
    return [CudaGraphPath(setup, eager)] + eager
