"""``metafast bench``: run the microbenchmarks of a source checkout.

Each ``bench/bench_<op>.py`` runs as its own process, ``python bench/bench_<op>.py --device D --out DIR
[--quick]``, and prints its own table: the library never imports bench/. A script with a top-level
``run(device, quick)`` function is a microbenchmark with that command line; the others (e.g. the
multi-process bench_distributed.py) are run by hand. An installation without bench/ (a wheel) gets an
error that says where the benchmarks live.
"""
import argparse
import ast
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..runtime.command import CommandError, reports_errors


def find_bench_dir() -> Optional[Path]:
    """The repository's bench/ directory (present in a source checkout, absent from a wheel install)."""
    import metafast

    candidates = [Path(metafast.__file__).resolve().parent.parent / "bench", Path.cwd() / "bench"]
    for c in candidates:
        if (c / "common.py").is_file():
            return c
    return None


def is_microbenchmark(script: Path) -> bool:
    """Whether ``script`` defines a top-level ``run`` function (read as text, not imported)."""
    tree = ast.parse(script.read_text(), filename=str(script))
    return any(isinstance(node, ast.FunctionDef) and node.name == "run" for node in tree.body)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="run the kernel microbenchmarks of a source checkout (bench/)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="default auto")
    p.add_argument("--quick", action="store_true", help="small problem sizes, few repeats")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only benchmarks whose name contains NAME")
    p.add_argument("--out", metavar="DIR", help="keep the JSON rows in DIR (default: printed only)")
    p.set_defaults(handler=main)
    return p


@reports_errors
def main(args: argparse.Namespace) -> int:
    bench_dir = find_bench_dir()
    if bench_dir is None:
        raise CommandError("the benchmarks live in the bench/ directory of a metafast source checkout, which this "
                           "installation does not have (e.g. installed from a wheel); run from a clone of the repository")
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: torch.cuda.is_available() is False")
    else:
        device = args.device
    scripts = sorted(bench_dir.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if any(o in s.stem for o in args.only)]
    if not scripts:
        what = f" matching {args.only}" if args.only else ""
        raise CommandError(f"no bench_*.py scripts{what} in {bench_dir}")
    label = f"cuda ({torch.cuda.get_device_name()})" if device == "cuda" else "cpu"
    out = args.out or tempfile.mkdtemp(prefix="metafast-bench-")
    failed = ran = 0
    try:
        for script in scripts:
            if not is_microbenchmark(script):
                print(f"== {script.stem}: skipped (no run(device, quick) function; run python {script} by hand)\n")
                continue
            print(f"== {script.stem} on {label}" + (" (quick)" if args.quick else ""), flush=True)
            cmd = [sys.executable, str(script), "--device", device, "--out", out] + (["--quick"] if args.quick else [])
            rc = subprocess.run(cmd, cwd=str(bench_dir.parent)).returncode
            ran += 1
            if rc != 0:
                failed += 1
                print(f"{script.stem} failed (exit status {rc})", file=sys.stderr)
            print(flush=True)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    if failed:
        print(f"{failed} of {ran} benchmarks failed", file=sys.stderr)
        return 1
    return 0
