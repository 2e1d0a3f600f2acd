"""inner_update_multi microbenchmark: the update of one task whose parameters are a list of tensors (a
Conv4-like module), against PyTorch eager, for the forward, the backward and both; the bandwidth
achieved against a device copy measured in the same run.

Implementations (every "speedup" is torch_ms / ms of the same phase and case):
  torch   inner_update_multi on the torch backend: torch._foreach without autograd, the per-tensor
          reference ops when differentiated (the baseline)
  cuda    the fused custom op, every tensor in one launch (GPU)
  loop    learn2learn style: one `p - lr * g` per parameter tensor (forward only, no clipping)

    python bench/bench_inner_update_multi.py [--device cuda|cpu] [--out DIR] [--quick]
"""
import os
import sys
from typing import Dict, List, Optional, Sequence, Union

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `metafast` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_inner_update import (CLIP, bench_device, bytes_fwd, copy_gbps, main_for, rows_for,  # noqa: E402
                                      time_group)
from bench.common import base_row  # noqa: E402
from metafast import _backend  # noqa: E402
from metafast.ops.inner_update_multi import inner_update_multi, inner_update_multi_reference  # noqa: E402

BENCH = "inner_update_multi"


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
    nbytes = bytes_fwd(1, P, dtype, True, "float", clip)
    gbps_of = lambda ms: (nbytes / ms / 1e6, copy_gbps)  # noqa: E731
    params = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    grads = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    impls = ["torch"] + (["cuda"] if device.type == "cuda" and _usable_multi_cuda(device) else [])

    fns = {impl: (lambda impl=impl: inner_update_multi(params, grads, 0.01, max_norm, backend=impl)) for impl in impls}
    if not clip:
        fns["loop"] = lambda: [p - 0.01 * g for p, g in zip(params, grads)]
    with torch.no_grad():
        rows = rows_for(common, "fwd", time_group(fns, device), "torch", gbps_of)

    for x in params + grads:
        x.requires_grad_()
    gos = [torch.randn_like(p) for p in params]
    xs = params + grads
    makers = {impl: ((lambda: inner_update_multi_reference(params, grads, 0.01, max_norm)) if impl == "torch" else
                     (lambda impl=impl: inner_update_multi(params, grads, 0.01, max_norm, backend=impl)))
              for impl in impls}
    outs = {impl: make() for impl, make in makers.items()}
    bwd = {impl: (lambda o=o: torch.autograd.grad(o, xs, gos, retain_graph=True)) for impl, o in outs.items()}
    rows += rows_for(common, "bwd", time_group(bwd, device), "torch")
    del outs, bwd
    full = {impl: (lambda make=make: torch.autograd.grad(make(), xs, gos)) for impl, make in makers.items()}
    rows += rows_for(common, "full", time_group(full, device), "torch")
    return rows


def _usable_multi_cuda(device) -> bool:
    try:
        return _backend.resolve("inner_update_multi", device, "cuda") == "cuda"
    except Exception as e:  # noqa: BLE001
        print(f"note: inner_update_multi backend cuda not timed: {e}")
        return False


def run(device: Union[str, torch.device] = "cpu", quick: bool = False,
        threads: Optional[int] = 2) -> List[Dict[str, object]]:
    """Time every case on ``device`` and return the rows (``threads`` applies on CPU)."""
    with bench_device(device, threads) as device:
        totals = [1 << 14] if quick else ([112_005, 1 << 24] if device.type == "cuda" else [112_005])
        rows = []
        for total in totals:
            for clip in (False, True):
                rows += _bench_multi(device, total, torch.float32, clip, lambda n: copy_gbps(device, n, torch.float32))
        base = base_row(BENCH, device)
        return [{**base, **r} for r in rows]


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for(BENCH, __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
