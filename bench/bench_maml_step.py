"""One second-order MAML meta-step: metafast.BatchedMAML against torch.func, a per-task autograd
loop (learn2learn's recipe; learn2learn itself when importable) and higher, in the same run.

A meta-step is: inner loop on the support set (differentiated through) + query loss + backward to
the meta-parameters + Adam step (PyTorch's fused Adam where available, the same for every method);
every method gets the same inputs and the same initial weights, and
the meta-gradients are compared against the per-task loop before anything is timed.

On the CPU each method is timed in a fresh process of its own (one per method and round, rounds
interleaved): the C library's allocator state is per process, and a method's frees change how often
the next method faults pages in (glibc's adaptive thresholds; metafast's CPU block cache keeps its own
blocks, so torch.func no longer inherits raised thresholds from metafast's frees). ``--shared-process``
times every method in this one process instead.

    python bench/bench_maml_step.py [--device cpu|cuda] [--workload sinusoid|omniglot|all]
                                    [--cuda-graph] [--out DIR] [--quick] [--threads N] [--shared-process]
"""
import argparse
import contextlib
import inspect
import math
import os
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `metafast` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.baselines import MetaStep, PerTaskLoop, TorchFunc, available  # noqa: E402
from bench.common import (RESULTS_DIR, RowSink, add_target, as_sink, base_row, finish, print_table,  # noqa: E402
                          print_targets, rel_err, speedup_target, time_ms)
from metafast.models import MLP, Conv4, ResNet12  # noqa: E402

BENCH = "maml_step"
# A meta-gradient this far from the per-task loop's is wrong, not rounding: fp32 rounding of the
# loop itself (printed against fp64) is ~1e-7 on the MLP and Conv4. Where the loop's own fp32 distance
# from fp64 is larger (ResNet-12: ~1e-2, ill-conditioned in fp32), twice that distance is the tolerance.
GRAD_RTOL = 1e-4
# The GPU targets (speed-ups of BatchedMAML's meta-step, checked per row on CUDA; the Workload's
# target_vs_torch_func is the CPU target). learn2learn's recipe (the per-task loop) stands in for
# learn2learn where learn2learn is not installed.
GPU_TARGETS: Dict[str, Dict[str, float]] = {
    "omniglot": {"speedup_vs_torch_func": 3.0, "speedup_vs_learn2learn": 10.0},
    "sinusoid": {"speedup_vs_torch_func": 20.0, "speedup_vs_learn2learn": 50.0},
}
# Columns `metafast bench` prints.
COLUMNS = ["workload", "method", "ms", "speedup_vs_torch_func", "speedup_vs_loop", "grad_rel_err_vs_loop", "threads"]


@dataclass
class Workload:
    name: str
    make_model: Callable[[], torch.nn.Module]
    loss: str
    inner_lr: float
    steps: int
    tasks: int
    quick_tasks: int
    target_vs_torch_func: float  # the speed-up metafast must reach
    repeats: int  # timed runs (>= 7) after warm-up, per round
    make_batch: Callable[[int, torch.Generator], Tuple[torch.Tensor, ...]]
    time_loop: bool = True  # False: the per-task loop only checks gradients (too slow to time)


def _sinusoid_batch(T: int, g: torch.Generator, K: int = 10, Q: int = 10):
    # MAML paper: amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5].
    amp = torch.rand(T, 1, 1, generator=g) * 4.9 + 0.1
    phase = torch.rand(T, 1, 1, generator=g) * math.pi
    x = torch.rand(T, K + Q, 1, generator=g) * 10 - 5
    y = amp * torch.sin(x - phase)
    return x[:, :K], y[:, :K], x[:, K:], y[:, K:]


def _omniglot_batch(T: int, g: torch.Generator, ways: int = 5, shots: int = 1, queries: int = 1):
    # Omniglot-shaped episodes: 28x28x1 images in [0, 1].
    return episodes(T, g, ways, shots, queries, lambda rows: torch.rand(T, rows, 1, 28, 28, generator=g))


def episodes(T: int, g: torch.Generator, ways: int, shots: int, queries: int,
             draw: Callable[[int], torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """(sx, sy, qx, qy): inputs [T, rows, ...] from ``draw(rows)``, labels a per-task permutation of the ways."""
    def split(n):
        x = draw(ways * n)
        y = torch.stack([torch.randperm(ways, generator=g).repeat_interleave(n) for _ in range(T)])
        return x, y

    sx, sy = split(shots)
    qx, qy = split(queries)
    return sx, sy, qx, qy


def _cifar_batch(T: int, g: torch.Generator, ways: int = 5, shots: int = 1, queries: int = 3):
    # CIFAR-FS-shaped episodes: 32x32x3 images in [0, 1], 5-way 1-shot, 3 queries per class.
    return episodes(T, g, ways, shots, queries, lambda rows: torch.rand(T, rows, 3, 32, 32, generator=g))


WORKLOADS: Dict[str, Workload] = {
    "sinusoid": Workload("sinusoid", lambda: MLP(1, [40, 40], 1), "mse", 0.01, 1, 25, 5, 5.0, 21,
                         _sinusoid_batch),
    "omniglot": Workload("omniglot", lambda: Conv4.omniglot(5), "cross_entropy", 0.4, 1, 32, 4, 1.5, 7,
                         _omniglot_batch),
    # ResNet-12 narrow (64-128-256-512) on CIFAR-FS-shaped episodes, meta-batch 4; the per-task loop
    # only checks gradients (learn2learn, when importable, is the timed per-task method)
    "resnet12": Workload("resnet12", lambda: ResNet12.cifar(5, wide=False), "cross_entropy", 0.01, 1, 4, 2, 2.0, 7,
                         _cifar_batch, time_loop=False),
}


class Metafast(MetaStep):
    """metafast.BatchedMAML wrapped in the same interface as the baselines."""

    name = "metafast"

    def __init__(self, model, inner_lr, steps, loss, cuda_graph: bool = False, name: Optional[str] = None,
                 **maml_kwargs):
        super().__init__(model, inner_lr, steps, loss)
        import metafast

        if cuda_graph:
            maml_kwargs["cuda_graph"] = True
        self.maml = metafast.BatchedMAML(self.model, inner_lr=inner_lr, inner_steps=steps, first_order=False,
                                         meta_sgd=False, anil=False, loss=loss, **maml_kwargs)
        self.name = name or ("metafast+cuda-graph" if cuda_graph else "metafast")

    @property
    def params(self):
        return list(self.maml.parameters())

    def meta_loss(self, sx, sy, qx, qy):
        return self.maml(sx, sy, qx, qy).loss

    def meta_grad(self, sx, sy, qx, qy):
        g = super().meta_grad(sx, sy, qx, qy)
        n = sum(p.numel() for p in self.model.parameters())
        if g.numel() != n:
            raise RuntimeError(f"metafast: BatchedMAML.parameters() hold {g.numel()} elements, the model {n}")
        return g


def metafast_status(cuda_graph: bool, device: torch.device) -> Tuple[bool, bool, List[str]]:
    """(BatchedMAML importable, cuda_graph usable, notes)."""
    notes = []
    try:
        import metafast

        cls = metafast.BatchedMAML
    except (ImportError, AttributeError) as e:
        return False, False, [f"metafast.BatchedMAML not importable ({e}); metafast rows skipped"]
    graph = False
    if cuda_graph:
        if device.type != "cuda":
            notes.append("--cuda-graph needs --device cuda; skipped")
        elif "cuda_graph" not in inspect.signature(cls).parameters:
            notes.append("BatchedMAML has no cuda_graph keyword yet; --cuda-graph skipped")
        else:
            graph = True
    return True, graph, notes


def _worst_params(g: torch.Tensor, ref: torch.Tensor, model: torch.nn.Module, k: int = 3) -> str:
    """The k parameters contributing most to the mismatch, as ||g_p - ref_p|| / ||ref|| (a per-parameter
    relative error would single out the conv biases before BN, whose true gradient is ~0)."""
    out, i, scale = [], 0, ref.double().norm().clamp_min(1e-30)
    for name, p in model.named_parameters():
        n = p.numel()
        out.append((((g[i:i + n].double() - ref[i:i + n].double()).norm() / scale).item(), name))
        i += n
    out.sort(reverse=True)
    return ", ".join(f"{name} {e:.1e}" for e, name in out[:k])


def _adam(params) -> torch.optim.Optimizer:
    """Every method's meta-optimizer: Adam with PyTorch's fused kernel where it has one (a third of the
    default for-loop Adam's time on the sinusoid MLP's 6 tensors on CPU: 0.12 vs 0.37 ms)."""
    try:
        return torch.optim.Adam(params, lr=1e-3, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or no fused kernel for this device
        return torch.optim.Adam(params, lr=1e-3)


def _load() -> Optional[float]:
    """1-minute load average: other processes on the machine skew CPU timings, so it goes in the rows."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _to(batch, device, dtype=None):
    return tuple(t.to(device=device, dtype=dtype if (dtype and t.is_floating_point()) else t.dtype) for t in batch)


def bench_workload(wl: Workload, device: torch.device, quick: bool, classes: Sequence[type],
                   use_metafast: bool, cuda_graph: bool, seed: int = 0,
                   variants: Sequence[Tuple[str, Dict[str, object]]] = (),
                   isolate: bool = False, sink: Optional[RowSink] = None,
                   goals: Optional[Dict[str, float]] = None) -> List[Dict[str, object]]:
    """Rows for one workload, streamed to ``sink`` once measured; ``variants`` adds BatchedMAML
    configurations as (name, keyword args); ``isolate`` times each method in a fresh process per
    round (CPU; not for variants); ``goals`` {"speedup_vs_X": at least} are the targets of the
    metafast rows (default: the workload's CPU target on the CPU, GPU_TARGETS on CUDA). A metafast
    method that fails or whose meta-gradient is wrong is recorded with ``sink.fail``."""
    sink = as_sink(sink)
    if goals is None:
        goals = ({"speedup_vs_torch_func": wl.target_vs_torch_func} if device.type == "cpu"
                 else GPU_TARGETS.get(wl.name, {}))
    model, batch = _setup(wl, device, quick, seed)
    T = batch[0].shape[0]
    print(f"\n== {wl.name}: {type(model).__name__}, {T} tasks, {wl.steps} inner step(s) lr {wl.inner_lr}, "
          f"{wl.loss}, support {tuple(batch[0].shape)}, query {tuple(batch[2].shape)}")

    methods: List[MetaStep] = [cls(model, wl.inner_lr, wl.steps, wl.loss) for cls in classes]
    if use_metafast:
        methods.append(Metafast(model, wl.inner_lr, wl.steps, wl.loss))
        if cuda_graph:
            methods.append(Metafast(model, wl.inner_lr, wl.steps, wl.loss, cuda_graph=True))
        methods += [Metafast(model, wl.inner_lr, wl.steps, wl.loss, name=n, **kw) for n, kw in variants]

    sink.expect(sum(1 for m in methods if wl.time_loop or not isinstance(m, PerTaskLoop)))
    # Correctness first: every method's meta-gradient against the per-task loop's, from the same weights.
    loop = next(m for m in methods if isinstance(m, PerTaskLoop))
    ref = loop.meta_grad(*batch)
    ref64 = PerTaskLoop(model, wl.inner_lr, wl.steps, wl.loss)
    ref64.model.double()
    ref64 = ref64.meta_grad(*_to(batch, device, torch.float64))
    tol = max(GRAD_RTOL, 2 * rel_err(ref, ref64))
    print(f"per-task loop fp32 vs fp64 meta-gradient: rel err {rel_err(ref, ref64):.1e} (tolerance {tol:.1e})")
    errs, notes = {}, {}
    for m in methods:
        try:
            g = ref if m is loop else m.meta_grad(*batch)
        except Exception as e:  # a method that cannot run is reported, not fatal for the others
            errs[m.name], notes[m.name] = float("nan"), f"failed: {type(e).__name__}: {e}"
            print(f"  {m.name:>20}: FAILED ({notes[m.name]})")
            if isinstance(m, Metafast):
                sink.fail(f"{wl.name}: {m.name} {notes[m.name]}")
            continue
        errs[m.name] = rel_err(g, ref)
        ok = errs[m.name] <= tol
        if not ok:
            why = " (vmap second order through BatchNorm)" if (
                isinstance(m, TorchFunc) and any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm)
                                                 for x in model.modules())) else ""
            notes[m.name] = f"WRONG meta-gradient: rel err {errs[m.name]:.1e} vs per-task loop{why}; timed anyway"
            if isinstance(m, Metafast):
                sink.fail(f"{wl.name}: {m.name} meta-gradient rel err {errs[m.name]:.1e} > {tol:.1e}")
        print(f"  {m.name:>20}: meta-grad rel err vs loop {errs[m.name]:.1e}  {'OK' if ok else 'MISMATCH'}"
              + ("" if ok else f"  worst: {_worst_params(g, ref, model)}"))

    # Methods are timed in interleaved rounds (each a time_ms median) so that a change in machine load
    # during the run hits every method alike; a method's time is the median of its round medians. Five
    # rounds: with three, one bimodal round (page faults, bench/NOTES.md) swung Conv4's ratio 1.28-2.3x.
    warmup, repeats, rounds = (1, 3, 1) if quick else (3, wl.repeats, 5)
    steps = {}
    for m in methods:
        if m.name in notes and notes[m.name].startswith("failed"):
            continue
        if isinstance(m, PerTaskLoop) and not wl.time_loop:
            continue
        steps[m.name] = _step_fn(m, batch)
    per_round = {name: [] for name in steps}
    load_before = _load()
    for r in range(rounds):
        for name, step in steps.items():
            if isolate:  # a fresh process warms up every time
                per_round[name].append(_time_in_child(wl, name, device, quick, seed, warmup, repeats))
            else:
                per_round[name].append(time_ms(step, device, warmup=warmup if r == 0 else 1, repeats=repeats))
    times = {name: statistics.median(v) for name, v in per_round.items()}
    for name, v in per_round.items():
        print(f"  {name:>20}: {times[name]:9.2f} ms  (round medians {', '.join(f'{x:.2f}' for x in v)})")

    rows = []
    base = base_row(BENCH, device)
    load_after = _load()
    vs_l2l = "learn2learn" if "learn2learn" in times else PerTaskLoop.name
    for m in methods:
        if m.name not in times:
            continue
        ms = times[m.name]
        row = {**base, "workload": wl.name, "method": m.name, "ms": ms,
               "speedup_vs_torch_func": times[TorchFunc.name] / ms if TorchFunc.name in times else None,
               "speedup_vs_loop": times[PerTaskLoop.name] / ms if PerTaskLoop.name in times else None,
               "speedup_vs_learn2learn": times[vs_l2l] / ms if vs_l2l in times else None,
               "learn2learn_timed_as": vs_l2l,
               "grad_rel_err_vs_loop": errs[m.name], "grad_tol": tol, "threads": torch.get_num_threads(), "tasks": T,
               "quick": quick, "isolated_processes": isolate, "load_avg_1min_before": load_before,
               "load_avg_1min_after": load_after, "ms_rounds": per_round[m.name]}
        if isinstance(m, Metafast) and goals:
            if device.type == "cpu" and "speedup_vs_torch_func" in goals:
                row["target_vs_torch_func"] = goals["speedup_vs_torch_func"]
            speedup_target(row, goals, device.type)
            add_target(row, f"meta-grad rel. err <= {tol:.1e}", errs[m.name] <= tol, errs[m.name])
        if m.name in notes:
            row["note"] = notes[m.name]
        rows.append(sink.add(row))
    return rows


def _setup(wl: Workload, device: torch.device, quick: bool, seed: int):
    """(model, batch) of the workload: what every method, and an isolated round's child, starts from."""
    torch.manual_seed(seed)
    model = wl.make_model().to(device)
    batch = _to(wl.make_batch(wl.quick_tasks if quick else wl.tasks, torch.Generator().manual_seed(seed)), device)
    return model, batch


def _step_fn(m: MetaStep, batch) -> Callable[[], None]:
    """One timed meta-step of ``m``: zero_grad, forward + backward, Adam step."""
    opt = _adam(m.params)

    def step():
        opt.zero_grad(set_to_none=True)
        m.forward_backward(*batch)
        opt.step()

    return step


def _make_method(wl: Workload, name: str, model: torch.nn.Module) -> MetaStep:
    if name == Metafast.name:
        return Metafast(model, wl.inner_lr, wl.steps, wl.loss)
    for cls in available():
        if cls.name == name:
            return cls(model, wl.inner_lr, wl.steps, wl.loss)
    raise ValueError(f"method: expected metafast or one of {[c.name for c in available()]}, got {name!r}")


def _time_in_child(wl: Workload, method: str, device: torch.device, quick: bool, seed: int, warmup: int,
                   repeats: int) -> float:
    """One round of ``method`` timed in a fresh process (``--time-one``); returns its median ms."""
    cmd = [sys.executable, os.path.abspath(__file__), "--time-one", method, "--workload", wl.name,
           "--device", device.type, "--threads", str(torch.get_num_threads()), "--seed", str(seed),
           "--warmup", str(warmup), "--repeats", str(repeats)] + (["--quick"] if quick else [])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"timing {method} on {wl.name} in a child process failed (rc {res.returncode}): "
                           f"{res.stderr.strip()[-2000:]}")
    return float(json.loads(lines[-1])["ms"])


def time_one(workload: str, method: str, device: str, quick: bool, seed: int, warmup: int, repeats: int,
             threads: int) -> float:
    """The child's side of an isolated round: the workload's model, batch and optimizer built as the
    parent builds them, ``method``'s step timed after ``warmup`` steps."""
    wl = WORKLOADS[workload]
    dev = torch.device(device)
    with bench_settings(dev, [workload], WORKLOADS, threads):
        model, batch = _setup(wl, dev, quick, seed)
        return time_ms(_step_fn(_make_method(wl, method, model), batch), dev, warmup=warmup, repeats=repeats)


@contextlib.contextmanager
def bench_settings(device: torch.device, workloads: Optional[Sequence[str]], known: Dict[str, Workload],
                   threads: Optional[int]) -> Iterator[List[str]]:
    """Validate the device and workload names (yields the names), set the CPU thread count and true
    fp32 for the run, and restore both afterwards."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' was asked for but torch sees no CUDA device")
    names = list(known) if workloads is None else list(workloads)
    for n in names:
        if n not in known:
            raise ValueError(f"workloads: expected names from {sorted(known)}, got {n!r}")
    old_threads = torch.get_num_threads()
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    # Every method runs in true fp32: cuDNN's default TF32 convolutions change meta-gradients by ~10%
    # through batch norm's second-order terms, so the correctness check would compare rounding.
    old_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield names
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old_tf32


def run(device: Union[str, torch.device] = "cpu", quick: bool = False, workloads: Optional[Sequence[str]] = None,
        cuda_graph: bool = False, threads: Optional[int] = 2, isolate: Optional[bool] = None,
        sink: Optional[RowSink] = None) -> List[Dict[str, object]]:
    """Run the meta-step bench and return its rows, each streamed to ``sink`` once measured
    (``threads`` applies on CPU; None leaves torch's). ``isolate`` (default: on the CPU) times each
    method in a fresh process per round."""
    sink = as_sink(sink)
    device = torch.device(device)
    if isolate is None:
        isolate = device.type == "cpu"
    with bench_settings(device, workloads, WORKLOADS, threads) as names:
        use_metafast, graph, notes = metafast_status(cuda_graph, device)
        for n in notes:
            print(f"note: {n}")
        if not use_metafast:
            sink.fail(notes[0])
        classes = available()
        missing = {"learn2learn", "higher"} - {c.name for c in classes}
        if missing:
            print(f"note: {', '.join(sorted(missing))} not importable; skipped")
        rows = []
        for n in names:
            rows += bench_workload(WORKLOADS[n], device, quick, classes, use_metafast, graph, isolate=isolate,
                                   sink=sink)
        return rows


def report(rows: List[Dict[str, object]]) -> bool:
    """Print the table and each metafast row's targets (PASS/FAIL); False when a metafast
    meta-gradient is wrong."""
    print()
    print_table(rows, COLUMNS)
    ok = True
    for r in rows:
        if "targets" not in r:
            continue
        right = r["grad_rel_err_vs_loop"] <= r.get("grad_tol", GRAD_RTOL)
        ok &= right
        tf = next((x for x in rows if x["workload"] == r["workload"] and x["method"] == TorchFunc.name), None)
        caveat = f" (torch.func itself: {tf['note']})" if tf is not None and "note" in tf else ""
        if r.get("learn2learn_timed_as") not in (None, "learn2learn") and any("learn2learn" in t for t in r["targets"]):
            caveat += f" (learn2learn not installed: its recipe, the {r['learn2learn_timed_as']}, stands in)"
        sp = r["speedup_vs_torch_func"]
        print(f"{'PASS' if r['target_met'] else 'FAIL'}  {r['workload']}: {r['method']} "
              f"{'?' if sp is None else f'{sp:.2f}'}x torch.func"
              f"{'' if right else ', meta-gradient WRONG'}{caveat}")
        print_targets([r], lambda x: f"      {x['workload']} {x['method']}")
    for r in rows:
        if "note" in r and "targets" not in r:
            print(f"note: {r['workload']} {r['method']}: {r['note']}")
    return ok


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workload", default="all", choices=["all", *WORKLOADS])
    ap.add_argument("--cuda-graph", action="store_true", help="also time BatchedMAML(..., cuda_graph=True)")
    ap.add_argument("--out", default=RESULTS_DIR, help="directory for the JSON rows")
    ap.add_argument("--quick", action="store_true", help="few tasks and repeats: a smoke run, not a measurement")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU only)")
    ap.add_argument("--shared-process", action="store_true",
                    help="on the CPU, time every method in this process (default: a fresh process per method and round)")
    ap.add_argument("--time-one", metavar="METHOD", help=argparse.SUPPRESS)  # an isolated round's child
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=7, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads: expected >= 1, got {args.threads}")
    if args.time_one:
        if args.workload == "all":
            ap.error("--time-one needs one --workload")
        ms = time_one(args.workload, args.time_one, args.device, args.quick, args.seed, args.warmup, args.repeats,
                      args.threads)
        print(json.dumps({"ms": ms}))
        return 0
    workloads = None if args.workload == "all" else [args.workload]
    if hasattr(os, "getloadavg"):
        print("load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    name = f"{BENCH}_{args.device}" + ("" if workloads is None else f"_{args.workload}") + ("_quick" if args.quick else "")
    sink = RowSink(name, args.out)
    rows = run(args.device, quick=args.quick, workloads=workloads, cuda_graph=args.cuda_graph, threads=args.threads,
               isolate=args.device == "cpu" and not args.shared_process, sink=sink)
    report(rows)  # wrong meta-gradients are already failures of the sink
    return finish(sink)


if __name__ == "__main__":
    sys.exit(main())
