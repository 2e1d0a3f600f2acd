"""ResNet-12 through BatchedMAML (against a per-task autograd loop) and the few-shot vision job:
`metafast train --dataset ...` on tiny fixtures, best-checkpoint keeping, exact resume, `metafast eval`."""
import json
import os

import pytest
import torch

from maml_reference import per_task_maml
from metafast import BatchedMAML
from metafast.models.resnet12 import ResNet12

DT = torch.float64


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------- ResNet-12
def test_resnet12_shapes_and_structure():
    m = ResNet12(5, in_channels=3, widths=(3, 4, 5, 6), image_size=33)
    y = m(torch.randn(2, 3, 33, 33))
    assert y.shape == (2, 5)
    big = ResNet12.miniimagenet(5)
    convs = [mod for mod in big.modules() if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (3, 3)]
    assert len(convs) == 12 and [c.out_channels for c in convs[2::3]] == [64, 160, 320, 640]
    assert all(isinstance(mod.act, torch.nn.LeakyReLU) and mod.act.negative_slope == 0.1 for mod in list(big)[:4])
    flat = ResNet12(3, in_channels=1, widths=(2, 2, 2, 2), image_size=32, avg_pool=False)
    assert flat[-1].in_features == 2 * 2 * 2
    with pytest.raises(ValueError, match="image_size"):
        ResNet12(5, image_size=15)
    with pytest.raises(ValueError, match="widths"):
        ResNet12(5, widths=(1, 2, 3))


@pytest.mark.parametrize("first_order,steps", [(False, 2), (True, 1)])
def test_resnet12_meta_gradients_match_per_task_loop(first_order, steps):
    torch.manual_seed(0)
    model = ResNet12(3, in_channels=2, widths=(2, 3, 2, 3), image_size=17).to(DT)  # odd size: 17 -> 8 -> 4 -> 2 -> 1
    g = torch.Generator().manual_seed(4)
    T, S, Q = 2, 3, 2
    sx = torch.randn(T, S, 2, 17, 17, generator=g, dtype=DT)
    qx = torch.randn(T, Q, 2, 17, 17, generator=g, dtype=DT)
    sy = torch.randint(0, 3, (T, S), generator=g)
    qy = torch.randint(0, 3, (T, Q), generator=g)
    lr = 0.3
    maml = BatchedMAML(model, inner_lr=lr, inner_steps=steps, first_order=first_order, loss="cross_entropy")
    out = maml(sx, sy, qx, qy)
    params = list(model.parameters())
    grads = torch.autograd.grad(out.loss * 1.7, params)  # grad_output != 1
    ref_loss = per_task_maml(model, sx, sy, qx, qy, lr, steps, first_order=first_order, loss="cross_entropy")
    ref = torch.autograd.grad(ref_loss * 1.7, params)
    assert abs(out.loss.item() - ref_loss.item()) <= 1e-12 * abs(ref_loss.item())
    names = [n for n, _ in model.named_parameters()]
    for n, a, b in zip(names, grads, ref):
        assert rel_err(a, b) <= 1e-9, f"{n}: rel err {rel_err(a, b):.3g}"
