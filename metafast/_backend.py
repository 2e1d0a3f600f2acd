"""The backend registry: which implementation of an op runs on a device, and why.

Backends (names say what runs)
- ``"cuda"``: metafast._C's CUDA kernels, for CUDA tensors; only when the binary was built with them
  (``_ext_info.build_info()``), since a CPU-only build registers some of the same symbols.
- ``"cpp"``: metafast._C's C++ CPU kernels, for CPU tensors.
- ``"triton"``: the Triton kernels of kernels/, for CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (Triton's interpreter, which the tests use).
- ``"torch"``: the op's pure-PyTorch reference; every op has it.

:data:`OPS` is the one list of ops and the backends each implements. The op modules register their
kernels under (op, backend) with :func:`register`; :func:`dispatch` picks the implementation that runs
an op on a device, :func:`explain` says why, and :func:`describe` reports it all for ``metafast info``.

Choice: the op's ``backend=`` argument, else ``METAFAST_BACKEND=auto|cuda|cpp|triton|torch``
(default ``auto``).
- ``auto``: CUDA tensors get cuda, else triton, else torch; CPU tensors get cpp where the op has it,
  else torch. Skipping a backend the op has (metafast._C or triton missing, an extension built
  without the op) is a fallback: reported through :func:`metafast.fallback.fallback` (a
  ``FallbackWarning``, counted, an error under ``METAFAST_STRICT=1``).
- A backend named by the ``backend=`` argument must run the op, or :class:`BackendUnavailableError`
  says why. METAFAST_BACKEND applies the same to the ops that implement the backend it names; the
  others run their PyTorch reference (``METAFAST_BACKEND=triton`` thus tests the Triton kernels while
  batch norm, which has none, stays on PyTorch).
- Before the cpp backend had its own name, ``cuda`` also meant metafast._C's CPU kernels; asking for
  ``cuda`` on CPU tensors now raises an error that names ``cpp``.

Probing is lazy (first :func:`resolve`), so importing metafast never imports triton or the extension
and never fails because either is missing; ``METAFAST_REQUIRE_EXT=1`` makes a missing or unloadable
metafast._C an error when metafast is imported (for CI and installs that must have it).
"""
import importlib
import os
import threading
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from . import _ext_info
from .fallback import counts as fallback_counts
from .fallback import fallback, strict

BACKENDS = ("cuda", "cpp", "triton", "torch")
CHOICES = ("auto",) + BACKENDS
ENV = "METAFAST_BACKEND"
REQUIRE_EXT_ENV = "METAFAST_REQUIRE_EXT"

# op -> {backend: the torch.ops.metafast symbol the backend needs in metafast._C (None: no symbol)}.
# The one list of ops: dispatch and describe() read it; the op modules (metafast/ops/) register the kernels.
OPS: Dict[str, Dict[str, Optional[str]]] = {
    "inner_update": {"cuda": "inner_update_cuda", "triton": None, "torch": None},
    "inner_update_multi": {"cuda": "inner_update_multi_cuda", "torch": None},
    "fused_inner_loop": {"cuda": "fused_inner_loop_cxx", "cpp": "fused_inner_loop_cxx", "triton": None, "torch": None},
    "task_cross_entropy": {"cuda": "task_cross_entropy_fwd_cuda", "triton": None, "torch": None},
    "kd_loss": {"cuda": "kd_loss_fwd_cuda", "triton": None, "torch": None},
    "multitask_heads_cross_entropy": {"cuda": "multitask_heads_ce_fwd_cuda", "triton": None, "torch": None},
    "batch_norm": {"cpp": "batch_norm_forward_cxx", "torch": None},
    "batch_norm_rop": {"cpp": "batch_norm_rforward_cxx", "torch": None},
    "to_nchw": {"cpp": "to_nchw_cxx", "torch": None},
}

# auto's order of preference by device type (torch closes every list)
_AUTO = {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}

DeviceLike = Union[torch.Tensor, torch.device, str, None]  # a tensor stands for its device


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but cannot run the op here."""


# ------------------------------------------------------------------------------ implementations
class Implementation:
    """An op's kernels on one backend, as attributes (``impl.forward(...)``). A kernel given as
    ``"module:name"`` is imported on first use: triton and the extension load only when needed."""

    def __init__(self, op: str, backend: str, kernels: Dict[str, Union[Callable, str]]):
        self.op, self.backend = op, backend
        self._lazy = {}
        for name, kernel in kernels.items():
            if isinstance(kernel, str):
                self._lazy[name] = kernel
            elif callable(kernel):
                setattr(self, name, kernel)
            else:
                raise TypeError(f"register({op!r}, {backend!r}): kernel {name} must be a callable or a "
                                f"'module:name' string, got {type(kernel).__name__}")

    def __getattr__(self, name: str):  # only for names not set yet: the lazy kernels
        target = self.__dict__.get("_lazy", {}).get(name)
        if target is None:
            raise AttributeError(f"{self.op} has no kernel {name!r} on the {self.backend} backend")
        module, _, attr = target.partition(":")
        kernel = getattr(importlib.import_module(module), attr)
        setattr(self, name, kernel)
        return kernel

    def __repr__(self) -> str:
        return f"Implementation({self.op!r}, {self.backend!r})"


_impls: Dict[Tuple[str, str], Implementation] = {}


def register(op: str, backend: str, **kernels: Union[Callable, str]) -> Implementation:
    """Register ``op``'s kernels on ``backend`` (a pair :data:`OPS` lists); returns the implementation."""
    if op not in OPS:
        raise KeyError(f"register: unknown op {op!r}; the ops are listed in metafast._backend.OPS")
    if backend not in OPS[op]:
        raise ValueError(f"register: OPS lists no {backend} backend for {op} (it lists {', '.join(OPS[op])})")
    impl = _impls[(op, backend)] = Implementation(op, backend, kernels)
    return impl


def implementation(op: str, backend: str) -> Implementation:
    """The registered implementation of ``op`` on ``backend`` (no availability check: see :func:`dispatch`)."""
    impl = _impls.get((op, backend))
    if impl is None:
        raise LookupError(f"no {backend} implementation of {op} is registered (its module in metafast.ops "
                          "registers it when imported)")
    return impl


def dispatch(op: str, device: DeviceLike = None, backend: Optional[str] = None) -> Implementation:
    """The implementation that runs ``op`` on ``device`` tensors (see the module docstring; ``backend``
    is the op's ``backend=`` argument). Its ``.backend`` names the choice."""
    return implementation(op, resolve(op, device, backend))


# ------------------------------------------------------------------------------------- probes
def _probe_extension() -> Tuple[bool, str]:
    try:
        importlib.import_module("metafast._C")  # loading it registers the torch.ops.metafast ops
    except Exception as e:  # noqa: BLE001 - any failure means "not usable", with the reason kept
        return False, f"metafast._C failed to import ({type(e).__name__}: {e})"
    return True, "metafast._C loaded"


def _probe_triton() -> Tuple[bool, str]:
    try:
        triton = importlib.import_module("triton")
    except Exception as e:  # noqa: BLE001
        return False, f"triton failed to import ({type(e).__name__}: {e})"
    return True, f"triton {getattr(triton, '__version__', '?')}"


def _probe_cuda_device() -> Tuple[bool, str]:
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    try:
        if torch.cuda.is_available():
            return True, f"{torch.cuda.device_count()} CUDA device(s)"
        return False, "no CUDA device is visible (torch.cuda.is_available() is False)"
    except Exception as e:  # noqa: BLE001
        return False, f"CUDA initialisation failed ({type(e).__name__}: {e})"


def _probe_cuda_build() -> Tuple[bool, str]:
    """Whether the loaded metafast._C holds CUDA kernels: a CPU-only build still registers the symbols
    its C++ CPU kernels share with the cuda backend (fused_inner_loop_cxx), so the symbol alone does not say."""
    info = _ext_info.build_info()
    if info is None:
        return False, "metafast._C does not load"
    if not info.get("cuda"):
        return False, "metafast._C was built without CUDA kernels (CPU only: no nvcc or a CPU build of torch at build time)"
    return True, f"metafast._C was built with CUDA {info.get('cuda_version', 'unknown')}"


_PROBES = {"extension": "_probe_extension", "triton": "_probe_triton", "cuda_device": "_probe_cuda_device",
           "cuda_build": "_probe_cuda_build"}
_lock = threading.Lock()
_probes: Dict[str, Tuple[bool, str]] = {}


def _probe(key: str) -> Tuple[bool, str]:
    hit = _probes.get(key)
    if hit is None:
        with _lock:
            hit = _probes.get(key)
            if hit is None:
                hit = globals()[_PROBES[key]]()  # looked up by name so tests can monkeypatch the probes
                _probes[key] = hit
    return hit


def _ext_has(symbol: str) -> bool:
    """Does the loaded extension register metafast::<symbol>?"""
    return hasattr(torch.ops.metafast, symbol)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def reset() -> None:
    """Forget probe results and choices (tests; after installing triton or the extension)."""
    with _lock:
        _probes.clear()
        _memo.clear()


def extension() -> Tuple[bool, str]:
    """(metafast._C is loaded, why / why not); loads it on first call."""
    return _probe("extension")


def require_extension() -> None:
    """Raise ImportError unless metafast._C loads (``METAFAST_REQUIRE_EXT=1`` calls this on import)."""
    ok, why = _probe("extension")
    if not ok:
        raise ImportError(f"{REQUIRE_EXT_ENV}=1 requires the C++/CUDA extension, but {why}. Build it "
                          "(pip install . or python setup.py build_ext --inplace) or unset "
                          f"{REQUIRE_EXT_ENV}.")


def _flag(value: Optional[str]) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


# -------------------------------------------------------------------------------- availability
def available() -> Dict[str, Tuple[bool, str]]:
    """backend -> (usable on this machine for some device, why / why not)."""
    ext_ok, ext_why = _probe("extension")
    dev_ok, dev_why = _probe("cuda_device")
    tri_ok, tri_why = _probe("triton")
    out = {}
    if not ext_ok:
        out["cuda"] = (False, ext_why)
    elif not _probe("cuda_build")[0]:
        out["cuda"] = (False, _probe("cuda_build")[1])
    elif not dev_ok:
        out["cuda"] = (False, f"metafast._C is built but {dev_why}")
    else:
        out["cuda"] = (True, ext_why)
    out["cpp"] = (ext_ok, ext_why)
    if not tri_ok:
        out["triton"] = (False, tri_why)
    elif dev_ok:
        out["triton"] = (True, tri_why)
    elif _interpret():
        out["triton"] = (True, f"{tri_why}, TRITON_INTERPRET=1 (CPU interpreter)")
    else:
        out["triton"] = (False, f"{tri_why} is installed but {dev_why} (TRITON_INTERPRET=1 runs it on CPU)")
    out["torch"] = (True, f"torch {torch.__version__}")
    return out


def _usable(backend: str, op: str, dev: str) -> Tuple[bool, str]:
    """Can ``backend`` run ``op`` on tensors of device type ``dev``? (ok, why)."""
    symbols = OPS[op]
    if backend not in symbols:
        return False, f"{op} has no {backend} implementation (it has {', '.join(symbols)})"
    if backend == "torch":
        return True, "the PyTorch reference"
    if backend == "triton":
        ok, why = _probe("triton")
        if not ok:
            return False, why
        if dev == "cuda":
            dev_ok, dev_why = _probe("cuda_device")
            return (True, f"Triton kernel ({why})") if dev_ok else (False, dev_why)
        if dev == "cpu" and _interpret():
            return True, f"Triton kernel, interpreted on CPU ({why}, TRITON_INTERPRET=1)"
        return False, f"Triton needs CUDA tensors (got {dev}) unless TRITON_INTERPRET=1"
    # the extension's backends
    if backend == "cuda" and dev != "cuda":
        hint = "; metafast._C's C++ CPU kernels are the cpp backend" if "cpp" in symbols else ""
        return False, f"the cuda backend (metafast._C's CUDA kernels) needs CUDA tensors, got {dev}{hint}"
    if backend == "cpp" and dev != "cpu":
        return False, f"the cpp backend (metafast._C's C++ CPU kernels) needs CPU tensors, got {dev}"
    ok, why = _probe("extension")
    if not ok:
        return False, why
    if backend == "cuda":
        built, built_why = _probe("cuda_build")
        if not built:
            return False, built_why
        dev_ok, dev_why = _probe("cuda_device")
        if not dev_ok:
            return False, f"metafast._C is built but {dev_why}"
    symbol = symbols[backend]
    if symbol is not None and not _ext_has(symbol):
        return False, f"metafast._C was built without metafast::{symbol}"
    return True, f"metafast._C's {'CUDA' if backend == 'cuda' else 'C++ CPU'} kernel"


# ------------------------------------------------------------------------------------- choice
def requested() -> str:
    """The validated METAFAST_BACKEND value ("auto" when unset)."""
    return _parse(os.environ.get(ENV), ENV)


def _parse(raw: Optional[str], name: str) -> str:
    value = (raw or "").strip().lower() or "auto"
    if value not in CHOICES:
        also = " or None" if name == "backend" else ""
        raise ValueError(f"{name} must be one of {', '.join(CHOICES)}{also}; got {raw!r}")
    return value


def _device_type(device: DeviceLike) -> str:
    if isinstance(device, torch.Tensor):  # is_cuda / is_cpu cost a tenth of torch.device.type
        return "cuda" if device.is_cuda else ("cpu" if device.is_cpu else device.device.type)
    if isinstance(device, torch.device):
        return device.type
    return torch.device("cpu" if device is None else device).type


# (op, device type, backend argument, METAFAST_BACKEND) -> (backend, TRITON_INTERPRET it depended on or
# None, the fallback message or None). Errors are not memoised; fallbacks are re-raised under strict mode.
_memo: Dict[tuple, Tuple[str, Optional[bool], Optional[Tuple[str, str]]]] = {}


def resolve(op: str, device: DeviceLike = None, backend: Optional[str] = None) -> str:
    """The name of the backend that runs ``op`` on ``device`` tensors (:func:`dispatch` without the lookup).
    Runs on every op call: reading METAFAST_BACKEND (about a microsecond) is most of its cost."""
    dev = _device_type(device)
    env = os.environ.get(ENV)
    key = (op, dev, backend, env)
    hit = _memo.get(key)
    if hit is not None and (hit[1] is None or hit[1] == _interpret()):
        if hit[2] is not None and strict():
            fallback(*hit[2], stacklevel=3)  # raises
        return hit[0]
    name, _, fell_back, interp = _decide(op, dev, backend, env)
    if fell_back is not None:
        fallback(*fell_back, stacklevel=3)
    if len(_memo) > 256:
        _memo.clear()
    _memo[key] = (name, interp, fell_back)
    return name


def explain(op: str, device: DeviceLike = None, backend: Optional[str] = None) -> Tuple[str, str]:
    """(backend, why) for ``op`` on ``device``, as :func:`resolve` decides, without reporting a fallback."""
    name, why, _, _ = _decide(op, _device_type(device), backend, os.environ.get(ENV))
    return name, why


def _decide(op: str, dev: str, backend: Optional[str], env: Optional[str]):
    """(backend, why, (fallback key, message) or None, TRITON_INTERPRET value the choice depends on or None)."""
    symbols = OPS.get(op)
    if symbols is None:
        raise KeyError(f"unknown op {op!r}; the ops are listed in metafast._backend.OPS")
    if backend is None:
        choice = _parse(env, ENV)
        source = f"{ENV}={choice}"
    else:
        choice = _parse(str(backend), "backend")
        source = f"backend={choice!r}"
    interp = _interpret() if dev != "cuda" and choice == "triton" else None  # auto never interprets
    if choice != "auto":
        if backend is None and choice not in symbols:
            return "torch", f"{source}, which {op} does not implement: its PyTorch reference runs", None, interp
        ok, why = _usable(choice, op, dev)
        if not ok:
            raise BackendUnavailableError(f"{source} was requested for {op} on {dev}, but the {choice} backend "
                                          f"cannot run it: {why}")
        return choice, f"{source}: {why}", None, interp
    skipped = []
    for candidate in _AUTO.get(dev, ()):
        if candidate not in symbols:
            continue
        ok, why = _usable(candidate, op, dev)
        if ok:
            return candidate, f"auto: {why}" + _skipped_text(skipped), _fallback_of(op, dev, candidate, skipped), interp
        skipped.append((candidate, why))
    if skipped:
        why = "auto: the PyTorch reference" + _skipped_text(skipped)
    else:
        why = f"auto: {op} has no kernel for {dev} tensors, so its PyTorch reference runs"
    return "torch", why, _fallback_of(op, dev, "torch", skipped), interp


def _skipped_text(skipped) -> str:
    return "".join(f"; not {b}: {why}" for b, why in skipped)


def _fallback_of(op: str, dev: str, chosen: str, skipped) -> Optional[Tuple[str, str]]:
    """(count key, message) when auto skipped a backend ``op`` has, else None."""
    if not skipped:
        return None
    ext_missing = not _probe("extension")[0] and any(b in ("cuda", "cpp") for b, _ in skipped)
    key = "metafast._C missing" if ext_missing else f"backend {op}"
    reasons = "; ".join(f"{b}: {why}" for b, why in skipped)
    return key, (f"metafast: {op} runs on the {chosen} backend for {dev} tensors ({reasons}). Set {ENV}={chosen} "
                 "to choose it, or install the missing piece for the fused kernels.")


# ------------------------------------------------------------------------------------ describe
def describe() -> Dict[str, object]:
    """Versions, what is available and why, per op the backend on cpu and cuda and why, the fallbacks."""
    report: Dict[str, object] = {"torch": torch.__version__, "torch CUDA build": torch.version.cuda or "none"}
    tri_ok, tri_why = _probe("triton")
    report["triton"] = getattr(importlib.import_module("triton"), "__version__", "?") if tri_ok else \
        f"not available: {tri_why}"
    ext_ok, ext_why = _probe("extension")
    report["metafast._C"] = _ext_path() if ext_ok else f"not built/loadable: {ext_why}"
    report["metafast._C build"] = _ext_info.describe()  # which parts (CPU kernels, CUDA kernels) it holds
    dev_ok, dev_why = _probe("cuda_device")
    report["cuda device"] = _device_name() if dev_ok else dev_why
    try:
        report[ENV] = requested()
    except ValueError as e:
        report[ENV] = f"invalid: {e}"
    report["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "0")
    report["METAFAST_STRICT"] = "1 (fallbacks are errors)" if strict() else "0"
    report["CPU block cache"] = _describe_cpu_cache()
    report["backends"] = {name: ("available" if ok else "unavailable") + f" ({why})"
                          for name, (ok, why) in available().items()}
    report["ops"] = {op: {"implements": ", ".join(OPS[op]), "cpu": _describe_choice(op, "cpu"),
                          "cuda": _describe_choice(op, "cuda")} for op in OPS}
    report["fallbacks"] = fallback_counts()
    return report


def _describe_choice(op: str, dev: str) -> str:
    if dev == "cuda" and not _probe("cuda_device")[0]:
        return f"n/a ({_probe('cuda_device')[1]})"
    try:
        name, why = explain(op, dev)
    except (ValueError, BackendUnavailableError) as e:
        return f"error: {e}"
    return f"{name} ({why})"


def _describe_cpu_cache() -> str:
    from . import cpu_cache

    if not cpu_cache.available():
        return "unavailable (metafast._C not loaded)"
    try:
        on = cpu_cache.enabled()
    except ValueError as e:
        return f"invalid: {e}"
    limit = cpu_cache.stats()["limit_bytes"] / 2**20
    return (f"on for BatchedMAML's CPU meta-steps (keeps up to {limit:g} MiB of freed blocks)" if on
            else f"off ({cpu_cache.ENV}=0 or cpu_cache.set_enabled(False))")


def _device_name() -> str:
    try:
        return torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__}: {e})"


def _ext_path() -> str:
    return getattr(importlib.import_module("metafast._C"), "__file__", "metafast._C")


if _flag(os.environ.get(REQUIRE_EXT_ENV)):
    require_extension()
