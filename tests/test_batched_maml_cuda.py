"""BatchedMAML on a GPU (fused ops, CUDA graphs) against the CPU float64 path."""
import warnings

import pytest
import torch

from metafast import BatchedMAML
from metafast.models import MLP, Conv4

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def omniglot_batch(T=8, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    sx = torch.randn(T, 5, 1, 28, 28, generator=g)
    qx = torch.randn(T, 5, 1, 28, 28, generator=g)
    y = torch.arange(5).repeat(T, 1)
    return sx.to(device, dtype), y.to(device), qx.to(device, dtype), y.to(device)


def meta_grad(maml, batch):
    maml.zero_grad(set_to_none=True)
    out = maml(*batch)
    out.loss.backward()
    return out, torch.cat([p.grad.reshape(-1) for p in maml.parameters()])


def test_cuda_graph_on_cpu_warns_once_and_runs_eagerly(monkeypatch):
    monkeypatch.delenv("METAFAST_STRICT", raising=False)  # a fallback: an error under METAFAST_STRICT=1
    torch.manual_seed(0)
    model = MLP(1, [8], 1)
    batch = [torch.randn(3, 4, 1) for _ in range(4)]
    eager = meta_grad(BatchedMAML(model, 0.1, 1), batch)[1]
    graphed = BatchedMAML(model, 0.1, 1, cuda_graph=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        g1 = meta_grad(graphed, batch)[1]
        meta_grad(graphed, batch)
    assert sum("cuda_graph" in str(x.message) for x in w) == 1
    assert torch.equal(g1, eager)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("first_order", [False, True])
def test_gpu_meta_gradient_matches_cpu_float64(first_order):
    torch.manual_seed(0)
    model = Conv4.omniglot(5)
    ref_model = Conv4.omniglot(5).double()
    ref_model.load_state_dict(model.state_dict())
    gpu = BatchedMAML(model.cuda(), 0.4, 2, first_order=first_order, loss="cross_entropy")
    ref = BatchedMAML(ref_model, 0.4, 2, first_order=first_order, loss="cross_entropy")
    out, g = meta_grad(gpu, omniglot_batch(device="cuda"))
    out_ref, g_ref = meta_grad(ref, omniglot_batch(dtype=torch.float64))
    assert abs(out.loss.item() - out_ref.loss.item()) < 1e-4 * abs(out_ref.loss.item())
    err = ((g.double().cpu() - g_ref).norm() / g_ref.norm()).item()
    assert err < 1e-3, err


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("model_kind", ["mlp", "conv4"])
def test_cuda_graph_equals_eager(model_kind):
    torch.manual_seed(0)
    if model_kind == "mlp":
        model = MLP(1, [40, 40], 1).cuda()
        batch = [torch.randn(25, 10, 1, device="cuda") for _ in range(4)]
        kw = dict(inner_lr=0.01, loss="mse")
    else:
        model = Conv4.omniglot(5).cuda()
        batch = omniglot_batch(device="cuda")
        kw = dict(inner_lr=0.4, loss="cross_entropy")
    eager = BatchedMAML(model, inner_steps=2, **kw)
    graphed = BatchedMAML(model, inner_steps=2, cuda_graph=True, **kw)
    out_e, g_e = meta_grad(eager, batch)
    for _ in range(3):  # capture, then replays
        out_g, g_g = meta_grad(graphed, batch)
        torch.testing.assert_close(out_g.loss, out_e.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_g, g_e, rtol=1e-4, atol=1e-6)
    # a new shape captures again, with one warning
    small = [t[:4] for t in batch]
    with pytest.warns(UserWarning, match="shapes changed"):
        out_s, g_s = meta_grad(graphed, small)
    torch.testing.assert_close(g_s, meta_grad(eager, small)[1], rtol=1e-4, atol=1e-6)
