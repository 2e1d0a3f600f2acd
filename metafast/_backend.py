"""Which compute backend runs an op: the CUDA extension, Triton, or plain PyTorch.

Backends
- ``"cuda"``: ``metafast._C`` imports and a CUDA device is visible.
- ``"triton"``: triton imports and a CUDA device is visible, or ``TRITON_INTERPRET=1`` (Triton's CPU
  interpreter, used by the tests: it runs the kernels on CPU tensors).
- ``"torch"``: always (the pure-PyTorch reference of each op).

Choice: ``METAFAST_BACKEND=auto|cuda|triton|torch`` (default ``auto``). ``auto`` picks, for CUDA
tensors, the CUDA extension, else Triton, else torch; CPU tensors get torch, or the extension for
ops registered with ``ext_on_cpu`` (their C++ op has a CPU kernel) when it is built with them. When ``auto``
has to skip a backend on a CUDA device, one warning says why (once per process). A backend named
explicitly (environment or an op's ``backend=`` argument) that cannot run raises instead.

Probing is lazy (first :func:`resolve`/:func:`available`), so importing metafast never imports
triton or the extension, and never fails because either is missing.

Ops register with :func:`register_op` to declare which backends they implement and, for ``"cuda"``,
which ``torch.ops.metafast`` symbol must exist (an extension built without that op then counts as
missing for it). Unregistered ops are assumed to implement all three.
"""
import os
import threading
import warnings
from typing import Dict, Iterable, Optional, Tuple, Union

import torch

from . import _ext_info

BACKENDS = ("cuda", "triton", "torch")
CHOICES = ("auto",) + BACKENDS
ENV = "METAFAST_BACKEND"

_lock = threading.Lock()
_probes: Dict[str, Tuple[bool, str]] = {}   # "cuda_ext", "triton", "cuda_device" -> (ok, reason)
_warned: set = set()
_memo: Dict[tuple, str] = {}                # (op, device type, choice, TRITON_INTERPRET) -> resolved backend
_ops: Dict[str, Dict[str, object]] = {}     # op -> {"backends": tuple, "cuda_symbol": str | None}

DeviceLike = Union[torch.device, str, None]


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but cannot run the op here."""


def register_op(name: str, backends: Iterable[str] = BACKENDS, cuda_symbol: Optional[str] = None,
                ext_on_cpu: bool = False) -> None:
    """Declare the backends ``name`` implements; ``cuda_symbol`` is the ``torch.ops.metafast`` op
    the CUDA backend calls (checked to exist once the extension is loaded). ``ext_on_cpu``: the
    extension's op also runs CPU tensors, so "cuda" serves them (and ``auto`` prefers it on CPU)."""
    backends = tuple(backends)
    bad = [b for b in backends if b not in BACKENDS]
    if bad or "torch" not in backends:
        raise ValueError(f"register_op({name!r}): backends must be a subset of {BACKENDS} including 'torch', "
                         f"got {backends}")
    _ops[name] = {"backends": backends, "cuda_symbol": cuda_symbol, "ext_on_cpu": bool(ext_on_cpu)}
    _memo.clear()


# ----------------------------------------------------------------------------------- probes
def _probe_cuda_ext() -> Tuple[bool, str]:
    try:
        import metafast._C  # noqa: F401  (loading it registers the torch.ops.metafast CUDA ops)
    except Exception as e:  # noqa: BLE001 - any failure means "not usable", with the reason kept
        return False, f"metafast._C failed to import ({type(e).__name__}: {e})"
    return True, "metafast._C loaded"


def _probe_triton() -> Tuple[bool, str]:
    try:
        import triton
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


_PROBES = {"cuda_ext": "_probe_cuda_ext", "triton": "_probe_triton", "cuda_device": "_probe_cuda_device"}


def _probe(key: str) -> Tuple[bool, str]:
    hit = _probes.get(key)
    if hit is None:
        with _lock:
            hit = _probes.get(key)
            if hit is None:
                hit = globals()[_PROBES[key]]()  # looked up by name so tests can monkeypatch the probes
                _probes[key] = hit
    return hit


def reset() -> None:
    """Forget probe results and issued warnings (tests; after installing triton or the extension)."""
    with _lock:
        _probes.clear()
        _warned.clear()
        _memo.clear()


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> Dict[str, Tuple[bool, str]]:
    """name -> (usable on this machine, why / why not)."""
    dev_ok, dev_why = _probe("cuda_device")
    ext_ok, ext_why = _probe("cuda_ext")
    tri_ok, tri_why = _probe("triton")
    out = {}
    if not ext_ok:
        out["cuda"] = (False, ext_why)
    elif not dev_ok:
        out["cuda"] = (False, f"metafast._C is built but {dev_why}")
    else:
        out["cuda"] = (True, ext_why)
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


def _cuda_has(symbol: str) -> bool:
    """Does the loaded extension register metafast::<symbol>?"""
    return hasattr(torch.ops.metafast, symbol)


def _usable(backend: str, op_name: str, device: torch.device) -> Tuple[bool, str]:
    """Can ``backend`` run ``op_name`` on tensors of ``device``?"""
    info = _ops.get(op_name)
    if info is not None and backend not in info["backends"]:
        return False, f"{op_name} has no {backend} implementation (it has {', '.join(info['backends'])})"
    if backend == "torch":
        return True, "pure PyTorch"
    if backend == "cuda":
        if device.type != "cuda":
            if info is None or not info.get("ext_on_cpu"):
                return False, f"the CUDA extension needs CUDA tensors, got {device}"
            ok, why = _probe("cuda_ext")  # the op's CPU kernel needs no device
        else:
            ok, why = available()["cuda"]
        if not ok:
            return False, why
        symbol = info["cuda_symbol"] if info is not None else None
        if symbol is not None and not _cuda_has(symbol):
            return False, f"metafast._C was built without metafast::{symbol}"
        return True, why
    # triton
    ok, why = _probe("triton")
    if not ok:
        return False, why
    if device.type == "cuda":
        dev_ok, dev_why = _probe("cuda_device")
        return (True, why) if dev_ok else (False, dev_why)
    if _interpret():
        return True, f"{why} (TRITON_INTERPRET=1)"
    return False, f"Triton needs CUDA tensors (got {device}) unless TRITON_INTERPRET=1"


# os.environ.get costs ~1.3 us when the variable is unset (a KeyError is raised and caught inside);
# the CPU hot path reads METAFAST_BACKEND on every call, so read CPython's backing dict directly.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEY = os.environ.encodekey(ENV)  # type: ignore[attr-defined]
    _ENV_DECODE = os.environ.decodevalue  # type: ignore[attr-defined]
except AttributeError:
    _ENVIRON_DATA = None


def env_value() -> Optional[str]:
    """The raw METAFAST_BACKEND value, or None when unset (as os.environ.get, only faster)."""
    if isinstance(_ENVIRON_DATA, dict):
        raw = _ENVIRON_DATA.get(_ENV_KEY)
        return None if raw is None else _ENV_DECODE(raw)
    return os.environ.get(ENV)


def requested() -> str:
    """The validated METAFAST_BACKEND value ("auto" when unset)."""
    raw = env_value() or ""
    value = raw.strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}; got {raw!r}")
    return value


def resolve(op_name: str, device: DeviceLike = None, backend: Optional[str] = None) -> str:
    """The backend that runs ``op_name`` on ``device`` tensors: "cuda", "triton" or "torch".

    ``backend`` (an op's ``backend=`` argument) overrides METAFAST_BACKEND. An explicit backend that
    cannot run raises :class:`BackendUnavailableError` naming the reason; ``auto`` falls back with one
    warning per process.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    # The answer depends only on these (probes are cached); errors and warnings are not memoised.
    key = (op_name, device.type, backend if backend is None else str(backend), env_value(), _interpret())
    hit = _memo.get(key)
    if hit is not None:
        return hit
    result = _resolve(op_name, device, backend)
    _memo[key] = result
    return result


def use_cpu_kernel(op_name: str, backend: Optional[str] = None) -> bool:
    """Whether the extension's CPU kernel of ``op_name`` (registered with ``ext_on_cpu``) runs CPU tensors:
    as :func:`resolve` decides, except that METAFAST_BACKEND=triton leaves an op without a Triton kernel
    on torch instead of raising (such ops run inside others, e.g. BatchedMAML's reverse, where raising
    would rule that setting out for every model using them)."""
    if backend is None and env_value() and requested() == "triton" and "triton" not in _ops[op_name]["backends"]:
        return False
    return resolve(op_name, "cpu", backend) == "cuda"


def _resolve(op_name: str, device: torch.device, backend: Optional[str]) -> str:
    if backend is None:
        choice = requested()
        source = f"{ENV}={choice}"
    else:
        choice = str(backend).strip().lower()
        if choice not in CHOICES:
            raise ValueError(f"backend must be one of {', '.join(CHOICES)} or None; got {backend!r}")
        source = f"backend={choice!r}"
    if choice != "auto":
        ok, why = _usable(choice, op_name, device)
        if not ok:
            raise BackendUnavailableError(f"{source} was requested for {op_name} on {device}, "
                                          f"but the {choice} backend cannot run it: {why}")
        return choice
    if device.type != "cuda":
        info = _ops.get(op_name)
        if info is not None and info.get("ext_on_cpu") and _usable("cuda", op_name, device)[0]:
            return "cuda"
        return "torch"
    skipped = []
    for candidate in ("cuda", "triton"):
        ok, why = _usable(candidate, op_name, device)
        if ok:
            _warn_fallback(op_name, candidate, skipped)
            return candidate
        skipped.append((candidate, why))
    _warn_fallback(op_name, "torch", skipped)
    return "torch"


def _warn_fallback(op_name: str, chosen: str, skipped) -> None:
    # Skipping a backend the op never had is not worth a warning.
    info = _ops.get(op_name)
    skipped = [(b, why) for b, why in skipped if info is None or b in info["backends"]]
    if not skipped:
        return
    key = (chosen, tuple(b for b, _ in skipped))
    if key in _warned:
        return
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    reasons = "; ".join(f"{b}: {why}" for b, why in skipped)
    warnings.warn(f"metafast: using the {chosen} backend on CUDA ({reasons}). Set {ENV}={chosen} to "
                  "silence this, or install the missing piece for the fused kernels.", RuntimeWarning, stacklevel=3)


def describe() -> Dict[str, object]:
    """Versions, what is available and why, and the backend each registered op would use."""
    report: Dict[str, object] = {"torch": torch.__version__, "torch CUDA build": torch.version.cuda or "none"}
    tri_ok, tri_why = _probe("triton")
    if tri_ok:
        import triton

        report["triton"] = getattr(triton, "__version__", "?")
    else:
        report["triton"] = f"not available: {tri_why}"
    ext_ok, ext_why = _probe("cuda_ext")
    report["metafast._C"] = _ext_path() if ext_ok else f"not built/loadable: {ext_why}"
    report["metafast._C build"] = _ext_info.describe()  # which parts (CPU kernels, CUDA kernels) it holds
    dev_ok, dev_why = _probe("cuda_device")
    report["cuda device"] = _device_name() if dev_ok else dev_why
    try:
        report[ENV] = requested()
    except ValueError as e:
        report[ENV] = f"invalid: {e}"
    report["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "0")
    report["CPU block cache"] = _describe_cpu_cache()
    report["backends"] = {name: ("available" if ok else "unavailable") + f" ({why})"
                          for name, (ok, why) in available().items()}
    _import_ops()
    per_op: Dict[str, Dict[str, str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for op in sorted(_ops):
            per_op[op] = {dev: _describe_choice(op, dev) for dev in ("cpu", "cuda")}
    report["ops"] = per_op
    return report


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


def _describe_choice(op: str, device: str) -> str:
    if device == "cuda" and not _probe("cuda_device")[0]:
        return "n/a (no CUDA device)"
    try:
        return resolve(op, device)
    except (ValueError, BackendUnavailableError) as e:
        return f"error: {e}"


def _device_name() -> str:
    try:
        return torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__}: {e})"


def _ext_path() -> str:
    import metafast._C

    return getattr(metafast._C, "__file__", "metafast._C")


def _import_ops() -> None:
    """Import the op modules so that they register (describe() reports every op)."""
    import importlib
    import pkgutil

    try:
        import metafast.ops as ops_pkg
    except Exception:  # noqa: BLE001 - describe() still reports the rest
        return
    for mod in pkgutil.iter_modules(ops_pkg.__path__):
        try:
            importlib.import_module(f"metafast.ops.{mod.name}")
        except Exception:  # noqa: BLE001
            pass
