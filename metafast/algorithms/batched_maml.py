"""BatchedMAML: MAML, Meta-SGD and ANIL over a whole batch of tasks at once.

BatchedMAML validates its arguments and each batch, and picks one meta-step path per batch signature;
the paths themselves (fused, exact reverse, unrolled autograd, CUDA graph) and the conditions under
which each runs are in metafast/algorithms/paths/.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .. import _backend
from ..functional.executor import BatchedModel
from ..functional.flat import FlatParams
from ..functional.losses import make_loss
from ..functional.step_stats import StepStats
from ..functional import precision as _precision
from . import mamlpp as _mamlpp
from .paths import FastWeights, FiniteGuard, MetaStepPath, Setup, Where, choose, make_paths
from .paths import autograd as _autograd
from .paths import exact_reverse as _exact_reverse

__all__ = ["BatchedMAML", "MetaOutput", "FastWeights", "explain_paths", "MEMORY_MODES"]

MEMORY_MODES = ("fast", "low", "min")
_MAX_SIGNATURES = 16  # batch signatures whose checks and path are remembered (a train and an eval shape...)


@dataclass
class MetaOutput:
    loss: torch.Tensor                      # mean query loss over tasks (differentiable)
    task_losses: torch.Tensor               # [T], detached
    task_accuracies: Optional[torch.Tensor]  # [T] for classification, else None
    support_losses: torch.Tensor            # [T] support loss before the last inner step, detached


def _setting(name: str, doc: str) -> property:
    """A setting the meta-step paths read: assigning it rebuilds them (and forgets checked signatures)."""
    attr = "_" + name

    def get(self):
        return getattr(self, attr)

    def set(self, value):
        object.__setattr__(self, attr, value)
        self._settings_changed()

    return property(get, set, doc=doc)


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
            then runs eagerly with one warning. Results equal the eager path. With CPU inputs it runs
            eagerly (a metafast.FallbackWarning, an error under METAFAST_STRICT=1).
        exact_reverse: where every adapted layer has R-operators (Linear, Conv2d, BatchNorm, MaxPool2d,
            ReLU, Tanh, Sigmoid, Flatten and the graph layers: MLPs, Conv4, ResNet-12) and the loss is
            "mse" or "cross_entropy", run the meta-step as one autograd node whose backward is the
            hand-derived exact reverse (Hessian-vector products by R-operators) instead of autograd
            through the unrolled inner loop. Same gradients, far fewer autograd nodes; the result
            supports one backward (no third-order derivatives). False forces autograd. With anil=True
            the body runs once per support and query set under autograd and the head's reverse hands
            it its features' gradients (fp32 only; on a module graph the head must read one value).
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
        memory: "fast" (default) keeps every inner step's activations for the reverse pass; "low" keeps
            only each step's fast weights (K x T x P numbers) and recomputes one step's forward and
            backward when the reverse reaches it, so the peak holds one step's activations whatever
            ``inner_steps`` is, for about one more support forward+backward per step. It runs on the
            exact-reverse path; where that does not apply, "fast" runs with a FallbackWarning
            (``describe()`` says why). "min" is "low" keeping no fast weights either: the reverse
            replays each chunk's inner loop from θ (one more support forward+backward per step), so
            what a step keeps for its backward does not grow with the meta-batch. Every mode gives the
            same meta-gradients.
        task_chunk: run the meta-batch in chunks of this many tasks whose meta-gradients add up (the
            result equals the unchunked one). With memory="low" the peak is then one step of one chunk
            plus every task's fast weights; with "min" one step and the fast weights of one chunk;
            with "fast" chunks split the work, not the peak. None (default): all tasks at once. A chunk
            larger than the batch is clamped.
        lslr: MAML++ learned per-step, per-layer inner rates: an nn.Parameter ``step_lrs``
            [inner_steps, adapted parameter tensors] initialised to ``inner_lr`` (one value, or one per
            step); the meta-gradient trains it. Not with meta_sgd.
        multi_step_loss: MAML++ multi-step loss: the query loss after every inner step, weighted by
            ``metafast.algorithms.mamlpp.step_loss_weights(iteration, steps, msl_anneal_iters)``
            (uniform at first, annealed towards the last step; from iteration ``msl_anneal_iters`` on
            only the last step counts, as in the paper's code).
        msl_anneal_iters: the multi-step loss's annealing length (iterations, an int >= 0).
        first_order_iters: MAML++ derivative-order annealing: first order while the iteration
            (``set_iteration``) is < this, then second order (0: never first order by schedule).
        per_step_bn: MAML++ per-step BatchNorm weights and biases (BNWB): an nn.Parameter ``step_bn``
            [inner_steps, BatchNorm weight+bias numel] initialised to the model's; inner step k (and the
            query pass after it) uses row k in place of the BatchNorm weights, which are therefore not
            adapted (as in the paper's code); adapt()'s weights carry the last step's.
        per_step_bn_stats: MAML++ per-step BatchNorm running statistics (BNRS): buffers
            ``step_running_mean`` / ``step_running_var`` [inner_steps, C] (C: every BatchNorm layer's channels,
            layer after layer) and ``step_running_count`` [inner_steps], in the state_dict. Each training-mode
            meta-step (``forward``) moves row k, with each layer's momentum (1/count when None), towards the
            mean over the meta-batch's tasks of the per-task batch mean and unbiased variance of inner step
            k's support pass (a no-grad side effect: losses and meta-gradients are those of batch
            statistics). In eval mode (``maml.eval()``) inner step k of ``adapt()``/``forward`` and the pass
            after it, and ``predict()`` after K steps, normalise by row min(k, inner_steps - 1) (K - 1 for
            predict) instead of batch statistics. Runs on the autograd path and the exact reverse
            (training mode); CUDA graphs do not capture it.

    MAML++ options run on the autograd path and on the exact reverse (memory modes and task chunks
    included; per_step_bn_stats in eval mode: autograd); the fused path and CUDA graphs (multi_step_loss,
    per_step_bn_stats) do not run them (``describe()`` says so). The iteration counter the schedules
    read is set with ``set_iteration(i)`` and is the ``iteration`` buffer of the state_dict (present
    when a schedule is on), so a checkpoint resumes the schedules.
    ``metafast.MAMLpp(model)`` is the paper's combination.

    The settings (inner_lrs, inner_steps, first_order, anil, clip_grad_norm, check_finite, cuda_graph,
    exact_reverse, fused, loss_fn, memory, task_chunk, and the Meta-SGD parameter lrs) may be reassigned between steps;
    the next step checks its batch and picks its path again. Change them by assignment (an in-place
    edit of the inner_lrs list is not seen).
    """

    def __init__(self, model: nn.Module, inner_lr: Union[float, Sequence[float]] = 0.01, inner_steps: int = 1,
                 first_order: bool = False, meta_sgd: bool = False, anil: bool = False,
                 loss: Union[str, Callable] = "mse", clip_grad_norm: Optional[float] = None,
                 check_finite: bool = True, cuda_graph: bool = False, exact_reverse: bool = True,
                 fused: Optional[bool] = None, precision: str = "fp32", inner_loss_scale: Optional[float] = None,
                 memory: str = "fast", task_chunk: Optional[int] = None, lslr: bool = False,
                 multi_step_loss: bool = False, msl_anneal_iters: int = 0, first_order_iters: int = 0,
                 per_step_bn: bool = False, per_step_bn_stats: bool = False):
        super().__init__()
        self._built = None        # (Setup, paths) of the current settings
        self._choices = {}        # Where -> the path that runs it
        self._signatures = {}     # batch signature -> (path, steps, prepared)
        self._keyed_buffer = None  # the flat buffer the signatures were checked against
        self._fallbacks = {}      # fallbacks of this instance, by key (describe())
        self._prec = _precision.resolve(precision, inner_loss_scale)
        self.precision = precision
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
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory: expected one of {MEMORY_MODES}, got {memory!r}")
        if task_chunk is not None and (type(task_chunk) is not int or task_chunk < 1):
            raise ValueError(f"task_chunk: expected None or an int >= 1, got {task_chunk!r}")
        if lslr and meta_sgd:
            raise ValueError("lslr: learns one rate per step and parameter tensor; meta_sgd one per parameter: pick one")
        _mamlpp.check_anneal(msl_anneal_iters, "msl_anneal_iters")
        _mamlpp.check_anneal(first_order_iters, "first_order_iters")
        if per_step_bn and anil:
            raise ValueError("per_step_bn: needs every layer adapted (anil=False): the BatchNorm layers then hold "
                             "per-step weights")
        if per_step_bn_stats and anil:
            raise ValueError("per_step_bn_stats: needs every layer adapted (anil=False): the body's BatchNorm "
                             "layers run once per meta-step, not once per inner step")
        if per_step_bn_stats and inner_steps < 1:
            raise ValueError(f"per_step_bn_stats: keeps one row of statistics per inner step; inner_steps="
                             f"{inner_steps}")
        if fused and (lslr or multi_step_loss or per_step_bn or per_step_bn_stats):
            raise ValueError("fused=True: the fused inner loop does not implement lslr / multi_step_loss / "
                             "per_step_bn / per_step_bn_stats")
        if fused not in (None, True, False):
            raise ValueError(f"fused: expected None, True or False, got {fused!r}")
        if fused and self._prec.mixed:
            raise ValueError(f"fused=True: the fused inner loop runs float32/float64 only; precision={precision!r} "
                             "runs on the batched path (use fused=None or False)")
        self.module = model
        self.meta_sgd = meta_sgd
        self._flat = FlatParams(model)
        self._engine = BatchedModel(model, self._flat, head_only=anil)
        self.inner_lrs = lrs
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.anil = anil
        self.clip_grad_norm = clip_grad_norm
        self.check_finite = check_finite
        self.cuda_graph = cuda_graph
        self.loss_fn = make_loss(loss)
        self.exact_reverse = exact_reverse
        self.fused = fused
        self.memory = memory
        self.task_chunk = task_chunk
        if meta_sgd:
            self.lrs = nn.Parameter(torch.full((self._engine.adapted_numel,),
                                               lrs[0], dtype=self._flat.buffer.dtype, device=self._flat.buffer.device))
        else:
            self.lrs = None
        self.multi_step_loss = bool(multi_step_loss)
        self.msl_anneal_iters = msl_anneal_iters
        self.first_order_iters = first_order_iters
        self._iteration = 0  # mirror of the iteration buffer (read without a device sync)
        if multi_step_loss or first_order_iters:
            self.register_buffer("iteration", torch.zeros((), dtype=torch.long, device=self._flat.buffer.device))
            self.register_load_state_dict_post_hook(BatchedMAML._iteration_loaded)
        if lslr:
            pieces = self._flat.slots[self._engine.first_adapted_slot:]
            init = torch.tensor(lrs if len(lrs) > 1 else lrs * inner_steps, dtype=self._flat.buffer.dtype)
            self.step_lrs = nn.Parameter(init[:, None].expand(inner_steps, len(pieces)).clone()
                                         .to(self._flat.buffer.device))
        else:
            self.step_lrs = None
        self.step_bn, self._bn_index = None, None
        if per_step_bn:
            self._init_step_bn(inner_steps)
        self._step_stats = None
        if per_step_bn_stats:
            self._init_step_stats(inner_steps)
        if fused:  # required: raise now, naming the reason, when it cannot run
            buffer = self._flat.buffer
            choose([p for p in self._paths() if p.name == "fused"], Where(buffer.device, buffer.dtype,
                                                                          max(inner_steps, 1), True))

    inner_lrs = _setting("inner_lrs", "inner-loop rates: one float, or one per inner step")
    inner_steps = _setting("inner_steps", "inner SGD steps of a meta-training step")
    first_order = _setting("first_order", "FOMAML: drop the second-order terms")
    anil = _setting("anil", "adapt only the head (set at construction: the engine is built for it)")
    clip_grad_norm = _setting("clip_grad_norm", "per-task max norm of the inner gradient, or None")
    check_finite = _setting("check_finite", "raise when a loss becomes NaN/inf")
    cuda_graph = _setting("cuda_graph", "capture the meta-step in CUDA graphs (CUDA inputs)")
    fused = _setting("fused", "None: fused where it applies; True: required; False: never")
    loss_fn = _setting("loss_fn", "the per-task loss (metafast.functional.losses.TaskLoss)")
    memory = _setting("memory", '"fast": keep every inner step for the reverse; "low": step checkpointing; '
                      '"min": step checkpointing with the inner loop replayed in the reverse')
    task_chunk = _setting("task_chunk", "tasks per chunk of the meta-batch, or None (all at once)")

    @property
    def exact_reverse(self) -> bool:
        """Whether the meta-gradient is computed by the exact reverse (where it applies, unless set False)."""
        return _exact_reverse.support(self._engine, self.loss_fn, self.clip_grad_norm, self._exact_reverse,
                                      self._prec).ok

    @exact_reverse.setter
    def exact_reverse(self, value: bool) -> None:
        object.__setattr__(self, "_exact_reverse", bool(value))
        self._settings_changed()

    def register_parameter(self, name, param) -> None:
        super().register_parameter(name, param)
        if name in ("lrs", "step_lrs", "step_bn"):  # learned rates reassigned: the paths hold the old ones
            self._settings_changed()

    # -- MAML++ schedules: the iteration counter --------------------------------------------------------
    def set_iteration(self, iteration: int) -> None:
        """Set the iteration the MAML++ schedules (multi-step loss weights, derivative order) read."""
        if type(iteration) is not int or iteration < 0:
            raise ValueError(f"iteration: expected an int >= 0, got {iteration!r}")
        was = self._scheduled_first_order()
        self._iteration = iteration
        if "iteration" in self._buffers:
            self.iteration.fill_(iteration)
        if self._scheduled_first_order() != was:
            self._settings_changed()

    def get_iteration(self) -> int:
        return self._iteration

    @staticmethod
    def _iteration_loaded(module, incompatible) -> None:
        """load_state_dict post hook: the schedules follow the loaded counter."""
        module._iteration = int(module.iteration)
        module._settings_changed()

    def _scheduled_first_order(self) -> bool:
        return self.first_order or _mamlpp.is_first_order(self._iteration, self.first_order_iters)

    def step_loss_weights(self, steps: Optional[int] = None):
        """The multi-step loss weights of the current iteration (floats, one per inner step)."""
        steps = self.inner_steps if steps is None else steps
        return _mamlpp.step_loss_weights(self._iteration, steps, self.msl_anneal_iters)

    def _settings_changed(self) -> None:
        self._built = None
        self._choices.clear()
        self._signatures.clear()

    def _setup(self) -> Setup:
        return self._paths_and_setup()[0]

    def _paths(self):
        return self._paths_and_setup()[1]

    def _paths_and_setup(self):
        if self._built is None:
            setup = Setup(owner=self, module=self.module, flat=self._flat, engine=self._engine, loss_fn=self.loss_fn,
                          prec=self._prec, inner_lrs=tuple(self.inner_lrs), lrs=self.lrs,
                          first_order=self._scheduled_first_order(), anil=self.anil, clip_grad_norm=self.clip_grad_norm,
                          fused=self.fused, exact_reverse=self._exact_reverse, cuda_graph=self.cuda_graph,
                          guard=FiniteGuard(self.check_finite, self._prec), fallbacks=self._fallbacks,
                          memory=self.memory, task_chunk=self.task_chunk, step_lrs=self.step_lrs,
                          piece_sizes=self._piece_sizes(), multi_step_loss=self.multi_step_loss,
                          step_weights=self.step_loss_weights, step_bn=self.step_bn, step_stats=self._step_stats,
                          bn_index=None if self._bn_index is None else self._bn_index.to(self._flat.buffer.device))
            self._built = (setup, make_paths(setup))
        return self._built

    def _init_step_bn(self, steps: int) -> None:
        """BNWB: ``step_bn`` [steps, n] holds every affine BatchNorm weight and bias once per step, each row
        initialised to the model's; at step k they replace the BatchNorm weights of the fast weights."""
        from ..functional.layers import BatchNorm
        a = self._engine.adapt_offset
        slots = [s for layer in self._engine.layers if isinstance(layer, BatchNorm) for s in layer.slots]
        if not slots:
            raise ValueError("per_step_bn: the model has no BatchNorm layer with affine weights")
        buffer = self._flat.buffer
        index = torch.cat([torch.arange(s.offset - a, s.offset - a + s.numel) for s in slots])
        self._bn_index = index
        init = buffer.detach()[a:][index.to(buffer.device)]
        self.step_bn = nn.Parameter(init.expand(steps, -1).clone())

    def _init_step_stats(self, steps: int) -> None:
        """BNRS: the per-step running statistics buffers (mean 0, variance 1, as nn.BatchNorm starts)."""
        stats = StepStats(self._engine)
        if not stats.channels:
            raise ValueError("per_step_bn_stats: the model has no BatchNorm layer (BatchNorm1d/2d) run by the "
                             "batched engine")
        buffer = self._flat.buffer
        kw = dict(dtype=buffer.dtype, device=buffer.device)
        self.register_buffer("step_running_mean", torch.zeros(steps, stats.channels, **kw))
        self.register_buffer("step_running_var", torch.ones(steps, stats.channels, **kw))
        self.register_buffer("step_running_count", torch.zeros(steps, dtype=torch.long, device=buffer.device))
        self._step_stats = stats

    def train(self, mode: bool = True):
        """nn.Module.train; with per_step_bn_stats the paths are chosen again (eval mode runs on autograd)."""
        changed = mode != self.training
        super().train(mode)
        if changed and getattr(self, "_step_stats", None) is not None:
            self._settings_changed()
        return self

    def _piece_sizes(self) -> Optional[torch.Tensor]:
        if self.step_lrs is None:
            return None
        sizes = [slot.numel for slot in self._flat.slots[self._engine.first_adapted_slot:]]
        return torch.tensor(sizes, dtype=torch.long, device=self.step_lrs.device)

    def _check_lslr_steps(self, steps: int) -> None:
        if self.step_lrs is not None and steps > self.step_lrs.shape[0]:
            raise ValueError(f"inner_steps: lslr learned rates for {self.step_lrs.shape[0]} steps, {steps} asked")
        if self.step_bn is not None and steps > self.step_bn.shape[0]:
            raise ValueError(f"inner_steps: per_step_bn holds BatchNorm weights for {self.step_bn.shape[0]} steps, "
                             f"{steps} asked")

    @property
    def _overflow(self) -> Optional[torch.Tensor]:
        """fp16: per task, whether the scaled inner gradient of the last call overflowed."""
        return None if self._built is None else self._built[0].guard.overflow

    # -- the meta-step: a checked batch signature runs its path directly -----------------------------
    def forward(self, support_x, support_y, query_x, query_y, inner_steps: Optional[int] = None) -> MetaOutput:
        """Adapt to every task on its support set, then return the query loss (mean over tasks)."""
        batch = (support_x, support_y, query_x, query_y)
        key = self._signature(batch, inner_steps)
        entry = None if key is None else self._signatures.get(key)
        if entry is None:
            entry = self._prepare(batch, inner_steps)
            if key is None:  # the parameters may have been bound only now
                key = self._signature(batch, inner_steps)
            if key is not None:
                if len(self._signatures) >= _MAX_SIGNATURES:
                    self._signatures.clear()
                self._signatures[key] = entry
        path, steps, prepared = entry
        out = path.run(batch, steps, prepared)
        mean = out.task_losses.mean() if out.mean is None else out.mean
        return MetaOutput(mean, out.task_losses.detach(), out.accuracies, out.support_losses.detach())

    def _signature(self, batch, inner_steps):
        """What the checks and the choice of a meta-step depend on beyond the settings (whose changes
        clear the remembered signatures): shapes, dtypes, devices, steps, grad mode and the requested
        backend; None when they must run (parameters moved to new storage, a non-int step count, a
        non-tensor argument, a compiling call)."""
        if (torch.compiler.is_compiling() or self._flat.buffer is not self._keyed_buffer
                or not (inner_steps is None or type(inner_steps) is int) or not self._flat.is_bound()):
            return None
        sx, sy, qx, qy = batch
        try:
            return (inner_steps, torch.is_grad_enabled(), sx.shape, sy.shape, qx.shape, qy.shape, sx.dtype, sy.dtype,
                    qx.dtype, qy.dtype, sx.device, sy.device, qx.device, qy.device, _backend.requested())
        except AttributeError:
            return None

    def _prepare(self, batch, inner_steps):
        """Validate a batch and pick its path: (path, steps, what the path prepared for the signature)."""
        self._check_batch(*batch)
        steps = self.inner_steps if inner_steps is None else self._check_steps(inner_steps)
        self._check_lslr_steps(steps)
        if self._step_stats is not None and self.training and steps > self.step_running_mean.shape[0]:
            raise ValueError(f"inner_steps: per_step_bn_stats keeps statistics for {self.step_running_mean.shape[0]} "
                             f"steps, {steps} asked in training mode (eval mode uses the last row past them)")
        buffer = self._flat.buffer  # bound by _check_batch
        self._prec.check_params(buffer.dtype)
        if buffer is not self._keyed_buffer and not torch.compiler.is_compiling():
            self._signatures.clear()  # checked against other parameters
            self._keyed_buffer = buffer
        path = self._choose(Where(buffer.device, buffer.dtype, steps, torch.is_grad_enabled()))
        return path, steps, path.prepare(batch, steps)

    def _choose(self, where: Where) -> MetaStepPath:
        path = self._choices.get(where)
        if path is None:
            path = choose(self._paths(), where)[0]
            self._choices[where] = path
        return path

    # -- evaluation ----------------------------------------------------------------------------------
    def adapt(self, support_x, support_y, steps: Optional[int] = None) -> FastWeights:
        """Adapted fast weights for evaluation (no graph back to the meta-parameters)."""
        self._check_batch(support_x, support_y)
        steps = self.inner_steps if steps is None else self._check_steps(steps)
        self._check_lslr_steps(steps)
        buffer = self._flat.buffer
        self._prec.check_params(buffer.dtype)
        path = self._choose(Where(buffer.device, buffer.dtype, steps, False, adapt=True))
        weights = path.adapt(support_x, support_y, steps)
        weights.steps = steps
        return weights

    def predict(self, weights: FastWeights, x: torch.Tensor) -> torch.Tensor:
        """Outputs [T, N, ...] of the adapted models on inputs x [T, N, ...] (float32 with bf16/fp16)."""
        if not isinstance(weights, FastWeights):
            raise TypeError(f"weights: expected the FastWeights returned by adapt(), got {type(weights).__name__}")
        self._check_x(x, "x")
        if weights.fast is not None and weights.fast.shape[0] != x.shape[0]:
            raise ValueError(f"x: weights were adapted for {weights.fast.shape[0]} tasks, x has {x.shape[0]}")
        # per-step BatchNorm statistics (eval mode): those of the last inner step that adapted the weights
        return _autograd.predict(self._setup(), weights.theta, weights.fast, x, x.shape[0], (weights.steps or 1) - 1)

    def describe(self) -> str:
        """Which layer runs how ('*' marks adapted layers), how the meta-gradient is computed, and every
        meta-step path with the reason it runs or not ('>' marks the one a training step takes here)."""
        how = ("meta-gradient: exact reverse (R-operator Hessian-vector products, one autograd node)"
               if self.exact_reverse else "meta-gradient: autograd through the unrolled inner loop")
        if self.exact_reverse and self._engine.adapt_from:
            how += "; anil: of the head, the body's by autograd from its features' gradients"
        buffer = self._flat.ensure_bound()
        verdicts = self._verdicts()
        fused = dict((p.name, v) for p, v in verdicts)["fused"]
        if self.fused is False:
            line = "meta-step: batched layers (fused=False)"
        elif fused.ok:
            line = f"meta-step: {fused.reason}"
        else:
            line = f"meta-step: batched layers; not fused because {fused.reason}"
        chosen = next(p for p, v in verdicts if v.ok)
        listing = [f"meta-step paths on {buffer.device} (the first that applies runs; metafast/algorithms/paths):"]
        listing += [f"  {'>' if p is chosen else ' '} {p.name}: {'yes' if v.ok else 'no'}, {v.reason}"
                    for p, v in verdicts]
        falls = ", ".join(f"{k} x{n}" for k, n in sorted(self._fallbacks.items())) or "none"
        return "\n".join(self._engine.describe() + [how, line, self._prec.describe(), self._memory_line(verdicts),
                                                    self._describe_maml_pp()] + listing
                         + [f"fallbacks: {falls}"])

    def _describe_maml_pp(self) -> str:
        """One line: the MAML++ options and where their schedules stand."""
        msl = (f"on (annealed over {self.msl_anneal_iters} iterations; weights now "
               f"{[round(w, 4) for w in self.step_loss_weights()] if self.inner_steps else []})"
               if self.multi_step_loss else "off")
        order = ("first" if self._scheduled_first_order() else "second") + " order now" + (
            f", first order for iterations < {self.first_order_iters}" if self.first_order_iters else "")
        return (f"MAML++ (iteration {self._iteration}): lslr {'on' if self.step_lrs is not None else 'off'}, "
                f"multi_step_loss {msl}, {order}, per-step BatchNorm weights {'on' if self.step_bn is not None else 'off'}, "
                f"per-step BatchNorm running statistics {self._describe_step_stats()}")

    def _describe_step_stats(self) -> str:
        if self._step_stats is None:
            return "off (BatchNorm normalises by each task's batch statistics)"
        rows, used = self.step_running_mean.shape[0], "used now" if not self.training else "used in eval mode"
        return (f"on ({rows} step(s) x {self._step_stats.channels} channels; updated by training meta-steps, "
                f"{used}: autograd path in eval mode)")

    def memory_plan(self, num_tasks: Optional[int] = None) -> str:
        """The memory mode a training step runs in and what it keeps for the reverse pass (sizes for
        ``num_tasks`` tasks when given)."""
        return self._memory_line(self._verdicts(), num_tasks)

    def _memory_line(self, verdicts, num_tasks: Optional[int] = None) -> str:
        chosen = next(p for p, v in verdicts if v.ok)
        asked = f"memory={self.memory!r}, task_chunk={self.task_chunk!r}"
        if chosen.name == "fused":
            return (f"memory: the fused kernel's own saved state (small: an MLP's per-step activations); {asked} "
                    "apply to the batched paths")
        if chosen.name != "exact_reverse":
            if self.memory == "fast" and self.task_chunk is None:
                return "memory: fast (autograd keeps every inner step's graph)"
            why = dict((p.name, v) for p, v in verdicts)["exact_reverse"].reason
            return f"memory: fast, although {asked} was asked: they need the exact reverse, which does not run: {why}"
        chunk = "all" if self.task_chunk is None else str(min(self.task_chunk, num_tasks or self.task_chunk))
        if self.memory == "fast":
            return (f"memory: fast (every inner step's activations kept for the reverse: grows with inner_steps="
                    f"{self.inner_steps}; chunks of {chunk} task(s) split the work, not the peak)")
        numel = self._engine.adapted_numel
        per_task = self.inner_steps * numel * self._flat.buffer.element_size() / 2**20
        body = ("; anil: the body checkpointed too (its features kept, its activations rebuilt one chunk at a time "
                "in the backward)" if self._engine.adapt_from else "")
        if self.memory == "min":
            per_chunk = f", {per_task * int(chunk):.1f} MB per chunk" if chunk != "all" else ""
            return (f"memory: min (step-checkpointed exact reverse replaying each chunk's inner loop, chunks of "
                    f"{chunk} task(s)): peak ~ one inner step's activations of one chunk + that chunk's fast weights "
                    f"of {self.inner_steps} steps x {numel} parameters ({per_task:.1f} MB per task{per_chunk}), "
                    "rebuilt in its backward" + body)
        kept = f"{per_task:.1f} MB per task" + (f", {per_task * num_tasks:.1f} MB in all" if num_tasks else "")
        return (f"memory: low (step-checkpointed exact reverse, chunks of {chunk} task(s)): peak ~ one inner step's "
                f"activations of one chunk + fast weights of {self.inner_steps} steps x {numel} parameters ({kept})"
                + body)

    def _verdicts(self):
        """(path, Support) of every path for a training step of the current settings on the model's device."""
        buffer = self._flat.ensure_bound()
        where = Where(buffer.device, buffer.dtype, self.inner_steps, True)
        return [(p, p.supports(where)) for p in self._paths()]

    # -- validation ----------------------------------------------------------------------------------
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
        if x.shape[0] == 0:
            raise ValueError(f"{name}: holds no tasks (shape {tuple(x.shape)}): expected at least one task")
        if x.shape[1] == 0:
            raise ValueError(f"{name}: is empty (shape {tuple(x.shape)}): every task needs at least one sample")
        ref = self._flat.ensure_bound() if ref is None else ref
        if x.device != ref.device:
            raise ValueError(f"{name}: is on {x.device}, the model is on {ref.device}")
        if x.is_floating_point() and x.dtype != ref.dtype:
            raise TypeError(f"{name}: dtype {x.dtype} differs from the model's {ref.dtype}")
        first = self.module
        while isinstance(first, nn.Sequential) and len(first):
            first = first[0]
        # the first layer's input width, named here rather than as a batched matmul's shape error
        if isinstance(first, nn.Linear) and (x.dim() < 3 or x.shape[-1] != first.in_features):
            raise ValueError(f"{name}: the model's first Linear takes [T, N, ..., {first.in_features}], "
                             f"got shape {tuple(x.shape)}")
        if isinstance(first, nn.Conv2d) and x.dim() == 5 and x.shape[2] != first.in_channels:
            raise ValueError(f"{name}: the model's first Conv2d takes {first.in_channels} channels, "
                             f"got shape {tuple(x.shape)}")

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


def explain_paths(model: nn.Module, loss: Union[str, Callable] = "mse", device="cpu") -> str:
    """One line for ``metafast info``: the path a default ``BatchedMAML(model, loss=loss)`` training step
    takes on ``device`` and why, then why each path before it does not apply."""
    verdicts = BatchedMAML(model.to(device), loss=loss)._verdicts()
    chosen, why = next((p, v) for p, v in verdicts if v.ok)
    skipped = [f"{p.name}: {v.reason}" for p, v in verdicts if not v.ok and not v.quiet]
    return f"{chosen.name}: {why.reason}" + (f" (not {'; '.join(skipped)})" if skipped else "")
