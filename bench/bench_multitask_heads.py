"""Microbenchmark: H = 16 linear classification heads with their cross-entropy losses, batched
(metafast.ops.multitask_heads) against a Python loop over the heads.

Baselines, measured in the same run:
- ``loop``: one nn.Linear-style F.linear + F.cross_entropy per head (separate weight tensors), what
  a multi-task model with a ModuleList of heads does;
- ``reference``: multitask_heads_cross_entropy_reference (one baddbmm, or one GEMM over all heads for
  shared features, then a batched log_softmax + gather).
``metafast[<backend>]`` is the op on each available backend (GPU: cuda extension, triton; CPU: the
reference itself). Features are either shared by all heads ([N, I], one trunk output) or per head
([H, N, I]). Modes: ``fwd`` (no graph) and ``fwd+bwd`` (gradients of features, weights and biases,
grad_out != 1). CPU: one thread by default (``--threads``), each case timed in interleaved rounds
and the fastest round's median kept.

    python -m bench.bench_multitask_heads --device cuda [--quick] [--out DIR]
"""
import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (RESULTS_DIR, RowSink, as_sink, base_row, check_grads, finish, print_table,  # noqa: E402
                          print_targets, speedup_target, time_interleaved)
from metafast import _backend  # noqa: E402
from metafast.ops.multitask_heads import (  # noqa: E402
    multitask_heads_cross_entropy,
    multitask_heads_cross_entropy_reference,
)

BENCH = "multitask_heads"
HEADS = 16
# GPU target of every fused row of mode fwd+bwd.
GPU_GOALS = {"speedup_vs_loop": 3.0}


def loop_over_heads(x, ws, bs, y):
    """One F.linear + F.cross_entropy per head; ws/bs are lists of per-head tensors."""
    shared = x.dim() == 2
    return torch.stack([F.cross_entropy(F.linear(x if shared else x[h], ws[h], bs[h]), y[h])
                        for h in range(len(ws))])


def _cases(device: torch.device, quick: bool):
    """(N, I, O, shared, dtype)."""
    if device.type == "cuda":
        shapes = [(1024, 512, 10), (256, 256, 100)] if quick else [(1024, 512, 10), (256, 256, 100), (4096, 1024, 32)]
        dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    else:
        shapes = [(128, 64, 10)] if quick else [(128, 64, 10), (512, 128, 32)]
        dtypes = [torch.float32]
    return [(n, i, o, shared, d) for (n, i, o) in shapes for shared in (True, False) for d in dtypes]


def _impls(device: torch.device) -> Dict[str, Callable]:
    impls = {"reference": lambda x, w, b, y: multitask_heads_cross_entropy_reference(x, w, b, y)}
    if device.type != "cuda":
        impls["metafast[torch]"] = lambda x, w, b, y: multitask_heads_cross_entropy(x, w, b, y)
        return impls
    for backend in ("cuda", "triton"):
        try:
            _backend.resolve("multitask_heads_cross_entropy", device, backend)
        except (_backend.BackendUnavailableError, RuntimeError):
            continue
        impls[f"metafast[{backend}]"] = \
            lambda x, w, b, y, be=backend: multitask_heads_cross_entropy(x, w, b, y, backend=be)
    return impls


def _mode_fns(x, w, b, y, g, impls) -> Dict[str, Callable]:
    fns = {}
    ws = [w[h].detach().clone().requires_grad_() for h in range(w.shape[0])]
    bs = [b[h].detach().clone().requires_grad_() for h in range(b.shape[0])]
    xl = x.detach().requires_grad_()

    def loop_fwd():
        with torch.no_grad():
            loop_over_heads(x, ws, bs, y)

    def loop_full():
        loss = loop_over_heads(xl, ws, bs, y)
        torch.autograd.grad(loss, [xl, *ws, *bs], g)

    fns["loop|fwd"], fns["loop|fwd+bwd"] = loop_fwd, loop_full
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    for name, fn in impls.items():
        def fwd(fn=fn):
            with torch.no_grad():
                fn(x, w, b, y)

        def full(fn=fn):
            torch.autograd.grad(fn(*leaves, y), leaves, g)

        fns[f"{name}|fwd"], fns[f"{name}|fwd+bwd"] = fwd, full
    return fns


def run(device, quick: bool = False, rounds: int = 5, sink: Optional[RowSink] = None) -> List[Dict[str, object]]:
    """Rows (each streamed to ``sink`` once its case is measured); a fused implementation missing on
    CUDA or off the loop's losses and gradients is a failure of the sink."""
    device = torch.device(device)
    sink = as_sink(sink)
    saved = os.environ.get("METAFAST_CHECK_LABELS")
    if device.type == "cuda":
        os.environ["METAFAST_CHECK_LABELS"] = "0"  # time the kernels, not the host-side label check
    try:
        return _run(device, quick, rounds, sink)
    finally:
        if device.type == "cuda":
            if saved is None:
                os.environ.pop("METAFAST_CHECK_LABELS", None)
            else:
                os.environ["METAFAST_CHECK_LABELS"] = saved


def _grads(fn, x, w, b, y, g):
    """(losses, d features, d weights, d biases) of one implementation (fn None: the loop)."""
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    if fn is None:
        ws, bs = list(leaves[1].unbind(0)), list(leaves[2].unbind(0))
        loss = loop_over_heads(leaves[0], ws, bs, y)
    else:
        loss = fn(*leaves, y)
    return (loss.detach(), *torch.autograd.grad(loss, leaves, g.to(loss.dtype)))


def _run(device: torch.device, quick: bool, rounds: int, sink: RowSink) -> List[Dict[str, object]]:
    gen = torch.Generator().manual_seed(0)
    impls = _impls(device)
    if not any(k.startswith("metafast") for k in impls):
        sink.fail(f"no metafast multitask_heads backend on {device} ({_backend.available()})")
    for N, I, O, shared, dtype in _cases(device, quick):
        H = HEADS
        x = torch.randn(*((N, I) if shared else (H, N, I)), generator=gen).to(device=device, dtype=dtype)
        w = (torch.randn(H, O, I, generator=gen) / I ** 0.5).to(device=device, dtype=dtype)
        b = torch.randn(H, O, generator=gen).to(device=device, dtype=dtype)
        y = torch.randint(0, O, (H, N), generator=gen).to(device)
        g = (torch.rand(H, generator=gen) + 0.5).to(device)  # grad_out != 1
        sink.expect(2 * (1 + len(impls)))
        ref = _grads(None, x, w, b, y, g)
        errs = {"loop": 0.0}
        for name, fn in impls.items():
            errs[name] = check_grads(sink, f"{name} N{N} I{I} O{O} {dtype}", _grads(fn, x, w, b, y, g), ref, dtype)
        measured = time_interleaved(_mode_fns(x, w, b, y, g, impls), device, rounds)
        times: Dict[str, Dict[str, float]] = {}
        for key, ms in measured.items():
            name, mode = key.split("|")
            times.setdefault(name, {})[mode] = ms
        for name, per_mode in times.items():
            for mode, ms in per_mode.items():
                row = {
                    **base_row(BENCH, device), "impl": name, "mode": mode, "H": H, "N": N, "I": I, "O": O,
                    "features": "shared" if shared else "per-head", "dtype": str(dtype).replace("torch.", ""),
                    "ms": ms, "speedup_vs_loop": times["loop"][mode] / ms,
                    "speedup_vs_reference": times["reference"][mode] / ms, "rel_err_vs_loop": errs[name],
                    "threads": torch.get_num_threads() if device.type == "cpu" else None,
                }
                if device.type == "cuda" and name.startswith("metafast") and mode == "fwd+bwd":
                    speedup_target(row, GPU_GOALS, "cuda")
                sink.add(row)
    return sink.rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=RESULTS_DIR, help="directory for the JSON rows")
    p.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: on small VMs a parallel torch op can stall for milliseconds "
                        "waking its worker threads, which swamps these timings)")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sink = RowSink(f"{BENCH}_{device.type}", args.out)
    rows = run(args.device, quick=args.quick, sink=sink)
    print_table(rows, ["impl", "mode", "H", "N", "I", "O", "features", "dtype", "ms", "speedup_vs_loop",
                       "speedup_vs_reference"])
    print_targets(rows, lambda r: f"{r['impl']} {r['mode']} N{r['N']} I{r['I']} O{r['O']} {r['features']} {r['dtype']}")
    return finish(sink)


if __name__ == "__main__":
    sys.exit(main())
