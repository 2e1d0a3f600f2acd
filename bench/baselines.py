"""Second-order MAML meta-steps written the way other libraries do them; bench_maml_step.py times
metafast against these.

Every method computes the same quantity: for each task t, ``steps`` plain-SGD inner steps on the
support loss, differentiated through (no detach), then the query loss of the adapted weights; the
meta-loss is the mean over tasks, and ``forward_backward`` leaves its gradient in ``p.grad`` of the
meta-parameters ``params``, in the model's ``parameters()`` order.
"""
import copy
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

LossSpec = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
LOSSES = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}


def loss_fn(loss: LossSpec) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {sorted(LOSSES)} or a callable, got {loss!r}")
    return LOSSES[loss]


class MetaStep:
    """One MAML method over a private copy of ``model``; subclasses define ``meta_loss``."""

    name = "?"

    def __init__(self, model: nn.Module, inner_lr: float, steps: int, loss: LossSpec):
        if steps < 1:
            raise ValueError(f"steps: expected >= 1 inner step, got {steps}")
        self.model = copy.deepcopy(model)
        self.inner_lr = inner_lr
        self.steps = steps
        self.loss = loss_fn(loss)

    @property
    def params(self) -> List[torch.Tensor]:
        return list(self.model.parameters())

    def meta_loss(self, sx, sy, qx, qy) -> torch.Tensor:
        raise NotImplementedError

    def forward_backward(self, sx, sy, qx, qy) -> None:
        self.meta_loss(sx, sy, qx, qy).backward()

    def meta_grad(self, sx, sy, qx, qy) -> torch.Tensor:
        """The meta-gradient as one flat vector (for comparing methods)."""
        for p in self.params:
            p.grad = None
        self.forward_backward(sx, sy, qx, qy)
        g = torch.cat([p.grad.reshape(-1) for p in self.params])
        for p in self.params:
            p.grad = None
        return g


class PerTaskLoop(MetaStep):
    """learn2learn's recipe written out: per task, clone the parameters, autograd.grad with
    create_graph=True, p - lr * g, functional forward on the query; sum the query losses."""

    name = "per-task loop"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._names = [n for n, _ in self.model.named_parameters()]
        self._buffers = dict(self.model.named_buffers())

    def meta_loss(self, sx, sy, qx, qy):
        names, buffers = self._names, self._buffers
        total = 0.0
        for t in range(sx.shape[0]):
            fast = [p.clone() for p in self.params]  # learn2learn's MAML.clone()
            for _ in range(self.steps):
                out = functional_call(self.model, ({**dict(zip(names, fast)), **buffers},), (sx[t],))
                g = torch.autograd.grad(self.loss(out, sy[t]), fast, create_graph=True)
                fast = [p - self.inner_lr * gi for p, gi in zip(fast, g)]
            out = functional_call(self.model, ({**dict(zip(names, fast)), **buffers},), (qx[t],))
            total = total + self.loss(out, qy[t])
        return total / sx.shape[0]


class TorchFunc(MetaStep):
    """The torch.func recipe: vmap over tasks of (torch.func.grad inner steps on a params dict +
    query loss), second order (nothing detached), then ordinary autograd to the meta-parameters.

    Caveat measured here: vmap's second-order gradients through BatchNorm are wrong in current
    torch; the bench reports the mismatch rather than hiding it.
    """

    name = "torch.func"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model, lossf, lr, steps = self.model, self.loss, self.inner_lr, self.steps
        buffers = dict(model.named_buffers())

        def inner_loss(p, x, y):
            return lossf(functional_call(model, (p, buffers), (x,)), y)

        def task_loss(p, sx, sy, qx, qy):
            for _ in range(steps):
                g = grad(inner_loss)(p, sx, sy)
                p = {k: p[k] - lr * g[k] for k in p}
            return inner_loss(p, qx, qy)

        self._batched = vmap(task_loss, in_dims=(None, 0, 0, 0, 0))

    def meta_loss(self, sx, sy, qx, qy):
        return self._batched(dict(self.model.named_parameters()), sx, sy, qx, qy).mean()


class Higher(MetaStep):
    """higher's MAML example: per task an innerloop_ctx with a differentiable SGD, query loss
    backward per task (scaled by 1/T so the gradient is that of the mean)."""

    name = "higher"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import higher  # noqa: F401  (ImportError tells the bench to skip this method)

        self._inner_opt = torch.optim.SGD(self.model.parameters(), lr=self.inner_lr)

    def forward_backward(self, sx, sy, qx, qy):
        import higher

        T = sx.shape[0]
        for t in range(T):
            with higher.innerloop_ctx(self.model, self._inner_opt, copy_initial_weights=False) as (fnet, dopt):
                for _ in range(self.steps):
                    dopt.step(self.loss(fnet(sx[t]), sy[t]))
                (self.loss(fnet(qx[t]), qy[t]) / T).backward()


class Learn2Learn(MetaStep):
    """learn2learn.algorithms.MAML itself: learner = maml.clone(); learner.adapt(loss)."""

    name = "learn2learn"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import learn2learn as l2l

        self.maml = l2l.algorithms.MAML(self.model, lr=self.inner_lr, first_order=False)

    @property
    def params(self):
        return list(self.maml.parameters())

    def meta_loss(self, sx, sy, qx, qy):
        total = 0.0
        for t in range(sx.shape[0]):
            learner = self.maml.clone()
            for _ in range(self.steps):
                learner.adapt(self.loss(learner(sx[t]), sy[t]))
            total = total + self.loss(learner(qx[t]), qy[t])
        return total / sx.shape[0]


def available(names: Optional[Sequence[str]] = None) -> List[type]:
    """Baseline classes whose libraries import here (learn2learn and higher are optional)."""
    out = []
    for cls in (TorchFunc, PerTaskLoop, Learn2Learn, Higher):
        if names is not None and cls.name not in names:
            continue
        if cls is Learn2Learn or cls is Higher:
            try:
                __import__(cls.name)
            except Exception:  # a broken install is as absent as a missing one
                continue
        out.append(cls)
    return out
