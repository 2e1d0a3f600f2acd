"""Timing and result-row helpers shared by the benchmarks.

GPU: triton.testing.do_bench (median, warm-up, L2 flush). CPU: median of repeated perf_counter runs.
Every number a benchmark reports is paired with a baseline measured in the same run.

Rows stream: a benchmark hands each row to a :class:`RowSink` as soon as it is measured, which
rewrites ``<out>/<name>.json`` at once and, when $OUT is set (a GPU machine's output folder), appends
the row to ``$OUT/rows.jsonl``; a run cut short keeps what it measured. Each row carries device, torch,
commit, dirty flag and date (bench/source.py). A benchmark exits non-zero when its metafast subject
failed, a row it promised is missing, or a gradient check failed (:func:`finish`); a target missed is
reported per row (``targets``, ``target_met``) and printed PASS/FAIL, not an exit code.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional

import torch

from .source import source, write_json

from metafast.runtime.allocator import keep_freed_memory  # noqa: F401  (the CPU benches' allocator setting)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def commit() -> str:
    """The short commit rows are measured at ($METAFAST_COMMIT, git, or bench/source.json)."""
    return str(source()["commit"])


def dirty() -> Optional[bool]:
    """Whether tracked files (bench/results/ excepted) differ from that commit; None when unknown."""
    return source()["dirty"]


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
    ref = fns[baseline]()
    errs = {name: max_abs_diff(fn(), ref) for name, fn in fns.items()}
    best = time_interleaved({"copy": lambda: plain.clone(), **fns}, cpu, rounds, warmup=2, repeats=9)
    gb = 2 * plain.numel() * plain.element_size() / 1e6
    copy_gbps = gb / best.pop("copy")
    return [{**base_row(bench, cpu), "impl": name, "shape": list(shape), "ms": ms,
             f"speedup_vs_{baseline}": best[baseline] / ms, "GB/s": gb / ms, "copy_GB/s": copy_gbps,
             f"max_abs_err_vs_{baseline}": errs[name], "threads": torch.get_num_threads()} for name, ms in best.items()]


def cpu_bench_main(argv, doc: str, bench: str, run: Callable[..., List[Dict[str, object]]], columns: List[str],
                   quick_help: str) -> int:
    """The command line of a benchmark of CPU kernels: --threads (default 2, as the meta-step bench),
    --quick, --out; ``run(device, quick=..., sink=...)`` streams the rows to ``<out>/<bench>_cpu.json``
    and returns them (None: nothing to time on that device). Returns the exit code."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (the op's kernels are CPU kernels)")
    p.add_argument("--out", default=RESULTS_DIR, help="directory for the JSON rows")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the meta-step bench uses 2)")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    sink = RowSink(f"{bench}_cpu", args.out)
    rows = run(args.device, quick=args.quick, sink=sink)
    if rows is None:  # not an op of this device: nothing promised
        return 0
    print_table(rows, columns)
    return finish(sink)


def map_op_check(sink: RowSink, rows: List[Dict[str, object]], baseline: str, atol: float = 1e-5) -> None:
    """Stream ``map_op_rows`` rows; a metafast result farther than ``atol`` from ``baseline``'s fails."""
    for r in rows:
        err = r[f"max_abs_err_vs_{baseline}"]
        if not err <= atol:
            sink.fail(f"{r['bench']} {r['impl']} {r['shape']}: max |err| vs {baseline} {err:.2e} > {atol:g}")
        sink.add(r)


def base_row(bench: str, device: torch.device) -> Dict[str, object]:
    return {
        "bench": bench,
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": commit(),
        "dirty": dirty(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
    }


class RowSink:
    """The rows of one results file, each written the moment it is added.

    ``name`` None collects only (``metafast bench`` and tests). Otherwise every :meth:`add` rewrites
    ``<out_dir>/<name>.json`` (the rows of this run so far: nothing from an earlier run survives the
    first row) and appends the row, tagged ``"file": name``, to ``<stream_dir>/rows.jsonl``
    (``stream_dir`` defaults to $OUT). ``failures`` collects what makes the benchmark exit non-zero."""

    def __init__(self, name: Optional[str] = None, out_dir: str = RESULTS_DIR, stream_dir: Optional[str] = None):
        self.name, self.out_dir, self.rows = name, out_dir, []
        self.stream_dir = (os.environ.get("OUT") or None) if stream_dir is None else stream_dir
        self.failures: List[str] = []
        self.expected = 0  # rows promised so far (:meth:`expect`); fewer at the end is a failure

    def expect(self, n: int) -> None:
        """Promise ``n`` more rows (before measuring them)."""
        self.expected += n

    def add(self, row: Dict[str, object]) -> Dict[str, object]:
        self.rows.append(row)
        if self.name is not None:
            write_rows(self.name, self.rows, self.out_dir)
            if self.stream_dir:
                os.makedirs(self.stream_dir, exist_ok=True)
                with open(os.path.join(self.stream_dir, STREAM_FILE), "a") as f:
                    f.write(json.dumps({"file": self.name, **row}) + "\n")
        return row

    def extend(self, rows: Iterable[Dict[str, object]]) -> None:
        for r in rows:
            self.add(r)

    def fail(self, why: str) -> None:
        """Record a failure of the benchmark's subject (printed at once; :func:`finish` exits 1)."""
        print(f"FAILED: {why}", flush=True)
        self.failures.append(why)


STREAM_FILE = "rows.jsonl"


def as_sink(sink: Optional[RowSink]) -> RowSink:
    """A benchmark's ``run(..., sink=None)``: a collecting sink when the caller gave none."""
    return RowSink() if sink is None else sink


def set_targets(row: Dict[str, object], checks: Dict[str, bool],
                values: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """Record targets on a row: ``targets`` {description: met}, ``target_met`` all of them, and
    ``target_values`` {description: the measured value it judged} (``values``; `metafast bench` prints them)."""
    row["targets"] = {k: bool(v) for k, v in checks.items()}
    row["target_values"] = {k: (values or {}).get(k) for k in checks}
    row["target_met"] = all(row["targets"].values())
    return row


def add_target(row: Dict[str, object], what: str, met: bool, value: object = None) -> Dict[str, object]:
    """One more target on a row that may already have some (``target_met`` is then all of them)."""
    return set_targets(row, {**(row.get("targets") or {}), what: met},
                       {**(row.get("target_values") or {}), what: value})


def speedup_target(row: Dict[str, object], goals: Dict[str, float], device: str) -> Dict[str, object]:
    """``goals`` {"speedup_vs_X": at least}: targets named "<device>: >= Nx X" on ``row``."""
    checks, values = {}, {}
    for key, goal in goals.items():
        v = row.get(key)
        what = BASELINE_NAMES.get(key, key.replace("speedup_vs_", ""))
        name = f"{device}: >= {goal:g}x {what}"
        checks[name], values[name] = v is not None and v == v and v >= goal, v
    return set_targets(row, checks, values)


BASELINE_NAMES = {"speedup_vs_torch_func": "torch.func", "speedup_vs_learn2learn": "learn2learn",
                  "speedup_vs_loop": "the loop", "speedup_vs_eager": "eager"}


def print_targets(rows: Iterable[Dict[str, object]], label: Callable[[Dict[str, object]], str]) -> None:
    """One PASS/FAIL line per target of each row that has targets."""
    for r in rows:
        for what, met in (r.get("targets") or {}).items():
            print(f"{'PASS' if met else 'FAIL'}  {label(r)}: {what}")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64 (inf when not finite)."""
    err = ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    return err if err == err and err != float("inf") else float("inf")


# Relative (norm) error a fused result may have against the eager one computed from the same inputs.
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def check_grads(sink: RowSink, label: str, got, ref, dtype: torch.dtype) -> float:
    """Worst relative error of ``got`` against ``ref`` (tensors or tuples of them, e.g. loss and
    gradient); above ``GRAD_RTOL[dtype]`` it is recorded as a failure. Returns the error."""
    gs = list(got) if isinstance(got, (tuple, list)) else [got]
    rs = list(ref) if isinstance(ref, (tuple, list)) else [ref]
    err = max((rel_err(g, r) for g, r in zip(gs, rs)), default=float("inf")) if len(gs) == len(rs) else float("inf")
    if not err <= GRAD_RTOL[dtype]:
        sink.fail(f"{label}: rel err {err:.2e} vs eager > {GRAD_RTOL[dtype]:g}")
    return err


def finish(sink: RowSink, expected: Optional[int] = None) -> int:
    """The exit code of a benchmark: 1 when its subject failed, a gradient check failed (both
    recorded with ``sink.fail``) or fewer rows than promised (``expected``, default what was promised
    with ``sink.expect``, at least one) were measured; else 0."""
    expected = max(1, sink.expected) if expected is None else expected
    if len(sink.rows) < expected:
        sink.fail(f"{expected - len(sink.rows)} of {expected} expected rows missing")
    where = f" ({os.path.join(sink.out_dir, sink.name + '.json')})" if sink.name else ""
    print(f"{len(sink.rows)} rows{where}; " + (f"{len(sink.failures)} failure(s)" if sink.failures else "no failures"))
    return 1 if sink.failures else 0


def max_abs_diff(a, b) -> float:
    """Largest |a - b| over the tensors of two results (a tensor or a tuple/list of tensors)."""
    xs = list(a) if isinstance(a, (tuple, list)) else [a]
    ys = list(b) if isinstance(b, (tuple, list)) else [b]
    if len(xs) != len(ys):
        return float("inf")
    worst = 0.0
    for x, y in zip(xs, ys):
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                return float("inf")
            d = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
            worst = max(worst, d if d == d else float("inf"))
    return worst


def write_rows(name: str, rows: List[Dict[str, object]], out_dir: str = RESULTS_DIR) -> str:
    """Write rows to ``<out_dir>/<name>.json`` atomically; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    return write_json(os.path.join(out_dir, f"{name}.json"), rows)


def print_table(rows: List[Dict[str, object]], columns: List[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
