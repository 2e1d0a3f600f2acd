"""The meta-step path interface (see the package docstring) and what every path shares: the
configuration it reads (:class:`Setup`), the call it is asked about (:class:`Where`), its verdict
(:class:`Support`), its result (:class:`StepOutput`), the finiteness guard, and the choice."""
import math
from dataclasses import dataclass, field
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from ... import fallback as _fallback
from ...functional.executor import BatchedModel
from ...functional.flat import FlatParams
from ...functional.layers import BatchNorm
from ...functional.step_stats import Recorder, StepStats
from ...functional.precision import Precision


class Where(NamedTuple):
    """What a path's support depends on beyond the configuration: the call's device and dtype, the
    number of inner steps, whether autograd records (a meta-gradient is wanted), and whether the call
    is ``adapt()`` (evaluation: adapted weights, no query loss, no meta-gradient)."""
    device: torch.device
    dtype: torch.dtype
    steps: int
    grad: bool
    adapt: bool = False


class Support(NamedTuple):
    """A path's verdict on a configuration. ``reason`` says why it runs or why not (``describe()`` and
    ``metafast info`` print it). ``quiet``: not running is no fallback (nothing to do for this call,
    e.g. no inner steps or no gradient wanted), so a path asked for explicitly neither warns nor raises."""
    ok: bool
    reason: str
    quiet: bool = False


class StepOutput(NamedTuple):
    """One meta-step: per-task query losses [T] (differentiable), accuracies [T] or None, support losses
    [T] of the last inner step, and the losses' mean when the path computed it itself (else None)."""
    task_losses: torch.Tensor
    accuracies: Optional[torch.Tensor]
    support_losses: torch.Tensor
    mean: Optional[torch.Tensor] = None


@dataclass
class FastWeights:
    """Adapted weights of T tasks: θ for the shared prefix, ``fast`` [T, Pa] for the adapted suffix;
    ``steps``: the inner steps that adapted them (per-step BatchNorm statistics at evaluation)."""

    theta: torch.Tensor
    fast: Optional[torch.Tensor]
    offset: int
    steps: Optional[int] = None

    @property
    def num_tasks(self) -> Optional[int]:
        return None if self.fast is None else self.fast.shape[0]


class FiniteGuard:
    """``check_finite``: one host read per meta-step that the losses are finite, and with fp16 which
    tasks' scaled inner gradient overflowed (``overflow``, [T] bools, set by the path that ran)."""

    def __init__(self, enabled: bool, prec: Precision):
        self.enabled = enabled
        self.prec = prec
        self.overflow: Optional[torch.Tensor] = None

    def watching(self, buffer: torch.Tensor) -> bool:
        """Whether to record which tasks' scaled fp16 inner gradients overflowed (read by :meth:`check`)."""
        return self.prec.name == "fp16" and self.enabled and not (
            buffer.is_cuda and torch.cuda.is_current_stream_capturing())

    def add_overflow(self, bad: torch.Tensor) -> None:
        self.overflow = bad if self.overflow is None else self.overflow | bad

    def check(self, losses: torch.Tensor, what: str, support_losses: Optional[torch.Tensor] = None,
              mean: Optional[torch.Tensor] = None) -> None:
        """One check per meta-step: a NaN in the inner loop propagates to the query loss, and is then
        blamed on the support loss when that is where it started. ``mean``: the losses' mean, when
        already computed (it is then the one value read)."""
        if not self.enabled or (losses.is_cuda and torch.cuda.is_current_stream_capturing()):
            return  # a host sync would break capture; checked on the replayed outputs instead
        if self.overflow is not None and bool(self.overflow.any()):
            # no GradScaler sees the inner gradient: skipping the step would not lower S, so say so
            bad = torch.nonzero(self.overflow).flatten().tolist()
            raise FloatingPointError(
                f"the fp16 inner gradient (support loss x inner_loss_scale={self.prec.scale:g}) overflowed for "
                f"tasks {bad[:10]}{'...' if len(bad) > 10 else ''}; lower inner_loss_scale or use precision='bf16' "
                "(check_finite=False leaves the resulting non-finite query loss to a GradScaler to skip)")
        if self.prec.name == "fp16" and what == "query loss":
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


@dataclass
class Setup:
    """BatchedMAML's configuration as the paths read it; BatchedMAML rebuilds it (and its paths) when
    a setting changes, so a path may cache anything derived from it."""
    owner: nn.Module                 # the BatchedMAML: its parameters are the meta-parameters
    module: nn.Module                # the wrapped network
    flat: FlatParams                 # the network's parameters as one flat buffer
    engine: BatchedModel             # the network's batched layers
    loss_fn: Any                     # metafast.functional.losses.TaskLoss
    prec: Precision
    inner_lrs: Tuple[float, ...]     # one rate, or one per step
    lrs: Optional[torch.Tensor]      # Meta-SGD's learned per-parameter rates, else None
    first_order: bool
    anil: bool
    clip_grad_norm: Optional[float]
    fused: Optional[bool]            # None: where it applies; True: required; False: never
    exact_reverse: bool              # requested (it runs where it applies)
    cuda_graph: bool                 # requested (falls back to eager with a FallbackWarning)
    guard: FiniteGuard
    fallbacks: dict = field(default_factory=dict)  # key -> count, shared with the owner (describe())
    memory: str = "fast"             # "fast" | "low" (step checkpointing) | "min" (and replay; both on the exact reverse)
    task_chunk: Optional[int] = None  # tasks per chunk of the meta-batch (None: all)
    # MAML++ (metafast/algorithms/mamlpp.py); a path that does not implement one says so in supports()
    step_lrs: Optional[torch.Tensor] = None  # LSLR: [steps, adapted tensors] learned rates, else None
    piece_sizes: Optional[torch.Tensor] = None  # LSLR: numel of each adapted tensor (int64, on the device)
    multi_step_loss: bool = False    # query loss after every inner step, weighted by step_weights()
    step_weights: Any = None         # MSL: fn(steps) -> [steps] weights of this iteration, or None (last only)
    step_bn: Optional[torch.Tensor] = None  # BNWB: [steps, BatchNorm weight+bias numel] per-step BN affine params
    bn_index: Optional[torch.Tensor] = None  # BNWB: their positions in the adapted weights [Pa] (int64)
    # BNRS: the BatchNorm columns of the owner's step_running_mean / step_running_var / step_running_count
    step_stats: Optional[StepStats] = None

    def maml_pp_options(self) -> List[str]:
        """The MAML++ options this setup uses (for a path's supports() reason)."""
        return [name for name, on in (("lslr", self.step_lrs is not None), ("multi_step_loss", self.multi_step_loss),
                                      ("per_step_bn", self.step_bn is not None),
                                      ("per_step_bn_stats", self.step_stats is not None)) if on]

    def stats_recorder(self) -> Optional[Recorder]:
        """BNRS: a recorder of this meta-step's per-step batch statistics (training mode), else None."""
        if self.step_stats is None or not self.owner.training:
            return None
        mean = self.owner.step_running_mean
        return self.step_stats.recorder(mean.shape[0], mean.device, mean.dtype)

    def commit_stats(self, recorder: Optional[Recorder]) -> None:
        """BNRS: the running statistics move towards what ``recorder`` saw (a finished training step)."""
        if recorder is not None:
            o = self.owner
            recorder.commit(o.step_running_mean, o.step_running_var, o.step_running_count)

    def bn_hook(self, step: int, recorder: Optional[Recorder] = None):
        """BNRS: the RunCtx.bn_stats of a pass at inner step ``step`` (a query pass: the step before it):
        recording (a training support pass), the running statistics of that step (eval mode), or None."""
        if recorder is not None:
            return recorder.at(step)
        if self.step_stats is None or self.owner.training:
            return None
        return self.step_stats.use(self.owner.step_running_mean, self.owner.step_running_var, step)

    def with_step_bn(self, theta: torch.Tensor, fast: Optional[torch.Tensor], step: int, T: int,
                     detach: bool = False) -> Optional[torch.Tensor]:
        """Per-step BatchNorm weights (BNWB): the fast weights [T, Pa] (θ's adapted part where None) with
        every BatchNorm weight and bias replaced by step ``step``'s; unchanged without per_step_bn."""
        if self.step_bn is None:
            return fast
        base = theta[self.engine.adapt_offset:].expand(T, -1) if fast is None else fast
        if self.bn_index.device != base.device:  # the module moved since the setup was built
            self.bn_index = self.bn_index.to(base.device)
        values = self.step_bn[step].detach() if detach else self.step_bn[step]
        return base.index_copy(1, self.bn_index, values.to(base.dtype).expand(T, -1))

    def step_bn_pieces(self) -> Optional[List[Tuple[int, int]]]:
        """BNWB for the exact reverse: (adapted piece index, column in step_bn's rows) of every BatchNorm
        weight and bias, in step_bn's column order; None without per_step_bn."""
        if self.step_bn is None:
            return None
        adapted = [s.offset for s in self.flat.slots if s.offset >= self.engine.adapt_offset]
        at, pieces = 0, []
        for s in (s for layer in self.engine.layers if isinstance(layer, BatchNorm) for s in layer.slots):
            pieces.append((adapted.index(s.offset), at))
            at += s.numel
        return pieces

    def lr(self, step: int):
        """The inner rate of ``step``: Meta-SGD's [Pa] tensor, LSLR's per-tensor rates expanded to [Pa],
        or a float."""
        if self.lrs is not None:
            return self.lrs
        if self.step_lrs is not None:
            if self.piece_sizes.device != self.step_lrs.device:  # the module moved since the setup was built
                self.piece_sizes = self.piece_sizes.to(self.step_lrs.device)
            return torch.repeat_interleave(self.step_lrs[step], self.piece_sizes, output_size=self.engine.adapted_numel)
        return self.inner_lrs[step] if len(self.inner_lrs) > 1 else self.inner_lrs[0]

    def fallback(self, key: str, message: str) -> None:
        """Report a fallback from a path that was asked for (metafast.fallback: warns, counts, raises
        under METAFAST_STRICT=1) and count it for ``describe()``."""
        self.fallbacks[key] = self.fallbacks.get(key, 0) + 1
        _fallback.fallback(key, message, stacklevel=4)


Batch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class MetaStepPath:
    """One way of computing BatchedMAML's meta-step (the interface; see the package docstring)."""

    name = "path"    # short name: describe(), fallback keys, tests
    title = "path"   # what it is, for messages ("the fused inner loop")
    flag = ""        # the BatchedMAML argument that asks for this path explicitly ("" when none)

    def __init__(self, setup: Setup):
        self.setup = setup

    def supports(self, where: Where) -> Support:
        raise NotImplementedError

    def required(self) -> Optional[bool]:
        """True: the configuration requires this path (not supporting a call is a ValueError);
        False: it asks for it (not supporting is a fallback, warned and counted); None: neither."""
        return None

    def prepare(self, batch: Batch, steps: int) -> Any:
        """Per batch signature (shapes, dtypes, devices), after BatchedMAML's validation: checks of
        this path that hold for every batch with the signature; returns what ``run`` takes."""
        return None

    def run(self, batch: Batch, steps: int, prepared: Any) -> StepOutput:
        raise NotImplementedError

    def adapt(self, sx: torch.Tensor, sy: torch.Tensor, steps: int) -> FastWeights:
        raise NotImplementedError(f"the {self.name} path does not adapt for evaluation")


def choose(paths: Sequence[MetaStepPath], where: Where) -> Tuple[MetaStepPath, List[Tuple[MetaStepPath, Support]]]:
    """The first path that supports ``where``, and the verdicts of those before it. A path the
    configuration requires raises ValueError naming why it cannot run; one it asks for reports a
    fallback (FallbackWarning, counted; FallbackError under METAFAST_STRICT=1)."""
    skipped = []
    for path in paths:
        verdict = path.supports(where)
        if verdict.ok:
            for other, why in skipped:
                if other.required() is False and not why.quiet:
                    other.setup.fallback(f"maml_path.{other.name}",
                                         f"BatchedMAML({other.flag}): {why.reason}; running the {path.name} path")
            return path, skipped
        if path.required() and not verdict.quiet:
            raise ValueError(f"{path.flag}: {path.title} cannot run this configuration: {verdict.reason}")
        skipped.append((path, verdict))
    raise RuntimeError("no meta-step path supports this call: " + "; ".join(f"{p.name}: {s.reason}" for p, s in skipped))
