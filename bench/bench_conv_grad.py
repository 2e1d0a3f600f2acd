"""Per-task convolutions over the tasks-in-channels layout (metafast/functional/conv_grad.py): the loop over
tasks against the grouped call on ResNet-12 narrow's shapes (4 tasks, 5 support / 15 query images), and a
census of the convolutions one second-order meta-step issues (metafast, learn2learn, torch.func).

The census counts every aten convolution / convolution_backward call of one ResNet-12 meta-step (the
bench_maml_step workload) with its shapes, groups and FLOPs: it is deterministic and needs no quiet host.
The timings interleave the two forms in one process; ``--cpu-time`` times process CPU seconds (use with
``--threads 1``), which a host loaded by other processes disturbs far less than wall time.

    python bench/bench_conv_grad.py [--census] [--threads N] [--cpu-time] [--quick] [--out DIR]
"""
import argparse
import collections
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RowSink, base_row, finish, print_table  # noqa: E402
from metafast.functional import conv_grad  # noqa: E402

BENCH = "conv_grad"
T = 4
# ResNet-12 narrow on 32x32 images: (Cin, Cout, kernel, map side) of its convolutions with per-task weights
SHAPES = [(64, 64, 3, 32), (128, 128, 3, 16), (256, 256, 3, 8), (256, 512, 3, 4), (512, 512, 3, 4), (256, 512, 1, 4)]


def conv_flops(x_shape, w_shape, y_shape) -> int:
    """2 * N * Cout * Ho * Wo * (Cin / groups) * kh * kw."""
    return 2 * x_shape[0] * w_shape[0] * y_shape[2] * y_shape[3] * w_shape[1] * w_shape[2] * w_shape[3]


def census(method_names=("metafast", "learn2learn", "torch.func")) -> List[Dict[str, object]]:
    """Rows {method, kind, x, w, groups, calls, GFLOP} of one ResNet-12 meta-step's convolutions."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from bench.baselines import available
    from bench.bench_maml_step import WORKLOADS, Metafast, _setup, _step_fn

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = collections.OrderedDict()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name == "convolution":
                x, w, transposed, groups = args[0], args[1], args[6], args[8]
                kind, fl = ("transposed", conv_flops(out.shape, w.shape, x.shape)) if transposed else (
                    "fwd", conv_flops(x.shape, w.shape, out.shape))
            elif name == "convolution_backward":
                x, w, groups, mask = args[1], args[2], args[9], args[10]
                kinds = [k for k, m in zip(("dx", "dw"), mask[:2]) if m]
                kind, fl = "+".join(kinds), conv_flops(x.shape, w.shape, args[0].shape) * len(kinds)
            else:
                return out
            key = (kind, tuple(x.shape), tuple(w.shape), groups)
            n, f = self.calls.get(key, (0, 0))
            self.calls[key] = (n + 1, f + fl)
            return out

    wl = WORKLOADS["resnet12"]
    model, batch = _setup(wl, torch.device("cpu"), False, 0)
    classes = {c.name: c for c in available()}
    rows = []
    for name in method_names:
        if name == "metafast":
            m = Metafast(model, wl.inner_lr, wl.steps, wl.loss)
        elif name in classes:
            m = classes[name](model, wl.inner_lr, wl.steps, wl.loss)
        else:
            print(f"note: {name} not importable; left out of the census")
            continue
        step = _step_fn(m, batch)
        step()
        counter = Count()
        with counter:
            step()
        for (kind, xs, ws, groups), (n, fl) in counter.calls.items():
            rows.append({"method": name, "kind": kind, "x": list(xs), "w": list(ws), "groups": groups, "calls": n,
                         "GFLOP": fl / 1e9})
    return rows


def _forms(cin, cout, k, side, n, gen):
    """Callables of both forms (loop / grouped) for one shape: forward, backward (dx + dW), dW alone."""
    p = k // 2
    x = torch.randn(n, T * cin, side, side, generator=gen)
    w = torch.randn(T, cout, cin, k, k, generator=gen)
    gy = torch.randn(n, T * cout, side, side, generator=gen)
    args = ([1, 1], [p, p], [1, 1], 1)
    ops = {"forward": lambda: conv_grad.task_conv(x, w, None, T, *args),
           "backward": lambda: conv_grad.task_conv_backward(gy, x, w, T, *args, need_gx=True),
           "weight_grad": lambda: conv_grad.task_conv_backward(gy, x, w, T, *args, need_gx=False)}
    return ops, 2 * n * T * cout * side * side * cin * k * k


def run(quick: bool, cpu_time: bool, rounds: int, sink: RowSink) -> List[Dict[str, object]]:
    clock = time.process_time if cpu_time else time.perf_counter
    gen = torch.Generator().manual_seed(0)
    shapes = SHAPES[-2:-1] if quick else SHAPES
    for cin, cout, k, side in shapes:
        for n in (5, 15):
            ops, flops = _forms(cin, cout, k, side, n, gen)
            for op, fn in ops.items():
                times = {"loop": [], "grouped": []}
                for form in times:  # warm-up (oneDNN primitive caches)
                    conv_grad.TASK_LOOP = form == "loop"
                    fn()
                for _ in range(rounds):
                    for form in times:
                        conv_grad.TASK_LOOP = form == "loop"
                        t0 = clock()
                        fn()
                        times[form].append((clock() - t0) * 1e3)
                conv_grad.TASK_LOOP = None
                med = {f: statistics.median(v) for f, v in times.items()}
                sink.expect(1)
                sink.add({**base_row(BENCH, torch.device("cpu")), "shape": f"{cin}->{cout} k{k} {side}x{side} N={n}",
                          "op": op, "loop_ms": med["loop"], "grouped_ms": med["grouped"],
                          "loop_vs_grouped": med["loop"] / med["grouped"],
                          "rule_loops": conv_grad.per_task_loop(torch.empty(n, T * cin, side, side),
                                                                torch.empty(T, cout, cin, k, k), T),
                          "GFLOP": flops / 1e9 * (1 if op != "backward" else 2), "clock": clock.__name__,
                          "threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0]})
    return sink.rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--census", action="store_true", help="count one ResNet-12 meta-step's convolutions instead")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the meta-step bench uses 2)")
    ap.add_argument("--cpu-time", action="store_true", help="time process CPU seconds (with --threads 1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one shape")
    ap.add_argument("--out", default=None, help="directory for the JSON rows (default: bench/results)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.census:
        rows = census()
        print_table(rows, ["method", "kind", "x", "w", "groups", "calls", "GFLOP"])
        for m in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == m]
            print(f"{m}: {sum(r['calls'] for r in mine)} convolution calls, {sum(r['GFLOP'] for r in mine):.2f} GFLOP")
        return 0
    sink = RowSink(f"{BENCH}_cpu", **({"out_dir": args.out} if args.out else {}))
    rows = run(args.quick, args.cpu_time, args.rounds, sink)
    print_table(rows, ["shape", "op", "loop_ms", "grouped_ms", "loop_vs_grouped", "rule_loops", "GFLOP"])
    return finish(sink)


if __name__ == "__main__":
    sys.exit(main())
