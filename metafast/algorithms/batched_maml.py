"""BatchedMAML: MAML, Meta-SGD and ANIL over a whole batch of tasks at once."""
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..functional.executor import BatchedModel
from ..functional.flat import FlatParams
from ..functional.layers import RunCtx
from ..functional.losses import CrossEntropy, make_loss
from ..functional.meta_step import MetaStep
from .. import _backend
from . import fused_path
from . import precision as _precision
from .cuda_graph import GraphedMetaSteps
from ..ops.inner_update import inner_update


@dataclass
class MetaOutput:
    loss: torch.Tensor                      # mean query loss over tasks (differentiable)
    task_losses: torch.Tensor               # [T], detached
    task_accuracies: Optional[torch.Tensor]  # [T] for classification, else None
    support_losses: torch.Tensor            # [T] support loss before the last inner step, detached


@dataclass
class FastWeights:
    """Adapted weights of T tasks: θ for the shared prefix, ``fast`` [T, Pa] for the adapted suffix."""

    theta: torch.Tensor
    fast: Optional[torch.Tensor]
    offset: int

    @property
    def num_tasks(self) -> Optional[int]:
        return None if self.fast is None else self.fast.shape[0]


class BatchedMAML(nn.Module):
    """Model-Agnostic Meta-Learning over T tasks in one batched pass.

    Args:
        model: the network (an ``nn.Sequential``-style chain runs on batched layers with hand-written
            inner backward; other modules run per task through vmap).
        inner_lr: inner-loop step size (float), or one per step (sequence of ``inner_steps`` floats).
        inner_steps: number of inner SGD steps during meta-training.
        first_order: FOMAML (drop the second-order terms).
        meta_sgd: learn a per-parameter inner learning rate (Meta-SGD), initialised to ``inner_lr``.
        anil: adapt only the last layer with parameters (the head); the body is meta-learned only.
        loss: "mse", "cross_entropy" or ``fn(out [T, N, ...], target) -> [T]`` per-task losses.
        clip_grad_norm: optional per-task max norm of the inner gradient.
        check_finite: raise when a loss becomes NaN/inf (one host sync per call on GPU).
        cuda_graph: on CUDA, capture the whole meta-step (inner loop, query loss and their backward)
            in a CUDA graph on first use and replay it; a new input shape captures again (up to 8),
            then runs eagerly with one warning. Results equal the eager path.
        exact_reverse: where every layer has R-operators (Linear, Conv2d, BatchNorm, MaxPool2d, ReLU,
            Tanh, Sigmoid, Flatten: MLPs and Conv4), every parameter is adapted (not ANIL) and the
            loss is "mse" or "cross_entropy", run the meta-step as one autograd node whose backward is
            the hand-derived exact reverse (Hessian-vector products by R-operators) instead of
            autograd through the unrolled inner loop. Same gradients, far fewer autograd nodes; the
            result supports one backward (no third-order derivatives). False forces autograd.
        fused: run the whole meta-step (inner loop, query loss, exact reverse) of a small Linear/ReLU
            MLP as one fused kernel per task batch (metafast.ops.fused_inner_loop). None (default):
            whenever the model and settings qualify (``describe()`` says whether and why); True:
            require it (ValueError naming the reason otherwise); False: never. Only with precision="fp32".
        precision: "fp32", "bf16" or "fp16". With "bf16"/"fp16" the forward and backward passes of the
            inner loop and the query pass run on low-precision copies of the weights and inputs, while
            the meta-parameters (master copy) and the fast weights stay float32, and the losses and inner
            updates are computed in float32; meta-gradients (second order included) flow through the
            casts to the float32 parameters. Works on the batched autograd path (any model) and the exact
            reverse (MLPs); the fused path is not used. Outputs of ``predict`` are float32.
        inner_loss_scale: fp16/bf16 only: the inner gradient is taken of ``S * support loss`` in low
            precision and divided by S in float32, so small gradients do not underflow (default 2**10
            for fp16, 1 for bf16). For the meta-gradient use ``torch.amp.GradScaler`` on ``out.loss``.
            With fp16, ``check_finite`` checks the support losses and whether the scaled inner gradient
            overflowed (FloatingPointError naming inner_loss_scale), not the query loss: a non-finite
            query loss (fp16 overflow) is left to the GradScaler, which skips that step.
    """

    def __init__(self, model: nn.Module, inner_lr: Union[float, Sequence[float]] = 0.01, inner_steps: int = 1,
                 first_order: bool = False, meta_sgd: bool = False, anil: bool = False,
                 loss: Union[str, Callable] = "mse", clip_grad_norm: Optional[float] = None,
                 check_finite: bool = True, cuda_graph: bool = False, exact_reverse: bool = True,
                 fused: Optional[bool] = None, precision: str = "fp32", inner_loss_scale: Optional[float] = None):
        super().__init__()
        self._prec = _precision.resolve(precision, inner_loss_scale)
        self.precision = precision
        self._overflow = None  # fp16: per-task "the scaled inner gradient overflowed" of the last call
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps: expected an int >= 0, got {inner_steps!r}")
        lrs = [float(v) for v in inner_lr] if isinstance(inner_lr, (list, tuple)) else [float(inner_lr)]
        if len(lrs) > 1 and len(lrs) != inner_steps:
            raise ValueError(f"inner_lr: expected one value or {inner_steps} (one per step), got {len(lrs)}")
        if any(not math.isfinite(v) or v < 0 for v in lrs):
            raise ValueError(f"inner_lr: expected finite values >= 0, got {lrs}")
        if meta_sgd and len(lrs) > 1:
            raise ValueError("inner_lr: meta_sgd learns one rate per parameter; pass a single float as its init")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm: expected None or a value > 0, got {clip_grad_norm}")
        self.module = model
        self.inner_lrs = lrs
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.meta_sgd = meta_sgd
        self.anil = anil
        self.clip_grad_norm = clip_grad_norm
        self.check_finite = check_finite
        self.cuda_graph = cuda_graph
        self._graphs = GraphedMetaSteps(self) if cuda_graph else None
        self.loss_fn = make_loss(loss)
        self._flat = FlatParams(model)
        self._engine = BatchedModel(model, self._flat, head_only=anil)
        self.exact_reverse = (exact_reverse and self._engine.supports_rop() and clip_grad_norm is None
                              and hasattr(self.loss_fn, "rgrad"))
        if fused not in (None, True, False):
            raise ValueError(f"fused: expected None, True or False, got {fused!r}")
        self.fused = fused
        self._fused_plans = {}
        self._fused_checked = (None, None)  # (_fused_key, checked op arguments) of the last fused call
        if fused and self._prec.mixed:
            raise ValueError(f"fused=True: the fused inner loop runs float32/float64 only; precision={precision!r} "
                             "runs on the batched path (use fused=None or False)")
        if fused:
            self._fused_dims(self._flat.buffer.device)  # raises with the reason when it cannot
        if meta_sgd:
            self.lrs = nn.Parameter(torch.full((self._engine.adapted_numel,), lrs[0], dtype=self._flat.buffer.dtype,
                                               device=self._flat.buffer.device))
        else:
            self.lrs = None

    # -- public API ------------------------------------------------------------------------------
    def forward(self, support_x, support_y, query_x, query_y, inner_steps: Optional[int] = None) -> MetaOutput:
        """Adapt to every task on its support set, then return the query loss (mean over tasks)."""
        # only a model whose fused call was checked before can take the short path (no key otherwise)
        same = inner_steps is None or (type(inner_steps) is int and inner_steps == self.inner_steps)
        key = None if self._fused_checked[0] is None else self._fused_key(support_x, support_y, query_x, query_y,
                                                                          None if same else inner_steps)
        if key is not None and self._fused_checked[0] == key:
            # the configuration and these shapes passed every check before: only the per-call ones remain
            out = self._fused_step(self._flat.buffer, self._fused_checked[1], support_x, support_y, query_x, query_y)
            return MetaOutput(out[3], out[0].detach(), out[1], out[2].detach())
        self._check_batch(support_x, support_y, query_x, query_y)
        steps = self.inner_steps if inner_steps is None else self._check_steps(inner_steps)
        graphed = self._graphs(support_x, support_y, query_x, query_y, steps) if self._graphs is not None else None
        if graphed is not None:
            task_losses, support_losses = graphed[0], graphed[1]
            acc = graphed[2] if len(graphed) > 2 else None
            self._overflow = None  # recorded at capture, not by the replay
            self._finite(task_losses, "query loss", support_losses)
        else:
            task_losses, acc, support_losses, mean = self._meta_forward(support_x, support_y, query_x, query_y, steps)
            if mean is not None:
                return MetaOutput(mean, task_losses.detach(), acc, support_losses.detach())
        return MetaOutput(task_losses.mean(), task_losses.detach(), acc, support_losses.detach())

    def _meta_forward(self, support_x, support_y, query_x, query_y, steps: int):
        """(per-task query losses, accuracies or None, support losses, their mean or None) - the
        graph-capturable step."""
        buffer = self._flat.buffer  # bound by _check_batch
        self._prec.check_params(buffer.dtype)
        self._overflow = None
        dims = self._fused_dims(buffer.device) if steps else None
        if dims is not None:
            from ..ops import fused_inner_loop as op

            key = self._fused_key(support_x, support_y, query_x, query_y, None if steps == self.inner_steps else steps)
            if key is not None and op.runs_eager_node(buffer.device):
                # checked once per batch signature; later calls with it skip straight to _fused_step
                self._fused_checked = (key, self._fused_args(buffer, support_x, support_y, query_x, query_y, dims,
                                                             steps))
                return self._fused_step(buffer, self._fused_checked[1], support_x, support_y, query_x, query_y)
            mean, r = self._fused_call(buffer, support_x, support_y, query_x, query_y, dims, steps, self.first_order)
            return self._fused_outputs(mean, r, query_y)
        theta = self._flat.theta()
        if self.exact_reverse and torch.is_grad_enabled():
            report = [] if self._watch_overflow() else None
            plan = (self._engine, self.loss_fn, steps, self._lr, self.first_order, self._prec, report)
            task_losses, support_losses, out = MetaStep.apply(theta, self.lrs, support_x, support_y, query_x,
                                                               query_y, plan)
            self._overflow = report[0] if report else None
        else:
            mode = "first" if self.first_order else "second"
            fast, support_losses = self._inner_loop(theta, support_x, support_y, steps, mode)
            out = self._predict(theta, fast, query_x, support_x.shape[0])
            self.loss_fn.check_target(out, query_y, "query_y")
            task_losses = self.loss_fn.value(out, query_y)
        self._finite(task_losses, "query loss", support_losses)
        acc = CrossEntropy.accuracy(out.detach(), query_y) if self.loss_fn.classification else None
        return task_losses, acc, support_losses, None

    def adapt(self, support_x, support_y, steps: Optional[int] = None) -> FastWeights:
        """Adapted fast weights for evaluation (no graph back to the meta-parameters)."""
        self._check_batch(support_x, support_y)
        steps = self.inner_steps if steps is None else self._check_steps(steps)
        theta = self._flat.theta().detach()
        self._prec.check_params(theta.dtype)
        self._overflow = None
        dims = self._fused_dims(theta.device) if steps else None
        if dims is not None:
            with torch.no_grad():
                r = self._fused_call(theta, support_x, support_y, support_x, support_y, dims, steps, True)[1]
            self._finite(r.support_loss, "support loss")
            return FastWeights(theta, r.fast, 0)
        if self._engine.local_autograd:
            theta.requires_grad_(True)
        with torch.enable_grad():
            fast, support_losses = self._inner_loop(theta, support_x, support_y, steps, "eval")
        if steps:
            self._finite(support_losses, "support loss")
        return FastWeights(theta.detach(), None if fast is None else fast.detach(), self._engine.adapt_offset)

    def predict(self, weights: FastWeights, x: torch.Tensor) -> torch.Tensor:
        """Outputs [T, N, ...] of the adapted models on inputs x [T, N, ...] (float32 with bf16/fp16)."""
        if not isinstance(weights, FastWeights):
            raise TypeError(f"weights: expected the FastWeights returned by adapt(), got {type(weights).__name__}")
        self._check_x(x, "x")
        if weights.fast is not None and weights.fast.shape[0] != x.shape[0]:
            raise ValueError(f"x: weights were adapted for {weights.fast.shape[0]} tasks, x has {x.shape[0]}")
        return self._predict(weights.theta, weights.fast, x, x.shape[0])

    def describe(self) -> str:
        """Which layer runs how ('*' marks adapted layers) and how the meta-gradient is computed."""
        how = ("meta-gradient: exact reverse (R-operator Hessian-vector products, one autograd node)"
               if self.exact_reverse else "meta-gradient: autograd through the unrolled inner loop")
        device = self._flat.ensure_bound().device
        if self.fused is False:
            path = "meta-step: batched layers (fused=False)"
        elif self._prec.mixed:
            path = f"meta-step: batched layers; not fused because precision={self.precision!r} (the fused op is fp32/fp64)"
        else:
            dims, why = self._fused_plan(device)
            path = f"meta-step: {why}" if dims is not None else f"meta-step: batched layers; not fused because {why}"
        return "\n".join(self._engine.describe() + [how, path, self._prec.describe()])

    # -- fused path ------------------------------------------------------------------------------
    def _fused_plan(self, device: torch.device):
        key = (device.type, self._flat.buffer.dtype)  # callers bound the buffer
        if key not in self._fused_plans:
            self._fused_plans[key] = fused_path.plan(self.module, self.loss_fn, self.anil, self.clip_grad_norm,
                                                     key[1], device)
        return self._fused_plans[key]

    def _fused_dims(self, device: torch.device):
        """The MLP dims when this meta-step runs fused on ``device``, else None."""
        if self.fused is False or self._prec.mixed:
            return None
        dims, why = self._fused_plan(device)
        if dims is None and self.fused:
            raise ValueError(f"fused=True: the fused inner loop cannot run this configuration: {why}")
        return dims

    def _fused_op_args(self, sx, sy, qx, qy, dims):
        """(lr, loss) of the fused op, after the batched path's target checks."""
        for x, y, name in ((sx, sy, "support_y"), (qx, qy, "query_y")):
            # the same target checks as the batched path, against the output shape alone (the op
            # itself checks label ranges on every device)
            self.loss_fn.check_target(torch.empty(*x.shape[:2], dims[-1], device="meta"), y, name)
        lr = self.lrs if self.lrs is not None else (self.inner_lrs if len(self.inner_lrs) > 1 else self.inner_lrs[0])
        return lr, "cross_entropy" if self.loss_fn.classification else "mse"

    def _fused_call(self, buffer, sx, sy, qx, qy, dims, steps: int, first_order: bool):
        """(mean query loss, FusedInnerLoopResult) with the meta-gradient going to the parameters."""
        from ..ops.fused_inner_loop import fused_meta_loss

        lr, loss = self._fused_op_args(sx, sy, qx, qy, dims)
        return fused_meta_loss(buffer, self._flat.params, lr, sx, sy, qx, qy, dims, steps, loss,
                               first_order=first_order)

    def _fused_args(self, buffer, sx, sy, qx, qy, dims, steps: int):
        """The fused op's checked arguments for this batch (errors name the argument)."""
        from ..ops.fused_inner_loop import check_args

        lr, loss = self._fused_op_args(sx, sy, qx, qy, dims)
        return check_args(buffer, lr, sx, sy, qx, qy, dims, steps, loss)

    def _fused_key(self, sx, sy, qx, qy, steps: Optional[int]):
        """What the checks of a fused meta-step depend on beyond the module, or None when they must run
        (parameters moved to new storage, a non-tensor argument, a compiling or graphed call)."""
        if self._graphs is not None or torch.compiler.is_compiling() or not self._flat.is_bound():
            return None
        try:
            shapes = (sx.shape, sy.shape, qx.shape, qy.shape, sx.dtype, sy.dtype, qx.dtype, qy.dtype,
                      sx.device, sy.device, qx.device, qy.device)
        except AttributeError:
            return None
        buffer = self._flat.buffer
        return (shapes, buffer.dtype, buffer.device, steps, self.inner_steps, tuple(self.inner_lrs), id(self.lrs),
                self.first_order, self.fused, _backend.requested())

    def _fused_step(self, buffer, checked, sx, sy, qx, qy):
        """The fused meta-step through the C++ autograd node, for arguments that passed every check."""
        from ..ops.fused_inner_loop import LOSS_KINDS, check_labels, eager_meta_loss

        if checked.kind == LOSS_KINDS["cross_entropy"]:  # label values: every call (the kernels index logits by them)
            check_labels(sy, checked.dims[-1], "support_y")
            check_labels(qy, checked.dims[-1], "query_y")
        self._overflow = None
        # the meta-parameters go in as the flat buffer and its parameter views: the op's own
        # autograd node hands each parameter its gradient
        mean, r = eager_meta_loss(buffer, self._flat.params, checked, sx, sy, qx, qy, self.first_order,
                                  need_fast=False)
        return self._fused_outputs(mean, r, qy)

    def _fused_outputs(self, mean, r, query_y):
        """_meta_forward's outputs of a fused step, after the finite check."""
        self._finite(r.query_loss, "query loss", r.support_loss, mean)
        acc = CrossEntropy.accuracy(r.query_out.detach(), query_y) if self.loss_fn.classification else None
        return r.query_loss, acc, r.support_loss, mean

    # -- engine ----------------------------------------------------------------------------------
    def _lr(self, step: int):
        if self.lrs is not None:
            return self.lrs
        return self.inner_lrs[step] if len(self.inner_lrs) > 1 else self.inner_lrs[0]

    def _inner_loop(self, theta, sx, sy, steps: int, mode: str):
        engine = self._engine
        prec = self._prec
        T = sx.shape[0]
        second = mode == "second"
        rc = RunCtx(T, create_graph=second)
        # first-order / eval: the inner graph is not differentiated later, so skip recording it
        # (unless a layer computes its backward through a local autograd graph).
        grad_ctx = nullcontext() if (second or engine.local_autograd) else torch.no_grad()
        watch = self._watch_overflow()
        a = engine.adapt_offset
        # mixed precision: layers run on low-precision casts of the float32 θ and fast weights
        theta_c = prec.low(theta)
        with grad_ctx:
            x, layout, _ = engine.forward(0, engine.adapt_from, theta_c, None, prec.low(sx), "tn", rc, record=False)
        fast = None
        support_losses = torch.zeros(T, dtype=theta.dtype, device=theta.device)
        for step in range(steps):
            with grad_ctx:
                out, out_layout, tape = engine.forward(engine.adapt_from, len(engine.layers), theta_c, prec.low(fast),
                                                       x, layout, rc, record=True)
                out = engine.output(out, out_layout, T)
                if step == 0:
                    self.loss_fn.check_target(out, sy, "support_y")
                # loss in float32; the backward runs on S * dloss/dout in the compute precision
                loss, dout = self.loss_fn.value_and_grad(out.to(theta.dtype), sy, create_graph=second)
            with nullcontext() if second else torch.no_grad():
                g = prec.unscale(engine.backward(tape, prec.grad_seed(dout), out_layout, rc), theta.dtype)
            if watch:  # a finite loss with a non-finite gradient: the scale S overflowed fp16
                bad = prec.overflowed([g], loss)
                self._overflow = bad if self._overflow is None else self._overflow | bad
            if not second:
                g = g.detach()
            support_losses = loss
            lr = self._lr(step)
            if mode == "eval" and torch.is_tensor(lr):
                lr = lr.detach()
            start = theta[a:] if fast is None else fast
            fast = inner_update(start, g, lr, self.clip_grad_norm)
        return fast, support_losses

    def _predict(self, theta, fast, x, T):
        engine = self._engine
        prec = self._prec
        rc = RunCtx(T, create_graph=False)
        out, layout, _ = engine.forward(0, len(engine.layers), prec.low(theta), prec.low(fast), prec.low(x), "tn",
                                        rc, record=False)
        out = engine.output(out, layout, T)
        return out.to(theta.dtype) if prec.mixed else out

    # -- validation ------------------------------------------------------------------------------
    def _watch_overflow(self) -> bool:
        """Whether to record which tasks' scaled fp16 inner gradients overflowed (checked by _finite)."""
        return self._prec.name == "fp16" and self.check_finite and not (
            self._flat.buffer.is_cuda and torch.cuda.is_current_stream_capturing())

    def _finite(self, losses: torch.Tensor, what: str, support_losses: Optional[torch.Tensor] = None,
                mean: Optional[torch.Tensor] = None) -> None:
        """One check per meta-step: a NaN in the inner loop propagates to the query loss, and is then
        blamed on the support loss when that is where it started. ``mean``: the losses' mean, when
        already computed (it is then the one value read)."""
        if not self.check_finite or (losses.is_cuda and torch.cuda.is_current_stream_capturing()):
            return  # a host sync would break capture; checked on the replayed outputs instead
        if self._overflow is not None and bool(self._overflow.any()):
            # no GradScaler sees the inner gradient: skipping the step would not lower S, so say so
            bad = torch.nonzero(self._overflow).flatten().tolist()
            raise FloatingPointError(
                f"the fp16 inner gradient (support loss x inner_loss_scale={self._prec.scale:g}) overflowed for "
                f"tasks {bad[:10]}{'...' if len(bad) > 10 else ''}; lower inner_loss_scale or use precision='bf16' "
                "(check_finite=False leaves the resulting non-finite query loss to a GradScaler to skip)")
        if self._prec.name == "fp16" and what == "query loss":
            # fp16 overflow in the query pass or its backward is the GradScaler's to skip; a
            # non-finite support loss is not (the scaler never sees the inner loop's forward).
            if support_losses is None:
                return
            losses, what, support_losses = support_losses, "support loss", None
        if torch.compiler.is_compiling():  # no host sync inside a compiled graph: assert on the device
            torch._assert_async(torch.isfinite(losses).all(), f"{what} is NaN/inf")
            return
        # one reduction and one host read; a sum of finite losses that overflows is not an error
        total = losses.detach().sum() if mean is None else mean.detach()
        if not math.isfinite(float(total)) and not torch.isfinite(losses).all():
            if support_losses is not None and not torch.isfinite(support_losses).all():
                losses, what = support_losses, "support loss"
            bad = torch.nonzero(~torch.isfinite(losses.detach())).flatten().tolist()
            raise FloatingPointError(f"{what} is NaN/inf for tasks {bad[:10]}{'...' if len(bad) > 10 else ''}; "
                                     "check the inputs, inner_lr and the model's initialisation")

    @staticmethod
    def _check_steps(steps) -> int:
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
        return steps

    def _check_x(self, x, name: str, ref: Optional[torch.Tensor] = None) -> None:
        if not torch.is_tensor(x):
            raise TypeError(f"{name}: expected a tensor [T, N, ...], got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"{name}: expected a tensor [T, N, ...] with a leading task dim, got shape {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError(f"{name}: is empty (shape {tuple(x.shape)}): every task needs at least one sample")
        ref = self._flat.ensure_bound() if ref is None else ref
        if x.device != ref.device:
            raise ValueError(f"{name}: is on {x.device}, the model is on {ref.device}")
        if x.is_floating_point() and x.dtype != ref.dtype:
            raise TypeError(f"{name}: dtype {x.dtype} differs from the model's {ref.dtype}")

    def _check_batch(self, sx, sy, qx=None, qy=None) -> int:
        pairs = [("support_x", sx), ("support_y", sy)]
        if qx is not None:
            pairs += [("query_x", qx), ("query_y", qy)]
        for name, t in pairs:
            if not torch.is_tensor(t):
                raise TypeError(f"{name}: expected a tensor with a leading task dim, got {type(t).__name__}")
        ref = self._flat.ensure_bound()
        self._check_x(sx, "support_x", ref)
        T = sx.shape[0]
        for name, t in pairs[1:]:
            if t.dim() < 1 or t.shape[0] != T:
                raise ValueError(f"{name}: expected {T} tasks (support_x.shape[0]), got shape {tuple(t.shape)}")
        if sy.dim() < 2 or sy.shape[1] != sx.shape[1]:
            raise ValueError(f"support_y: expected {sx.shape[1]} targets per task (support_x.shape[1]), "
                             f"got shape {tuple(sy.shape)}")
        if qx is not None:
            self._check_x(qx, "query_x", ref)
            if qy.dim() < 2 or qy.shape[1] != qx.shape[1]:
                raise ValueError(f"query_y: expected {qx.shape[1]} targets per task (query_x.shape[1]), "
                                 f"got shape {tuple(qy.shape)}")
        return T
