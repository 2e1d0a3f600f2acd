"""Timing and result-row helpers shared by the benchmarks.

GPU: triton.testing.do_bench (median, warm-up, L2 flush). CPU: median of repeated perf_counter runs.
Every number a benchmark reports is paired with a baseline measured in the same run.
"""
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch

from metafast.train.allocator import keep_freed_memory  # noqa: F401  (the CPU benches' allocator setting)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def commit() -> str:
    if os.environ.get("METAFAST_COMMIT"):  # a copy of the tree without .git (a remote GPU machine)
        return os.environ["METAFAST_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 7) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, rounds: int, warmup: int = 3,
                     repeats: int = 7) -> Dict[str, float]:
    """Median time of each callable; on CPU the minimum over ``rounds`` interleaved rounds, so that
    load from other processes hits every implementation alike and a quiet round wins."""
    best = {k: float("inf") for k in fns}
    for _ in range(1 if device.type == "cuda" else rounds):
        for k, f in fns.items():
            best[k] = min(best[k], time_ms(f, device, warmup=warmup, repeats=repeats))
    return best


def cpu_kernel_start(device, op: str, only: str, fallback: str) -> Optional[bool]:
    """Start of a microbenchmark of an op that has C++ CPU kernels only: None (after saying so) when
    ``device`` is not the CPU; else keeps freed memory (multi-MB outputs: fresh mappings' page faults
    would otherwise dominate) and returns whether the extension's kernel runs the op, as the op
    itself decides (the cpp backend). ``only`` / ``fallback`` complete the messages."""
    from metafast import _backend

    if torch.device(device).type != "cpu":
        print(f"   {op} has {only}: nothing to time on {device}")
        return None
    keep_freed_memory()
    backend, why = _backend.explain(op, "cpu")
    kernel = backend == "cpp"
    if not kernel:
        print(f"metafast._C's {op} kernel does not run here ({why}): {fallback} only")
    return kernel


def map_op_rows(bench: str, shape, plain: torch.Tensor, fns: Dict[str, Callable[[], object]], baseline: str,
                rounds: int) -> List[Dict[str, object]]:
    """Rows for a CPU op that reads one map and writes one (``plain``: a contiguous map of those bytes):
    ``fns`` timed interleaved with a copy of ``plain``; bandwidth is 2 x its bytes over the time, next
    to the copy's, and ``speedup_vs_<baseline>`` compares with the ``baseline`` entry."""
    cpu = torch.device("cpu")
    best = time_interleaved({"copy": lambda: plain.clone(), **fns}, cpu, rounds, warmup=2, repeats=9)
    gb = 2 * plain.numel() * plain.element_size() / 1e6
    copy_gbps = gb / best.pop("copy")
    return [{**base_row(bench, cpu), "impl": name, "shape": list(shape), "ms": ms,
             f"speedup_vs_{baseline}": best[baseline] / ms, "GB/s": gb / ms, "copy_GB/s": copy_gbps,
             "threads": torch.get_num_threads()} for name, ms in best.items()]


def cpu_bench_main(argv, doc: str, bench: str, run: Callable[..., List[Dict[str, object]]], columns: List[str],
                   quick_help: str) -> None:
    """The command line of a benchmark of CPU kernels: --threads (default 2, as the meta-step bench),
    --quick, --out; ``run(device, quick=...)`` gives the rows, written to ``<out>/<bench>_cpu.json``."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (the op's kernels are CPU kernels)")
    p.add_argument("--out", default=RESULTS_DIR, help="directory for the JSON rows")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the meta-step bench uses 2)")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    rows = run(args.device, quick=args.quick)
    if not rows:
        return
    print_table(rows, columns)
    print(f"wrote {write_rows(f'{bench}_cpu', rows, out_dir=args.out)}")


def base_row(bench: str, device: torch.device) -> Dict[str, object]:
    return {
        "bench": bench,
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
    }


def write_rows(name: str, rows: List[Dict[str, object]], out_dir: str = RESULTS_DIR) -> str:
    """Write rows to ``<out_dir>/<name>.json`` atomically; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def print_table(rows: List[Dict[str, object]], columns: List[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
