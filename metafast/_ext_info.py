"""Which parts of metafast._C were built, for `metafast info` and the backend report.

setup.py compiles the CPU kernels and the CPU block cache whenever a C++ compiler is there, and the
CUDA kernels when nvcc and a CUDA build of torch are there too; ``metafast._C.build_info()`` (csrc/
library.cpp) says what the binary was compiled with. Nothing here imports the extension on import.
"""
from typing import Dict, List, Optional

import torch

__all__ = ["CPU_PARTS", "CUDA_PARTS", "build_info", "parts", "cuda_built", "describe"]

# part -> the torch.ops.metafast symbols that prove it is in the binary
CPU_PARTS: Dict[str, tuple] = {
    "fused_inner_loop (CPU)": ("fused_inner_loop_cxx", "fused_inner_loop_backward_cxx", "fused_inner_loop_autograd"),
    "batch_norm (CPU)": ("batch_norm_forward_cxx",),
    "batch_norm_rop (CPU)": ("batch_norm_rforward_cxx", "batch_norm_rbackward_cxx"),
    "to_nchw (CPU)": ("to_nchw_cxx",),
    "cpu_cache": ("cpu_cache_enter", "cpu_cache_exit", "cpu_cache_stats"),
}
CUDA_PARTS: Dict[str, tuple] = {
    "inner_update (CUDA)": ("inner_update_cuda", "inner_update_multi_cuda"),
    "kd_loss (CUDA)": ("kd_loss_fwd_cuda",),
    "task_cross_entropy (CUDA)": ("task_cross_entropy_fwd_cuda",),
    "multitask_heads (CUDA)": ("multitask_heads_ce_fwd_cuda",),
}


def _load():
    """The extension module, or the ImportError that loading it raised."""
    try:
        import metafast._C as ext
    except ImportError as e:
        return e
    return ext


def build_info() -> Optional[dict]:
    """What metafast._C was compiled with ({"cuda", "cuda_version", "torch", "cxx11_abi", "openmp"}),
    or None when it does not load. A binary from before build_info() existed counts as a CUDA build
    (setup.py only built the extension with CUDA then)."""
    ext = _load()
    if isinstance(ext, ImportError):
        return None
    fn = getattr(ext, "build_info", None)
    if fn is None:
        return {"cuda": True, "cuda_version": "unknown", "torch": "unknown", "cxx11_abi": None, "openmp": None}
    return dict(fn())


def cuda_built() -> bool:
    """Whether the loaded metafast._C holds the CUDA kernels (False when it is CPU-only or absent)."""
    info = build_info()
    return bool(info and info["cuda"])


def parts() -> Dict[str, bool]:
    """part -> whether the loaded binary registers it (all False when metafast._C does not load)."""
    loaded = not isinstance(_load(), ImportError)
    out = {}
    for name, symbols in {**CPU_PARTS, **CUDA_PARTS}.items():
        out[name] = loaded and all(_has_op(s) for s in symbols)
    return out


def _has_op(symbol: str) -> bool:
    return hasattr(torch.ops.metafast, symbol)


def _built_against_note(info: dict) -> str:
    built = info.get("torch", "unknown")
    running = torch.__version__.split("+")[0]
    if built == "unknown":
        return "an older binary without build_info(): rebuild it for details"
    if built == running:
        return f"compiled against torch {built}"
    return f"compiled against torch {built} but running torch {torch.__version__}: rebuild it"


def describe() -> str:
    """One line for `metafast info`: which parts were built, or why the extension is absent."""
    ext = _load()
    if isinstance(ext, ImportError):
        if isinstance(ext, ModuleNotFoundError) and ext.name == "metafast._C":
            return ("not built (no C++ compiler at install time, or METAFAST_SKIP_EXT=1): "
                    "every op runs its PyTorch path")
        return f"built but fails to load ({type(ext).__name__}: {ext})"
    info = build_info()
    have = parts()
    cpu: List[str] = [n for n in CPU_PARTS if have[n]]
    kind = (f"CPU + CUDA {info['cuda_version']}" if info["cuda_version"] != "unknown" else "CPU + CUDA") \
        if info["cuda"] else "CPU only"
    text = f"{kind} ({_built_against_note(info)}); CPU kernels: {', '.join(cpu) or 'none'}"
    if info["cuda"]:
        cuda = [n for n in CUDA_PARTS if have[n]]
        text += f"; CUDA kernels: {', '.join(cuda) or 'none'}"
    return text
