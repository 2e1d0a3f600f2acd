"""The whole MAML meta-step as one autograd node with a hand-derived exact reverse.

For models whose every layer has R-operators (Linear, Conv2d, BatchNorm, MaxPool2d, ReLU, Tanh, Sigmoid,
Flatten: MLPs and Conv4-style CNNs), the
forward runs the inner loop and the query loss with no autograd graph at all, and the backward
computes the meta-gradient directly:

    W_{k+1} = W_k - lr_k * g_k,   g_k = grad L_s(W_k)           (W_0 = theta, broadcast to T tasks)
    Wbar_K  = dL_q / dW_K
    Wbar_k  = Wbar_{k+1} - H_s(W_k) (lr_k * Wbar_{k+1})          (second order; FOMAML drops H)
    lrbar  -= sum_t Wbar_{k+1} * g_k                             (Meta-SGD's learned rates)
    thetabar = sum_t Wbar_0

H_s(W_k) v is the R-operator of the recorded inner backward (Pearlmutter 1994). On small few-shot
models this removes the autograd engine's per-node cost, which dominates their meta-step.

What runs is a :class:`StepPlan` (the engine, loss, step count, rates, order, and the options below,
each a named field).

Step checkpointing (``checkpoint=True``): the forward keeps only each step's fast
weights W_k (K * T * P numbers) instead of every step's activations, and the reverse recomputes step k's
support forward and backward when it reaches it (and the query pass from W_K), so the peak holds one
step's activations whatever K is. Recomputation runs the same ops on the same inputs, so the
meta-gradient is the same. With ``replay=True`` too (memory="min") the forward keeps not even W_k: the
reverse first replays the inner loop from θ to get W_1..W_K back (one more support forward and backward
per step), so between forward and backward a node holds its outputs and nothing of size K * T * P, and
the peak of a chunked meta-batch is one chunk's K fast weights and one step's activations.

MAML++ (``lslr``, ``msl_weights``, ``bn_pieces``, ``bn_recorder``): with ``lslr`` the ``lrs`` input is LSLR's
[K', n_pieces] per-step per-piece rates (K' >= K), so lr_k is a scalar per piece i and

    lrbar[k, i] = -sum_t <Wbar_{k+1,i}, g_{k,i}>,   Wbar_k = Wbar_{k+1} - H_s(W_k) (lr_k * Wbar_{k+1});

``msl_weights`` [K] (the multi-step loss) makes the result sum_j w_j L_q(W_j) over the fast weights after
every step j = 1..K, so the reverse adds w_j dL_q/dW_j to Wbar_j (a query pass per weighted step,
rebuilt from W_j under step checkpointing). ``bn_pieces`` (per-step BatchNorm weights, BNWB: the
(piece, column) of each BatchNorm weight and bias in the rows of the eighth input ``step_bn`` [K', n])
makes step k run at W'_k = P_k(W_k), W_k with those pieces replaced by row k, and the query pass after
step k at P_k(W_{k+1}). The BatchNorm pieces of W_{k+1} are thus never read, so in the reverse

    step_bnbar[k] += (Wbar_{k+1})_bn  (the query term after step k),   then (Wbar_{k+1})_bn = 0,
    step_bnbar[k] += (Wbar'_k)_bn,  Wbar'_k = Wbar_{k+1} - H_s(W'_k)(lr_k Wbar_{k+1}),   then (Wbar_k)_bn = 0

(θ's BatchNorm weights get no gradient; full adaptation is assumed: step 0 runs at θ with row 0 in it).
``bn_recorder`` (per-step BatchNorm running statistics, BNRS: a metafast.functional.step_stats.Recorder)
receives the batch statistics of each step's support pass in the forward (not of its recomputation).

Mixed precision (``precision``, a metafast.functional.precision.Precision): the layers
run on low-precision copies of θ and W_k, while W_k, the losses, the inner update and every
accumulated Wbar stay float32; the inner gradient (and its R-operator) is taken of S * loss and
divided by S in float32; ``overflow_report``, a list, receives which tasks' scaled inner gradient overflowed.
"""
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch

from .. import cpu_cache
from .precision import FP32, Precision
from .layers import RunCtx


@dataclass
class StepPlan:
    """What one MetaStep node runs (every field but the first five is an option, off by default)."""
    engine: Any                          # BatchedModel, GraphModel or HeadEngine (ANIL's head)
    loss_fn: Any                         # a metafast.functional.losses loss (value_and_grad, rgrad)
    steps: int                           # K inner steps
    lr_of: Callable[[int], float]        # step k -> its scalar inner rate (read when ``lrs`` is None)
    first_order: bool                    # FOMAML: the reverse drops the Hessian terms
    precision: Precision = FP32          # mixed precision of the layers
    overflow_report: Optional[list] = None  # receives the per-task overflow flags [T] of the inner gradients
    checkpoint: bool = False             # step checkpointing (memory="low")
    replay: bool = False                 # with checkpoint: keep no W_k, replay the inner loop in the reverse (memory="min")
    lslr: bool = False                   # MAML++ LSLR: ``lrs`` is [K', n_pieces]
    msl_weights: Optional[Any] = None    # MAML++ multi-step loss weights [K]
    bn_pieces: Optional[List[Tuple[int, int]]] = None  # BNWB: (piece, column in step_bn) per BatchNorm tensor
    bn_recorder: Optional[Any] = None    # BNRS: a step_stats.Recorder of each step's support statistics


def _update(base, g, lr):
    """The inner update W_{k+1} = W_k - lr * g_k per parameter piece: base pieces [n_i] (theta) or [T, n_i],
    g pieces [T, n_i], lr a float or pieces [n_i] (Meta-SGD). Each result is a contiguous [T, n_i], so the
    layers view it as per-task weights without the copies (and the [T, P] concatenation) a flat buffer needs."""
    if isinstance(lr, (list, tuple)):
        return [torch.addcmul(b, l, gk, value=-1.0) for b, l, gk in zip(base, lr, g)]
    return [torch.add(b, gk, alpha=-lr) for b, gk in zip(base, g)]


def _step_lr(plan, lrs, sizes, k):
    """Step k's inner rate as _update takes it: LSLR's row k (a scalar per piece), Meta-SGD's per-parameter
    pieces, or the plan's scalar for step k."""
    if plan.lslr:
        return list(lrs[k].unbind())
    return lrs.split(sizes) if lrs is not None else plan.lr_of(k)


def _generators(engine):
    """The layers' own random generators (Dropout masks): a recomputed step must draw what its forward drew."""
    return [layer.gen for layer in engine.layers if getattr(layer, "gen", None) is not None]


def _rng_states(engine):
    return [g.get_state() for g in _generators(engine)]


def _set_rng_states(engine, states) -> None:
    for g, state in zip(_generators(engine), states):
        g.set_state(state)


def _low(low, fast):
    return None if fast is None else [low(p) for p in fast]


def _with_bn(bn, step_bn, k, fast, T):
    """BNWB: the fast weight pieces [T, n_i] with each BatchNorm piece replaced by row k of step_bn
    (an expanded view: the layers only read it)."""
    fast = list(fast)
    for i, c in bn:
        fast[i] = step_bn[k, c:c + fast[i].shape[1]].to(fast[i].dtype).expand(fast[i].shape[0], -1)
    return fast


def _theta_with_bn(bn, step_bn, k, theta, sizes):
    """BNWB: θ with its BatchNorm pieces replaced by row k of step_bn (step 0's weights)."""
    parts = list(theta.split(sizes))
    for i, c in bn:
        parts[i] = step_bn[k, c:c + sizes[i]].to(theta.dtype)
    return torch.cat(parts)


def _route_bn(bn, wbar, step_bnbar, k):
    """BNWB's reverse: the BatchNorm pieces of Wbar go to row k of step_bn's gradient and are zeroed."""
    for i, c in bn:
        step_bnbar[k, c:c + wbar[i].shape[1]] += wbar[i].sum(0).to(step_bnbar.dtype)
        wbar[i].zero_()


class MetaStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, lrs, sx, sy, qx, qy, plan, step_bn=None):
        if not isinstance(plan, StepPlan):
            raise TypeError(f"plan: expected a metafast.functional.meta_step.StepPlan, got {type(plan).__name__}")
        with cpu_cache.scope(theta.device):
            return MetaStep._forward(ctx, theta, lrs, sx, sy, qx, qy, plan, step_bn)

    @staticmethod
    def _forward(ctx, theta, lrs, sx, sy, qx, qy, plan, step_bn=None):
        engine, loss_fn, steps = plan.engine, plan.loss_fn, plan.steps
        prec, report, ckpt = plan.precision, plan.overflow_report, plan.checkpoint
        keep = ckpt and not plan.replay  # checkpointed: keep W_k (replay: the reverse recomputes it from θ)
        lslr, weights, recorder = plan.lslr, plan.msl_weights, plan.bn_recorder
        bn = plan.bn_pieces if steps > 0 else None  # BNWB: [(piece, column)]
        overflow = None
        low, scale = prec.low, prec.scale
        T = sx.shape[0]
        rc = RunCtx(T, create_graph=False)
        n = len(engine.layers)
        records, fast = [], None
        support_losses = torch.zeros(T, dtype=theta.dtype, device=theta.device)
        ctx.x_dtypes, ctx.x_shapes = (sx.dtype, qx.dtype), (sx.shape, qx.shape)
        sizes = engine.slot_sizes()
        # BNWB: step 0 runs at θ with row 0's BatchNorm weights (every later pass has fast weights)
        theta_c = low(theta if bn is None else _theta_with_bn(bn, step_bn, 0, theta, sizes))
        sx, qx = low(sx), low(qx)
        msl = {}  # MAML++ multi-step loss: step j -> (weighted loss [T], query tape, layout, dL/dout)
        for k in range(steps):
            if bn is not None and fast is not None:
                fast = _with_bn(bn, step_bn, k, fast, T)
            rng = _rng_states(engine) if ckpt else None
            rc.bn_stats = None if recorder is None else recorder.at(k)  # recorded here only, not when recomputed
            out, layout, tape = engine.forward(0, n, theta_c, _low(low, fast), sx, "tn", rc, record=True)
            rc.bn_stats = None
            out = engine.output(out, layout, T)
            if k == 0:
                loss_fn.check_target(out, sy, "support_y")
            support_losses, dout = loss_fn.value_and_grad(out.to(theta.dtype), sy, False)
            g, gys = engine.backward(tape, prec.grad_seed(dout), layout, rc, record_gy=True, flat=False)
            g = [prec.unscale(p, theta.dtype) for p in g]
            if report is not None:  # which tasks' scaled inner gradient overflowed, for the caller
                bad = prec.overflowed(g, support_losses)
                overflow = bad if overflow is None else overflow | bad
            # checkpointed: W_k alone (None: theta); the step's tape is dropped here and rebuilt by the reverse
            records.append(((fast if keep else None), rng) if ckpt else (tape, gys, out, layout, g))
            del tape, gys, out
            fast = _update(theta.split(sizes) if fast is None else fast, g, _step_lr(plan, lrs, sizes, k))
            if weights is not None and k + 1 < steps and weights[k] != 0:
                rng = _rng_states(engine) if ckpt else None
                at = fast if bn is None else _with_bn(bn, step_bn, k, fast, T)
                msl[k + 1] = MetaStep._query(engine, loss_fn, theta_c, _low(low, at), qx, qy, rc, not ckpt,
                                             weights[k], theta.dtype) + (rng,)
        if bn is not None:  # the query pass after step K-1 runs with row K-1
            fast = _with_bn(bn, step_bn, steps - 1, fast, T)
        rng = _rng_states(engine) if ckpt else None
        out_q, layout_q, tape_q = engine.forward(0, n, theta_c, _low(low, fast), qx, "tn", rc, record=not ckpt)
        out_q = engine.output(out_q, layout_q, T).to(theta.dtype)
        if ckpt:
            tape_q = None
            ctx.ckpt_inputs = (theta_c, sx, qx, (fast if keep else None, rng))  # W_K: the query tape's rebuild
        if report is not None and overflow is not None:
            report.append(overflow)
        loss_fn.check_target(out_q, qy, "query_y")
        task_losses, dq = loss_fn.value_and_grad(out_q, qy, False)
        if weights is not None and steps > 0:
            task_losses = sum((m[0] for m in msl.values()), weights[steps - 1] * task_losses)
            dq = dq * weights[steps - 1]
        ctx.msl, ctx.qy = msl, qy
        ctx.plan, ctx.rc, ctx.sy, ctx.scale, ctx.ckpt, ctx.dtype = plan, rc, sy, scale, ckpt, theta.dtype
        ctx.records, ctx.tape_q, ctx.layout_q, ctx.dq = records, tape_q, layout_q, dq
        ctx.lrs, ctx.theta_shape, ctx.records_dtype = lrs, theta.shape, theta_c.dtype
        ctx.bn, ctx.step_bn = bn, step_bn
        if ckpt:  # the replay's start (autograd's version check catches an in-place change before the backward)
            ctx.save_for_backward(theta)
            ctx.theta_sum = theta.detach().sum()  # and this one a change through the parameters it aliases
        ctx.replay_pending = ckpt and not keep
        ctx.mark_non_differentiable(support_losses, out_q)
        return task_losses, support_losses, out_q

    @staticmethod
    def _query(engine, loss_fn, theta_c, fast_c, qx, qy, rc, record, weight, dtype):
        """A multi-step loss term: (weight * query loss [T], its tape or None, layout, weight * dL/dout)."""
        out, layout, tape = engine.forward(0, len(engine.layers), theta_c, fast_c, qx, "tn", rc, record=record)
        out = engine.output(out, layout, rc.T).to(dtype)
        loss, dq = loss_fn.value_and_grad(out, qy, False)
        return weight * loss, tape, layout, dq * weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_losses, _g_support, _g_out):
        with cpu_cache.scope(ctx.dq.device):
            return MetaStep._backward(ctx, g_losses)

    @staticmethod
    def _backward(ctx, g_losses):
        plan = ctx.plan
        engine, loss_fn, steps, lr_of = plan.engine, plan.loss_fn, plan.steps, plan.lr_of
        first_order = plan.first_order
        rc = ctx.rc
        scale = g_losses.view(-1, *([1] * (ctx.dq.dim() - 1)))
        gq = ctx.dq * scale
        tape_q, layout_q = ctx.tape_q, ctx.layout_q
        if ctx.replay_pending:  # memory="min" (or a second backward): W_1..W_K back first
            MetaStep._replay(ctx, ctx.saved_tensors[0])
        if ctx.ckpt:  # rebuild the query tape from W_K
            _, _, qx, record = ctx.ckpt_inputs
            _, layout_q, tape_q = MetaStep._rebuild(ctx, record, qx)
        # Wbar is kept as per-parameter pieces [T, n_i] (what the layers return and the R-operators take),
        # so no [T, Pa] tensor is concatenated; the query backward runs in the tape's precision, what it
        # returns is accumulated in float32. The pieces are fresh, so they are updated in place.
        # ANIL's body features (sx, qx are then h_s, h_q): their gradients, hbar_q from the query passes and
        # hbar_s from the inner steps' mixed second derivatives (metafast/functional/head.py)
        need_s, need_q = ctx.needs_input_grad[2], ctx.needs_input_grad[4]
        ctx.hbar_q = None
        wbar = engine.backward(tape_q, gq.to(ctx.records_dtype), layout_q, rc, flat=False,
                               **({"input_grad": True} if need_q else {}))
        if need_q:
            wbar, ctx.hbar_q = wbar
        wbar = [w.to(gq.dtype) for w in wbar]
        hbar_s = None
        sizes = [w.shape[1] for w in wbar]
        lslr = plan.lslr
        lrbar = None
        if ctx.lrs is not None and ctx.needs_input_grad[1]:
            lrbar = torch.zeros_like(ctx.lrs)
        del tape_q
        bn = ctx.bn
        step_bnbar = None if bn is None else torch.zeros_like(ctx.step_bn)
        for k in range(steps - 1, -1, -1):
            if k + 1 in ctx.msl:  # the multi-step loss's term at W_{k+1} joins Wbar_{k+1}
                wbar = MetaStep._add_query_grad(ctx, wbar, k + 1, scale)
            if bn is not None:  # the query terms' BatchNorm part is row k's; W_{k+1}'s own is never read
                _route_bn(bn, wbar, step_bnbar, k)
            if first_order and lrbar is None:
                continue  # FOMAML without learned rates reads nothing of the inner steps
            if ctx.ckpt:
                tape = gys = out = h = None  # drop step k+1's rebuilt activations before rebuilding step k's
                tape, gys, out, layout, g = MetaStep._recompute(ctx, k)
            else:
                tape, gys, out, layout, g = ctx.records[k]
            if lrbar is not None and lslr:
                lrbar[k] -= torch.stack([(w * gk).sum() for w, gk in zip(wbar, g)])
            elif lrbar is not None:
                lrbar -= torch.cat([(w * gk).sum(0) for w, gk in zip(wbar, g)])
            if not first_order:
                if lslr:
                    lrs = list(ctx.lrs[k].unbind())
                else:
                    lrs = ctx.lrs.split(sizes) if ctx.lrs is not None else [lr_of(k)] * len(wbar)
                # d W_{k+1} / d W_k = I - diag(lr) H, so its transpose applies H to lr * Wbar.
                # Low-precision layers get lr * Wbar, the range the inner loss scale was chosen for;
                # otherwise a scalar lr is applied after H (H (lr Wbar) = lr H Wbar), one pass less.
                kw = {"input_grad": True} if need_s else {}
                if ctx.lrs is not None or ctx.records_dtype != gq.dtype:
                    h = engine.hvp(tape, gys, out, layout, ctx.sy, loss_fn, [lr * w for lr, w in zip(lrs, wbar)],
                                   rc, ctx.scale, **kw)
                    if need_s:  # hbar_s -= d/dh_s <g_k, lr Wbar_{k+1}>
                        h, rh = h
                        hbar_s = -rh if hbar_s is None else hbar_s.sub_(rh)
                    wbar = [w.sub_(hk) for w, hk in zip(wbar, h)]
                else:
                    h = engine.hvp(tape, gys, out, layout, ctx.sy, loss_fn, wbar, rc, ctx.scale, **kw)
                    if need_s:  # one scalar rate for every piece here
                        h, rh = h
                        hbar_s = rh * -lrs[0] if hbar_s is None else hbar_s.add_(rh, alpha=-lrs[0])
                    wbar = [w.add_(hk, alpha=-lr) for w, hk, lr in zip(wbar, h, lrs)]
                if bn is not None:  # Wbar'_k's BatchNorm part: step k ran with row k
                    _route_bn(bn, wbar, step_bnbar, k)
        hbar_q = ctx.hbar_q
        if need_s and hbar_s is None:  # first order (or no steps): the support features get no gradient
            hbar_s = torch.zeros(ctx.x_shapes[0], dtype=ctx.x_dtypes[0], device=gq.device)
        if ctx.ckpt:  # this node's fast weights go now, not when its graph dies (a retained graph replays them)
            ctx.records = [(None, rng) for _, rng in ctx.records]
            MetaStep._set_final_weights(ctx, None)
            ctx.replay_pending = True
        return (torch.cat([w.sum(0) for w in wbar]), lrbar, None if hbar_s is None else hbar_s.to(ctx.x_dtypes[0]),
                None, None if hbar_q is None else hbar_q.to(ctx.x_dtypes[1]), None, None, step_bnbar)

    @staticmethod
    def _add_query_grad(ctx, wbar, j, scale):
        """Wbar_j += w_j dL_q/dW_j (the multi-step loss), its query tape rebuilt from W_j when checkpointed."""
        engine = ctx.plan.engine
        _, tape, layout, dq, rng = ctx.msl[j]
        if ctx.ckpt:
            _, _, qx, _ = ctx.ckpt_inputs
            fast = ctx.records[j][0]  # W_j (with row j's BatchNorm weights under BNWB: this pass reads row j-1's)
            if ctx.bn is not None:
                fast = _with_bn(ctx.bn, ctx.step_bn, j - 1, fast, ctx.rc.T)
            _, layout, tape = MetaStep._rebuild(ctx, (fast, rng), qx)
        need_q = ctx.needs_input_grad[4]
        g = engine.backward(tape, (dq * scale).to(ctx.records_dtype), layout, ctx.rc, flat=False,
                            **({"input_grad": True} if need_q else {}))
        if need_q:  # the weighted query pass at W_j reads h_q too
            g, hq = g
            ctx.hbar_q = hq if ctx.hbar_q is None else ctx.hbar_q + hq
        return [w.add_(gk.to(w.dtype)) for w, gk in zip(wbar, g)]

    @staticmethod
    def _rerun(engine, record, forward):
        """``forward(W)`` for a checkpointed record (W, generator states): with the generators as they were
        when the forward ran it, then put back where they are now."""
        fast, rng = record
        now = _rng_states(engine)
        _set_rng_states(engine, rng)
        try:
            return forward(fast)
        finally:
            _set_rng_states(engine, now)

    @staticmethod
    def _rebuild(ctx, record, x):
        """A checkpointed pass rebuilt with its tape: the whole engine on input ``x`` (the support or query set,
        as the forward cast it) at the record's fast weights, in the plan's precision. Returns (out, layout, tape)."""
        engine, low = ctx.plan.engine, ctx.plan.precision.low
        theta_c = ctx.ckpt_inputs[0]
        return MetaStep._rerun(engine, record, lambda fast: engine.forward(
            0, len(engine.layers), theta_c, _low(low, fast), x, "tn", ctx.rc, record=True))

    @staticmethod
    def _set_final_weights(ctx, fast):
        """W_K of the checkpointed query pass (None: dropped, the replay brings it back)."""
        theta_c, sx, qx, (_, rng) = ctx.ckpt_inputs
        ctx.ckpt_inputs = (theta_c, sx, qx, (fast, rng))

    @staticmethod
    def _replay(ctx, theta):
        """memory="min": the inner loop again from θ, each step as its checkpointed rebuild (the same ops on the
        same inputs and random states as the forward), filling the records with W_k and W_K."""
        plan, T, bn = ctx.plan, ctx.rc.T, ctx.bn
        now = theta.detach().sum()
        if not (torch.equal(now, ctx.theta_sum) or bool(now.isnan() & ctx.theta_sum.isnan())):
            raise RuntimeError("MetaStep: the parameters changed between this meta-step's forward and a backward "
                               "that replays its inner loop from them (memory='min', or a second backward of a "
                               "checkpointed step; an optimizer step in between?): run the backward first")
        sizes = plan.engine.slot_sizes()
        fast = None
        for k in range(plan.steps):
            if bn is not None and fast is not None:
                fast = _with_bn(bn, ctx.step_bn, k, fast, T)
            ctx.records[k] = (fast, ctx.records[k][1])
            g = MetaStep._recompute(ctx, k)[4]  # the step's tape is dropped here
            fast = _update(theta.split(sizes) if fast is None else fast, g, _step_lr(plan, ctx.lrs, sizes, k))
        if bn is not None:
            fast = _with_bn(bn, ctx.step_bn, plan.steps - 1, fast, T)
        MetaStep._set_final_weights(ctx, fast)
        ctx.replay_pending = False

    @staticmethod
    def _recompute(ctx, k):
        """Step k's record (tape, gys, out, layout, g) rebuilt from its fast weights W_k: the same ops on the
        same inputs as the forward, so the same values."""
        engine, loss_fn, prec = ctx.plan.engine, ctx.plan.loss_fn, ctx.plan.precision
        _, sx, _, _ = ctx.ckpt_inputs
        rc = ctx.rc
        out, layout, tape = MetaStep._rebuild(ctx, ctx.records[k], sx)
        out = engine.output(out, layout, rc.T)
        _, dout = loss_fn.value_and_grad(out.to(ctx.dtype), ctx.sy, False)
        g, gys = engine.backward(tape, prec.grad_seed(dout), layout, rc, record_gy=True, flat=False)
        return tape, gys, out, layout, [prec.unscale(p, ctx.dtype) for p in g]
