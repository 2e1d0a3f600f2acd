"""BatchedMAML's memory modes (memory="fast" | "low" | "min", task_chunk=N) against the float64 per-task
reference (rel. err <= 1e-10), that the low mode really keeps only fast weights between steps and the min
mode not even those."""
import pytest
import torch

from metafast import BatchedMAML, FallbackError, FallbackWarning
from metafast.functional import meta_step
from test_batched_maml import TOL, flat, make, meta_grads, reference, rel_err


# memory="fast" unchunked is the matrix of test_batched_maml_exact_reverse.py; chunks in the fast mode
# only split the work, so one model covers them.
MODES = [("low", None, kind) for kind in ("mlp", "mlp_bn", "conv4_bn", "conv4_pool")] + \
        [("low", 2, kind) for kind in ("mlp_bn", "conv4_bn", "conv4_pool")] + [("fast", 1, "conv4_bn")] + \
        [("min", None, kind) for kind in ("mlp", "conv4_bn")] + [("min", c, kind) for c, kind in
                                                                ((1, "mlp_bn"), (2, "conv4_bn"), (2, "conv4_pool"))]


@pytest.mark.parametrize("memory,task_chunk,kind", MODES)
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("first_order,meta_sgd", [(False, False), (True, False), (False, True)])
def test_every_memory_mode_matches_per_task_autograd(kind, steps, first_order, meta_sgd, memory, task_chunk):
    torch.manual_seed(0)
    model, batch, loss = make(kind)
    lr = 0.1 if loss == "mse" else 0.3
    maml = BatchedMAML(model, inner_lr=lr, inner_steps=steps, first_order=first_order, meta_sgd=meta_sgd,
                       loss=loss, fused=False, memory=memory, task_chunk=task_chunk)
    assert maml.exact_reverse, "this matrix covers the exact reverse; the model must qualify"
    if meta_sgd:
        with torch.no_grad():
            maml.lrs.mul_(torch.rand_like(maml.lrs) + 0.5)
    extra = [maml.lrs] if meta_sgd else []
    out, grads = meta_grads(maml, batch, extra)
    ref = reference(maml, batch, lr, steps, first_order, loss)
    ref_grads = torch.autograd.grad(ref, list(maml.module.parameters()) + extra)
    assert rel_err(out.loss, ref) <= TOL
    assert rel_err(flat(grads), flat(ref_grads)) <= TOL
    assert out.task_losses.shape == (batch[0].shape[0],)


def _checkpointed_calls(monkeypatch):
    """Count how many step records MetaStep rebuilds in its reverse (the checkpointed path's signature)."""
    calls = []
    real = meta_step.MetaStep._recompute

    def spy(ctx, k):
        calls.append(k)
        return real(ctx, k)

    monkeypatch.setattr(meta_step.MetaStep, "_recompute", staticmethod(spy))
    return calls


def test_low_mode_recomputes_each_step_per_chunk_and_fast_mode_does_not(monkeypatch):
    model, batch, loss = make("conv4_bn")  # 3 tasks
    calls = _checkpointed_calls(monkeypatch)
    low = BatchedMAML(model, inner_lr=0.3, inner_steps=3, loss=loss, memory="low", task_chunk=2)
    low(*batch).loss.backward()
    assert sorted(calls) == [0, 0, 1, 1, 2, 2]  # two chunks (2 + 1 tasks), steps 2, 1, 0 each
    calls.clear()
    fast = BatchedMAML(model, inner_lr=0.3, inner_steps=3, loss=loss, memory="fast")
    fast(*batch).loss.backward()
    assert calls == []


def test_low_mode_keeps_fast_weights_not_activations():
    """What the autograd node holds after the forward: one [T, n_i] piece set per step, no tapes."""
    model, batch, loss = make("conv4_bn")
    seen = {}
    real = meta_step.MetaStep.forward

    def grab(ctx, *args):
        out = real(ctx, *args)
        seen["records"] = ctx.records
        return out

    meta_step.MetaStep.forward = staticmethod(grab)
    try:
        BatchedMAML(model, inner_lr=0.3, inner_steps=3, loss=loss, memory="low")(*batch)
        low = seen["records"]
        BatchedMAML(model, inner_lr=0.3, inner_steps=3, loss=loss, memory="fast")(*batch)
        fast = seen["records"]
    finally:
        meta_step.MetaStep.forward = real
    assert low[0][0] is None  # W_0 is theta itself
    assert all(isinstance(w, list) and all(p.shape[0] == 3 for p in w) for w, _ in low[1:])
    assert all(isinstance(r, tuple) and len(r) == 5 for r in fast)  # (tape, gys, out, layout, g)


def test_min_mode_keeps_no_fast_weights_and_replays_each_chunk(monkeypatch):
    """memory="min": the node holds random states only; the reverse replays steps 0..K-1, then reverses."""
    model, batch, loss = make("conv4_bn")  # 3 tasks
    seen = []
    real = meta_step.MetaStep.forward

    def grab(ctx, *args):
        out = real(ctx, *args)
        seen.append((list(ctx.records), ctx.ckpt_inputs[3][0]))
        return out

    monkeypatch.setattr(meta_step.MetaStep, "forward", staticmethod(grab))
    calls = _checkpointed_calls(monkeypatch)
    maml = BatchedMAML(model, inner_lr=0.3, inner_steps=3, loss=loss, memory="min", task_chunk=2)
    out = maml(*batch)
    assert len(seen) == 2 and all(w is None and all(r[0] is None for r in records) for records, w in seen)
    assert calls == []
    out.loss.backward()
    # per chunk (the second chunk's node runs first in the backward): replay 0, 1, 2, then the reverse 2, 1, 0
    assert calls == [0, 1, 2, 2, 1, 0] * 2
    assert "memory: min (step-checkpointed exact reverse replaying each chunk's inner loop, chunks of 2" \
        in maml.describe()


@pytest.mark.parametrize("memory", ["low", "min"])
def test_checkpointed_node_frees_its_fast_weights_after_its_backward(memory):
    """A chunk's W_k go when its backward ends (not when the graph dies); a retained graph replays them."""
    model, batch, loss = make("conv4_bn")
    nodes = []
    real = meta_step.MetaStep.forward

    def grab(ctx, *args):
        nodes.append(ctx)
        return real(ctx, *args)

    meta_step.MetaStep.forward = staticmethod(grab)
    try:
        maml = BatchedMAML(model, inner_lr=0.3, inner_steps=3, loss=loss, memory=memory, task_chunk=2)
        out = maml(*batch)
    finally:
        meta_step.MetaStep.forward = real
    params = list(model.parameters())
    first = flat(torch.autograd.grad(out.loss, params, retain_graph=True))
    assert len(nodes) == 2 and all(r[0] is None for ctx in nodes for r in ctx.records)
    assert all(ctx.ckpt_inputs[3][0] is None for ctx in nodes)
    second = flat(torch.autograd.grad(out.loss, params))  # the retained graph: replayed from θ
    assert torch.equal(first, second)


def test_min_mode_refuses_a_theta_changed_before_the_backward():
    model, batch, loss = make("conv4_bn")
    out = BatchedMAML(model, inner_lr=0.3, inner_steps=2, loss=loss, memory="min")(*batch)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # e.g. an optimizer step between forward and backward
    with pytest.raises(RuntimeError, match="parameters changed between this meta-step's forward and a backward"):
        out.loss.backward()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_min_mode_replays_mixed_precision_steps_exactly(precision):
    """The replay recomputes the low-precision inner steps: the same meta-gradient as the low mode's, bit for bit."""
    model, batch, loss = make("conv4_bn")
    model, batch = model.float(), [t.float() if t.is_floating_point() else t for t in batch]
    grads = []
    for memory in ("low", "min"):
        maml = BatchedMAML(model, inner_lr=0.3, inner_steps=3, loss=loss, precision=precision, memory=memory,
                           task_chunk=2, fused=False)
        assert maml.exact_reverse
        grads.append(flat(meta_grads(maml, batch)[1]))
    assert torch.equal(grads[0], grads[1])


def test_chunk_larger_than_batch_is_clamped_and_equals_unchunked():
    model, batch, loss = make("conv4_pool")
    grads = []
    for chunk in (None, 100):
        maml = BatchedMAML(model, inner_lr=0.3, inner_steps=2, loss=loss, memory="low", task_chunk=chunk)
        grads.append(flat(meta_grads(maml, batch)[1]))
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_task_chunk_names_the_argument(bad):
    model, _, loss = make("mlp")
    with pytest.raises(ValueError, match="task_chunk"):
        BatchedMAML(model, loss=loss, task_chunk=bad)


def test_unknown_memory_mode_names_the_argument():
    model, _, loss = make("mlp")
    with pytest.raises(ValueError, match="memory.*'fast', 'low'"):
        BatchedMAML(model, loss=loss, memory="tiny")


def test_describe_names_the_mode_and_what_it_keeps():
    model, _, loss = make("conv4_bn")
    maml = BatchedMAML(model, inner_steps=5, loss=loss, memory="low", task_chunk=2)
    text = maml.describe()
    assert "memory: low (step-checkpointed exact reverse, chunks of 2 task(s))" in text
    assert f"5 steps x {sum(p.numel() for p in model.parameters())} parameters" in text
    assert "memory: fast (every inner step's activations" in BatchedMAML(model, loss=loss).describe()


def test_low_mode_without_exact_reverse_falls_back_loudly(monkeypatch):
    """clip_grad_norm has no exact reverse: the low mode cannot run and says so (an error when strict)."""
    model, batch, loss = make("conv4_bn")
    def make_maml():
        return BatchedMAML(model, inner_lr=0.3, loss=loss, memory="low", clip_grad_norm=1.0)

    assert "memory: fast, although memory='low'" in make_maml().describe()
    monkeypatch.delenv("METAFAST_STRICT", raising=False)
    with pytest.warns(FallbackWarning, match="memory='low'.*clip_grad_norm"):
        make_maml()(*batch)
    monkeypatch.setenv("METAFAST_STRICT", "1")
    with pytest.raises(FallbackError, match="memory"):
        make_maml()(*batch)
