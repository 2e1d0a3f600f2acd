"""metafast._backend: the registry (OPS, register, dispatch), what is available and why, METAFAST_BACKEND,
fallbacks through metafast.fallback (counted, FallbackWarning, errors under METAFAST_STRICT=1),
METAFAST_REQUIRE_EXT, and importing metafast without triton or the CUDA extension."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

from metafast import _backend, _ext_info, fallback
from metafast.ops.inner_update import inner_update, inner_update_reference


@pytest.fixture
def fresh(monkeypatch):
    """Clean probe/choice state, no METAFAST_BACKEND, strict mode as the suite sets it; restored afterwards."""
    monkeypatch.delenv(_backend.ENV, raising=False)
    _backend.reset()
    yield monkeypatch
    _backend.reset()


@pytest.fixture
def lenient(fresh):
    """As ``fresh``, with METAFAST_STRICT unset: fallbacks warn instead of raising."""
    fresh.delenv(fallback.STRICT_ENV, raising=False)
    return fresh


def simulate(monkeypatch, *, ext=True, triton=True, device=True, cuda_build=True):
    """Pretend the extension / triton / a CUDA device / the extension's CUDA kernels are (not) there."""
    monkeypatch.setattr(_backend, "_probe_extension",
                        lambda: (True, "metafast._C loaded") if ext else
                        (False, "metafast._C failed to import (ModuleNotFoundError: simulated)"))
    monkeypatch.setattr(_backend, "_probe_triton",
                        lambda: (True, "triton 9.9") if triton else
                        (False, "triton failed to import (ModuleNotFoundError: simulated)"))
    monkeypatch.setattr(_backend, "_probe_cuda_device",
                        lambda: (True, "1 CUDA device(s)") if device else (False, "no CUDA device is visible"))
    monkeypatch.setattr(_backend, "_ext_has", lambda symbol: True)
    info = {"cuda": cuda_build, "cuda_version": "13.0" if cuda_build else None, "torch": torch.__version__,
            "cxx11_abi": True, "openmp": True}
    monkeypatch.setattr(_ext_info, "build_info", lambda: info)
    _backend.reset()


def _resolve_recording(n, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [_backend.resolve(*args, **kwargs) for _ in range(n)]
    return results, [w for w in caught if issubclass(w.category, fallback.FallbackWarning)]


# ------------------------------------------------------------------------------------ the registry
def test_ops_list_every_op_module_and_its_registered_kernels():
    """OPS is the one list: each (op, backend) it names has registered kernels once the op modules are
    imported, and the registry never imported them itself."""
    import importlib

    for module in ("inner_update", "inner_update_multi", "fused_inner_loop", "task_cross_entropy", "kd_loss",
                   "multitask_heads", "batch_norm", "batch_norm_rop", "to_nchw"):
        importlib.import_module(f"metafast.ops.{module}")
    for op, backends in _backend.OPS.items():
        assert "torch" in backends, op
        for backend in backends:
            impl = _backend.implementation(op, backend)
            assert (impl.op, impl.backend) == (op, backend)
    with open(_backend.__file__) as f:
        source = f.read()
    assert "import metafast.ops" not in source and "from .ops" not in source and "_data" not in source


def test_register_checks_the_list_and_loads_lazily(fresh):
    with pytest.raises(KeyError, match="unknown op 'nope'"):
        _backend.register("nope", "torch", forward=lambda: None)
    with pytest.raises(ValueError, match="OPS lists no triton backend for batch_norm"):
        _backend.register("batch_norm", "triton", forward=lambda: None)
    fresh.setitem(_backend.OPS, "_test_op", {"triton": None, "torch": None})
    fresh.setitem(sys.modules, "_test_kernels_mod", None)  # importing it raises
    impl = _backend.register("_test_op", "triton", forward="_test_kernels_mod:fwd", other=len)
    try:
        assert impl.other is len
        with pytest.raises(ImportError):
            impl.forward  # noqa: B018 - the lazy kernel is imported on first access only
        with pytest.raises(AttributeError, match="_test_op has no kernel 'backward' on the triton backend"):
            impl.backward  # noqa: B018
    finally:
        _backend._impls.pop(("_test_op", "triton"), None)
    with pytest.raises(LookupError, match="no cuda implementation of _test_op is registered"):
        _backend.implementation("_test_op", "cuda")


def test_dispatch_returns_the_chosen_implementation(fresh):
    simulate(fresh)
    import metafast.ops.batch_norm  # noqa: F401  (registers batch_norm)

    assert _backend.dispatch("batch_norm", "cpu").backend == "cpp"
    assert _backend.dispatch("batch_norm", torch.device("cpu"), "torch") is _backend.implementation("batch_norm",
                                                                                                     "torch")


# --------------------------------------------------------------------------------------- choices
def test_auto_prefers_the_extension_on_cuda_and_cpp_on_cpu(fresh):
    simulate(fresh)
    results, caught = _resolve_recording(1, "inner_update", "cuda")
    assert results == ["cuda"] and caught == []
    assert _backend.resolve("fused_inner_loop", "cpu") == "cpp"
    assert _backend.resolve("inner_update", "cpu") == "torch"  # no C++ CPU kernel: the reference, no fallback
    assert _backend.resolve("inner_update", torch.device("cpu")) == "torch"
    name, why = _backend.explain("fused_inner_loop", "cpu")
    assert name == "cpp" and why.startswith("auto: metafast._C's C++ CPU kernel")


def test_cuda_and_cpp_are_different_backends(fresh):
    simulate(fresh)
    with pytest.raises(_backend.BackendUnavailableError, match="needs CUDA tensors, got cpu; metafast._C's C.. CPU "
                                                               "kernels are the cpp backend"):
        _backend.resolve("fused_inner_loop", "cpu", "cuda")
    fresh.setenv(_backend.ENV, "cuda")  # the value that used to mean the C++ CPU kernels too
    with pytest.raises(_backend.BackendUnavailableError, match=r"METAFAST_BACKEND=cuda.*the cpp backend"):
        _backend.resolve("fused_inner_loop", "cpu")
    fresh.setenv(_backend.ENV, "cpp")
    assert _backend.resolve("fused_inner_loop", "cpu") == "cpp"
    with pytest.raises(_backend.BackendUnavailableError, match="the cpp backend .* needs CPU tensors, got cuda"):
        _backend.resolve("fused_inner_loop", "cuda")


def test_extension_without_the_op_counts_as_missing(fresh):
    simulate(fresh, triton=False)
    fresh.setattr(_backend, "_ext_has", lambda symbol: False)
    with pytest.raises(_backend.BackendUnavailableError, match="built without metafast::inner_update_cuda"):
        _backend.resolve("inner_update", "cuda", "cuda")


def test_cpu_only_build_is_no_cuda_backend(lenient):
    """An extension built without CUDA registers fused_inner_loop_cxx (its C++ CPU kernel) too: CUDA
    tensors must not be routed to it. The build info, not the symbol, decides."""
    simulate(lenient, triton=True, device=True, cuda_build=False)
    assert _ext_info.cuda_built() is False
    avail = _backend.available()
    assert avail["cuda"][0] is False and "built without CUDA kernels" in avail["cuda"][1]
    assert avail["cpp"][0] is True
    with pytest.raises(_backend.BackendUnavailableError, match="fused_inner_loop on cuda.*built without CUDA kernels"):
        _backend.resolve("fused_inner_loop", "cuda", "cuda")
    results, caught = _resolve_recording(1, "fused_inner_loop", "cuda")
    assert results == ["triton"] and len(caught) == 1 and "cuda: metafast._C was built without CUDA" in str(
        caught[0].message)
    with pytest.warns(fallback.FallbackWarning, match="inner_update runs on the triton backend"):
        assert _backend.resolve("inner_update", "cuda") == "triton"
    assert _backend.resolve("fused_inner_loop", "cpu") == "cpp"  # the CPU kernels stay
    simulate(lenient, triton=True, device=True, cuda_build=True)  # the same binary with CUDA kernels
    assert _backend.resolve("fused_inner_loop", "cuda") == "cuda"
    assert _backend.available()["cuda"] == (True, "metafast._C loaded")


def test_explicit_cuda_without_extension_is_a_clear_error(fresh):
    simulate(fresh, ext=False)
    fresh.setenv(_backend.ENV, "cuda")
    with pytest.raises(_backend.BackendUnavailableError, match=r"METAFAST_BACKEND=cuda.*simulated"):
        _backend.resolve("inner_update", "cuda")
    with pytest.raises(_backend.BackendUnavailableError, match="METAFAST_BACKEND=cuda"):
        inner_update(torch.randn(4), torch.randn(2, 4), 0.1)


def test_explicit_triton(fresh):
    simulate(fresh, triton=False)
    with pytest.raises(_backend.BackendUnavailableError, match=r"backend='triton'.*triton failed to import"):
        _backend.resolve("inner_update", "cuda", "triton")
    simulate(fresh, triton=True, device=False)
    fresh.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(_backend.BackendUnavailableError, match="unless TRITON_INTERPRET=1"):
        _backend.resolve("inner_update", "cpu", "triton")
    fresh.setenv("TRITON_INTERPRET", "1")  # the memoised choice follows the variable
    assert _backend.resolve("inner_update", "cpu", "triton") == "triton"
    fresh.delenv("TRITON_INTERPRET")
    with pytest.raises(_backend.BackendUnavailableError, match="unless TRITON_INTERPRET=1"):
        _backend.resolve("inner_update", "cpu", "triton")


def test_env_backend_applies_to_the_ops_that_have_it(fresh):
    simulate(fresh)
    fresh.setenv(_backend.ENV, "triton")
    fresh.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("inner_update", "cpu") == "triton"
    assert _backend.resolve("batch_norm", "cpu") == "torch"  # no Triton kernel: its reference, not an error
    assert "does not implement" in _backend.explain("batch_norm", "cpu")[1]
    with pytest.raises(_backend.BackendUnavailableError, match="batch_norm has no triton implementation"):
        _backend.resolve("batch_norm", "cpu", "triton")  # named by the argument: must run


@pytest.mark.parametrize("value", ["bogus", "CUDA-ext", "1"])
def test_bogus_env_value_is_a_clear_error(fresh, value):
    fresh.setenv(_backend.ENV, value)
    with pytest.raises(ValueError, match=r"METAFAST_BACKEND must be one of auto, cuda, cpp, triton, torch; got"):
        _backend.resolve("inner_update", "cpu")
    with pytest.raises(ValueError, match="METAFAST_BACKEND must be one of"):
        inner_update(torch.randn(4), torch.randn(2, 4), 0.1)


@pytest.mark.parametrize("value", ["torch", "TORCH", " auto ", ""])
def test_env_values_accepted(fresh, value, assert_close):
    fresh.setenv(_backend.ENV, value)
    assert _backend.resolve("inner_update", "cpu") == "torch"
    theta, grad = torch.randn(5), torch.randn(3, 5)
    assert_close(inner_update(theta, grad, 0.2), inner_update_reference(theta, grad, 0.2), 0, 0, "fast")


def test_unknown_op_is_a_clear_error(fresh):
    with pytest.raises(KeyError, match="unknown op 'inner_updat'"):
        _backend.resolve("inner_updat", "cpu")


# ------------------------------------------------------------------------------------- fallbacks
def test_extension_missing_falls_back_to_torch_with_one_counted_warning(lenient):
    simulate(lenient, ext=False, triton=False)
    before = fallback.counts().get("metafast._C missing", 0)
    results, caught = _resolve_recording(3, "inner_update", "cuda")
    assert results == ["torch"] * 3
    assert len(caught) == 1, [str(w.message) for w in caught]  # the choice is remembered, not re-reported
    msg = str(caught[0].message)
    assert "simulated" in msg and "cuda:" in msg and "triton:" in msg
    assert fallback.counts()["metafast._C missing"] == before + 1
    # another op that would have used the extension reports its own fallback
    results, caught = _resolve_recording(1, "fused_inner_loop", "cpu")
    assert results == ["torch"] and len(caught) == 1 and "cpp: metafast._C failed" in str(caught[0].message)


def test_extension_missing_falls_back_to_triton_on_gpu(lenient):
    simulate(lenient, ext=False, triton=True)
    results, caught = _resolve_recording(2, "inner_update", "cuda")
    assert results == ["triton", "triton"]
    assert len(caught) == 1 and "metafast._C failed to import" in str(caught[0].message)


def test_a_fallback_is_an_error_under_strict_mode(fresh):
    assert fallback.strict()  # tests/conftest.py runs the suite strict
    simulate(fresh, ext=False, triton=False)
    with pytest.raises(fallback.FallbackError, match=r"inner_update runs on the torch backend.*METAFAST_STRICT=1"):
        _backend.resolve("inner_update", "cuda")
    with pytest.raises(fallback.FallbackError, match="cpp: metafast._C failed to import"):
        _backend.resolve("fused_inner_loop", "cpu")
    # a fallback remembered while lenient still raises once strict again
    fresh.delenv(fallback.STRICT_ENV)
    with pytest.warns(fallback.FallbackWarning):
        assert _backend.resolve("to_nchw", "cpu") == "torch"
    fresh.setenv(fallback.STRICT_ENV, "1")
    with pytest.raises(fallback.FallbackError):
        _backend.resolve("to_nchw", "cpu")


def test_ops_without_the_skipped_backend_do_not_fall_back(fresh):
    simulate(fresh, ext=False, triton=True, device=True)
    assert _backend.resolve("batch_norm", "cuda") == "torch"  # batch_norm has no CUDA or Triton kernel
    assert _backend.resolve("inner_update", "cpu") == "torch"


# ------------------------------------------------------------------------------- what is there
def test_torch_is_always_available_and_reasons_are_kept(fresh):
    simulate(fresh, ext=False, triton=False, device=False)
    avail = _backend.available()
    assert set(avail) == {"cuda", "cpp", "triton", "torch"}
    assert avail["torch"][0] is True
    assert avail["cuda"] == (False, "metafast._C failed to import (ModuleNotFoundError: simulated)")
    assert avail["cpp"] == avail["cuda"]
    assert avail["triton"][0] is False and "simulated" in avail["triton"][1]
    simulate(fresh, ext=True, triton=True, device=False)
    fresh.delenv("TRITON_INTERPRET", raising=False)
    avail = _backend.available()
    assert avail["cpp"][0] is True
    assert avail["cuda"][0] is False and "no CUDA device" in avail["cuda"][1]
    assert avail["triton"][0] is False and "no CUDA device" in avail["triton"][1]


def test_describe_reports_per_op_choice_reasons_and_fallbacks(lenient):
    report = _backend.describe()
    for key in ("torch", "triton", "metafast._C", "cuda device", "backends", "ops", "fallbacks", _backend.ENV):
        assert key in report
    assert report["torch"] == torch.__version__
    assert set(report["ops"]) == set(_backend.OPS)
    assert report["ops"]["inner_update"]["cpu"] == ("torch (auto: inner_update has no kernel for cpu tensors, so "
                                                     "its PyTorch reference runs)")
    assert report["ops"]["inner_update"]["implements"] == "cuda, triton, torch"
    assert set(report["ops"]["inner_update"]) == {"implements", "cpu", "cuda"}
    simulate(lenient, ext=False, triton=False)
    report = _backend.describe()  # describing reports no fallback itself
    assert report["ops"]["inner_update"]["cuda"].startswith("torch (auto: the PyTorch reference; not cuda:")
    assert report["ops"]["fused_inner_loop"]["cpu"].startswith("torch (auto: the PyTorch reference; not cpp:")
    assert "simulated" in report["metafast._C"]
    with pytest.warns(fallback.FallbackWarning):
        _backend.resolve("fused_inner_loop", "cpu")
    assert _backend.describe()["fallbacks"]["metafast._C missing"] >= 1


def test_info_prints_each_ops_choice_and_the_fallback_counts(lenient, capsys):
    from metafast import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "inner_update:" in out and "implements: cuda, triton, torch" in out and "cpu: torch (auto:" in out
    assert "fallbacks:" in out


# ---------------------------------------------------------------------------- without natives
_NO_NATIVE_SCRIPT = r"""
import importlib.abc, os, sys, warnings

class Block(importlib.abc.MetaPathFinder):
    # make `import triton` and `import metafast._C` fail as if neither were installed
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton.") or name == "metafast._C":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
        return None

sys.meta_path.insert(0, Block())
import torch
if os.environ.get("METAFAST_REQUIRE_EXT") == "1":
    try:
        import metafast
    except ImportError as e:
        print("IMPORT ERROR", e)
        sys.exit(0)
    sys.exit("import metafast succeeded without the extension")
import metafast
from metafast import _backend, _ext_info, fallback
from metafast.ops.inner_update import inner_update
from metafast.ops.inner_update_multi import inner_update_multi
from metafast.ops.to_nchw import to_nchw
assert "triton" not in sys.modules
avail = _backend.available()
assert not avail["cuda"][0] and "blocked" in avail["cuda"][1], avail
assert not avail["triton"][0] and "blocked" in avail["triton"][1], avail
out = inner_update(torch.zeros(3), torch.ones(2, 3), 0.5)
assert torch.equal(out, torch.full((2, 3), -0.5)), out
outs = inner_update_multi([torch.zeros(2)], [torch.ones(2)], 0.5)
assert torch.equal(outs[0], torch.full((2,), -0.5))
x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert torch.equal(to_nchw(x), x.contiguous())  # its C++ kernel is missing: a counted fallback
assert [w.category for w in caught] == [fallback.FallbackWarning], caught
report = _backend.describe()
print("OK", report["ops"]["inner_update"], report["fallbacks"])
"""


def _run_without_natives(**env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", _backend.ENV, fallback.STRICT_ENV,
                                                             _backend.REQUIRE_EXT_ENV)}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", _NO_NATIVE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)


def test_import_and_cpu_path_work_without_triton_or_extension():
    out = _run_without_natives()
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.startswith("OK") and "'metafast._C missing': 1" in out.stdout, out.stdout


def test_require_ext_makes_a_missing_extension_an_import_error():
    out = _run_without_natives(METAFAST_REQUIRE_EXT="1")
    assert out.returncode == 0, out.stderr[-4000:] + out.stdout
    assert "IMPORT ERROR METAFAST_REQUIRE_EXT=1 requires the C++/CUDA extension, but metafast._C failed to import" \
        in out.stdout, out.stdout


def test_require_ext_passes_with_the_extension():
    ok, why = _backend.extension()
    if not ok:
        pytest.skip(f"metafast._C is not built here: {why}")
    env = {**os.environ, _backend.REQUIRE_EXT_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", "import metafast, sys; print('_C' in dir(metafast))"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-4000:]
