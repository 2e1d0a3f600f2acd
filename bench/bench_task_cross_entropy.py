"""Microbenchmark: metafast.ops.task_cross_entropy against PyTorch eager.

Baselines, measured in the same run:
- ``eager``: log_softmax + nll_loss per task (a Python loop over T), what a per-task MAML loop does;
- ``reference``: task_cross_entropy_reference (one batched log_softmax + gather over all tasks).
Modes: ``fwd`` (loss only, no graph), ``bwd`` (gradient of an existing graph, grad_out != 1),
``fwd+bwd``. GPU: T*N = 64K rows, C in {5, 100, 1000}, float32 and bfloat16, fused = every available
backend (cuda extension, triton), timed without the host-side label check (METAFAST_CHECK_LABELS=0);
``metafast+labelcheck`` is the first of them with that check in front. CPU: small shapes, fused =
the CPU path (the reference itself, labels always checked); one thread by default (``--threads``)
and glibc told to keep freed memory, because on small VMs worker-thread wake-ups and fresh page
faults otherwise swamp these sub-millisecond timings; each case is timed in 5 interleaved rounds
and the fastest round's median kept.

Bandwidth: the bytes an ideal fused implementation moves (fwd: read logits + write dlogits; bwd:
read dlogits + write the gradient; fwd+bwd: both) divided by the time, next to a device copy of a
logits-sized tensor timed in the same run.

    python -m bench.bench_task_cross_entropy --device cuda [--quick] [--out DIR]
"""
import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    RESULTS_DIR,
    RowSink,
    as_sink,
    base_row,
    check_grads,
    finish,
    keep_freed_memory,
    print_table,
    print_targets,
    speedup_target,
    time_interleaved,
)
from metafast import _backend  # noqa: E402
from metafast.ops.task_cross_entropy import (  # noqa: E402
    _check_label_range,
    task_cross_entropy,
    task_cross_entropy_reference,
)

BENCH = "task_cross_entropy"
# GPU target of every fused row of mode fwd+bwd.
GPU_GOALS = {"speedup_vs_eager": 2.0}


def eager_per_task(logits, labels):
    return torch.stack([F.nll_loss(F.log_softmax(logits[t], dim=-1), labels[t]) for t in range(logits.shape[0])])


def _cases(device: torch.device, quick: bool):
    if device.type == "cuda":
        shapes = [(64, 1024, c) for c in ((5, 100) if quick else (5, 100, 1000))]
        dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    else:
        shapes = [(16, 64, c) for c in ((5, 100) if quick else (5, 100, 1000))]
        dtypes = [torch.float32]
    return [(s, d) for s in shapes for d in dtypes]


def _fused_impls(device: torch.device) -> Dict[str, Callable]:
    if device.type != "cuda":
        return {"metafast[torch]": lambda x, y: task_cross_entropy(x, y)}
    impls = {}
    for backend in ("cuda", "triton"):
        try:
            _backend.resolve(BENCH, device, backend)
        except (_backend.BackendUnavailableError, RuntimeError):
            continue
        impls[f"metafast[{backend}]"] = lambda x, y, b=backend: task_cross_entropy(x, y, backend=b)
    if impls:
        # The same op with the default label-range check (one host sync) put back in front.
        first = impls[next(iter(impls))]
        impls["metafast+labelcheck"] = lambda x, y: (_check_label_range(y, x.shape[2], -100), first(x, y))[1]
    return impls


def _mode_fns(fn, x, y, g):
    """{mode: zero-argument callable} for one implementation."""
    def fwd():
        with torch.no_grad():
            fn(x, y)

    xg = x.detach().requires_grad_()
    loss = fn(xg, y)
    g = g.to(loss.dtype)

    def bwd():
        torch.autograd.grad(loss, xg, g, retain_graph=True)

    def fwd_bwd():
        xx = x.detach().requires_grad_()
        torch.autograd.grad(fn(xx, y), xx, g)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def run(device, quick: bool = False, rounds: int = 5, sink: Optional[RowSink] = None) -> List[Dict[str, object]]:
    """Rows (each streamed to ``sink`` once its case is measured); a fused implementation missing on
    CUDA or off eager's loss and gradient is a failure of the sink."""
    device = torch.device(device)
    sink = as_sink(sink)
    if device.type == "cpu":
        keep_freed_memory()
        return _run(device, quick, rounds, sink)
    saved = os.environ.get("METAFAST_CHECK_LABELS")
    os.environ["METAFAST_CHECK_LABELS"] = "0"  # time the kernels; "+labelcheck" adds the check back
    try:
        return _run(device, quick, rounds, sink)
    finally:
        if saved is None:
            del os.environ["METAFAST_CHECK_LABELS"]
        else:
            os.environ["METAFAST_CHECK_LABELS"] = saved


def _run(device: torch.device, quick: bool, rounds: int, sink: RowSink) -> List[Dict[str, object]]:
    if not _fused_impls(device):
        sink.fail(f"no metafast task_cross_entropy backend on {device} ({_backend.available()})")
    gen = torch.Generator(device="cpu").manual_seed(0)
    for (T, N, C), dtype in _cases(device, quick):
        x = (torch.randn(T, N, C, generator=gen) * 3).to(device=device, dtype=dtype)
        y = torch.randint(0, C, (T, N), generator=gen).to(device)
        g = (torch.rand(T, generator=gen) + 0.5).to(device)  # grad_out != 1
        es = x.element_size()
        src, dst = torch.empty_like(x), torch.empty_like(x)
        moved = {"fwd": 2 * x.numel() * es + y.numel() * 8, "bwd": 2 * x.numel() * es}
        moved["fwd+bwd"] = moved["fwd"] + moved["bwd"]

        impls = {"eager": eager_per_task,
                 "reference": lambda a, b: task_cross_entropy_reference(a, b),
                 **_fused_impls(device)}
        sink.expect(3 * len(impls))
        errs, ref = {}, None
        for name, fn in impls.items():  # loss and gradient against eager's (the first) before timing
            xg = x.detach().requires_grad_()
            loss = fn(xg, y)
            got = (loss.detach(), torch.autograd.grad(loss, xg, g.to(loss.dtype))[0])
            ref = got if ref is None else ref
            errs[name] = check_grads(sink, f"{name} {T}x{N}x{C} {dtype}", got, ref, dtype)
        fns = {"copy": lambda: dst.copy_(src)}
        for name, fn in impls.items():
            for mode, f in _mode_fns(fn, x, y, g).items():
                fns[f"{name}|{mode}"] = f
        measured = time_interleaved(fns, device, rounds)
        copy_gbps = 2 * x.numel() * es / measured.pop("copy") / 1e6
        times: Dict[str, Dict[str, float]] = {}
        for key, ms in measured.items():
            name, mode = key.split("|")
            times.setdefault(name, {})[mode] = ms
        for name, per_mode in times.items():
            for mode, ms in per_mode.items():
                gbps = moved[mode] / ms / 1e6
                row = {
                    **base_row(BENCH, device), "impl": name, "mode": mode, "T": T, "N": N, "C": C,
                    "dtype": str(dtype).replace("torch.", ""), "ms": ms,
                    "speedup_vs_eager": times["eager"][mode] / ms,
                    "speedup_vs_reference": times["reference"][mode] / ms,
                    "GB/s": gbps, "copy_GB/s": copy_gbps, "frac_of_copy": gbps / copy_gbps,
                    "rel_err_vs_eager": errs[name],
                }
                if device.type == "cuda" and name.startswith("metafast[") and mode == "fwd+bwd":
                    speedup_target(row, GPU_GOALS, "cuda")
                sink.add(row)
    return sink.rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=RESULTS_DIR, help="directory for the JSON rows")
    p.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: on small VMs a parallel torch op can stall for "
                        "milliseconds waking its worker threads, which swamps these timings)")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sink = RowSink(f"{BENCH}_{device.type}", args.out)
    rows = run(args.device, quick=args.quick, sink=sink)
    print_table(rows, ["impl", "mode", "T", "N", "C", "dtype", "ms", "speedup_vs_eager",
                       "speedup_vs_reference", "GB/s", "frac_of_copy"])
    print_targets(rows, lambda r: f"{r['impl']} {r['mode']} {r['T']}x{r['N']}x{r['C']} {r['dtype']}")
    return finish(sink)


if __name__ == "__main__":
    sys.exit(main())
