"""Helpers of bench/device_check.sh (standard library only: they run before anything is built).

    python bench/device_check.py manifest OUT_DIR          # OUT_DIR/manifest.json
    python bench/device_check.py summary STEPS_FILE OUT_DIR  # OUT_DIR/summary.json from the step records
    python bench/device_check.py takes-args SCRIPT "ARGS"  # SCRIPT's argparse knows every --flag of ARGS
    python bench/device_check.py import-rows ROWS_JSONL [RESULTS_DIR]
        # after a GPU run: the streamed rows back into bench/results/<file>.json, one file per benchmark

The step records (one JSON object a line: name, rc, wall_s, cap_s, log, kind) are written by the shell
script; ``summary`` adds pytest's pass/fail counts from each test step's log and the row and target
counts of each benchmark from rows.jsonl.
"""
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections import OrderedDict
from typing import Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.source import source, write_json  # noqa: E402

ROWS = "rows.jsonl"
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "deselected")


def _cmd(args: List[str], timeout: float = 20) -> str:
    if shutil.which(args[0]) is None:
        return f"{args[0]}: not found"
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{args[0]}: {type(e).__name__}: {e}"
    return (out.stdout + out.stderr).strip()


def _versions() -> Dict[str, str]:
    """Installed versions, read from package metadata (importing torch can take a minute on a loaded
    host; the manifest must not); torch's CUDA version from its version.py."""
    from importlib import metadata, util

    v = {"python": platform.python_version()}
    for dist in ("torch", "triton", "numpy", "pytest", "pytest-xdist", "pytest-timeout", "pygments", "ninja",
                 "learn2learn", "higher"):
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            v[dist] = "absent"
    spec = util.find_spec("torch")
    if spec is not None and spec.origin:
        try:
            with open(os.path.join(os.path.dirname(spec.origin), "version.py")) as f:
                m = re.search(r"^cuda\b.*?=\s*'([^']*)'", f.read(), re.M)
            v["torch_cuda"] = m.group(1) if m else "none"
        except OSError:
            v["torch_cuda"] = "unknown"
    return v


def manifest(out_dir: str) -> Dict[str, object]:
    m = OrderedDict()
    m["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    m["source"] = source()
    m["versions"] = _versions()
    m["host"] = {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    m["nvidia_smi"] = _cmd(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                            "--format=csv,noheader"])
    m["nvcc"] = _cmd(["nvcc", "--version"]).splitlines()[-1:] if shutil.which("nvcc") else "nvcc: not found"
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "manifest.json"), m)
    return m


def pytest_counts(log: str) -> Dict[str, int]:
    """Outcome counts of a pytest log: its closing summary line, or (a run cut short) the per-test
    lines of -v output ("path::test PASSED", xdist's "[gw0] ... PASSED path::test")."""
    if not os.path.isfile(log):
        return {}
    with open(log, errors="replace") as f:
        text = f.read()
    closing = [line for line in text.splitlines() if re.match(r"^=+ .*\b(passed|failed|error|skipped|no tests ran)\b.* in [\d.]+s", line)]
    counts: Dict[str, int] = {}
    if closing:
        for n, what in re.findall(r"(\d+) (\w+)", closing[-1]):
            what = {"errors": "error", "warnings": "warnings"}.get(what, what)
            if what in OUTCOMES:
                counts[what] = counts.get(what, 0) + int(n)
        counts["complete"] = 1
        return counts
    seen = set()
    for m in re.finditer(r"^(?:\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+::\S+)"
                         r"|(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS))", text, re.M):
        outcome, test = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        if (test, outcome) in seen:
            continue
        seen.add((test, outcome))
        key = {"XFAIL": "xfailed", "XPASS": "xpassed", "ERROR": "error"}.get(outcome, outcome.lower())
        counts[key] = counts.get(key, 0) + 1
    counts["complete"] = 0
    return counts


def row_counts(rows_file: str) -> Dict[str, Dict[str, int]]:
    """Per results file: rows, targets met and missed, rows with a failed check (from rows.jsonl)."""
    out: Dict[str, Dict[str, int]] = {}
    if not os.path.isfile(rows_file):
        return out
    with open(rows_file) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            c = out.setdefault(r.get("file", "?"), {"rows": 0, "targets_met": 0, "targets_missed": 0})
            c["rows"] += 1
            for met in (r.get("targets") or {}).values():
                c["targets_met" if met else "targets_missed"] += 1
    return out


def summary(steps_file: str, out_dir: str) -> Dict[str, object]:
    steps = []
    if os.path.isfile(steps_file):
        with open(steps_file) as f:
            steps = [json.loads(line) for line in f if line.strip()]
    for s in steps:
        if s.get("kind") == "pytest":
            s["tests"] = pytest_counts(s["log"])
    rows = row_counts(os.path.join(out_dir, ROWS))
    for s in steps:
        if s.get("kind") == "bench":
            s["rows"] = rows.get(s.get("file", ""), {"rows": 0, "targets_met": 0, "targets_missed": 0})
    ok = all(s["rc"] == 0 for s in steps)
    result = OrderedDict(ok=ok, source=source(), date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                         wall_s=round(sum(s.get("wall_s", 0) for s in steps), 1), steps=steps, rows=rows)
    write_json(os.path.join(out_dir, "summary.json"), result)
    return result


def import_rows(rows_file: str, results_dir: Optional[str] = None) -> List[str]:
    """Write each file's streamed rows to ``<results_dir>/<file>.json`` (replacing that file)."""
    from bench.common import RESULTS_DIR, write_rows  # torch is needed only here

    by_file: "OrderedDict[str, List[dict]]" = OrderedDict()
    with open(rows_file) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                by_file.setdefault(r.pop("file"), []).append(r)
    return [write_rows(name, rows, results_dir or RESULTS_DIR) for name, rows in by_file.items()]


def takes_args(script: str, args: str) -> List[str]:
    """The --flags of ``args`` that ``script`` declares nowhere with add_argument (read from its source,
    so nothing is imported: the rehearsal's stand-in for running a GPU benchmark)."""
    import ast

    def flags(path, seen):
        # the script's own add_argument calls and those of the bench modules it imports (a shared main)
        seen.add(path)
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        out = {a.value for node in ast.walk(tree) if isinstance(node, ast.Call)
               and getattr(node.func, "attr", None) == "add_argument"
               for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bench."):
                dep = os.path.join(os.path.dirname(path), node.module.split(".", 1)[1] + ".py")
                if os.path.isfile(dep) and dep not in seen:
                    out |= flags(dep, seen)
        return out

    declared = flags(script, set())
    return [a for a in args.split() if a.startswith("--") and a not in declared]


def main(argv: List[str]) -> int:
    if len(argv) == 2 and argv[0] == "manifest":
        m = manifest(argv[1])
        print(json.dumps({k: m[k] for k in ("source", "versions", "nvidia_smi")}, indent=1))
        return 0
    if len(argv) == 3 and argv[0] == "summary":
        s = summary(argv[1], argv[2])
        for st in s["steps"]:
            extra = st.get("tests") or st.get("rows") or ""
            print(f"{st['name']:>14}: rc {st['rc']:>3}  {st['wall_s']:6.1f} s  {json.dumps(extra) if extra else ''}")
        print(f"summary: {'all steps passed' if s['ok'] else 'FAILED steps: ' + ', '.join(x['name'] for x in s['steps'] if x['rc'])}")
        return 0
    if len(argv) == 3 and argv[0] == "takes-args":
        unknown = takes_args(argv[1], argv[2])
        print(f"{argv[1]}: " + (f"takes no {' '.join(unknown)}" if unknown else f"parses and takes {argv[2]}"))
        return 1 if unknown else 0
    if argv[:1] == ["import-rows"] and len(argv) in (2, 3):
        for p in import_rows(*argv[1:]):
            print(f"wrote {p}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
