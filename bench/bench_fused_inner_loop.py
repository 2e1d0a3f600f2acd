"""The fused inner loop (whole MAML meta-step of a small MLP in one kernel) against torch.func, a
per-task autograd loop and metafast's unfused batched path, in the same run.

Workloads (the MAML paper's sinusoid regressor and an ANIL-style classifier head):
- sinusoid: MLP 1-40-40-1, 25 tasks, 1 step (target >= 20x torch.func, >= 50x the loop on GPU)
- sinusoid_1000x5: the same with 1,000 tasks and 5 steps (target >= 10x torch.func; the loop only
  checks gradients)
- anil_head: a 64->5 linear head on fixed features, 32 tasks 5-way 5-shot, 10 steps (>= 10x)
The targets are GPU targets (checked per row on CUDA only; learn2learn's recipe, the per-task loop,
stands in for learn2learn where it is not installed).
Every meta-gradient is checked against the per-task loop before timing (bench_maml_step's harness);
rows also carry the achieved FLOP/s (analytic count of the meta-step's matmuls) and, on GPU, the
fp32 matmul peak measured in the same run.

    python bench/bench_fused_inner_loop.py [--device cpu|cuda] [--workload NAME|all] [--quick]
"""
import argparse
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `metafast` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.baselines import available  # noqa: E402
from bench.bench_maml_step import (Workload, _sinusoid_batch, bench_settings, bench_workload,  # noqa: E402
                                   episodes, metafast_status, report)
from bench.common import RESULTS_DIR, RowSink, as_sink, finish, time_ms  # noqa: E402
from metafast.algorithms.paths.fused import mlp_dims  # noqa: E402
from metafast.models import MLP  # noqa: E402

BENCH = "fused_inner_loop"
# Columns `metafast bench` prints.
COLUMNS = ["workload", "method", "ms", "speedup_vs_torch_func", "speedup_vs_loop", "grad_rel_err_vs_loop", "tflops",
           "fraction_of_peak"]


def _head_batch(T: int, g: torch.Generator, ways: int = 5, shots: int = 5, queries: int = 15, features: int = 64):
    """Episodes of fixed 64-d features (what a frozen body hands an ANIL head)."""
    return episodes(T, g, ways, shots, queries, lambda rows: torch.randn(T, rows, features, generator=g))


WORKLOADS: Dict[str, Workload] = {
    "sinusoid": Workload("sinusoid", lambda: MLP(1, [40, 40], 1), "mse", 0.01, 1, 25, 5, 20.0, 21,
                         _sinusoid_batch),
    "sinusoid_1000x5": Workload("sinusoid_1000x5", lambda: MLP(1, [40, 40], 1), "mse", 0.01, 5, 1000, 16, 10.0,
                                11, _sinusoid_batch, time_loop=False),
    "anil_head": Workload("anil_head", lambda: MLP(64, [], 5), "cross_entropy", 0.1, 10, 32, 4, 10.0, 11,
                          _head_batch),
}


# Per workload, what BatchedMAML's fused meta-step must reach on a GPU.
GPU_TARGETS: Dict[str, Dict[str, float]] = {
    "sinusoid": {"speedup_vs_torch_func": 20.0, "speedup_vs_learn2learn": 50.0},
    "sinusoid_1000x5": {"speedup_vs_torch_func": 10.0},
    "anil_head": {"speedup_vs_torch_func": 10.0},
}


def meta_step_flops(dims: Sequence[int], n_support: int, n_query: int, steps: int, tasks: int,
                    second_order: bool = True) -> float:
    """Matmul FLOPs of one meta-step: per inner step forward + backward (3 passes of 2*d_in*d_out per
    row) on the support set, the reverse's Hessian-vector product (R-forward 2 passes, R-backward 4),
    and forward + backward on the query set."""
    per_row = sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))
    inner = 3 * n_support * per_row * steps
    reverse = 6 * n_support * per_row * steps if second_order else 0
    return float(tasks * (inner + reverse + 3 * n_query * per_row))


def fp32_peak_tflops(device: torch.device) -> Optional[float]:
    """Measured fp32 (TF32 off) matmul throughput on this GPU: the ceiling the FLOP/s column is read against."""
    if device.type != "cuda":
        return None
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        n = 8192
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        ms = time_ms(lambda: a @ b, device)
        return 2 * n ** 3 / (ms * 1e-3) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def run(device="cpu", quick: bool = False, workloads: Optional[Sequence[str]] = None,
        threads: Optional[int] = 1, sink: Optional[RowSink] = None) -> List[Dict[str, object]]:
    """Rows of the fused-inner-loop bench, each streamed to ``sink`` once its workload is measured."""
    device = torch.device(device)
    sink = as_sink(sink)
    with bench_settings(device, workloads, WORKLOADS, threads) as names:
        use_metafast, graph, notes = metafast_status(device.type == "cuda", device)
        for n in notes:
            print(f"note: {n}")
        if not use_metafast:
            sink.fail(notes[0])
        peak = fp32_peak_tflops(device)
        if peak is not None:
            print(f"fp32 matmul peak measured here: {peak:.1f} TFLOP/s")
        classes = [c for c in available() if c.name in ("torch.func", "per-task loop")]
        rows = []
        for n in names:
            wl = WORKLOADS[n]
            variants = [("metafast (unfused)", {"fused": False})]
            # the rows reach the sink after their FLOP/s columns are added below
            collect = RowSink()
            wrows = bench_workload(wl, device, quick, classes, use_metafast, graph, variants=variants, sink=collect,
                                   goals=GPU_TARGETS[n] if device.type == "cuda" else {})
            sink.expect(collect.expected)
            for why in collect.failures:
                sink.fail(why)
            model = wl.make_model()
            dims = mlp_dims(model)
            sx, _, qx, _ = wl.make_batch(1, torch.Generator().manual_seed(0))
            flops = meta_step_flops(dims, sx.shape[1], qx.shape[1], wl.steps, wrows[0]["tasks"])
            for r in wrows:
                r["bench"] = BENCH
                r["model_gflop"] = flops / 1e9
                r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
                r["fp32_peak_tflops"] = peak
                r["fraction_of_peak"] = None if peak is None else r["tflops"] / peak
                sink.add(r)
            rows += wrows
        return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workload", default="all", choices=["all", *WORKLOADS])
    ap.add_argument("--out", default=RESULTS_DIR, help="directory for the JSON rows")
    ap.add_argument("--quick", action="store_true", help="few tasks and repeats: a smoke run, not a measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU only)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads: expected >= 1, got {args.threads}")
    workloads = None if args.workload == "all" else [args.workload]
    name = f"{BENCH}_{args.device}" + ("" if workloads is None else f"_{args.workload}") + ("_quick" if args.quick else "")
    sink = RowSink(name, args.out)
    rows = run(args.device, quick=args.quick, workloads=workloads, threads=args.threads, sink=sink)
    report(rows)
    print()
    for r in rows:
        if math.isfinite(r["tflops"]):
            peak = "" if r["fraction_of_peak"] is None else f" ({100 * r['fraction_of_peak']:.2f}% of fp32 peak)"
            print(f"{r['workload']:>16} {r['method']:>22}: {1e3 * r['tflops']:9.2f} GFLOP/s{peak}")
    return finish(sink)


if __name__ == "__main__":
    sys.exit(main())
