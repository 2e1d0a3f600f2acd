"""The exact-reverse path: the meta-step as one autograd node whose backward is the hand-derived
reverse of the inner loop (metafast.functional.meta_step.MetaStep: Hessian-vector products by
R-operators) instead of autograd through the unrolled loop. Same gradients, far fewer autograd nodes;
the result supports one backward (no third-order derivatives).

It applies where every adapted layer has R-operators (metafast.functional.executor.EXACT_MODULES and the
graph operations: MLPs, Conv4, ResNet-12), there is no inner gradient clipping, the loss is "mse" or
"cross_entropy", exact_reverse is not False, and a meta-gradient is wanted (autograd records; ``adapt()``
and no-grad calls take the unrolled path, which then builds no graph).

MAML++'s per-step per-tensor rates (lslr), multi-step loss and per-step BatchNorm weights (per_step_bn)
run here too (StepPlan's lslr, msl_weights, bn_pieces and bn_recorder; step_bn is MetaStep's eighth input).
Memory modes run here: ``memory="low"`` passes step checkpointing to MetaStep (each step's fast weights
kept, its activations rebuilt by the reverse), ``memory="min"`` checkpointing with replay (no fast weights
kept: the reverse replays the inner loop from θ), and ``task_chunk`` runs one MetaStep node per chunk of
tasks, so with checkpointing the reverse holds one step of one chunk at a time. A memory mode asked for
where this path does not run is a fallback (the next path keeps every step).

ANIL (anil=True): the body runs once per support and query set with autograd (metafast.functional.head),
MetaStep runs the head's inner loop on its features and returns their gradients (the query pass's input
gradient, and the inner loop's adjoint by the head's mixed second derivatives), and autograd carries them
into the body, which needs no R-operators (with memory="low" or "min" the body is checkpointed, recomputed
per task chunk in the backward). Not with bf16/fp16 (autograd runs those), and on a module graph only where
the head reads one value of the body and every node after it depends on it.
"""
import torch

from ...functional.executor import EXACT_MODULES
from ...functional.head import HeadEngine, body_features, checkpointed_body_features
from ...functional.losses import CrossEntropy
from ...functional.meta_step import MetaStep, StepPlan
from ...functional.precision import FP32
from .base import MetaStepPath, StepOutput, Support, Where


def support(engine, loss_fn, clip_grad_norm, requested: bool = True, prec=FP32) -> Support:
    """Whether the exact reverse covers this model, loss, clipping and precision (``requested``: exact_reverse)."""
    if not requested:
        return Support(False, "exact_reverse=False")
    if engine.adapt_from != 0:
        key, why = engine.head_input()
        if key is False:
            return Support(False, f"anil=True and {why} (the reverse needs one input to the head)")
    # ANIL's body runs with autograd: only the adapted layers need R-operators
    missing = sorted({type(layer.module).__name__ for layer in engine.layers[engine.adapt_from:]
                      if not hasattr(layer, "rforward")})
    if missing:
        have = ", ".join(m.__name__ for m in EXACT_MODULES)
        return Support(False, f"no R-operator for {', '.join(missing)} (the modules with one: {have})")
    if clip_grad_norm is not None:
        return Support(False, "clip_grad_norm is set (the reverse has no clipped update)")
    if not hasattr(loss_fn, "rgrad"):
        return Support(False, "the loss is a custom function (no R-operator)")
    if engine.adapt_from != 0 and prec.mixed:
        return Support(False, f"anil=True with precision={prec.name!r} (the reverse of the head takes its features' "
                              "gradient in fp32 only)")
    if engine.adapt_from != 0:
        return Support(True, "exact reverse of the head (anil=True: R-operator Hessian-vector products, one "
                             "autograd node; the body's gradient from its features by autograd)")
    return Support(True, "exact reverse (R-operator Hessian-vector products, one autograd node)")


class ExactReversePath(MetaStepPath):
    name = "exact_reverse"
    title = "the exact reverse"

    def __init__(self, setup):
        super().__init__(setup)
        self._support = support(setup.engine, setup.loss_fn, setup.clip_grad_norm, setup.exact_reverse, setup.prec)
        self._head = HeadEngine(setup.engine) if setup.engine.adapt_from and self._support.ok else None
        self._bn_pieces = setup.step_bn_pieces()  # per_step_bn: where the BatchNorm weights sit

    @property
    def flag(self) -> str:
        s = self.setup
        return f"memory={s.memory!r}, task_chunk={s.task_chunk!r}"

    def required(self):
        """A memory mode asks for this path: not running it is a fallback (warned, counted, strict error)."""
        return False if (self.setup.memory != "fast" or self.setup.task_chunk is not None) else None

    def supports(self, where: Where) -> Support:
        if not self._support.ok:
            return self._support
        if where.adapt:
            return Support(False, "adapt() differentiates nothing", quiet=True)
        if not where.grad:
            return Support(False, "no meta-gradient is recorded (no_grad / inference mode)", quiet=True)
        if self.setup.step_stats is not None and not self.setup.owner.training:
            return Support(False, "per_step_bn_stats in eval mode (the reverse normalises by batch statistics; the "
                                  "autograd path uses each step's running statistics)")
        options = self.setup.maml_pp_options()
        if options:
            return Support(True, f"{self._support.reason}, with MAML++ {', '.join(options)}")
        return self._support

    def run(self, batch, steps, prepared) -> StepOutput:
        s = self.setup
        sx, sy, qx, qy = batch
        watch = s.guard.watching(s.flat.buffer)
        theta = s.flat.theta()
        T = sx.shape[0]
        n = T if s.task_chunk is None else min(s.task_chunk, T)
        outs, flags = [], []
        # MAML++: LSLR's [steps, pieces] rates take Meta-SGD's place; the multi-step loss's weights of this iteration
        lrs = s.lrs if s.step_lrs is None else s.step_lrs
        recorder = s.stats_recorder()  # BNRS: every chunk's support passes record into it
        msl_weights = s.step_weights(steps) if s.multi_step_loss and steps > 1 else None
        anil = s.engine.adapt_from != 0  # (per_step_bn and per_step_bn_stats need anil=False)
        body = body_features if s.memory == "fast" else checkpointed_body_features
        for lo in range(0, T, n):
            c = slice(lo, lo + n)
            report = [] if watch else None
            engine, th, xs, xq = s.engine, theta, sx[c], qx[c]
            if anil:  # the body once per set, by autograd; MetaStep runs the head on its features
                with torch.no_grad() if s.first_order else torch.enable_grad():
                    xs = (body_features if s.first_order else body)(s.engine, theta, xs)  # first order: h_s constant
                xq = body(s.engine, theta, xq)
                engine, th = self._head, theta[s.engine.adapt_offset:]
            plan = StepPlan(engine, s.loss_fn, steps, s.lr, s.first_order, precision=s.prec, overflow_report=report,
                            checkpoint=s.memory != "fast", replay=s.memory == "min", lslr=s.step_lrs is not None,
                            msl_weights=msl_weights, bn_pieces=self._bn_pieces, bn_recorder=recorder)
            outs.append(MetaStep.apply(th, lrs, xs, sy[c], xq, qy[c], plan, s.step_bn))
            if report:
                flags.append(report[0])
        task_losses, support_losses, out = outs[0] if len(outs) == 1 else (torch.cat(t) for t in zip(*outs))
        s.guard.overflow = torch.cat(flags) if flags else None
        s.guard.check(task_losses, "query loss", support_losses)
        s.commit_stats(recorder)
        acc = CrossEntropy.accuracy(out.detach(), qy) if s.loss_fn.classification else None
        return StepOutput(task_losses, acc, support_losses)
