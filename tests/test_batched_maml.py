"""BatchedMAML against a naive per-task autograd MAML, float64 (rel. err <= 1e-10)."""
import pytest
import torch
from torch import nn

from maml_reference import per_task_maml
from meta_paths import assert_path
from metafast import BatchedMAML
from metafast.models import MLP, Conv4

DT = torch.float64
TOL = 1e-10


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def regression_batch(T=4, S=6, Q=5):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(T, n, 1, generator=g, dtype=DT) for n in (S, S, Q, Q)]


def image_batch(T=3, S=6, Q=3, C=2, H=9, ways=3):
    g = torch.Generator().manual_seed(2)
    sx = torch.randn(T, S, C, H, H, generator=g, dtype=DT)
    qx = torch.randn(T, Q, C, H, H, generator=g, dtype=DT)
    sy = torch.randint(0, ways, (T, S), generator=g)
    qy = torch.randint(0, ways, (T, Q), generator=g)
    return sx, sy, qx, qy


def make(kind):
    if kind == "mlp":
        return MLP(1, [7, 5], 1).to(DT), regression_batch(), "mse"
    if kind == "mlp_bn":
        return MLP(1, [6, 5], 1, batch_norm=True).to(DT), regression_batch(), "mse"
    if kind == "conv4_bn":
        return Conv4(3, in_channels=2, hidden=4, image_size=9, stride=2).to(DT), image_batch(), "cross_entropy"
    if kind == "conv4_pool":
        return Conv4(3, in_channels=2, hidden=3, image_size=16, stride=1, pool=True).to(DT), image_batch(H=16), "cross_entropy"
    raise KeyError(kind)


def meta_grads(maml, batch, extra=()):
    out = maml(*batch)
    params = list(maml.module.parameters()) + list(extra)
    return out, torch.autograd.grad(out.loss, params)


def reference(maml, batch, lr, steps, first_order, loss, **kw):
    model = maml.module
    a = maml._engine.adapt_offset
    slots = [s for s in maml._flat.slots if s.offset >= a]
    lrs = None
    if maml.meta_sgd:
        lrs = {s.name: maml.lrs[s.offset - a:s.offset - a + s.numel].view(s.shape) for s in slots}
    head = [s.name for s in slots] if maml.anil else None
    return per_task_maml(model, *batch, lr, steps, first_order, loss, lrs=lrs, head_names=head, **kw)


@pytest.mark.parametrize("kind", ["mlp", "mlp_bn", "conv4_bn", "conv4_pool"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("meta_sgd,anil", [(False, False), (True, False), (False, True), (True, True)])
def test_meta_gradient_matches_per_task_autograd(kind, steps, first_order, meta_sgd, anil):
    torch.manual_seed(0)
    model, batch, loss = make(kind)
    lr = 0.1 if loss == "mse" else 0.3
    # exact_reverse=False, fused=False: this matrix covers autograd through the unrolled loop for every model
    maml = BatchedMAML(model, inner_lr=lr, inner_steps=steps, first_order=first_order, meta_sgd=meta_sgd,
                       anil=anil, loss=loss, exact_reverse=False, fused=False)
    assert_path(maml, fused=False, exact_reverse=False)
    if meta_sgd:  # distinct per-element rates, so a mix-up of lrs would show
        with torch.no_grad():
            maml.lrs.mul_(torch.rand_like(maml.lrs) + 0.5)
    extra = [maml.lrs] if meta_sgd else []
    out, grads = meta_grads(maml, batch, extra)
    ref = reference(maml, batch, lr, steps, first_order, loss)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()) + extra)
    assert abs(out.loss.item() - ref.item()) <= TOL * abs(ref.item())
    err = rel_err(flat(grads), flat(ref_grads))
    assert err <= TOL, f"meta-gradient rel. err {err:.2e}"
    if meta_sgd:  # the learned rates get a real gradient
        assert rel_err(grads[-1], ref_grads[-1]) <= TOL and grads[-1].abs().sum() > 0


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Sigmoid])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("steps", [0, 1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("meta_sgd", [False, True])
def test_exact_reverse_matches_per_task_autograd(act, loss, steps, first_order, meta_sgd):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 7), act(), nn.Linear(7, 5), act(), nn.Linear(5, 4)).to(DT)
    g = torch.Generator().manual_seed(3)
    sx, qx = torch.randn(4, 6, 3, generator=g, dtype=DT), torch.randn(4, 5, 3, generator=g, dtype=DT)
    if loss == "mse":
        sy, qy = torch.randn(4, 6, 4, generator=g, dtype=DT), torch.randn(4, 5, 4, generator=g, dtype=DT)
    else:
        sy, qy = torch.randint(0, 4, (4, 6), generator=g), torch.randint(0, 4, (4, 5), generator=g)
    batch = (sx, sy, qx, qy)
    maml = BatchedMAML(model, inner_lr=[0.3, 0.1, 0.2] if steps == 3 and not meta_sgd else 0.3, inner_steps=steps,
                       first_order=first_order, meta_sgd=meta_sgd, loss=loss, fused=False)
    assert_path(maml, fused=False, exact_reverse=True)
    if meta_sgd:
        with torch.no_grad():
            maml.lrs.mul_(torch.rand_like(maml.lrs) + 0.5)
    extra = [maml.lrs] if meta_sgd else []
    out = maml(*batch)
    grads = torch.autograd.grad(out.loss * 1.7, list(model.parameters()) + extra)  # grad_output != 1
    lr = [0.3, 0.1, 0.2] if steps == 3 and not meta_sgd else 0.3
    lrs = None
    if meta_sgd:
        lrs = {s.name: maml.lrs[s.offset:s.offset + s.numel].view(s.shape) for s in maml._flat.slots}
    ref = torch.stack([per_task_maml(model, *(t[i:i + 1] for t in batch), lr, steps, first_order, loss, lrs=lrs)
                       for i in range(4)])
    params = list(model.parameters()) + extra
    ref_grads = torch.autograd.grad(ref.mean() * 1.7, params, allow_unused=True)  # lrs unused at 0 steps
    ref_grads = [torch.zeros_like(p) if r is None else r for p, r in zip(params, ref_grads)]
    assert rel_err(out.task_losses, ref.detach()) <= TOL
    err = rel_err(flat(grads), flat(ref_grads))
    assert err <= TOL, f"meta-gradient rel. err {err:.2e}"


def test_per_step_lr_and_grad_clip():
    model, batch, loss = make("mlp")
    maml = BatchedMAML(model, inner_lr=[0.2, 0.05], inner_steps=2, clip_grad_norm=0.3)
    out, grads = meta_grads(maml, batch)
    ref = per_task_maml(model, *batch, [0.2, 0.05], 2, max_norm=0.3)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert rel_err(flat(grads), flat(ref_grads)) <= TOL
    # the clip really binds at this norm
    unclipped = per_task_maml(model, *batch, [0.2, 0.05], 2)
    assert abs(unclipped.item() - ref.item()) > 1e-6


def test_second_order_differs_from_first_order():
    model, batch, loss = make("conv4_bn")
    g2 = meta_grads(BatchedMAML(model, 0.3, 1, loss=loss), batch)[1]
    g1 = meta_grads(BatchedMAML(model, 0.3, 1, first_order=True, loss=loss), batch)[1]
    assert rel_err(flat(g1), flat(g2)) > 1e-3


def test_adapt_and_predict_match_per_task_adaptation():
    model, batch, loss = make("conv4_bn")
    sx, sy, qx, qy = batch
    maml = BatchedMAML(model, 0.3, 1, loss=loss)
    fast = maml.adapt(sx, sy, steps=4)
    pred = maml.predict(fast, qx)
    assert not pred.requires_grad
    _, params = per_task_maml(model, *batch, 0.3, 4, first_order=True, loss=loss, return_params=True)
    from torch.func import functional_call

    for t in range(sx.shape[0]):
        want = functional_call(model, params[t], (qx[t],))
        assert rel_err(pred[t], want) <= TOL
    # zero steps = the meta-parameters themselves
    pred0 = maml.predict(maml.adapt(sx, sy, steps=0), qx)
    assert rel_err(pred0[1], model(qx[1])) <= TOL


def test_task_accuracies_and_losses():
    model, batch, loss = make("conv4_bn")
    out = BatchedMAML(model, 0.3, 2, loss=loss)(*batch)
    assert out.task_losses.shape == (3,) and out.task_accuracies.shape == (3,)
    assert ((out.task_accuracies >= 0) & (out.task_accuracies <= 1)).all()
    assert abs(out.task_losses.mean().item() - out.loss.item()) < 1e-12


class Residual(nn.Module):
    """A module the batched executor doesn't know: runs per task through vmap."""

    def __init__(self, width, bn=False):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width, track_running_stats=False) if bn else None

    def forward(self, x):
        h = self.lin(x)
        if self.bn is not None:
            h = self.bn(h)
        return x + torch.tanh(h)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("first_order", [False, True])
def test_unknown_modules_fall_back_exactly(bn, first_order):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 6), nn.GELU(), Residual(6, bn), nn.Linear(6, 1)).to(DT)
    batch = regression_batch()
    maml = BatchedMAML(model, 0.1, 2, first_order=first_order)
    out, grads = meta_grads(maml, batch)
    ref = per_task_maml(model, *batch, 0.1, 2, first_order)
    assert rel_err(flat(grads), flat(torch.autograd.grad(ref, list(model.parameters())))) <= TOL
    assert "Generic" in maml.describe()


def test_custom_loss_callable():
    model, batch, _ = make("mlp")

    def l1ish(out, y):  # smooth, per-task
        return ((out - y) ** 2 + 1).sqrt().flatten(1).mean(1)

    maml = BatchedMAML(model, 0.1, 2, loss=l1ish)
    out, grads = meta_grads(maml, batch)
    ref = 0.0
    # per-task reference with the same loss
    from torch.func import functional_call

    params = dict(model.named_parameters())
    sx, sy, qx, qy = batch
    for t in range(sx.shape[0]):
        p = dict(params)
        for _ in range(2):
            l = l1ish(functional_call(model, p, (sx[t:t + 1][0],)).unsqueeze(0), sy[t:t + 1])[0]
            gs = torch.autograd.grad(l, list(p.values()), create_graph=True)
            p = {n: w - 0.1 * g for (n, w), g in zip(p.items(), gs)}
        ref = ref + l1ish(functional_call(model, p, (qx[t],)).unsqueeze(0), qy[t:t + 1])[0]
    ref = ref / sx.shape[0]
    assert rel_err(flat(grads), flat(torch.autograd.grad(ref, list(model.parameters())))) <= TOL


def test_parameters_are_views_of_one_flat_buffer():
    model = MLP(1, [40, 40], 1)
    maml = BatchedMAML(model)
    buf = maml._flat.buffer
    assert buf.numel() == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert buf[0].item() == next(model.parameters()).reshape(-1)[0].item()
    # an optimizer step moves the buffer; .double() rebinds
    model.double()
    out = maml(*regression_batch())
    assert out.loss.dtype == DT and maml._flat.buffer.dtype == DT


def test_meta_training_reduces_query_loss():
    torch.manual_seed(0)
    from metafast.data.sinusoid import SinusoidTasks

    tasks = SinusoidTasks()
    gen = torch.Generator().manual_seed(0)
    maml = BatchedMAML(MLP(1, [40, 40], 1), 0.01, 1)
    opt = torch.optim.Adam(maml.parameters(), 1e-3)
    losses = []
    for _ in range(800):
        sx, sy, qx, qy = tasks.sample(25, 10, 10, generator=gen)[:4]
        out = maml(sx, sy, qx, qy)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    assert last < 0.6 * first, (first, last)
