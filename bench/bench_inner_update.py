"""inner_update microbenchmark: the fused update of T tasks x P parameters against PyTorch eager, for
the forward, the backward and both, with the bandwidth achieved against a device copy measured in
the same run.

Implementations (every "speedup" is reference_ms / ms of the same phase and case):
  reference    inner_update_reference: the eager formula on the [T, P] tensors (the baseline)
  cuda/triton  the fused custom op on that backend (GPU)
  dispatch     inner_update() on CPU: the reference behind the public entry point (its overhead)
  loop         learn2learn style: one `p - lr * g` per parameter tensor per task (forward only)
  foreach      torch._foreach_add over the same tensors (forward only; no clipping)
inner_update_multi (one task, a module's parameter list): cuda (one launch) vs torch (_foreach,
or per-tensor ops when differentiated) vs loop.

GB/s counts the bytes the forward must move (theta, grad, lr read; fast written; grad read twice with
clipping); copy_gbps is dst.copy_(src) over T*P elements in the same run.

    python bench/bench_inner_update.py [--device cuda|cpu] [--out DIR] [--quick]
"""
import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `metafast` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import statistics  # noqa: E402
import time  # noqa: E402

from bench.common import RESULTS_DIR, base_row, print_table, time_ms, write_rows  # noqa: E402
from metafast import _backend  # noqa: E402
from metafast.ops.inner_update import (inner_update, inner_update_multi,  # noqa: E402
                                       inner_update_multi_reference, inner_update_reference)

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


def _bytes_fwd(T: int, P: int, dtype: torch.dtype, broadcast: bool, lr_kind: str, clip: bool) -> int:
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


def _rows_for(common, phase, times, reference, gbps_of=None):
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
    nbytes = _bytes_fwd(T, P, dtype, True, lr_kind, clip)
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
        rows = _rows_for(common, "fwd", time_group(fns, device), "reference", gbps_of)

    # backward alone (graph retained) and forward + backward
    theta, grad, lr = _make(T, P, dtype, device, lr_kind, True)
    xs = [x for x in (theta, grad, lr) if torch.is_tensor(x)]
    go = torch.randn(T, P, dtype=dtype, device=device)
    outs = {impl: _inner_update_fn(impl, max_norm)(theta, grad, lr) for impl in impls}
    bwd = {impl: (lambda out=out: torch.autograd.grad(out, xs, go, retain_graph=True)) for impl, out in outs.items()}
    rows += _rows_for(common, "bwd", time_group(bwd, device), "reference")
    del outs, bwd
    full = {impl: (lambda fn=_inner_update_fn(impl, max_norm): torch.autograd.grad(fn(theta, grad, lr), xs, go))
            for impl in impls}
    rows += _rows_for(common, "full", time_group(full, device), "reference")
    return rows


def _module_shapes(total: int) -> List[tuple]:
    """A Conv4-like parameter list (conv weight/bias + BN weight/bias per block, linear head), with
    the conv widths chosen so the total is about `total`."""
    width = 64
    while True:
        shapes = []
        cin = 1
        for _ in range(4):
            shapes += [(width, cin, 3, 3), (width,), (width,), (width,)]
            cin = width
        shapes += [(5, width), (5,)]
        n = sum(torch.Size(s).numel() for s in shapes)
        if n >= total or width >= 4096:
            return shapes
        width *= 2


def _bench_multi(device, total, dtype, clip, copy_gbps_fn) -> List[Dict[str, object]]:
    max_norm = CLIP if clip else None
    shapes = _module_shapes(total)
    P = sum(torch.Size(s).numel() for s in shapes)
    common = {"op": "inner_update_multi", "T": 1, "P": P, "dtype": str(dtype).replace("torch.", ""),
              "lr": "float", "clip": clip}
    copy_gbps = copy_gbps_fn(P)
    nbytes = _bytes_fwd(1, P, dtype, True, "float", clip)
    gbps_of = lambda ms: (nbytes / ms / 1e6, copy_gbps)  # noqa: E731
    params = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    grads = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    impls = ["torch"] + (["cuda"] if device.type == "cuda" and _usable_multi_cuda(device) else [])

    fns = {impl: (lambda impl=impl: inner_update_multi(params, grads, 0.01, max_norm, backend=impl)) for impl in impls}
    if not clip:
        fns["loop"] = lambda: [p - 0.01 * g for p, g in zip(params, grads)]
    with torch.no_grad():
        rows = _rows_for(common, "fwd", time_group(fns, device), "torch", gbps_of)

    for x in params + grads:
        x.requires_grad_()
    gos = [torch.randn_like(p) for p in params]
    xs = params + grads
    makers = {impl: ((lambda: inner_update_multi_reference(params, grads, 0.01, max_norm)) if impl == "torch" else
                     (lambda impl=impl: inner_update_multi(params, grads, 0.01, max_norm, backend=impl)))
              for impl in impls}
    outs = {impl: make() for impl, make in makers.items()}
    bwd = {impl: (lambda o=o: torch.autograd.grad(o, xs, gos, retain_graph=True)) for impl, o in outs.items()}
    rows += _rows_for(common, "bwd", time_group(bwd, device), "torch")
    del outs, bwd
    full = {impl: (lambda make=make: torch.autograd.grad(make(), xs, gos)) for impl, make in makers.items()}
    rows += _rows_for(common, "full", time_group(full, device), "torch")
    return rows


def _usable_multi_cuda(device) -> bool:
    try:
        return _backend.resolve("inner_update_multi", device, "cuda") == "cuda"
    except Exception as e:  # noqa: BLE001
        print(f"note: inner_update_multi backend cuda not timed: {e}")
        return False


def _copy_gbps(device, n: int, dtype) -> float:
    src = torch.randn(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    ms = time_group({"copy": lambda: dst.copy_(src)}, device)["copy"]
    return 2 * n * src.element_size() / ms / 1e6


def run(device: Union[str, torch.device] = "cpu", quick: bool = False,
        threads: Optional[int] = 2) -> List[Dict[str, object]]:
    """Time every case on ``device`` and return the rows (``threads`` applies on CPU)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' was asked for but torch sees no CUDA device")
    old_threads = torch.get_num_threads()
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    try:
        sizes = QUICK_SIZES if quick else (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
        dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" and not quick else [])
        rows = []
        for T, P in sizes:
            for dtype in dtypes:
                if dtype != torch.float32 and T * P < (1 << 22):
                    continue  # half precision only where bandwidth matters
                copy = _copy_gbps(device, T * P, dtype)
                for lr_kind in ("float", "vector"):
                    for clip in (False, True):
                        rows += _bench_case(device, T, P, dtype, lr_kind, clip, copy)
        totals = [1 << 14] if quick else ([112_005, 1 << 24] if device.type == "cuda" else [112_005])
        for total in totals:
            for clip in (False, True):
                rows += _bench_multi(device, total, torch.float32, clip,
                                     lambda n: _copy_gbps(device, n, torch.float32))
        base = base_row(BENCH, device)
        return [{**base, **r} for r in rows]
    finally:
        torch.set_num_threads(old_threads)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=RESULTS_DIR, help="directory for the JSON rows")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not a measurement")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU only)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads: expected >= 1, got {args.threads}")
    if hasattr(os, "getloadavg"):
        print("load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    rows = run(args.device, quick=args.quick, threads=args.threads)
    print_table(rows, COLUMNS)
    name = f"{BENCH}_{args.device}" + ("_quick" if args.quick else "")
    print(f"\nrows written to {write_rows(name, rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
