"""The exact reverse (R-operator Hessian-vector products) on CNNs: Conv2d, BatchNorm, MaxPool2d.

Each configuration is compared, in float64 (rel. err <= 1e-10), with the per-task autograd reference
and with BatchedMAML's autograd path through the unrolled inner loop.
"""
import pytest
import torch
from torch import nn

from metafast import BatchedMAML
from meta_paths import assert_path
from test_batched_maml import DT, TOL, flat, image_batch, make, rel_err, reference


def conv_out_model():
    """Output still in the tasks-in-channels layout: a dense-prediction head, MSE on [T, N, 2, 9, 9]."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False), nn.Tanh(),
                          nn.Conv2d(3, 2, 3, padding=1)).to(DT)
    sx, _, qx, _ = image_batch()
    g = torch.Generator().manual_seed(4)
    sy, qy = (torch.randn(*x.shape[:2], 2, 9, 9, generator=g, dtype=DT) for x in (sx, qx))
    return model, (sx, sy, qx, qy), "mse"


def no_affine_model():
    """BatchNorm without affine weights, followed by max-pooling."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1),
                          nn.BatchNorm2d(4, affine=False, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(16, 3)).to(DT)
    return model, image_batch(), "cross_entropy"


def running_stats_model():
    """BatchNorm in eval mode with stored running statistics (they normalise every task)."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(100, 3)).to(DT)
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return model.eval(), image_batch(), "cross_entropy"


def strided_model():
    """Strided convolutions after the first, whose input gradients the reverse needs: stride 2 on an
    odd 13x13 map, stride 3 with a 4x4 kernel on 12x12."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                          nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 2, padding=3),
                          nn.Tanh(), nn.Conv2d(3, 3, 4, stride=3, padding=1), nn.Flatten(),
                          nn.Linear(48, 3)).to(DT)
    return model, image_batch(H=13), "cross_entropy"


def build(kind):
    extra = {"conv_out": conv_out_model, "no_affine": no_affine_model, "running_stats": running_stats_model,
             "strided": strided_model}
    return extra[kind]() if kind in extra else make(kind)


def meta_gradient(kind, exact_reverse, steps, first_order, meta_sgd, anil=False, make_model=build, **kw):
    """``make_model(kind)`` -> (model, batch, loss); ``kw``: more BatchedMAML settings."""
    torch.manual_seed(0)
    model, batch, loss = make_model(kind)
    lr = 0.1 if loss == "mse" else 0.3
    maml = BatchedMAML(model, inner_lr=lr, inner_steps=steps, first_order=first_order, meta_sgd=meta_sgd, anil=anil,
                       loss=loss, exact_reverse=exact_reverse, fused=False, **kw)
    assert_path(maml, fused=False, exact_reverse=exact_reverse)
    if meta_sgd:  # distinct per-element rates, so a mix-up of lrs would show
        with torch.no_grad():
            maml.lrs.mul_(torch.rand_like(maml.lrs) + 0.5)
    params = list(model.parameters()) + ([maml.lrs] if meta_sgd else [])
    out = maml(*batch)
    grads = torch.autograd.grad(out.loss * 1.7, params)  # grad_output != 1
    return maml, (batch, lr, loss), out, flat(grads), params


@pytest.mark.parametrize("kind", ["conv4_bn", "conv4_pool", "mlp_bn", "conv_out", "no_affine", "running_stats",
                                  "strided"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("meta_sgd", [False, True])
def test_exact_reverse_matches_reference_and_autograd_path(kind, steps, first_order, meta_sgd):
    maml, (batch, lr, loss), out, g, params = meta_gradient(kind, True, steps, first_order, meta_sgd)
    ref = reference(maml, batch, lr, steps, first_order, loss)
    ref_g = flat(torch.autograd.grad(ref * 1.7, params))
    assert abs(out.loss.item() - ref.item()) <= TOL * abs(ref.item())
    err = rel_err(g, ref_g)
    assert err <= TOL, f"meta-gradient rel. err vs per-task reference {err:.2e}"
    g_autograd = meta_gradient(kind, False, steps, first_order, meta_sgd)[3]
    err = rel_err(g, g_autograd)
    assert err <= TOL, f"meta-gradient rel. err vs the autograd path {err:.2e}"


def test_in_place_relu_leaves_the_inputs_alone():
    # ReLU runs in place only on fresh tensors of the layer before, never on the inputs (negative entries)
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(75, 3)).to(DT)
    batch, loss = image_batch(), "cross_entropy"
    before = [t.clone() for t in batch]
    maml = BatchedMAML(model, inner_lr=0.3, inner_steps=2, loss=loss)
    maml(*batch).loss.backward()
    maml.adapt(batch[0], batch[1], steps=2)
    assert (batch[0] < 0).any()
    for t, b in zip(batch, before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("first_order", [False, True])
def test_anil_conv4_takes_exact_reverse_and_matches_reference(first_order):
    # the head's reverse hands the body its features' gradients (the full matrix: test_anil_exact_reverse.py)
    maml, (batch, lr, loss), out, g, params = meta_gradient("conv4_bn", True, 2, first_order, False, anil=True)
    assert maml.exact_reverse  # the path itself: asserted in meta_gradient
    ref = reference(maml, batch, lr, 2, first_order, loss)
    assert rel_err(g, flat(torch.autograd.grad(ref * 1.7, params))) <= TOL


def test_second_order_term_is_nonzero_through_batch_norm():
    # guards against an R-operator that silently drops the batch-statistics terms
    g2 = meta_gradient("conv4_bn", True, 1, False, False)[3]
    g1 = meta_gradient("conv4_bn", True, 1, True, False)[3]
    assert rel_err(g1, g2) > 1e-3
