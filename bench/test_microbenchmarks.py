"""The kernel microbenchmarks under pytest-benchmark (see bench/conftest.py): one benchmark per
(op, case, implementation), the cases and implementations taken from bench/bench_<op>.py, each group
holding the baseline and metafast's implementation so `--benchmark-group-by=group` compares them.
Every case first checks that the implementation agrees with its baseline, so a wrong fast path fails
instead of being timed."""
import pytest
import torch

from bench import bench_inner_update, bench_kd_loss, bench_task_cross_entropy
from metafast import _backend
from metafast.ops import batch_norm as bn
from metafast.ops.inner_update import inner_update, inner_update_reference
from metafast.ops.to_nchw import to_nchw

CPU = torch.device("cpu")


def _bench(benchmark, group: str, fn, expected=None, check=None):
    benchmark.group = group
    if expected is not None:
        got = fn()
        (check or (lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)))(got, expected)
    benchmark(fn)


def _cxx_or_skip(op: str):
    backend, why = _backend.explain(op, "cpu")
    if backend != "cpp":
        pytest.skip(f"metafast._C's {op} CPU kernel does not run here ({why})")


# ---------------------------------------------------------------------------- inner_update
@pytest.mark.parametrize("T,P", bench_inner_update.CPU_SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("impl", ["reference", "dispatch"])
def test_inner_update(benchmark, T, P, impl):
    theta, grad, lr = bench_inner_update._make(T, P, torch.float32, CPU, "tensor", requires_grad=False)
    ref = lambda: inner_update_reference(theta, grad, lr, bench_inner_update.CLIP)  # noqa: E731
    fn = ref if impl == "reference" else (lambda: inner_update(theta, grad, lr, bench_inner_update.CLIP))
    _bench(benchmark, f"inner_update T={T} P={P}", fn, ref())


# ---------------------------------------------------------------------------- kd_loss
@pytest.mark.parametrize("shape", [s for s, _ in bench_kd_loss._cases(CPU, quick=True)], ids=str)
@pytest.mark.parametrize("impl", list(bench_kd_loss._impls(CPU)))
def test_kd_loss(benchmark, shape, impl):
    s, t = torch.randn(shape), torch.randn(shape)
    y = torch.randint(0, shape[1], (shape[0],))
    impls = bench_kd_loss._impls(CPU)
    _bench(benchmark, f"kd_loss {shape}", lambda: impls[impl](s, t, y), impls["eager"](s, t, y))


# ---------------------------------------------------------------------------- task_cross_entropy
@pytest.mark.parametrize("shape", [s for s, _ in bench_task_cross_entropy._cases(CPU, quick=True)], ids=str)
@pytest.mark.parametrize("impl", ["eager"] + list(bench_task_cross_entropy._fused_impls(CPU)))
def test_task_cross_entropy(benchmark, shape, impl):
    x = torch.randn(shape)
    y = torch.randint(0, shape[2], shape[:2])
    fns = {"eager": bench_task_cross_entropy.eager_per_task, **bench_task_cross_entropy._fused_impls(CPU)}
    _bench(benchmark, f"task_cross_entropy {shape}", lambda: fns[impl](x, y),
           bench_task_cross_entropy.eager_per_task(x, y))


# ---------------------------------------------------------------------------- C++ CPU kernels
@pytest.mark.parametrize("impl", ["aten", "cxx"])
def test_batch_norm(benchmark, impl):
    if impl == "cxx":
        _cxx_or_skip("batch_norm")
    shape = (5, 2048, 14, 14)  # bench_batch_norm's quick case: Conv4's task-grouped map
    x = torch.randn(shape) * 2 + 0.5
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    backend = "torch" if impl == "aten" else "cpp"
    _bench(benchmark, f"batch_norm {shape}", lambda: bn.forward(x, w, b, 1e-5, backend=backend),
           bn.forward(x, w, b, 1e-5, backend="torch"),
           check=lambda a, e: [torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4) for u, v in zip(a, e)])


@pytest.mark.parametrize("impl", ["torch", "cxx"])
def test_to_nchw(benchmark, impl):
    if impl == "cxx":
        _cxx_or_skip("to_nchw")
    x = torch.randn(5, 2048, 14, 14).contiguous(memory_format=torch.channels_last)  # bench_to_nchw's quick case
    fn = (lambda: x.contiguous()) if impl == "torch" else (lambda: to_nchw(x, backend="cpp"))
    _bench(benchmark, "to_nchw (5, 2048, 14, 14)", fn, x.contiguous(), check=lambda a, e: torch.testing.assert_close(
        a, e, rtol=0, atol=0))
