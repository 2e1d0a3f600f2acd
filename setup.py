"""Build metafast: the Python package plus, when nvcc and a CUDA build of torch are present, the CUDA
extension ``metafast._C`` (every csrc/*.cpp and csrc/*.cu). A GPU is not needed to compile it.

Environment:
  METAFAST_SKIP_CUDA_BUILD=1   build the pure-Python package only
  METAFAST_CUDA_ARCHS="80;90"  compute capabilities to compile for (default 8.0 and 9.0; "90a" works)
  MAX_JOBS                     parallel compile jobs (default: from CPU cores and memory)
  CUDA_HOME                    the CUDA toolkit (nvcc is $CUDA_HOME/bin/nvcc)

Missing CUDA never fails the build: the reason is printed and metafast falls back to Triton/PyTorch.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "80;90"
# nvcc holds roughly this much memory per job on these sources (two archs per file).
GIB_PER_JOB = 3


def _log(msg: str) -> None:
    print(f"metafast setup: {msg}", file=sys.stderr, flush=True)


def _arch_list(spec: str) -> str:
    """'80;90a' -> '8.0;9.0a' (TORCH_CUDA_ARCH_LIST syntax); '8.0' and '+PTX' pass through."""
    out = []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        core = item[:-4] if ptx else item
        if "." not in core:
            digits = core.rstrip("abf")
            if not digits.isdigit() or len(digits) < 2:
                raise ValueError(f"METAFAST_CUDA_ARCHS: cannot parse {item!r}; expected e.g. '80;90' or '9.0a'")
            core = f"{digits[:-1]}.{digits[-1]}{core[len(digits):]}"
        out.append(core + ("+PTX" if ptx else ""))
    if not out:
        raise ValueError(f"METAFAST_CUDA_ARCHS: no architectures in {spec!r}")
    return ";".join(out)


def _default_max_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = GIB_PER_JOB * cores
    return max(1, min(cores, int(mem_gib // GIB_PER_JOB)))


def _pip_cuda_include_dirs(cuda_home: str):
    """Header dirs of the pip CUDA libraries (nvidia/cu*/include, ...) when the toolkit lacks headers
    that torch's CUDA headers include (cusparse.h, cublas_v2.h): a minimal toolkit has nvcc and the
    runtime only, and the wheels of a CUDA build of torch ship the rest."""
    if os.path.isfile(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    import torch

    site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    # cu13 wheels: nvidia/cu13/include holds everything; cu12 wheels: nvidia/<lib>/include each
    found = sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(d))
    if found:
        _log(f"using CUDA library headers from {', '.join(found)}")
    return found


def _cuda_extension():
    """([CUDAExtension], {"build_ext": BuildExtension}) or ([], {}) with the reason printed."""
    if os.environ.get("METAFAST_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        _log("METAFAST_SKIP_CUDA_BUILD is set: building without the CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as e:  # noqa: BLE001 - any import failure means "no extension"
        _log(f"torch is not importable ({type(e).__name__}: {e}): building without the CUDA extension")
        return [], {}
    if torch.version.cuda is None:
        _log(f"torch {torch.__version__} is a CPU-only build: building without the CUDA extension")
        return [], {}
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if nvcc is None or not os.path.isfile(nvcc):
        _log(f"nvcc not found (CUDA_HOME={CUDA_HOME!r}): building without the CUDA extension")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        _log("csrc/ has no sources: building without the CUDA extension")
        return [], {}

    include_dirs = [os.path.join(ROOT, "csrc")] + _pip_cuda_include_dirs(CUDA_HOME)
    archs = _arch_list(os.environ.get("METAFAST_CUDA_ARCHS", DEFAULT_ARCHS))
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by BuildExtension to emit -gencode flags
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    _log(f"compiling metafast._C with nvcc from {CUDA_HOME} (torch CUDA {torch.version.cuda}) for archs "
         f"{archs}, MAX_JOBS={os.environ['MAX_JOBS']}: {', '.join(sources)}")

    # No --use_fast_math: it flushes fp32 denormals and approximates division and sqrt, which the
    # exact-reference tests (and users' fp32 numerics) would notice. Kernels that can afford an
    # approximation use the intrinsics (__expf, __fdividef, ...) explicitly.
    ext = CUDAExtension(
        name="metafast._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={
            # FMA contraction in the CPU kernels; OpenMP, without which ATen's header-only
            # at::parallel_for runs every CPU kernel on one thread
            "cxx": ["-O3", "-ffp-contract=fast", "-fopenmp"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
        # libgomp.so.1: the OpenMP runtime torch itself loads, so both share one thread pool
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="metafast",
    version="0.1.0",
    description="Meta-learning for PyTorch on fused GPU kernels",
    packages=find_packages(include=["metafast", "metafast.*"]) + ["metafast.kernels"],
    package_dir={"metafast.kernels": "kernels"},
    package_data={"metafast.data.splits": ["*/*.txt", "README.md"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "numpy", "tqdm", "matplotlib"],
    extras_require={"vision": ["torchvision"]},
    entry_points={"console_scripts": ["metafast=metafast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
