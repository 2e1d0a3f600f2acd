"""Build metafast: the Python package plus the extension ``metafast._C``.

What gets compiled:
  - a C++ compiler and torch            -> the CPU kernels and the CPU block cache (every csrc/*.cpp,
                                           a CppExtension)
  - also nvcc and a CUDA build of torch -> the CUDA kernels join (csrc/*.cu, a CUDAExtension)
  - neither                             -> the pure-Python package (metafast falls back to PyTorch)
Missing CUDA never fails the build; `metafast info` reports which parts were built.

Environment:
  METAFAST_SKIP_CUDA_BUILD=1   leave out the CUDA sources (the CPU kernels still build)
  METAFAST_SKIP_EXT=1          build the pure-Python package only
  METAFAST_CUDA_ARCHS="80;90"  compute capabilities to compile for (default 8.0 and 9.0; "90a" works)
  MAX_JOBS                     parallel compile jobs (default: from CPU cores and memory)
  CUDA_HOME                    the CUDA toolkit (nvcc is $CUDA_HOME/bin/nvcc)
  METAFAST_BUILD_TORCH=match   with pip's build isolation: build against a copy of the torch that is
                               installed where metafast will run (see "Build isolation" below)

Build isolation. The extension only loads into the torch it was compiled against. pip's default
build isolation compiles against a fresh torch from the index, which may differ from the installed
one, so this file is also the PEP 517 backend (pyproject.toml: build-backend = "setup:backend"):
  - torch is installed where metafast will run -> the build stops at once, asking for
    `pip install --no-build-isolation .` (or METAFAST_BUILD_TORCH=match: the isolated build installs
    exactly that torch version);
  - no torch there (a fresh venv, `python -m build`) -> the build installs torch and the wheel
    requires exactly the torch version it was compiled against (torch==X.Y.Z).
Either way the built binary and the runtime's torch match, or nothing is built.
"""
import glob
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "80;90"
# nvcc holds roughly this much memory per job on these sources (two archs per file).
GIB_PER_JOB = 3
TORCH_MIN = "torch>=2.6"
# printed to the runtime interpreter's stdout by _runtime_torch()
_TORCH_PROBE = "import torch; print(torch.__version__); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"


def _log(msg: str) -> None:
    print(f"metafast setup: {msg}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip() not in ("", "0")


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


def _cxx_compiler():
    """Path of the C++ compiler torch's build would use ($CXX, else c++), or None."""
    cxx = os.environ.get("CXX", "").split()
    return shutil.which(cxx[0] if cxx else "c++")


# ------------------------------------------------------------------------ build isolation
def _runtime_env() -> dict:
    """The environment without pip's build-isolation overlay (PYTHONPATH entries of its build env,
    PYTHONNOUSERSITE), so that sys.executable sees the packages installed where metafast will run."""
    env = dict(os.environ)
    if "PYTHONPATH" in env:
        kept = [p for p in env["PYTHONPATH"].split(os.pathsep) if p and "pip-build-env" not in p]
        if kept:
            env["PYTHONPATH"] = os.pathsep.join(kept)
        else:
            del env["PYTHONPATH"]
    env.pop("PYTHONNOUSERSITE", None)
    return env


def _runtime_torch():
    """(version, cxx11_abi) of the torch installed for sys.executable outside any build-isolation
    overlay, or None when it has none."""
    try:
        out = subprocess.run([sys.executable, "-c", _TORCH_PROBE], env=_runtime_env(), capture_output=True,
                             text=True, timeout=300, cwd=os.path.expanduser("~"))
    except (OSError, subprocess.TimeoutExpired) as e:
        _log(f"could not ask {sys.executable} for its torch ({type(e).__name__}: {e})")
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) < 2:
        return None
    return lines[-2], lines[-1] == "1"


def _torch_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


ISOLATION_HELP = (
    "metafast compiles a C++ extension that only loads into the torch it was compiled against. pip's build "
    "isolation would compile it against a separate copy of torch from the package index{detail}. Install "
    "with the torch you have instead:\n\n    pip install --no-build-isolation .\n\n(needs setuptools, wheel and "
    "ninja in this environment), or set METAFAST_BUILD_TORCH=match to let the isolated build install exactly "
    "torch=={version}.")


def _check_build_torch(torch) -> None:
    """Stop when the torch being compiled against is not the torch metafast will run with."""
    runtime = _runtime_torch()
    if runtime is None:
        return  # nothing installed yet: the wheel pins torch==<this version> (_install_requires)
    version, abi = runtime
    if version == torch.__version__ and abi == bool(torch._C._GLIBCXX_USE_CXX11_ABI):
        return
    raise SystemExit("metafast setup: error: " + ISOLATION_HELP.format(
        detail=f" (building against torch {torch.__version__} from {os.path.dirname(torch.__file__)}, while "
               f"{sys.executable} runs torch {version}, cxx11 ABI {abi})", version=version))


# ------------------------------------------------------------------------ the extension
def _extension():
    """([extension], cmdclass, torch version it builds against) or ([], {}, None) with the reason printed."""
    if _flag("METAFAST_SKIP_EXT"):
        _log("METAFAST_SKIP_EXT is set: building the pure-Python package only")
        return [], {}, None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:
        _log(f"torch is not importable ({type(e).__name__}: {e}): building the pure-Python package only")
        return [], {}, None
    cxx = _cxx_compiler()
    if cxx is None:
        _log(f"no C++ compiler found (CXX={os.environ.get('CXX', '')!r}, no c++ on PATH): building the pure-Python "
             "package only; metafast runs on its PyTorch paths")
        return [], {}, None
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp:
        _log("csrc/ has no C++ sources: building the pure-Python package only")
        return [], {}, None
    # Building a wheel or in place: the binary has to match the torch it will run with.
    if any(cmd.startswith(("bdist", "build", "develop", "install", "editable")) for cmd in sys.argv[1:]):
        _check_build_torch(torch)

    why_no_cuda = None
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if _flag("METAFAST_SKIP_CUDA_BUILD"):
        why_no_cuda = "METAFAST_SKIP_CUDA_BUILD is set"
    elif torch.version.cuda is None:
        why_no_cuda = f"torch {torch.__version__} is a CPU-only build"
    elif nvcc is None or not os.path.isfile(nvcc):
        why_no_cuda = f"nvcc not found (CUDA_HOME={CUDA_HOME!r})"
    elif not cu:
        why_no_cuda = "csrc/ has no CUDA sources"

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    # FMA contraction in the CPU kernels; OpenMP, without which ATen's header-only at::parallel_for
    # runs every CPU kernel on one thread. libgomp.so.1 is the OpenMP runtime torch itself loads,
    # so both share one thread pool.
    cxx_flags = ["-O3", "-ffp-contract=fast", "-fopenmp"]
    common = dict(name="metafast._C", include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if why_no_cuda is None:
        archs = _arch_list(os.environ.get("METAFAST_CUDA_ARCHS", DEFAULT_ARCHS))
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by BuildExtension to emit -gencode flags
        _log(f"compiling metafast._C (CPU + CUDA kernels) with {cxx} and nvcc from {CUDA_HOME} (torch "
             f"{torch.__version__}, CUDA {torch.version.cuda}) for archs {archs}, MAX_JOBS={os.environ['MAX_JOBS']}")
        common["include_dirs"] += _pip_cuda_include_dirs(CUDA_HOME)
        macros = ["-DMETAFAST_WITH_CUDA", f"-DMETAFAST_CUDA_VERSION={torch.version.cuda}"]
        # No --use_fast_math: it flushes fp32 denormals and approximates division and sqrt, which the
        # exact-reference tests (and users' fp32 numerics) would notice. Kernels that can afford an
        # approximation use the intrinsics (__expf, __fdividef, ...) explicitly.
        ext = CUDAExtension(sources=cpp + cu, extra_compile_args={
            "cxx": cxx_flags + macros, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + macros}, **common)
    else:
        _log(f"compiling metafast._C (CPU kernels only: {why_no_cuda}) with {cxx} against torch {torch.__version__}, "
             f"MAX_JOBS={os.environ['MAX_JOBS']}")
        ext = CppExtension(sources=cpp, extra_compile_args={"cxx": cxx_flags}, **common)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}, \
        torch.__version__


def _install_requires(torch_version):
    """A compiled wheel runs only with the torch it was compiled against: require exactly that version
    (its public part, so 2.14.1 matches both 2.14.1+cpu and 2.14.1+cu130)."""
    torch_req = f"torch=={torch_version.split('+')[0]}" if torch_version else TORCH_MIN
    return [torch_req, "numpy", "tqdm", "matplotlib"]


def main() -> None:
    from setuptools import find_packages, setup

    ext_modules, cmdclass, torch_version = _extension()
    setup(
        name="metafast",
        version="0.1.0",
        description="Meta-learning for PyTorch on fused GPU kernels",
        packages=find_packages(include=["metafast", "metafast.*"]) + ["metafast.kernels"],
        package_dir={"metafast.kernels": "kernels"},
        package_data={"metafast.data.splits": ["*/*.txt", "README.md"]},
        python_requires=">=3.9",
        install_requires=_install_requires(torch_version),
        extras_require={"vision": ["torchvision", "pillow"]},
        entry_points={"console_scripts": ["metafast=metafast.cli:main"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )


# ------------------------------------------------------------------------ PEP 517 backend
class _Backend:
    """setuptools.build_meta, except that a wheel's build requirements say which torch to compile
    against (see "Build isolation" in the module docstring). Imported as `setup:backend`."""

    def __getattr__(self, name):
        from setuptools import build_meta

        return getattr(build_meta, name)

    def get_requires_for_build_wheel(self, config_settings=None):
        from setuptools import build_meta

        torch_req = self._torch_requirement()  # first: a build that cannot match stops before anything else
        return build_meta.get_requires_for_build_wheel(config_settings) + torch_req

    def get_requires_for_build_editable(self, config_settings=None):
        from setuptools import build_meta

        torch_req = self._torch_requirement()
        return build_meta.get_requires_for_build_editable(config_settings) + torch_req

    @staticmethod
    def _torch_requirement():
        if _flag("METAFAST_SKIP_EXT") or _torch_importable():
            return []  # no extension, or no isolation: the build uses the torch at hand
        runtime = _runtime_torch()
        if runtime is None:
            return [TORCH_MIN]  # a fresh environment: the wheel will pin the torch it is built against
        version = runtime[0]
        if os.environ.get("METAFAST_BUILD_TORCH", "").strip().lower() == "match":
            _log(f"METAFAST_BUILD_TORCH=match: the isolated build installs torch=={version}")
            return [f"torch=={version}"]
        raise SystemExit("metafast setup: error: " + ISOLATION_HELP.format(
            detail=f", not against the torch {version} that {sys.executable} runs", version=version))


backend = _Backend()

if __name__ == "__main__":
    main()
