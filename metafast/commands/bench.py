"""``metafast bench``: run the microbenchmarks of a source checkout.

Each ``bench/bench_<op>.py`` runs as its own process, ``python bench/bench_<op>.py --device D --out DIR
[--quick]``, and prints its own table: the library never imports bench/. A script with a top-level
``run(device, quick)`` function is a microbenchmark with that command line; the others (e.g. the
multi-process bench_distributed.py) are run by hand. An installation without bench/ (a wheel) gets an
error that says where the benchmarks live.

Each script writes its rows into a fresh directory of its own, so what is read back afterwards are the
rows of this run only; rows carry ``targets`` {description: met} and ``target_values`` {description:
measured value} where the benchmark sets targets (bench/common.py set_targets). After each script the
command prints its targets, measured values and PASS/FAIL, and exits non-zero when a script failed or a
target was missed. ``--out DIR`` keeps a copy of the files the scripts wrote.
"""
import argparse
import ast
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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
    p.add_argument("--out", metavar="DIR", help="keep a copy of the JSON rows in DIR (default: printed only)")
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
    work = Path(tempfile.mkdtemp(prefix="metafast-bench-"))
    failed, ran, missed = [], 0, 0
    try:
        for script in scripts:
            if not is_microbenchmark(script):
                print(f"== {script.stem}: skipped (no run(device, quick) function; run python {script} by hand)\n")
                continue
            print(f"== {script.stem} on {label}" + (" (quick)" if args.quick else ""), flush=True)
            fresh = work / script.stem  # only this run's rows land here
            fresh.mkdir()
            cmd = [sys.executable, str(script), "--device", device, "--out", str(fresh)] + \
                (["--quick"] if args.quick else [])
            rc = subprocess.run(cmd, cwd=str(bench_dir.parent)).returncode
            ran += 1
            rows = read_rows(fresh)
            misses = print_targets(script.stem, rows)
            missed += misses
            if rc != 0:
                print(f"{script.stem} failed (exit status {rc})", file=sys.stderr)
            if rc != 0 or misses:
                failed.append(script.stem)
            if args.out:
                keep(fresh, Path(args.out))
            print(flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        why = f"; {missed} target(s) missed" if missed else ""
        print(f"{len(failed)} of {ran} benchmarks failed ({', '.join(failed)}){why}", file=sys.stderr)
        return 1
    return 0


def read_rows(directory: Path) -> List[Dict[str, object]]:
    """The rows of the ``*.json`` results files a benchmark wrote into ``directory`` (a list of rows each)."""
    rows: List[Dict[str, object]] = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise CommandError(f"{path}: not a JSON results file ({e})") from None
        if isinstance(data, list):
            rows += [dict(r, _file=path.stem) for r in data if isinstance(r, dict)]
    return rows


# the fields that say which case a row measured, in the order they are printed
CASE_FIELDS = ("workload", "method", "impl", "op", "mode", "shape", "T", "N", "B", "C", "H", "I", "O", "K",
               "features", "dtype")


def case_label(row: Dict[str, object]) -> str:
    parts = [f"{k}={row[k]}" if k in ("T", "N", "B", "C", "H", "I", "O", "K") else str(row[k])
             for k in CASE_FIELDS if row.get(k) is not None]
    return " ".join(parts) or str(row.get("_file", "row"))


def target_lines(rows: List[Dict[str, object]]) -> List[Tuple[str, str, str, bool]]:
    """(case, target, measured value, met) for every target of every row. A row whose ``target_met`` is
    false although each listed target passed gets a line of its own, so that no miss goes unprinted."""
    out = []
    for r in rows:
        targets = r.get("targets") or {}
        values = r.get("target_values") or {}
        for what, met in targets.items():
            out.append((case_label(r), str(what), _value(values.get(what)), bool(met)))
        if r.get("target_met") is False and all(targets.values()):
            out.append((case_label(r), "target_met (the row's overall verdict)", "-", False))
    return out


def _value(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if v == v else "nan"
    return str(v)


def print_targets(name: str, rows: List[Dict[str, object]]) -> int:
    """Print ``name``'s targets as a table of case, target, measured value and PASS/FAIL; returns the misses."""
    lines = target_lines(rows)
    if not rows:
        print(f"-- {name}: no rows written")
        return 0
    if not lines:
        print(f"-- {name}: {len(rows)} rows, no targets on this device")
        return 0
    header = ("case", "target", "measured", "result")
    cells = [(c, t, v, "PASS" if met else "FAIL") for c, t, v, met in lines]
    widths = [max(len(header[i]), *(len(row[i]) for row in cells)) for i in range(4)]
    print(f"-- {name}: targets")
    for row in [header] + cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    misses = sum(not met for *_, met in lines)
    print(f"-- {name}: {len(lines) - misses} of {len(lines)} targets met")
    return misses


def keep(fresh: Path, out: Path) -> None:
    """Copy the files a benchmark wrote into ``out`` (--out)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in fresh.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
