"""Packaging: the sdist holds csrc/ and kernels/; a wheel built from the tree installs into a fresh
venv where metafast, metafast.kernels and metafast._C import from the installed copy; setup.py's
build-isolation guard stops a build against a torch other than the installed one, with the
--no-build-isolation message, and pins a fresh build's wheel to the torch it was compiled against.

The wheel test compiles the CPU kernels (METAFAST_SKIP_CUDA_BUILD=1 keeps it to a minute or two) and
reuses this interpreter's torch in the new venv through a .pth file instead of installing torch."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_COPY = {".git", ".venv", "build", "dist", "runs", ".pytest_cache", ".benchmarks"}


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "METAFAST_BUILD_TORCH")}
    env.update(extra)
    return env


def _copy_tree(dst) -> str:
    """The source tree without build outputs, the .so, the metafast/kernels link, or caches."""
    def ignore(folder, names):
        rel = os.path.relpath(folder, REPO)
        out = {n for n in names if n in SKIP_COPY or n == "__pycache__" or n.endswith((".so", ".egg-info"))}
        if rel == "metafast":
            out.add("kernels")  # a development symlink to ../kernels; package_dir maps it for builds
        return out

    shutil.copytree(REPO, dst, ignore=ignore, symlinks=True)
    return str(dst)


def _run(cmd, cwd, env=None, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env or _clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc


def _import_setup(monkeypatch):
    monkeypatch.syspath_prepend(REPO)
    sys.modules.pop("setup", None)
    import setup  # the module: its __main__ guard keeps setup() from running

    return setup


def test_sdist_holds_the_sources(tmp_path):
    src = _copy_tree(tmp_path / "src")
    # what `python -m build --sdist` calls: the PEP 517 hook of the backend pyproject.toml names
    _run([sys.executable, "-c", "import sys, setup; print(setup.backend.build_sdist(sys.argv[1]))", str(tmp_path)],
         cwd=src)
    [sdist] = [p for p in os.listdir(tmp_path) if p.endswith(".tar.gz")]
    with tarfile.open(tmp_path / sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for f in ("setup.py", "pyproject.toml", "MANIFEST.in", "csrc/library.cpp", "csrc/fused_inner_loop_cpu.cpp",
              "csrc/cpu_cache.cpp", "csrc/inner_update.cu", "csrc/fused_inner_loop.h", "csrc/online_softmax.cuh",
              "kernels/__init__.py", "kernels/inner_update.py", "metafast/__init__.py", "metafast/_ext_info.py",
              "metafast/data/splits/omniglot/train.txt"):
        assert f in names, f"{f} missing from the sdist"
    expected = {f"csrc/{f}" for f in os.listdir(os.path.join(REPO, "csrc"))}
    assert expected <= names, f"csrc files missing from the sdist: {sorted(expected - names)}"
    assert not [n for n in names if n.endswith(".so")]


def test_isolated_build_against_another_torch_stops_with_the_message(monkeypatch):
    setup = _import_setup(monkeypatch)
    # pip's build isolation: torch is not importable in the build environment, the runtime has one
    monkeypatch.setattr(setup, "_torch_importable", lambda: False)
    monkeypatch.delenv("METAFAST_SKIP_EXT", raising=False)
    monkeypatch.delenv("METAFAST_BUILD_TORCH", raising=False)
    with pytest.raises(SystemExit, match=r"pip install --no-build-isolation \.") as e:
        setup.backend.get_requires_for_build_wheel()
    assert torch.__version__ in str(e.value)
    monkeypatch.setenv("METAFAST_BUILD_TORCH", "match")
    assert setup._Backend._torch_requirement() == [f"torch=={torch.__version__}"]
    # a fresh environment (nothing installed where metafast will run): any torch, then the wheel pins it
    monkeypatch.setattr(setup, "_runtime_torch", lambda: None)
    assert setup._Backend._torch_requirement() == [setup.TORCH_MIN]
    assert setup._install_requires("2.14.1+cu130")[0] == "torch==2.14.1"
    # --no-build-isolation: torch at hand, nothing added
    monkeypatch.setattr(setup, "_torch_importable", lambda: True)
    assert setup._Backend._torch_requirement() == []


def test_build_against_a_torch_other_than_the_runtime_one_stops(monkeypatch):
    setup = _import_setup(monkeypatch)
    monkeypatch.setattr(setup, "_runtime_torch", lambda: ("2.5.0+other", True))  # never the torch at hand
    with pytest.raises(SystemExit, match=f"building against torch {re.escape(torch.__version__)}.*runs torch 2.5.0"):
        setup._check_build_torch(torch)
    monkeypatch.setattr(setup, "_runtime_torch",
                        lambda: (torch.__version__, bool(torch._C._GLIBCXX_USE_CXX11_ABI)))
    setup._check_build_torch(torch)  # the same torch: goes on


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_wheel_installs_and_imports_in_a_fresh_venv(tmp_path):
    if shutil.which(os.environ.get("CXX", "c++").split()[0]) is None:
        pytest.skip("no C++ compiler: the wheel would be pure Python")
    src = _copy_tree(tmp_path / "src")
    dist = tmp_path / "dist"
    env = _clean_env(METAFAST_SKIP_CUDA_BUILD="1")
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(dist), src],
         cwd=str(tmp_path), env=env, timeout=1500)
    [wheel] = [p for p in os.listdir(dist) if p.endswith(".whl")]
    with zipfile.ZipFile(dist / wheel) as z:
        names = z.namelist()
    assert any(n.startswith("metafast/_C") and n.endswith(".so") for n in names), names
    assert "metafast/kernels/inner_update.py" in names and "metafast/data/splits/omniglot/train.txt" in names
    with zipfile.ZipFile(dist / wheel) as z:
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"Requires-Dist: torch=={torch.__version__.split('+')[0]}" in meta  # pinned to its torch

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=str(tmp_path))
    py = venv / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=str(tmp_path)).stdout.strip()
    # torch and the other dependencies from this interpreter (appended after the venv's own site-packages)
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    deps = sorted({torch_site, sysconfig.get_paths()["purelib"]})
    with open(os.path.join(site, "_reuse_deps.pth"), "w") as f:
        f.write("\n".join(deps) + "\n")
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site,
          str(dist / wheel)], cwd=str(tmp_path))
    probe = ("import os, sys, metafast, metafast.kernels, metafast._C, torch; from metafast import _ext_info; "
             "info = metafast._C.build_info(); "
             "print(metafast.__file__); print(metafast.kernels.__file__); print(metafast._C.__file__); "
             "print(info['cuda'], info['torch']); print(_ext_info.describe()); "
             "x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last); "
             "print(torch.equal(torch.ops.metafast.to_nchw_cxx(x), x.contiguous()))")
    out = _run([str(py), "-c", probe], cwd=str(tmp_path)).stdout.splitlines()
    for line in out[:3]:
        assert line.startswith(site), f"imported from {line}, not from the venv's {site}"
    assert out[3] == f"False {torch.__version__.split('+')[0]}"  # METAFAST_SKIP_CUDA_BUILD: CPU kernels only
    assert out[4].startswith("CPU only") and "cpu_cache" in out[4] and "fused_inner_loop (CPU)" in out[4]
    assert out[5] == "True"


class _ExtImport:
    """A meta-path finder that makes `import metafast._C` raise ``error``."""

    def __init__(self, error):
        self.error = error

    def find_spec(self, name, path, target=None):
        if name == "metafast._C":
            raise self.error
        return None


@pytest.mark.parametrize("case", ["not built", "not built, required", "built but broken", "stale"])
def test_cxx_kernel_tests_skip_only_when_the_extension_is_legitimately_absent(case, monkeypatch):
    from _pytest.outcomes import Failed

    import cxx_ext

    monkeypatch.delitem(sys.modules, "metafast._C", raising=False)
    monkeypatch.delenv(cxx_ext.REQUIRE_ENV, raising=False)
    if case == "stale":  # loads, but without the op a test needs
        if not _loads():
            pytest.skip("metafast._C is not built here")
        with pytest.raises(Failed, match="lacks metafast::no_such_op_cxx"):
            cxx_ext.skip_reason("no_such_op_cxx")
        return
    error = (ImportError("undefined symbol: _ZN3c10") if case == "built but broken"
             else ModuleNotFoundError("No module named 'metafast._C'", name="metafast._C"))
    monkeypatch.setattr(sys, "meta_path", [_ExtImport(error)] + sys.meta_path)
    if case == "not built":
        assert "not built" in cxx_ext.skip_reason("to_nchw_cxx")
        return
    if case == "not built, required":
        monkeypatch.setenv(cxx_ext.REQUIRE_ENV, "1")
    with pytest.raises(Failed, match="METAFAST_REQUIRE_EXT is set" if case.endswith("required") else "fails to import"):
        cxx_ext.skip_reason("to_nchw_cxx")


def _loads() -> bool:
    try:
        import metafast._C  # noqa: F401
    except ImportError:
        return False
    return True
