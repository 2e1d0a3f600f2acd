"""Data-parallel meta-training on 2 CPU processes (gloo): the all-reduced meta-gradient equals one
process's meta-gradient on the concatenated tasks, a dead rank ends the job with a clear error within
the timeout, and the default job runs under torchrun with rank 0 alone writing.

The workers are this file run as a script (``python tests/test_distributed.py <mode> ...``) with
torchrun's environment variables; every subprocess has a timeout, so a failure cannot hang CI.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from meta_paths import assert_path

HERE = os.path.dirname(os.path.abspath(__file__))
DT = torch.float64
TOL = 1e-10
T = 3  # tasks per rank: odd on purpose
CASES = {  # name -> BatchedMAML options; all second order
    "maml": dict(inner_lr=0.3, inner_steps=2, meta_sgd=False),
    "meta_sgd": dict(inner_lr=0.2, inner_steps=1, meta_sgd=True),
    "maml_autograd": dict(inner_lr=0.3, inner_steps=2, meta_sgd=False, exact_reverse=False, fused=False),
}


def _build(case):
    from metafast import BatchedMAML
    from metafast.models import MLP

    torch.manual_seed(0)
    maml = BatchedMAML(MLP(1, [7, 5], 1).to(DT), loss="mse", **CASES[case])
    if maml.lrs is not None:  # distinct per-element rates, so a mix-up of lrs would show
        with torch.no_grad():
            maml.lrs.mul_(torch.rand(maml.lrs.shape, generator=torch.Generator().manual_seed(1), dtype=DT) + 0.5)
    return maml


def _tasks(n):
    from metafast.data.sinusoid import SinusoidTasks

    b = SinusoidTasks().sample(n, 6, 5, torch.Generator().manual_seed(7), dtype=DT)
    return b.support_x, b.support_y, b.query_x, b.query_y


def _grads(maml, batch):
    out = maml(*batch)
    out.loss.backward()
    return {n: p.grad.clone() for n, p in maml.named_parameters()}, out.loss.detach()


# ----------------------------------------------------------------------------- worker side
def start_together(timeout):
    """Join the gloo process group once every worker is up: the group's timeout also bounds its
    set-up, and a loaded CI machine may start one interpreter seconds after the other. -> (rank, world)"""
    from metafast import distributed

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    sync = os.environ["SYNC_DIR"]
    open(os.path.join(sync, f"ready{rank}"), "w").close()
    deadline = time.time() + 60
    while not all(os.path.exists(os.path.join(sync, f"ready{r}")) for r in range(world)):
        if time.time() > deadline:
            raise RuntimeError("the other workers did not start within 60 s")
        time.sleep(0.05)
    # leaving waits at most a minute here (rank 0's evaluation in the job tests is short)
    distributed.init("cpu", timeout=float(timeout), leave_timeout=max(float(timeout), 60.0))
    open(os.path.join(sync, f"joined{rank}"), "w").close()  # the parent's clock for the collective timeout
    return rank, world


def _worker(mode, out_dir, timeout, iterations="0", resume="0"):
    torch.set_num_threads(1)
    from metafast import distributed
    import metafast.train.sinusoid  # noqa: F401  (imports done before the clock of a short timeout starts)

    rank, world = start_together(timeout)
    with distributed.leaving():  # together on success, Ctrl-C and this rank's error
        if mode == "job":
            from metafast.train.sinusoid import SinusoidConfig, train_sinusoid

            config = SinusoidConfig(iterations=int(iterations), meta_batch=5, device="cpu", checkpoint_every=0)
            started = os.path.join(os.path.dirname(out_dir), f"rank{rank}.training")

            def callback(i):  # tells the parent that this rank is inside the training loop
                if i == 5:
                    open(started, "w").close()

            train_sinusoid(config, out_dir, resume=resume == "1", progress=False, plot=False, callback=callback)
        elif mode == "grad":
            result = {}
            for case in CASES:
                maml = _build(case)
                if rank != 0:  # a different start on rank 1: only the broadcast makes them equal
                    with torch.no_grad():
                        for p in maml.parameters():
                            p.add_(0.5)
                distributed.broadcast_parameters(maml)
                batch = [t[rank * T:(rank + 1) * T].contiguous() for t in _tasks(world * T)]
                out = maml(*batch)
                out.loss.backward()
                loss = out.loss.detach().clone()
                distributed.all_reduce_gradients(maml.parameters(), also=[loss])
                result[case] = ({n: p.grad.clone() for n, p in maml.named_parameters()}, loss,
                                {n: p.detach().clone() for n, p in maml.named_parameters()})
            torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        elif mode == "leave_alone":  # rank 1 tears down without the others; rank 0's leave must say so
            if rank == 1:
                distributed.shutdown()
                return
            time.sleep(1)
        elif mode in ("die", "hang"):
            maml = _build("maml")
            out = maml(*_tasks(T))
            out.loss.backward()
            if rank == 1:
                if mode == "die":
                    raise RuntimeError("rank 1 fails before the all_reduce")
                time.sleep(600)  # never reaches the collective; the parent kills it
            distributed.all_reduce_gradients(maml.parameters())
        else:
            raise ValueError(f"mode: unknown {mode!r}")


# ----------------------------------------------------------------------------- test side
def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    # faulthandler: a worker that aborts (SIGABRT from C++) prints its Python stack
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", **extra)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _store(world):
    """The rendezvous store, hosted here as torchrun's agent does: no rank owns it, so the order in
    which ranks exit cannot pull it from under the others."""
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)


def spawn(script, mode, out_dir, timeout, world=2, *extra):
    """``world`` workers running ``script`` as torchrun would start them (its __main__ calls its worker)."""
    store = _store(world)
    sync = tempfile.mkdtemp(prefix="metafast-dist-")
    procs = []
    for r in range(world):
        env = _env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_PORT=str(store.port),
                   TORCHELASTIC_USE_AGENT_STORE="True", SYNC_DIR=sync)
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(script), mode, str(out_dir), str(timeout), *extra],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        p.store, p.sync = store, sync  # alive as long as the workers
    return procs


def _wait(proc, timeout):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"worker did not finish within {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


ABORT_SIGNS = ("terminate called", "Fatal Python error", "Aborted", "core dumped")


def assert_exit(rc, err, expected):
    """Exit status ``expected`` exactly (0, or 1 for a Python exception): a non-zero expectation must not
    hide an abort (SIGABRT gives -6, torchrun reports it as 1 with the signal named in its log)."""
    signs = [s for s in ABORT_SIGNS if s in err]
    assert rc == expected and not signs, f"exit status {rc} (expected {expected}), abort signs {signs}:\n{err[-3000:]}"


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()
        shutil.rmtree(p.sync, ignore_errors=True)


def _rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def test_single_process_helpers_and_errors(monkeypatch):
    from metafast import distributed

    seeds = {distributed.task_seed(0, r, i) for r in range(3) for i in range(50)}
    assert len(seeds) == 150 and all(0 <= v < 2 ** 63 for v in seeds)  # every rank and iteration its own stream
    assert distributed.task_seed(5, 1, 7) == distributed.task_seed(5, 1, 7) != distributed.task_seed(6, 1, 7)
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    g = torch.tensor([1.5, -2.0])
    distributed.all_reduce_mean_([g])  # no process group: a no-op
    assert g.tolist() == [1.5, -2.0]
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR.*torchrun"):
        distributed.init("cpu")
    with pytest.raises(ValueError, match="timeout"):
        distributed.init("cpu", timeout=0)
    with pytest.raises(ValueError, match="leave_timeout"):
        distributed.init("cpu", leave_timeout=-1)
    monkeypatch.setenv("METAFAST_DIST_LEAVE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="METAFAST_DIST_LEAVE_TIMEOUT: expected seconds"):
        distributed.init("cpu")
    monkeypatch.delenv("METAFAST_DIST_LEAVE_TIMEOUT")
    with pytest.raises(ValueError, match="device"):
        distributed.init("tpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE.*integer"):
        distributed.launched()


def test_only_the_sinusoid_job_runs_under_torchrun(monkeypatch, capsys, tmp_path):
    from metafast.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--dataset", "omniglot", "--iterations", "1", "--out", str(tmp_path / "x")]) == 2
    assert "only the sinusoid job runs data parallel" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_two_ranks_give_the_meta_gradient_of_all_tasks(tmp_path):
    procs = spawn(__file__, "grad", tmp_path, 30)
    try:
        for p in procs:
            rc, _, err = _wait(p, 45)
            assert_exit(rc, err, 0)
    finally:
        _kill(procs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert_path(_build("maml_autograd"), fused=False, exact_reverse=False)
    for case in CASES:
        ref_grads, ref_loss = _grads(_build(case), _tasks(2 * T))  # one process, all 2T tasks
        ref_params = {n: p.detach() for n, p in _build(case).named_parameters()}
        for r, res in enumerate(ranks):
            grads, loss, params = res[case]
            assert set(grads) == set(ref_grads)
            for n in ref_grads:
                assert torch.equal(params[n], ref_params[n]), f"{case} rank {r}: {n} not broadcast from rank 0"
                err = _rel_err(grads[n], ref_grads[n])
                assert err <= TOL, (f"{case} rank {r} {n}: rel. err {err:.3e}; first values "
                                    f"{grads[n].flatten()[:4].tolist()} vs {ref_grads[n].flatten()[:4].tolist()}")
            assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item()), (case, loss, ref_loss)
        for n in ref_grads:  # the meta-optimizer sees the same gradient on every rank
            assert torch.equal(ranks[0][case][0][n], ranks[1][case][0][n]), (case, n)


@pytest.mark.parametrize("mode,timeout", [("die", 20), ("hang", 3)])
def test_a_dead_rank_ends_the_job_with_a_clear_error(tmp_path, mode, timeout):
    procs = spawn(__file__, mode, tmp_path, timeout)
    try:  # timed from the moment rank 0 joined the group: start-up on a loaded machine is not the subject
        joined, deadline = os.path.join(procs[0].sync, "joined0"), time.time() + 120
        while not os.path.exists(joined) and procs[0].poll() is None and time.time() < deadline:
            time.sleep(0.05)
        t0 = time.perf_counter()
        rc, _, err = _wait(procs[0], timeout + 30)
        elapsed = time.perf_counter() - t0
    finally:
        _kill(procs)
    assert_exit(rc, err, 1)  # rank 0 fails when rank 1 never joins the all_reduce
    assert "DistributedError" in err and "all_reduce failed" in err and "rank 0/2" in err, err[-3000:]
    assert elapsed < timeout + 25, elapsed


def test_a_rank_that_leaves_alone_is_reported_not_swallowed(tmp_path):
    procs = spawn(__file__, "leave_alone", tmp_path, 20)
    try:
        rc, _, err = _wait(procs[0], 90)
    finally:
        _kill(procs)
    assert_exit(rc, err, 0)  # the work is done: a warning, not a failure
    assert "LeaveWarning" in err and "did not leave the process group together" in err, err[-3000:]


def test_ctrl_c_on_one_rank_stops_all_after_the_same_step(tmp_path):
    import signal

    procs = spawn(__file__, "job", tmp_path / "run", 20, 2, "1000000", "0")
    try:
        deadline = time.time() + 60
        while not (tmp_path / "rank1.training").exists() and time.time() < deadline:
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGINT)
        results = [_wait(p, 40) for p in procs]
    finally:
        _kill(procs)
    for rc, _, err in results:
        assert_exit(rc, err, 1)
        assert "TrainingInterrupted" in err and "DistributedError" not in err and "LeaveWarning" not in err, err[-3000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert 0 < ckpt["iteration"] < 1000000
    assert f"interrupted at iteration {ckpt['iteration']}/" in results[0][2], results[0][2][-2000:]
    assert f"interrupted at iteration {ckpt['iteration']}/" in results[1][2], results[1][2][-2000:]


def _job(out_dir, iterations, resume=False):
    procs = spawn(__file__, "job", out_dir, 30, 2, str(iterations), "1" if resume else "0")
    try:
        for p in procs:
            rc, _, err = _wait(p, 60)
            assert_exit(rc, err, 0)
    finally:
        _kill(procs)
    return torch.load(os.path.join(out_dir, "checkpoint.pt"), weights_only=True)


def _same_state(a, b):
    for key in ("maml", "optimizer"):
        x, y = a[key], b[key]
        if key == "optimizer":
            x, y = x["state"], y["state"]
        tx = [t for v in x.values() for t in (v.values() if isinstance(v, dict) else [v]) if torch.is_tensor(t)]
        ty = [t for v in y.values() for t in (v.values() if isinstance(v, dict) else [v]) if torch.is_tensor(t)]
        assert len(tx) == len(ty) > 0, key
        for u, v in zip(tx, ty):
            assert torch.equal(u, v), f"{key}: first values {u.flatten()[:4].tolist()} vs {v.flatten()[:4].tolist()}"


def test_torchrun_default_job_rank0_writes_and_resumes(tmp_path):
    out = tmp_path / "run"
    port = str(_free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", port, "-m", "metafast", "train", "--iterations", "20", "--meta-batch", "5",
           "--device", "cpu", "--out", str(out), "--no-progress", "--checkpoint-every", "10"]
    res = subprocess.run(cmd, env=_env(METAFAST_DIST_TIMEOUT="30"), capture_output=True, text=True, timeout=90)
    assert_exit(res.returncode, res.stderr, 0)
    assert "LeaveWarning" not in res.stderr, res.stderr[-3000:]
    assert res.stdout.count("held-out MSE") == 1, res.stdout  # only rank 0 evaluates and prints
    assert "2 processes" in res.stdout and "10 tasks per step" in res.stdout, res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iteration"] == 20 and metrics["world_size"] == 2 and metrics["tasks_per_iteration"] == 10
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "metrics.json", "sinusoid_fits.png"]
    straight = torch.load(out / "checkpoint.pt", weights_only=True)
    assert straight["world_size"] == 2 and straight["iteration"] == 20

    # the same job stopped at 10 and resumed with the same world size ends bit for bit identical
    _job(tmp_path / "resumed", 10)
    resumed = _job(tmp_path / "resumed", 20, resume=True)
    assert resumed["iteration"] == 20
    _same_state(straight, resumed)
    again = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert again["mse"] == metrics["mse"] and again["train_loss"] == metrics["train_loss"]

    # resume in one process (another world size): model/optimizer/iteration continue
    res = subprocess.run([sys.executable, "-m", "metafast", "train", "--resume", str(out), "--iterations", "23",
                          "--no-progress"], env=_env(), capture_output=True, text=True, timeout=180)
    assert_exit(res.returncode, res.stderr, 0)
    assert "checkpoint of 2 processes" in res.stdout, res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iteration"] == 23 and metrics["world_size"] == 1 and metrics["timing"]["iterations_this_run"] == 3


if __name__ == "__main__":
    _worker(*sys.argv[1:])
