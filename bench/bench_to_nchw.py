"""Microbenchmark: metafast.ops.to_nchw (the C++ channels_last -> NCHW copy) against PyTorch's
``x.contiguous()`` in the same run, on the maps Conv4's meta-step converts (the strided input gradients
of its 14x14 layer: task-grouped [5, 2048, 14, 14] and per-image [160, 64, 14, 14]) and a 7x7 one.
Bandwidth: 2 x the map's bytes over the time, next to a plain copy of the same map. CPU only.

    python bench/bench_to_nchw.py [--threads N] [--out DIR] [--quick]
"""
import os
import sys
from typing import Dict, List, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RowSink, as_sink, cpu_bench_main, cpu_kernel_start, map_op_check, map_op_rows  # noqa: E402
from metafast.ops.to_nchw import to_nchw  # noqa: E402

BENCH = "to_nchw"


def run(device="cpu", quick: bool = False, rounds: int = 5,
        sink: Optional[RowSink] = None) -> Optional[List[Dict[str, object]]]:
    kernel = cpu_kernel_start(device, BENCH, "a CPU kernel only", "torch")
    if kernel is None:
        return None
    sink = as_sink(sink)
    if not kernel:
        sink.fail(f"metafast[cxx] {BENCH}: the extension's CPU kernel is not available")
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 2048, 14, 14)] if quick else [(5, 2048, 14, 14), (160, 64, 14, 14), (5, 2048, 7, 7)]
    for shape in shapes:
        x = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
        fns = {"torch": lambda: x.contiguous()}
        if kernel:
            fns["metafast[cxx]"] = lambda: to_nchw(x, backend="cpp")
        sink.expect(2)
        map_op_check(sink, map_op_rows(BENCH, shape, x.contiguous(), fns, "torch", rounds), "torch")
    return sink.rows


def main(argv=None) -> int:
    return cpu_bench_main(argv, __doc__, BENCH, run, ["impl", "shape", "ms", "speedup_vs_torch", "GB/s", "copy_GB/s", "threads"],
                   quick_help="the grouped 14x14 map only")


if __name__ == "__main__":
    sys.exit(main())
