"""BatchedMAML's meta-step paths (metafast/algorithms/paths): each path's verdict and reason for a few
configurations, that forcing a path runs that path (and its meta-gradient equals the others' in
float64), fallbacks, and that a changed setting is seen by the next step."""
import pytest
import torch
from torch import nn

from metafast import BatchedMAML
from metafast import fallback as fb
from metafast.algorithms import paths
from metafast.algorithms.paths import AutogradPath, CudaGraphPath, ExactReversePath, FusedPath, Where
from metafast.functional.losses import make_loss
from metafast.models import MLP, Conv4

CPU64 = (torch.device("cpu"), torch.float64)


def _fused_kernel_here() -> bool:
    dims, _ = paths.fused.plan(MLP(3, [5], 2).double(), make_loss("mse"), False, None, torch.float64,
                               torch.device("cpu"))
    return dims is not None


needs_fused = pytest.mark.skipif(not _fused_kernel_here(), reason="no fused kernel on the CPU here (metafast._C)")


@pytest.fixture(autouse=True)
def _not_strict(monkeypatch):
    monkeypatch.delenv(fb.STRICT_ENV, raising=False)


def verdicts(maml, steps=1, grad=True, adapt=False):
    """path name -> Support for a CPU float64 call."""
    return {p.name: p.supports(Where(*CPU64, steps, grad, adapt)) for p in maml._paths()}


def batch(T=4, n=3, d_in=3, d_out=2, classes=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, n, d_in, generator=g, dtype=torch.float64)
    qx = torch.randn(T, n + 1, d_in, generator=g, dtype=torch.float64)
    if classes:
        return sx, torch.randint(0, classes, (T, n), generator=g), qx, torch.randint(0, classes, (T, n + 1), generator=g)
    return sx, torch.randn(T, n, d_out, generator=g, dtype=torch.float64), qx, \
        torch.randn(T, n + 1, d_out, generator=g, dtype=torch.float64)


@pytest.fixture
def ran(monkeypatch):
    """The names of the paths whose run() / adapt() was called, in order."""
    names = []
    for cls in (FusedPath, ExactReversePath, AutogradPath, CudaGraphPath):
        for method in ("run", "adapt"):
            real = getattr(cls, method)

            def spy(self, *a, _real=real, **k):
                names.append(self.name)
                return _real(self, *a, **k)

            monkeypatch.setattr(cls, method, spy)
    return names


def meta_grad(maml, b, **kw):
    maml.zero_grad(set_to_none=True)
    out = maml(*b, **kw)
    out.loss.backward()
    return out, torch.cat([p.grad.reshape(-1) for p in maml.parameters()])


def test_the_order_of_the_paths():
    maml = BatchedMAML(MLP(3, [5], 2).double(), 0.1)
    assert [p.name for p in maml._paths()] == ["cuda_graph", "fused", "exact_reverse", "autograd"]


@pytest.mark.parametrize("kw,fused,exact", [
    (dict(), "fused inner loop", "exact reverse (R-operator"),
    (dict(fused=False), "fused=False", "exact reverse (R-operator"),
    (dict(exact_reverse=False), "fused inner loop", "exact_reverse=False"),
    (dict(anil=True), "anil=True", "exact reverse of the head (anil=True"),
    (dict(clip_grad_norm=1.0), "clip_grad_norm is set", "clip_grad_norm is set"),
    (dict(loss=lambda out, y: (out - y).abs().flatten(1).mean(1)), "the loss is a custom function",
     "the loss is a custom function"),
])
def test_mlp_reasons(kw, fused, exact):
    v = verdicts(BatchedMAML(MLP(3, [5], 2).double(), 0.1, **kw))
    if fused == "fused inner loop" and not _fused_kernel_here():
        fused = "no fused kernel"
    assert fused in v["fused"].reason and v["fused"].ok == fused.startswith("fused inner loop")
    assert exact in v["exact_reverse"].reason and v["exact_reverse"].ok == exact.startswith("exact reverse")
    assert v["autograd"].ok
    assert not v["cuda_graph"].ok and v["cuda_graph"].reason == "cuda_graph=False" and v["cuda_graph"].quiet


def test_other_models_and_calls_say_why():
    v = verdicts(BatchedMAML(nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)).double(), 0.1,
                             clip_grad_norm=1.0))
    assert "not a chain of Linear layers with ReLU" in v["fused"].reason and not v["fused"].ok
    assert not v["exact_reverse"].ok and "clip_grad_norm is set" in v["exact_reverse"].reason
    conv = BatchedMAML(Conv4(5, hidden=4, image_size=8).double(), 0.1, loss="cross_entropy")
    v = verdicts(conv)
    assert not v["fused"].ok and "not a chain" in v["fused"].reason and v["exact_reverse"].ok
    bf16 = verdicts(BatchedMAML(MLP(3, [5], 2), 0.1, precision="bf16"))
    assert not bf16["fused"].ok and "precision='bf16'" in bf16["fused"].reason
    maml = BatchedMAML(MLP(3, [5], 2).double(), 0.1)
    assert verdicts(maml, steps=0)["fused"].quiet  # nothing to fuse: no fallback
    nograd = verdicts(maml, grad=False)
    assert not nograd["exact_reverse"].ok and nograd["exact_reverse"].quiet
    adapt = verdicts(maml, grad=False, adapt=True)
    assert not adapt["exact_reverse"].ok and adapt["autograd"].ok and adapt["fused"].ok == _fused_kernel_here()
    graph = verdicts(BatchedMAML(MLP(3, [5], 2).double(), 0.1, cuda_graph=True))["cuda_graph"]
    assert not graph.ok and not graph.quiet and "not on a CUDA device" in graph.reason


@needs_fused
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_forcing_a_path_runs_it_and_every_path_agrees(ran, loss):
    classes = 4 if loss == "cross_entropy" else None
    torch.manual_seed(0)
    model = MLP(3, [6, 5], classes or 2).double()
    b = batch(classes=classes)
    forced = {"fused": dict(fused=True), "exact_reverse": dict(fused=False),
              "autograd": dict(fused=False, exact_reverse=False)}
    grads = {}
    for name, kw in forced.items():
        maml = BatchedMAML(model, 0.3, inner_steps=2, loss=loss, **kw)
        for _ in range(2):  # the second call takes the remembered signature
            del ran[:]
            out, grads[name] = meta_grad(maml, b)
            assert ran == [name], (kw, ran)
        assert f"> {name}: yes" in maml.describe()
    ref = grads["autograd"]
    for name in ("fused", "exact_reverse"):
        assert ((grads[name] - ref).norm() / ref.norm()).item() < 1e-10, name
    # the default runs the fused path where it applies; exact_reverse=False alone still fuses
    for kw in (dict(), dict(exact_reverse=False)):
        del ran[:]
        meta_grad(BatchedMAML(model, 0.3, inner_steps=2, loss=loss, **kw), b)
        assert ran == ["fused"]


def test_forcing_autograd_on_a_model_the_fused_op_cannot_run(ran):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    b = batch()
    g = {}
    for name, kw in (("exact_reverse", dict()), ("autograd", dict(exact_reverse=False))):
        del ran[:]
        g[name] = meta_grad(BatchedMAML(model, 0.2, inner_steps=3, **kw), b)[1]
        assert ran == [name]
    assert ((g["exact_reverse"] - g["autograd"]).norm() / g["autograd"].norm()).item() < 1e-10
    with pytest.raises(ValueError, match="fused=True: the fused inner loop cannot run this configuration: the model"):
        BatchedMAML(model, 0.2, fused=True)


def test_no_grad_and_adapt_take_the_unrolled_or_fused_path(ran):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    maml = BatchedMAML(model, 0.2, inner_steps=2)
    b = batch()
    with torch.no_grad():
        loss = maml(*b).loss
    assert ran == ["autograd"]
    assert abs(loss.item() - maml(*b).loss.item()) < 1e-12 and ran == ["autograd", "exact_reverse"]
    del ran[:]
    maml.adapt(b[0], b[1])
    assert ran == ["autograd"]
    if _fused_kernel_here():
        del ran[:]
        BatchedMAML(MLP(3, [5], 2).double(), 0.2).adapt(b[0], b[1])
        assert ran == ["fused"]


def test_a_changed_setting_is_seen_by_the_next_step(ran):
    model = MLP(3, [5], 2).double()
    maml = BatchedMAML(model, 0.2, inner_steps=2)
    b = batch()
    meta_grad(maml, b)
    first = ran[-1]
    maml.fused = False
    meta_grad(maml, b)
    assert ran[-1] == "exact_reverse" and first == ("fused" if _fused_kernel_here() else "exact_reverse")
    assert "meta-step: batched layers (fused=False)" in maml.describe()
    maml.exact_reverse = False
    assert not maml.exact_reverse
    meta_grad(maml, b)
    assert ran[-1] == "autograd"
    # Meta-SGD's rates reassigned: the next step uses the new ones
    sgd = BatchedMAML(model, 0.2, meta_sgd=True, fused=False)
    before = sgd(*b).loss.item()
    sgd.lrs = nn.Parameter(torch.zeros_like(sgd.lrs))
    after = sgd(*b).loss.item()
    plain = BatchedMAML(model, 0.0, fused=False)(*b).loss.item()
    assert after == pytest.approx(plain, rel=1e-12) and after != pytest.approx(before, rel=1e-6)


def test_cuda_graph_on_cpu_is_a_counted_fallback(ran, monkeypatch):
    maml = BatchedMAML(MLP(3, [5], 2).double(), 0.2, cuda_graph=True)
    b = batch()
    with pytest.warns(fb.FallbackWarning, match=r"cuda_graph=True\): inputs are not on a CUDA device"):
        meta_grad(maml, b)
    meta_grad(maml, b)  # once per configuration
    assert "cuda_graph" not in ran and len(ran) == 2
    assert "fallbacks: maml_path.cuda_graph x1" in maml.describe()
    monkeypatch.setenv(fb.STRICT_ENV, "1")
    with pytest.raises(fb.FallbackError, match="cuda_graph"):
        BatchedMAML(MLP(3, [5], 2).double(), 0.2, cuda_graph=True)(*b)


@needs_fused
def test_a_failed_self_check_is_a_fallback_and_strict_raises(monkeypatch):
    from metafast.ops import fused_inner_loop as op

    real = op.fused_inner_loop

    def broken(*args, backend=None, **kwargs):
        out = real(*args, backend=backend, **kwargs)
        return out if backend == "torch" else out._replace(query_loss=out.query_loss + 1e-2)

    monkeypatch.setattr(op, "fused_inner_loop", broken)
    monkeypatch.setattr(paths.fused, "_self_checks", {})
    monkeypatch.setattr(paths.fused, "plan", lambda *a, verify=None, _plan=paths.fused.plan: _plan(*a, verify=True))
    model = MLP(3, [5], 2).double()
    with pytest.warns(fb.FallbackWarning, match="self-check"):
        maml = BatchedMAML(model, 0.2)
        v = verdicts(maml)
    assert not v["fused"].ok and "self-check" in v["fused"].reason
    monkeypatch.setenv(fb.STRICT_ENV, "1")
    with pytest.raises(fb.FallbackError, match="self-check"):
        BatchedMAML(model, 0.2)(*batch())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_path_runs_on_a_gpu(ran):
    model = MLP(3, [5], 2).cuda()
    b = tuple(t.float().cuda() for t in batch())
    maml = BatchedMAML(model, 0.2, cuda_graph=True)
    for _ in range(2):
        del ran[:]
        meta_grad(maml, b)
        assert ran[0] == "cuda_graph"


def test_explain_paths_names_the_path_and_why_the_others_do_not_apply():
    from metafast.algorithms.batched_maml import explain_paths

    line = explain_paths(Conv4(5, hidden=4, image_size=8), "cross_entropy")
    assert line.startswith("exact_reverse: exact reverse (R-operator") and "not fused: the model is not a chain" in line
    custom = explain_paths(nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)),
                           lambda out, y: ((out - y) ** 4).flatten(1).mean(1))
    assert custom.startswith("autograd: ") and "exact_reverse: the loss is a custom function" in custom


def test_memory_low_runs_on_the_exact_reverse_and_elsewhere_is_a_counted_fallback(ran):
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)).double()
    maml = BatchedMAML(model, 0.2, memory="low", task_chunk=2, clip_grad_norm=1.0)
    b = batch()
    with pytest.warns(fb.FallbackWarning, match=r"memory='low', task_chunk=2\): clip_grad_norm is set"):
        meta_grad(maml, b)
    meta_grad(maml, b)  # once per choice
    assert ran == ["autograd", "autograd"] and "fallbacks: maml_path.exact_reverse x1" in maml.describe()
    del ran[:]
    mlp = MLP(3, [5], 2).double()
    low = BatchedMAML(mlp, 0.2, memory="low", task_chunk=3, fused=False)
    g_low = meta_grad(low, b)[1]
    assert ran == ["exact_reverse"] and "fallbacks: none" in low.describe()
    g_fast = meta_grad(BatchedMAML(mlp, 0.2, fused=False, exact_reverse=False), b)[1]
    assert ((g_low - g_fast).norm() / g_fast.norm()).item() < 1e-10
