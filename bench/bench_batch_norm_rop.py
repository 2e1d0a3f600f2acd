"""Microbenchmark: batch norm's R-operators (metafast.ops.batch_norm_rop), the C++ CPU kernels against
the PyTorch reference (native_batch_norm_backward calls and in-place updates) in the same run.

Shapes: Omniglot Conv4's batch norms inside the meta-step (5 images x 32 tasks x 64 channels in the
task-grouped layout [5, 2048, H, W], H = W = 14, 7, 4), with every direction present (rx and R(w) for
rforward; rx, R(w) and R(dx) for rbackward): what MetaStep's reverse calls per step. Bandwidth: the
bytes the kernel must move (rforward reads x, rx and writes R(y); rbackward reads x, gy, R(gy), rx and
writes R(dx)) over its time, next to a copy of one map timed in the same run. CPU only (the op has no
GPU kernel; on CUDA the reference runs).

    python bench/bench_batch_norm_rop.py [--threads N] [--out DIR] [--quick]
"""
import os
import sys
from typing import Dict, List, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RowSink, as_sink, base_row, cpu_bench_main, cpu_kernel_start, max_abs_diff, time_interleaved  # noqa: E402
from metafast.ops import batch_norm_rop as bnr  # noqa: E402

BENCH = "batch_norm_rop"


def _case(shape, gen):
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    c = shape[1]
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x, dims, correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    w = torch.rand(c, generator=gen) + 0.5
    maps = {k: torch.randn(shape, generator=gen) for k in ("rx", "gy", "rgy")}
    rw, rb = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    _, sx, s = bnr.rforward_reference(x, w, mean, invstd, maps["rx"], rw, rb)
    return x, w, mean, invstd, maps, rw, rb, sx, s


def run(device="cpu", quick: bool = False, rounds: int = 5,
        sink: Optional[RowSink] = None) -> Optional[List[Dict[str, object]]]:
    kernel = cpu_kernel_start(device, BENCH, "CPU kernels only (GPUs run the reference)", "reference")
    if kernel is None:
        return None
    sink = as_sink(sink)
    if not kernel:
        sink.fail(f"metafast[cxx] {BENCH}: the extension's CPU kernels are not available")
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    for hw in ((14,) if quick else (14, 7, 4)):
        shape = (5, 2048, hw, hw)
        x, w, mean, invstd, m, rw, rb, sx, s = _case(shape, gen)
        impls = {"reference": "torch"} | ({"metafast[cxx]": "cpp"} if kernel else {})
        fns = {"copy": lambda: m["rx"].clone()}
        for name, b in impls.items():
            fns[f"{name}|rforward"] = lambda b=b: bnr.rforward(x, w, mean, invstd, m["rx"], rw, rb, backend=b)
            fns[f"{name}|rbackward"] = lambda b=b: bnr.rbackward(x, w, mean, invstd, m["gy"], m["rgy"], m["rx"], sx, s,
                                                                 rw, True, backend=b)
        sink.expect(4)
        errs = {k: max_abs_diff(f(), fns[f"reference|{k.split('|')[1]}"]()) for k, f in fns.items() if k != "copy"}
        best = time_interleaved(fns, device, rounds, warmup=2, repeats=7)
        nbytes = x.numel() * x.element_size()
        copy_gbps = 2 * nbytes / best.pop("copy") / 1e6
        moved = {"rforward": 3 * nbytes, "rbackward": 5 * nbytes}
        for key, ms in best.items():
            name, op = key.split("|")
            gbps = moved[op] / ms / 1e6
            if not errs[key] <= 1e-4:
                sink.fail(f"{name} {op} {list(shape)}: max |err| vs reference {errs[key]:.2e} > 1e-4")
            sink.add({**base_row(BENCH, device), "impl": name, "op": op, "shape": list(shape), "ms": ms,
                      "speedup_vs_reference": best[f"reference|{op}"] / ms, "GB/s": gbps,
                      "copy_GB/s": copy_gbps, "frac_of_copy": gbps / copy_gbps,
                      "max_abs_err_vs_reference": errs[key], "threads": torch.get_num_threads()})
    return sink.rows


def main(argv=None) -> int:
    return cpu_bench_main(argv, __doc__, BENCH, run, ["impl", "op", "shape", "ms", "speedup_vs_reference", "GB/s", "frac_of_copy", "threads"],
                   quick_help="the 14x14 maps only")


if __name__ == "__main__":
    sys.exit(main())
