"""Microbenchmark: batch norm's forward with batch statistics (metafast.ops.batch_norm), the C++ CPU kernel
against ATen's native_batch_norm in the same run, on the maps Omniglot Conv4's meta-step normalises (5 images
x 32 tasks x 64 channels in the task-grouped layout [5, 2048, H, W], H = W = 14, 7, 4; the 2x2 maps stay on
ATen's kernel, metafast.ops.batch_norm.MIN_PER_CHANNEL). Bandwidth: the bytes moved (x read, y written) over the
time, next to a copy of the same map. CPU only.

    python bench/bench_batch_norm.py [--threads N] [--out DIR] [--quick]
"""
import os
import sys
from typing import Dict, List, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RowSink, as_sink, cpu_bench_main, cpu_kernel_start, map_op_check, map_op_rows  # noqa: E402
from metafast.ops import batch_norm as bn  # noqa: E402

BENCH = "batch_norm"


def run(device="cpu", quick: bool = False, rounds: int = 5,
        sink: Optional[RowSink] = None) -> Optional[List[Dict[str, object]]]:
    kernel = cpu_kernel_start(device, BENCH, "a CPU kernel only", "ATen's")
    if kernel is None:
        return None
    sink = as_sink(sink)
    if not kernel:
        sink.fail(f"metafast[cxx] {BENCH}: the extension's CPU kernel is not available")
    gen = torch.Generator().manual_seed(0)
    for hw in ((14,) if quick else (14, 7, 4)):
        shape = (5, 2048, hw, hw)
        x = torch.randn(shape, generator=gen) * 2 + 0.5
        w, b = torch.rand(shape[1], generator=gen) + 0.5, torch.randn(shape[1], generator=gen)
        fns = {"aten": lambda: bn.forward(x, w, b, 1e-5, backend="torch")}
        if kernel:
            fns["metafast[cxx]"] = lambda: bn.forward(x, w, b, 1e-5, backend="cpp")
        sink.expect(2)
        map_op_check(sink, map_op_rows(BENCH, shape, x, fns, "aten", rounds), "aten")
    return sink.rows


def main(argv=None) -> int:
    return cpu_bench_main(argv, __doc__, BENCH, run, ["impl", "shape", "ms", "speedup_vs_aten", "GB/s", "copy_GB/s", "threads"],
                   quick_help="the 14x14 map only")


if __name__ == "__main__":
    sys.exit(main())
