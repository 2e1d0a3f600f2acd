"""Stress: the torchrun job CI saw abort at teardown ("terminate called without an active exception"),
run many times in a row; every run must exit 0 with no abort. Slow (about a minute a run on a loaded
2-core machine): runs with ``-m slow``; METAFAST_STRESS_RUNS sets the count (default 30).

Core dumps are enabled for the workers: when a run aborts, the failure message carries gdb's backtrace
of every thread of the core (and faulthandler's Python stacks), the evidence for the cause. Also a
script: ``python tests/test_torchrun_stress.py [runs]`` prints one line per run and the abort count.
"""
import glob
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from test_distributed import ABORT_SIGNS, _env, _free_port  # noqa: E402

RUNS = int(os.environ.get("METAFAST_STRESS_RUNS", "30"))


def _allow_cores():
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _backtrace(core: str) -> str:
    gdb = shutil.which("gdb")
    if gdb is None:
        return f"(no gdb to read {core})"
    res = subprocess.run([gdb, "-batch", "-ex", "thread apply all bt 25", sys.executable, core],
                         capture_output=True, text=True, timeout=300)
    return res.stdout[-12000:]


def one_run(work: str) -> dict:
    """One torchrun job (2 gloo ranks, checkpoints, rank 0 evaluates and plots while rank 1 waits to leave)
    in ``work``; -> {"rc", "seconds", "abort": None or the evidence}."""
    out = os.path.join(work, "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "metafast", "train", "--iterations", "20", "--meta-batch", "5",
           "--device", "cpu", "--out", out, "--no-progress", "--checkpoint-every", "10"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=_env(METAFAST_DIST_TIMEOUT="30"), capture_output=True, text=True, timeout=600,
                         cwd=work, preexec_fn=_allow_cores)
    seconds = time.perf_counter() - t0
    cores = glob.glob(os.path.join(work, "core*"))
    signs = [s for s in ABORT_SIGNS if s in res.stderr]
    abort = None
    if cores or signs or res.returncode != 0:
        abort = f"exit {res.returncode}, signs {signs}, cores {cores}\n{res.stderr[-6000:]}\n"
        abort += "".join(f"\n--- gdb {c}\n{_backtrace(c)}" for c in cores)
    return {"rc": res.returncode, "seconds": seconds, "abort": abort}


def stress(runs: int, report=print) -> list:
    results = []
    for i in range(runs):
        work = tempfile.mkdtemp(prefix="metafast-stress-")
        try:
            r = one_run(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        results.append(r)
        report(f"run {i + 1}/{runs}: exit {r['rc']}, {r['seconds']:.0f} s, {'ABORT' if r['abort'] else 'ok'}")
        if r["abort"]:
            report(r["abort"])
    return results


@pytest.mark.slow
def test_torchrun_job_never_aborts_at_teardown(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("stress test: run with -m slow")
    results = stress(RUNS, report=lambda line: None)
    aborts = [r["abort"] for r in results if r["abort"]]
    print(f"\n{RUNS} torchrun jobs, {len(aborts)} aborts, "
          f"{sum(r['seconds'] for r in results) / RUNS:.0f} s per job")
    assert not aborts, f"{len(aborts)}/{RUNS} runs aborted; the first:\n{aborts[0]}"


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else RUNS
    found = stress(n, report=lambda line: print(line, flush=True))
    print(f"aborts={sum(1 for r in found if r['abort'])} of {n}", flush=True)
