"""The default job as `make demo` runs it: held-out MSE and wall time of `metafast train` on the CPU.

`make demo` runs ``metafast train`` with its defaults (the MAML paper's sinusoid setup, 40,000
iterations, seed 0). This runs that command as its own process on ``--threads`` CPU threads into a
temporary run directory, reads the run's metrics.json and writes one row per (K, adaptation steps)
of the evaluation on the 600 fixed held-out tasks: mean MSE, its 95% CI, the tasks whose adaptation
diverged, the iterations and seed it trained with, the end-to-end and training wall time, the
meta-step path the job's model takes, and the host's load average around the run. README.md's demo
table is rendered from these rows (bench/readme_tables.py). No `run()` function: `metafast bench`
skips it (it trains for a while); bench/regen_cpu.sh runs it.

    python bench/bench_demo.py [--threads 2] [--iterations N] [--out DIR]

``--iterations`` other than the default marks the rows ``quick`` (a smoke run: the README ignores them).
Exits non-zero when the command fails or its metrics lack a row's numbers.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as a script: make `bench` and `metafast` importable
    sys.path.insert(0, ROOT)

from bench.common import RESULTS_DIR, RowSink, base_row, finish, print_table  # noqa: E402

BENCH = "demo"
COLUMNS = ["shots", "steps", "mse", "ci95", "diverged", "iterations", "end_to_end_s", "ms_per_iteration"]


def meta_step_path() -> str:
    """The meta-step path the default job's model takes on the CPU (BatchedMAML.describe())."""
    from metafast.jobs.sinusoid import SinusoidConfig, build

    maml, _ = build(SinusoidConfig(), torch.device("cpu"))
    line = next(ln for ln in maml.describe().splitlines() if ln.startswith("meta-step: "))
    return line[len("meta-step: "):]


def rows_from_metrics(metrics: Dict[str, object], base: Dict[str, object], extra: Dict[str, object]) -> List[dict]:
    """One row per (K, steps) of metrics.json's evaluation; ``base`` and ``extra`` are copied into each."""
    timing, config, ev = metrics["timing"], metrics["config"], metrics["eval"]
    rows = []
    for k in metrics["mse"]:
        for s in metrics["mse"][k]:
            rows.append({**base, "shots": int(k), "steps": int(s), "mse": metrics["mse"][k][s],
                         "ci95": metrics["ci95"][k][s], "diverged": metrics["diverged"][k][s],
                         "eval_tasks": ev["tasks"], "eval_seed": ev["seed"], "iterations": metrics["iteration"],
                         "seed": config["seed"], "meta_batch": config["meta_batch"], "inner_lr": config["inner_lr"],
                         "inner_steps": config["inner_steps"], "meta_lr": config["meta_lr"],
                         "first_order": config["first_order"], "train_s": timing["train_seconds_total"],
                         "ms_per_iteration": timing["ms_per_iteration"], "eval_s": timing["eval_seconds"],
                         **extra})
    return rows


def measure(threads: int, iterations: int, sink: RowSink) -> List[dict]:
    """Run the demo command once and stream its rows to ``sink``."""
    from metafast.jobs.sinusoid import DEFAULT_ITERATIONS, EVAL_SHOTS, EVAL_STEPS

    sink.expect(len(EVAL_SHOTS) * len(EVAL_STEPS))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("TRITON_INTERPRET", None)
    env.pop("METAFAST_BACKEND", None)
    with tempfile.TemporaryDirectory(prefix="metafast-demo-") as tmp:
        out = os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "metafast", "train", "--device", "cpu", "--out", out, "--no-progress"]
        if iterations != DEFAULT_ITERATIONS:
            cmd += ["--iterations", str(iterations)]
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        load_after = os.getloadavg()[0]
        print(proc.stdout[-2000:], end="")
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            sink.fail(f"metafast train exited {proc.returncode}")
            return sink.rows
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
    base = base_row(BENCH, torch.device("cpu"))
    extra = {"threads": threads, "end_to_end_s": seconds, "command": "metafast train" + (
        "" if iterations == DEFAULT_ITERATIONS else f" --iterations {iterations}"), "meta_step": meta_step_path(),
        "quick": iterations != DEFAULT_ITERATIONS, "load_avg_1min_before": load_before,
        "load_avg_1min_after": load_after}
    for row in rows_from_metrics(metrics, base, extra):
        if row["mse"] is None and not row["diverged"]:
            sink.fail(f"K={row['shots']}, {row['steps']} steps: no MSE and no diverged task in metrics.json")
        sink.add(row)
    return sink.rows


def main(argv=None) -> int:
    from metafast.jobs.sinusoid import DEFAULT_ITERATIONS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu"], help="cpu (what `make demo` runs on here)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the training process (default 2)")
    p.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                   help=f"default {DEFAULT_ITERATIONS}, the demo's; any other value marks the rows quick")
    p.add_argument("--out", default=RESULTS_DIR, help="directory for demo_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)  # the rows' device label names the threads
    sink = RowSink(f"{BENCH}_cpu", args.out)
    rows = measure(args.threads, args.iterations, sink)
    if rows:
        print_table(rows, COLUMNS)
    return finish(sink)


if __name__ == "__main__":
    sys.exit(main())
