"""inner_update microbenchmark: the fused update of T tasks x P parameters against PyTorch eager, for
the forward, the backward and both, with the bandwidth achieved against a device copy measured in
the same run. inner_update_multi (one task's list of tensors): bench/bench_inner_update_multi.py.

Implementations (every "speedup" is reference_ms / ms of the same phase and case):
  reference    inner_update_reference: the eager formula on the [T, P] tensors (the baseline)
  cuda/triton  the fused custom op on that backend (GPU)
  dispatch     inner_update() on CPU: the reference behind the public entry point (its overhead)
  loop         learn2learn style: one `p - lr * g` per parameter tensor per task (forward only)
  foreach      torch._foreach_add over the same tensors (forward only; no clipping)

GB/s counts the bytes the forward must move (theta, grad, lr read; fast written; grad read twice with
clipping); copy_gbps is dst.copy_(src) over T*P elements in the same run.

    python bench/bench_inner_update.py [--device cuda|cpu] [--out DIR] [--quick]
"""
import argparse
import contextlib
import os
import sys
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `metafast` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import statistics  # noqa: E402
import time  # noqa: E402

from bench.common import RESULTS_DIR, base_row, print_table, time_ms, write_rows  # noqa: E402
from metafast import _backend  # noqa: E402
from metafast.ops.inner_update import inner_update, inner_update_reference  # noqa: E402

BENCH = "inner_update"
COLUMNS = ["op", "T", "P", "dtype", "lr", "clip", "phase", "impl", "ms", "speedup", "gbps", "frac_of_copy"]

# (T, P): sinusoid MLP 1-40-40-1 (1761 params, 25 tasks), Omniglot Conv4 (~112k params, 32 tasks),
# then bandwidth-bound sizes up to 16M elements.
GPU_SIZES = [(25, 1761), (32, 112_005), (16, 1 << 20), (4, 1 << 22)]
CPU_SIZES = [(25, 1761), (32, 112_005)]
QUICK_SIZES = [(25, 1761), (8, 1 << 14)]
# How P splits into parameter tensors for the loop/foreach baselines (Conv4-like: 18 tensors).
N_PARAM_TENSORS = 18
CLIP = 1.0
SAMPLES = 31  # CPU samples per implementation


def time_group(fns: Dict[str, Callable[[], object]], device: torch.device) -> Dict[str, float]:
    """Median ms per call of each function. GPU: bench.common.time_ms (do_bench) one after the
    other. CPU: samples of the functions interleaved round-robin, each sample running its function
    enough times to last ~0.3 ms, so that microsecond calls are not lost in timer noise and the load
    of a shared machine hits the implementations being compared alike."""
    if device.type == "cuda":
        return {name: time_ms(fn, device) for name, fn in fns.items()}
    reps = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        reps[name] = max(1, min(1000, int(3e-4 / max(time.perf_counter() - t0, 1e-7))))
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for i in range(3 + SAMPLES):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            if i >= 3:  # warm-up rounds
                samples[name].append((time.perf_counter() - t0) * 1e3 / reps[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def _split_sizes(P: int, n: int) -> List[int]:
    """n tensor sizes summing to P, uneven like a model's (weights large, biases small)."""
    weights = [16 if i % 2 == 0 else 1 for i in range(n)]
    sizes = [max(1, P * w // sum(weights)) for w in weights]
    sizes[0] += P - sum(sizes)
    return sizes


def bytes_fwd(T: int, P: int, dtype: torch.dtype, broadcast: bool, lr_kind: str, clip: bool) -> int:
    """Bytes the forward must move: theta, grad (twice with clipping) and lr read, fast written."""
    elems = (P if broadcast else T * P) + T * P * (3 if clip else 2) + (P if lr_kind == "vector" else 0)
    return elems * torch.empty((), dtype=dtype).element_size()


def _make(T, P, dtype, device, lr_kind, requires_grad):
    theta = torch.randn(P, dtype=dtype, device=device)
    grad = torch.randn(T, P, dtype=dtype, device=device)
    lr = 0.01 if lr_kind == "float" else torch.full((P,), 0.01, dtype=dtype, device=device)
    if requires_grad:
        theta.requires_grad_()
        grad.requires_grad_()
        if torch.is_tensor(lr):
            lr.requires_grad_()
    return theta, grad, lr


def _fused_impls(device: torch.device) -> List[str]:
    if device.type == "cpu":
        return ["dispatch"]
    out = []
    for b in ("cuda", "triton"):
        try:
            _backend.resolve("inner_update", device, b)
            out.append(b)
        except Exception as e:  # noqa: BLE001 - an unavailable backend is just not timed
            print(f"note: inner_update backend {b} not timed: {e}")
    return out


def _inner_update_fn(impl: str, max_norm):
    if impl == "reference":
        return lambda th, g, lr: inner_update_reference(th, g, lr, max_norm)
    if impl == "dispatch":
        return lambda th, g, lr: inner_update(th, g, lr, max_norm)
    return lambda th, g, lr: inner_update(th, g, lr, max_norm, backend=impl)


def rows_for(common, phase, times, reference, gbps_of=None):
    """One row per implementation: its ms and speedup against ``reference`` (and GB/s with gbps_of)."""
    rows = []
    for impl, ms in times.items():
        row = {**common, "phase": phase, "impl": impl, "ms": ms, "speedup": times[reference] / ms}
        if gbps_of is not None:
            gbps, copy_gbps = gbps_of(ms)
            row.update(gbps=gbps, copy_gbps=copy_gbps, frac_of_copy=gbps / copy_gbps)
        rows.append(row)
    return rows


def _bench_case(device, T, P, dtype, lr_kind, clip, copy_gbps) -> List[Dict[str, object]]:
    max_norm = CLIP if clip else None
    common = {"op": "inner_update", "T": T, "P": P, "dtype": str(dtype).replace("torch.", ""), "lr": lr_kind,
              "clip": clip}
    nbytes = bytes_fwd(T, P, dtype, True, lr_kind, clip)
    gbps_of = lambda ms: (nbytes / ms / 1e6, copy_gbps)  # noqa: E731
    impls = ["reference"] + _fused_impls(device)

    # forward without autograd
    theta, grad, lr = _make(T, P, dtype, device, lr_kind, False)
    fns = {impl: (lambda fn=_inner_update_fn(impl, max_norm): fn(theta, grad, lr)) for impl in impls}
    if not clip:  # eager per-tensor baselines (as a per-task, per-parameter update loop does it)
        sizes = _split_sizes(P, N_PARAM_TENSORS)
        ps = [p for _ in range(T) for p in torch.split(theta, sizes)]
        gs = [g for row in grad for g in torch.split(row, sizes)]
        if torch.is_tensor(lr):
            ls = [l for _ in range(T) for l in torch.split(lr, sizes)]
            fns["loop"] = lambda: [p - l * g for p, g, l in zip(ps, gs, ls)]
            fns["foreach"] = lambda: torch._foreach_addcmul(ps, ls, gs, value=-1.0)
        else:
            fns["loop"] = lambda: [p - lr * g for p, g in zip(ps, gs)]
            fns["foreach"] = lambda: torch._foreach_add(ps, gs, alpha=-lr)
    with torch.no_grad():
        rows = rows_for(common, "fwd", time_group(fns, device), "reference", gbps_of)

    # backward alone (graph retained) and forward + backward
    theta, grad, lr = _make(T, P, dtype, device, lr_kind, True)
    xs = [x for x in (theta, grad, lr) if torch.is_tensor(x)]
    go = torch.randn(T, P, dtype=dtype, device=device)
    outs = {impl: _inner_update_fn(impl, max_norm)(theta, grad, lr) for impl in impls}
    bwd = {impl: (lambda out=out: torch.autograd.grad(out, xs, go, retain_graph=True)) for impl, out in outs.items()}
    rows += rows_for(common, "bwd", time_group(bwd, device), "reference")
    del outs, bwd
    full = {impl: (lambda fn=_inner_update_fn(impl, max_norm): torch.autograd.grad(fn(theta, grad, lr), xs, go))
            for impl in impls}
    rows += rows_for(common, "full", time_group(full, device), "reference")
    return rows


def copy_gbps(device, n: int, dtype) -> float:
    """GB/s of dst.copy_(src) over n elements (the bandwidth a kernel's GB/s is a fraction of)."""
    src = torch.randn(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    ms = time_group({"copy": lambda: dst.copy_(src)}, device)["copy"]
    return 2 * n * src.element_size() / ms / 1e6


@contextlib.contextmanager
def bench_device(device: Union[str, torch.device], threads: Optional[int]) -> Iterator[torch.device]:
    """``device`` as a torch.device, checked to exist, with torch's CPU threads set to ``threads`` for a
    CPU run (restored afterwards)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' was asked for but torch sees no CUDA device")
    old = torch.get_num_threads()
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    try:
        yield device
    finally:
        torch.set_num_threads(old)


def run(device: Union[str, torch.device] = "cpu", quick: bool = False,
        threads: Optional[int] = 2) -> List[Dict[str, object]]:
    """Time every case on ``device`` and return the rows (``threads`` applies on CPU)."""
    with bench_device(device, threads) as device:
        sizes = QUICK_SIZES if quick else (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
        dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" and not quick else [])
        rows = []
        for T, P in sizes:
            for dtype in dtypes:
                if dtype != torch.float32 and T * P < (1 << 22):
                    continue  # half precision only where bandwidth matters
                copy = copy_gbps(device, T * P, dtype)
                for lr_kind in ("float", "vector"):
                    for clip in (False, True):
                        rows += _bench_case(device, T, P, dtype, lr_kind, clip, copy)
        base = base_row(BENCH, device)
        return [{**base, **r} for r in rows]


def main_for(bench: str, doc: str, run_fn: Callable[..., List[Dict[str, object]]],
             argv: Optional[Sequence[str]] = None) -> int:
    """The command line of the inner_update benchmarks: time ``run_fn``, print and write its rows."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=RESULTS_DIR, help="directory for the JSON rows")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not a measurement")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU only)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads: expected >= 1, got {args.threads}")
    if hasattr(os, "getloadavg"):
        print("load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    rows = run_fn(args.device, quick=args.quick, threads=args.threads)
    print_table(rows, COLUMNS)
    name = f"{bench}_{args.device}" + ("_quick" if args.quick else "")
    print(f"\nrows written to {write_rows(name, rows, args.out)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(BENCH, __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
