"""Data-parallel scaling of the sinusoid meta-step: tasks/s of W processes against one, same run.

One step = sample this rank's tasks (25, the paper's meta-batch, and 200) + second-order BatchedMAML forward/backward + all_reduce of the
meta-gradient (metafast.distributed) + Adam step, exactly what the default job does per iteration
under torchrun. Each process is timed in blocks of steps; rank 0 reports the median block.

CPU (gloo): 1 process with 1 thread, 1 process with all threads, and W processes with 1 thread each;
on a 2-core machine expect at most ~2x the 1-thread process. Rows go to bench/results/distributed_cpu.json.
CUDA (NCCL, one GPU per process, W = 1, 2, 4, ... up to the GPUs present): rows with
scaling_efficiency = tasks/s(W) / (W * tasks/s(1)) go to distributed_cuda.json (not run in CI).

    python bench/bench_distributed.py [--device cpu|cuda] [--world 2] [--steps 100] [--blocks 5]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed  # noqa: F401  (TCPStore)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as a script: make `bench` and `metafast` importable
    sys.path.insert(0, ROOT)

from bench.common import RESULTS_DIR, RowSink, base_row, finish, print_table  # noqa: E402

BENCH = "distributed"
META_BATCHES = (25, 200)  # per process: the paper's meta-batch, and one where compute outweighs the all_reduce
COLUMNS = ["meta_batch_per_process", "processes", "threads_per_process", "ms_per_step", "tasks_per_s", "speedup_vs_1x1", "scaling_efficiency",
           "all_reduce_ms"]


def _worker(device_name: str, threads: int, meta_batch: int, steps: int, blocks: int, out: str) -> None:
    torch.set_num_threads(threads)
    from metafast import distributed
    from metafast.data.sinusoid import SinusoidTasks
    from metafast.jobs.sinusoid import SinusoidConfig, build

    rank, world = distributed.init(device_name, timeout=120)
    try:
        device = distributed.device_for(torch.device(device_name))
        torch.manual_seed(0)
        maml, opt = build(SinusoidConfig(), device)
        distributed.broadcast_parameters(maml)
        tasks, gen = SinusoidTasks(), torch.Generator()

        def step(i):
            gen.manual_seed(distributed.task_seed(0, rank, i))
            b = tasks.sample(meta_batch, 10, 10, gen, device=device)
            out = maml(b.support_x, b.support_y, b.query_x, b.query_y)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            distributed.all_reduce_gradients(maml.parameters())
            opt.step()

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            distributed.barrier()

        for i in range(max(10, steps // 5)):  # warm-up
            step(i)
        block_ms = []
        for _ in range(blocks):
            sync()
            t0 = time.perf_counter()
            for i in range(steps):
                step(i)
            sync()
            block_ms.append((time.perf_counter() - t0) * 1e3 / steps)
        # the collective alone, on a gradient-sized buffer
        grads = [p.grad for p in maml.parameters()]
        comm = []
        for _ in range(blocks):
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                distributed.all_reduce_gradients(maml.parameters())
            sync()
            comm.append((time.perf_counter() - t0) * 1e3 / steps)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"ms_per_step": statistics.median(block_ms), "all_reduce_ms": statistics.median(comm)
                           if world > 1 else None, "params": sum(g.numel() for g in grads)}, f)
    finally:
        distributed.shutdown()


def _run(world: int, threads: int, meta_batch: int, device: str, steps: int, blocks: int) -> dict:
    """Launch ``world`` worker processes of this script and return rank 0's timings."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        # hosted here, as torchrun's agent does: the ranks' exit order cannot pull it from under the others
        store = torch.distributed.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
        procs = []
        for r in range(world):
            env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True",
                       OMP_NUM_THREADS=str(threads))
            env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", device, str(threads), str(meta_batch),
                                           str(steps), str(blocks), out], env=env))
        try:
            codes = [p.wait(timeout=600) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if any(codes):
            raise RuntimeError(f"a worker failed (exit codes {codes})")
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--worker":
        _worker(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5]), argv[6])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--world", type=int, default=None, help="largest process count (cpu default 2, cuda: all GPUs)")
    ap.add_argument("--steps", type=int, default=100, help="meta-steps per timed block")
    ap.add_argument("--blocks", type=int, default=5, help="timed blocks (median reported)")
    ap.add_argument("--meta-batch", type=int, nargs="+", default=list(META_BATCHES), help="tasks per process")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise SystemExit("--device cuda: no GPU visible")
        top = args.world or gpus
        worlds = [w for w in (1, 2, 4, 8, 16) if w <= min(top, gpus)]
        configs = [(w, 1) for w in worlds]
    else:
        top = args.world or 2
        cores = os.cpu_count() or 1
        configs = [(1, 1), (1, min(top, cores))] + [(w, 1) for w in range(2, top + 1)]
    load_before = os.getloadavg()[0]
    # rows stream as each meta-batch size is measured; a failed worker raises (non-zero exit)
    sink = RowSink(None if args.no_write else f"{BENCH}_{args.device}", args.out or RESULTS_DIR)
    for meta_batch in args.meta_batch:
        steps = max(5, args.steps * META_BATCHES[0] // meta_batch)  # about the same time per block
        results = {}
        for world, threads in configs:
            if (world, threads) not in results:
                results[(world, threads)] = _run(world, threads, meta_batch, args.device, steps, args.blocks)
        sink.expect(len(results))
        load_after = os.getloadavg()[0]
        base_tps = meta_batch / results[(1, 1)]["ms_per_step"] * 1e3
        for (world, threads), r in results.items():
            tps = world * meta_batch / r["ms_per_step"] * 1e3
            row = base_row(BENCH, device)
            row["device"] = row["device"].replace(f"{torch.get_num_threads()} threads", f"{threads} threads")
            row.update({"meta_batch_per_process": meta_batch, "processes": world, "threads_per_process": threads,
                        "ms_per_step": r["ms_per_step"], "tasks_per_s": tps, "speedup_vs_1x1": tps / base_tps,
                        "scaling_efficiency": tps / (world * base_tps), "all_reduce_ms": r["all_reduce_ms"],
                        "params": r["params"], "steps_per_block": steps, "blocks": args.blocks,
                        "backend": "nccl" if args.device == "cuda" else "gloo",
                        "load_avg_1min_before": load_before, "load_avg_1min_after": load_after})
            sink.add(row)
    print_table(sink.rows, COLUMNS)
    return finish(sink)


if __name__ == "__main__":
    sys.exit(main())
