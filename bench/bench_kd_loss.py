"""Microbenchmark: metafast.ops.kd_loss against PyTorch eager.

Baseline, measured in the same run: ``eager`` = log_softmax(student/T) + log_softmax(teacher/T) +
kl_div(log_target, "batchmean") * alpha * T^2 + (1 - alpha) * cross_entropy, as a training script
writes it. Mode: ``fwd+bwd`` (loss and d loss / d student, grad_out != 1).

GPU: B=4096 rows, C=32768 classes (also 128K classes unless --quick), float32 and bfloat16; fused =
every available backend (cuda extension, triton), timed without the host-side label check
(METAFAST_CHECK_LABELS=0); peak memory is torch.cuda.max_memory_allocated during fwd+bwd minus the
inputs already allocated. CPU: small shapes, fused = the CPU path (the reference itself), time
only; one thread by default (``--threads``: worker-thread wake-ups swamp these timings on small VMs)
and glibc told to keep freed memory (fresh page faults would otherwise dominate), each case timed in 5 interleaved rounds and the fastest round's median kept.

    python -m bench.bench_kd_loss --device cuda [--quick] [--out DIR]
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
    set_targets,
    time_interleaved,
)
from metafast import _backend  # noqa: E402
from metafast.ops.kd_loss import kd_loss  # noqa: E402

BENCH = "kd_loss"
TEMPERATURE, ALPHA = 4.0, 0.9
# GPU target (metafast rows of this shape): >= 3x eager fwd+bwd at <= half its peak memory.
TARGET_SHAPE, TARGET_SPEEDUP, TARGET_PEAK = (4096, 32768), 3.0, 0.5


def eager_kd(s, t, y, temperature=TEMPERATURE, alpha=ALPHA):
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="batchmean")
    return alpha * temperature * temperature * kl + (1 - alpha) * F.cross_entropy(s, y)


def _cases(device: torch.device, quick: bool):
    if device.type == "cuda":
        shapes = [(4096, 32768)] + ([] if quick else [(1024, 131072)])
        dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    else:
        shapes = [(512, 100), (256, 1000)] + ([] if quick else [(32, 32768)])
        dtypes = [torch.float32]
    return [(s, d) for s in shapes for d in dtypes]


def _impls(device: torch.device) -> Dict[str, Callable]:
    impls: Dict[str, Callable] = {"eager": eager_kd}
    if device.type != "cuda":
        impls["metafast[torch]"] = lambda s, t, y: kd_loss(s, t, y, TEMPERATURE, ALPHA)
        return impls
    for backend in ("cuda", "triton"):
        try:
            _backend.resolve(BENCH, device, backend)
        except (_backend.BackendUnavailableError, RuntimeError):
            continue
        impls[f"metafast[{backend}]"] = lambda s, t, y, b=backend: kd_loss(s, t, y, TEMPERATURE, ALPHA, backend=b)
    return impls


def _peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak extra memory of one fn() call above what is allocated before it, in MiB (GPU only)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run(device, quick: bool = False, rounds: int = 5, sink: Optional[RowSink] = None) -> List[Dict[str, object]]:
    """Rows (each streamed to ``sink`` once its case is measured); a fused implementation missing on
    CUDA or off eager's loss and gradient is a failure of the sink."""
    device = torch.device(device)
    sink = as_sink(sink)
    if device.type == "cpu":
        keep_freed_memory()  # multi-MB temporaries: page faults of fresh mappings would dominate
        return _run(device, quick, rounds, sink)
    saved = os.environ.get("METAFAST_CHECK_LABELS")
    os.environ["METAFAST_CHECK_LABELS"] = "0"  # time the kernels, not a host sync
    try:
        return _run(device, quick, rounds, sink)
    finally:
        if saved is None:
            del os.environ["METAFAST_CHECK_LABELS"]
        else:
            os.environ["METAFAST_CHECK_LABELS"] = saved


def _run(device: torch.device, quick: bool, rounds: int, sink: RowSink) -> List[Dict[str, object]]:
    impls = _impls(device)
    if len(impls) < 2:
        sink.fail(f"no metafast kd_loss backend on {device} ({_backend.available()})")
    gen = torch.Generator(device="cpu").manual_seed(0)
    for (B, C), dtype in _cases(device, quick):
        s = (torch.randn(B, C, generator=gen) * 3).to(device=device, dtype=dtype)
        t = (torch.randn(B, C, generator=gen) * 3).to(device=device, dtype=dtype)
        y = torch.randint(0, C, (B,), generator=gen).to(device)
        g = torch.tensor(1.7, device=device)  # grad_out != 1

        sink.expect(1 + max(1, len(impls) - 1))
        errs = {}
        for name, fn in impls.items():
            x = s.detach().requires_grad_()
            loss = fn(x, t, y)
            got = (loss.detach(), torch.autograd.grad(loss, x, g.to(loss.dtype))[0])
            if name == "eager":
                ref = got
            errs[name] = check_grads(sink, f"{name} {B}x{C} {dtype}", got, ref, dtype)
        fns = {}
        for name, fn in impls.items():
            def fwd_bwd(fn=fn):
                x = s.detach().requires_grad_()
                loss = fn(x, t, y)
                torch.autograd.grad(loss, x, g.to(loss.dtype))
            fns[name] = fwd_bwd
        best = time_interleaved(fns, device, rounds)
        peaks = {k: _peak_mb(f, device) for k, f in fns.items()} if device.type == "cuda" else {}
        for name in fns:
            row = dict(base_row(BENCH, device), impl=name, mode="fwd+bwd", B=B, C=C,
                       dtype=str(dtype).replace("torch.", ""), ms=best[name],
                       speedup_vs_eager=best["eager"] / best[name], rel_err_vs_eager=errs[name])
            if peaks:
                row.update(peak_MiB=peaks[name], peak_vs_eager=peaks[name] / peaks["eager"])
            if device.type == "cuda" and name.startswith("metafast") and (B, C) == TARGET_SHAPE:
                speed, peak = f"cuda: >= {TARGET_SPEEDUP:g}x eager", f"cuda: peak <= {TARGET_PEAK:g} x eager's"
                set_targets(row, {speed: row["speedup_vs_eager"] >= TARGET_SPEEDUP, peak: row["peak_vs_eager"] <= TARGET_PEAK},
                            {speed: row["speedup_vs_eager"], peak: row["peak_vs_eager"]})
            sink.add(row)
    return sink.rows


COLUMNS = ["impl", "mode", "B", "C", "dtype", "ms", "speedup_vs_eager", "peak_MiB", "peak_vs_eager"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--out", default=RESULTS_DIR, help="directory for <bench>_<device>.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    sink = RowSink(f"{BENCH}_{device.type}", args.out)
    rows = run(device, args.quick, sink=sink)
    print_table(rows, COLUMNS)
    print_targets(rows, lambda r: f"{r['impl']} {r['B']}x{r['C']} {r['dtype']}")
    return finish(sink)


if __name__ == "__main__":
    sys.exit(main())
