"""conv_grad.input_grad: the channels_last transposed-convolution route for strided input gradients on
CPU equals convolution_backward (float64 reference), and is the route actually taken."""
import pytest
import torch
import torch.nn.functional as F

from metafast import BatchedMAML
from metafast.functional import conv_grad
from metafast.models import Conv4
from meta_paths import assert_path

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (the route's reason)")

# (N, Cin, H, W, Cout, kernel, stride, padding, dilation, groups)
CASES = [
    (3, 8, 14, 14, 6, 3, 2, 1, 1, 1),  # Conv4's shape, small
    (2, 4, 13, 15, 5, 3, 2, 1, 1, 1),  # odd, non-square map: the stride skips a row and a column
    (2, 6, 16, 16, 3, 4, 3, 1, 1, 1),  # stride 3, 4x4 kernel
    (2, 4, 17, 17, 4, 3, 2, 2, 2, 1),  # dilated
    (2, 8, 12, 12, 8, 3, (2, 1), 1, 1, 4),  # grouped, stride only along H
]


def _ref(gy, x, w, stride, padding, dilation, groups):
    return torch.ops.aten.convolution_backward(gy.double(), x.double(), w.double(), None, stride, padding, dilation,
                                               False, [0, 0], groups, [True, False, False])[0]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_input_grad_matches_convolution_backward(case, monkeypatch):
    n, cin, h, w_, cout, k, s, p, d, g = case
    stride, padding, dilation = [s, s] if isinstance(s, int) else list(s), [p, p], [d, d]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, w_, generator=gen)
    w = torch.randn(cout, cin // g, k, k, generator=gen)
    gy = torch.randn_like(F.conv2d(x, w, None, stride, padding, dilation, g))
    monkeypatch.setattr(conv_grad, "MIN_PIXELS", 1)
    calls = []
    real = F.conv_transpose2d
    monkeypatch.setattr(conv_grad.F, "conv_transpose2d", lambda *a: calls.append(1) or real(*a))
    gx = conv_grad.input_grad(gy, x, w, stride, padding, dilation, g)
    assert calls, "the channels_last route was not taken"
    assert gx.shape == x.shape and gx.is_contiguous() and gx.dtype == torch.float32
    ref = _ref(gy, x, w, stride, padding, dilation, g)
    assert ((gx.double() - ref).norm() / ref.norm()).item() < 1e-6


def test_small_maps_and_other_dtypes_keep_convolution_backward(monkeypatch):
    calls = []
    real = F.conv_transpose2d
    monkeypatch.setattr(conv_grad.F, "conv_transpose2d", lambda *a: calls.append(1) or real(*a))
    w = torch.randn(4, 4, 3, 3)
    for x in (torch.randn(2, 4, 6, 8), torch.randn(2, 4, 14, 14, dtype=torch.float64)):  # 48 pixels; float64
        gy = torch.randn_like(F.conv2d(x, w.to(x.dtype), None, 2, 1))
        gx = conv_grad.input_grad(gy, x, w.to(x.dtype), [2, 2], [1, 1], [1, 1], 1)
        ref = _ref(gy, x, w, [2, 2], [1, 1], [1, 1], 1)
        assert ((gx.double() - ref).norm() / ref.norm()).item() < 1e-6
    assert not calls
    x = torch.randn(2, 4, 7, 7)  # 49 pixels: Conv4's 7x7 layer takes the route
    assert conv_grad._channels_last_route(x, x.shape, [2, 2]) and not conv_grad._channels_last_route(x, x.shape, [1, 1])


@pytest.mark.parametrize("exact_reverse", [True, False], ids=["exact-reverse", "autograd"])
def test_conv4_meta_gradient_same_with_and_without_the_route(exact_reverse, monkeypatch):
    """Both second-order paths (the exact reverse, and autograd's double backward through the route's
    transposed convolution) give the same float32 meta-gradient with the route as without."""
    torch.manual_seed(0)
    model = Conv4.omniglot(5)
    maml = BatchedMAML(model, inner_lr=0.4, inner_steps=1, loss="cross_entropy", exact_reverse=exact_reverse,
                       fused=False)
    assert_path(maml, fused=False, exact_reverse=exact_reverse)
    sx, qx = torch.rand(4, 5, 1, 28, 28), torch.rand(4, 5, 1, 28, 28)
    sy = qy = torch.arange(5).repeat(4, 1)

    def grads():
        return torch.cat([g.flatten() for g in torch.autograd.grad(maml(sx, sy, qx, qy).loss, model.parameters())])

    calls = []
    real = F.conv_transpose2d
    monkeypatch.setattr(conv_grad.F, "conv_transpose2d", lambda *a: calls.append(1) or real(*a))
    on = grads()
    assert calls  # Conv4's 14x14 layer takes the route
    monkeypatch.setattr(conv_grad, "MIN_PIXELS", 10 ** 9)
    off = grads()
    assert ((on - off).norm() / off.norm()).item() < 1e-5
