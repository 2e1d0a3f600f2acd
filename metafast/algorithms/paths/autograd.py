"""The unrolled-autograd path: the inner loop runs on the batched layers (hand-written inner backward
per layer), and autograd differentiates through the unrolled loop (second order: the inner backward is
recorded with create_graph). It runs every configuration: any model the executor takes (layers it
cannot batch run per task through vmap), ANIL, clipping, custom losses, bf16/fp16, first and second
order, no-grad calls. It is also what ``adapt()`` runs where the fused path does not apply.
"""
from contextlib import nullcontext

import torch

from ...functional.layers import RunCtx
from ...functional.losses import CrossEntropy
from ...ops.inner_update import inner_update
from .base import FastWeights, MetaStepPath, StepOutput, Support, Where


def inner_loop(setup, theta, sx, sy, steps: int, mode: str, on_step=None, recorder=None):
    """(fast weights [T, Pa] or None, support losses [T]) after ``steps`` inner steps from ``theta``;
    ``mode``: "second" (differentiable to second order), "first" (FOMAML) or "eval" (adapt()).
    ``on_step(step, fast)``: called after each inner update (MAML++'s multi-step loss).
    ``recorder``: MAML++ per-step BatchNorm statistics, recorded from each step's support pass."""
    engine = setup.engine
    prec = setup.prec
    guard = setup.guard
    T = sx.shape[0]
    second = mode == "second"
    rc = RunCtx(T, create_graph=second)
    # first-order / eval: the inner graph is not differentiated later, so skip recording it
    # (unless a layer computes its backward through a local autograd graph).
    grad_ctx = nullcontext() if (second or engine.local_autograd) else torch.no_grad()
    watch = guard.watching(setup.flat.buffer)
    a = engine.adapt_offset
    # mixed precision: layers run on low-precision casts of the float32 θ and fast weights
    theta_c = prec.low(theta)
    with grad_ctx:
        x, layout, _ = engine.forward(0, engine.adapt_from, theta_c, None, prec.low(sx), "tn", rc, record=False)
    fast = None
    support_losses = torch.zeros(T, dtype=theta.dtype, device=theta.device)
    for step in range(steps):
        fast = setup.with_step_bn(theta, fast, step, T, detach=mode == "eval")
        rc.bn_stats = setup.bn_hook(step, recorder)
        with grad_ctx:
            out, out_layout, tape = engine.forward(engine.adapt_from, len(engine.layers), theta_c, prec.low(fast),
                                                   x, layout, rc, record=True)
            out = engine.output(out, out_layout, T)
            if step == 0:
                setup.loss_fn.check_target(out, sy, "support_y")
            # loss in float32; the backward runs on S * dloss/dout in the compute precision
            loss, dout = setup.loss_fn.value_and_grad(out.to(theta.dtype), sy, create_graph=second)
        with nullcontext() if second else torch.no_grad():
            g = prec.unscale(engine.backward(tape, prec.grad_seed(dout), out_layout, rc), theta.dtype)
        if watch:  # a finite loss with a non-finite gradient: the scale S overflowed fp16
            guard.add_overflow(prec.overflowed([g], loss))
        if not second:
            g = g.detach()
        support_losses = loss
        lr = setup.lr(step)
        if mode == "eval" and torch.is_tensor(lr):
            lr = lr.detach()
        start = theta[a:] if fast is None else fast
        fast = inner_update(start, g, lr, setup.clip_grad_norm)
        if on_step is not None:
            on_step(step, fast)
    if steps:  # the query pass (and predict after adapt()) runs with the last step's BatchNorm weights
        fast = setup.with_step_bn(theta, fast, steps - 1, T, detach=mode == "eval")
    return fast, support_losses


def predict(setup, theta, fast, x, T: int, step: int = 0):
    """Outputs [T, N, ...] of the model at (θ, fast weights) on x (float32 under bf16/fp16); ``step``: the
    inner step whose BatchNorm statistics an evaluation pass uses (MAML++ per-step running statistics)."""
    engine = setup.engine
    prec = setup.prec
    rc = RunCtx(T, create_graph=False, bn_stats=setup.bn_hook(step))
    out, layout, _ = engine.forward(0, len(engine.layers), prec.low(theta), prec.low(fast), prec.low(x), "tn",
                                    rc, record=False)
    out = engine.output(out, layout, T)
    return out.to(theta.dtype) if prec.mixed else out


class AutogradPath(MetaStepPath):
    name = "autograd"
    title = "autograd through the unrolled inner loop"

    def supports(self, where: Where) -> Support:
        return Support(True, "autograd through the unrolled inner loop (every configuration)")

    def run(self, batch, steps, prepared) -> StepOutput:
        s = self.setup
        sx, sy, qx, qy = batch
        s.guard.overflow = None
        theta = s.flat.theta()
        T = sx.shape[0]
        weights = s.step_weights(steps) if s.multi_step_loss and steps > 1 else None
        step_losses = []

        def query_loss(step, fast):  # MAML++ multi-step loss: the query loss after every step with a weight
            if step < steps - 1 and weights[step] != 0:  # host floats: no device sync
                out = predict(s, theta, s.with_step_bn(theta, fast, step, T), qx, T, step)
                s.loss_fn.check_target(out, qy, "query_y")
                step_losses.append(weights[step] * s.loss_fn.value(out, qy))

        recorder = s.stats_recorder()
        fast, support_losses = inner_loop(s, theta, sx, sy, steps, "first" if s.first_order else "second",
                                          None if weights is None else query_loss, recorder)
        out = predict(s, theta, fast, qx, T, steps - 1)
        s.loss_fn.check_target(out, qy, "query_y")
        task_losses = s.loss_fn.value(out, qy)
        if weights is not None:
            task_losses = sum(step_losses, weights[-1] * task_losses)
        s.guard.check(task_losses, "query loss", support_losses)
        s.commit_stats(recorder)
        acc = CrossEntropy.accuracy(out.detach(), qy) if s.loss_fn.classification else None
        return StepOutput(task_losses, acc, support_losses)

    def adapt(self, sx, sy, steps) -> FastWeights:
        s = self.setup
        theta = s.flat.theta().detach()
        s.guard.overflow = None
        if s.engine.local_autograd:
            theta.requires_grad_(True)
        with torch.enable_grad():
            fast, support_losses = inner_loop(s, theta, sx, sy, steps, "eval")
        if steps:
            s.guard.check(support_losses, "support loss")
        return FastWeights(theta.detach(), None if fast is None else fast.detach(), s.engine.adapt_offset)
