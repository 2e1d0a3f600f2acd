"""ResNet-12 on the batched graph executor: meta-gradients equal the float64 per-task autograd
reference (rel. err <= 1e-10), exact reverse and autograd through the unrolled loop, first and second
order, Meta-SGD, 1 and 3 steps; narrow and wide widths on small images."""
import pytest
import torch

from metafast import BatchedMAML
from metafast.functional.graph.model import GraphModel
from metafast.models import ResNet12
from metafast.models.resnet12 import NARROW, WIDE
from test_batched_maml import DT, TOL, flat, image_batch, reference, rel_err


def meta_gradient(model, batch, steps, first_order, meta_sgd, exact_reverse=True, anil=False, lr=0.3):
    maml = BatchedMAML(model, inner_lr=lr, inner_steps=steps, first_order=first_order, meta_sgd=meta_sgd,
                       anil=anil, loss="cross_entropy", exact_reverse=exact_reverse)
    if meta_sgd:  # distinct per-element rates, so a mix-up of lrs would show
        with torch.no_grad():
            maml.lrs.mul_(torch.rand_like(maml.lrs) + 0.5)
    params = list(model.parameters()) + ([maml.lrs] if meta_sgd else [])
    out = maml(*batch)
    return maml, out, flat(torch.autograd.grad(out.loss * 1.7, params)), params  # grad_output != 1


def check(model, batch, steps, first_order, meta_sgd, exact_reverse=True, anil=False, lr=0.3):
    maml, out, g, params = meta_gradient(model, batch, steps, first_order, meta_sgd, exact_reverse, anil, lr)
    assert isinstance(maml._engine, GraphModel)
    assert maml.exact_reverse == exact_reverse
    assert ("exact reverse" in maml.describe()) == maml.exact_reverse
    ref = reference(maml, batch, lr, steps, first_order, "cross_entropy")
    assert abs(out.loss.item() - ref.item()) <= TOL * abs(ref.item())
    err = rel_err(g, flat(torch.autograd.grad(ref * 1.7, params)))
    assert err <= TOL, f"meta-gradient rel. err vs per-task reference {err:.2e}"
    return maml


def tiny(avg_pool=True):
    return ResNet12(3, in_channels=2, widths=(3, 4, 5, 6), image_size=16, avg_pool=avg_pool).to(DT)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("meta_sgd", [False, True])
@pytest.mark.parametrize("exact_reverse", [True, False])
def test_tiny_resnet12_matches_reference(steps, first_order, meta_sgd, exact_reverse):
    maml = check(tiny(), image_batch(H=16), steps, first_order, meta_sgd, exact_reverse)
    # every node batched: no per-task fallback
    assert "per task" not in maml.describe()


def test_resnet12_flatten_head_matches_reference():
    check(tiny(avg_pool=False), image_batch(H=16), 2, False, False)


@pytest.mark.parametrize("widths", [NARROW, WIDE], ids=["narrow", "wide"])
def test_full_width_resnet12_second_order_matches_reference(widths):
    torch.manual_seed(0)
    model = ResNet12(3, in_channels=3, widths=widths, image_size=16).to(DT)
    batch = image_batch(T=2, S=3, Q=2, C=3, H=16)
    check(model, batch, 1, False, False, lr=0.1)


@pytest.mark.parametrize("first_order", [False, True])
def test_anil_resnet12_matches_reference(first_order):
    # the head is adapted, the body (all residual blocks) shared: the exact reverse of the head, the body by
    # autograd from its features' gradients (the full matrix: test_anil_exact_reverse.py)
    maml = check(tiny(), image_batch(H=16), 2, first_order, False, exact_reverse=True, anil=True)
    assert maml._engine.layers[maml._engine.adapt_from] is maml._engine.layers[-1]


def test_second_order_term_is_nonzero():
    batch = image_batch(H=16)
    torch.manual_seed(0)
    g2 = meta_gradient(tiny(), batch, 1, False, False)[2]
    torch.manual_seed(0)
    g1 = meta_gradient(tiny(), batch, 1, True, False)[2]
    assert rel_err(g1, g2) > 1e-3


def test_adapt_and_predict_match_the_per_task_adapted_model():
    torch.manual_seed(0)
    model = tiny()
    sx, sy, qx, qy = image_batch(H=16)
    maml = BatchedMAML(model, inner_lr=0.3, inner_steps=2, loss="cross_entropy")
    out = maml.predict(maml.adapt(sx, sy), qx)
    _, params = reference(maml, (sx, sy, qx, qy), 0.3, 2, True, "cross_entropy", return_params=True)
    from torch.func import functional_call

    for t in range(sx.shape[0]):
        ref = functional_call(model, params[t], (qx[t],))
        assert rel_err(out[t], ref) <= TOL


def test_narrow_and_wide_constructors():
    narrow, wide = ResNet12.narrow(5, image_size=32), ResNet12.wide(5, image_size=32)
    widths = [m.out_channels for m in narrow.modules() if isinstance(m, torch.nn.Conv2d)][::4]
    assert widths == list(NARROW)
    assert [m.out_channels for m in wide.modules() if isinstance(m, torch.nn.Conv2d)][::4] == list(WIDE)


@pytest.mark.parametrize("meta_sgd", [False, True])
def test_tiny_wide_resnet_matches_reference(meta_sgd):
    from metafast.models import WideResNet

    torch.manual_seed(0)
    model = WideResNet(3, depth=10, widen=1, in_channels=2).to(DT)
    maml = check(model, image_batch(H=8), 2, False, meta_sgd)
    assert "per task" not in maml.describe()


def test_wide_resnet_bad_arguments():
    from metafast.models import WideResNet

    with pytest.raises(ValueError, match="depth must be 6n"):
        WideResNet(5, depth=27)
