"""Data-parallel distillation and multi-task training on 2 CPU processes (gloo): each rank takes a shard
of the batch, and the averaged gradients, the parameters after a few steps and the weighting state
equal one process's on the whole batch; ``metafast distill`` and ``metafast multitask`` run under
torchrun with rank 0 alone writing.

The workers are this file run as a script with torchrun's environment variables (the spawning
helpers of test_distributed.py); every subprocess has a timeout.
"""
import json
import os
import subprocess
import sys

import torch
from torch import nn

from test_distributed import _env, assert_exit, _free_port, _kill, _rel_err, _wait, spawn, start_together

DT = torch.float64
TOL = 1e-10
N = 9  # rows per batch: odd, so the two shards differ in size (5 and 4)
STEPS = 3
STRATEGIES = ("equal", "uncertainty", "gradnorm")


def _kd():
    from metafast.distill import Distiller

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4)).to(DT)
    student = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).to(DT)
    d = Distiller(teacher, student, temperature=3.0, alpha=0.7, lr=1e-2, backend="torch")
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(N, 5, generator=g, dtype=DT), torch.randint(0, 4, (N,), generator=g))
               for _ in range(STEPS)]
    batches[1] = (batches[1][0], None)  # a step on soft targets alone
    return d, [p for p in student.parameters()], lambda b: d.step(*b), batches


def _mt(strategy):
    from metafast.multitask import MultiTask, MultiTaskTrainer, make_weighting

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    model = MultiTask(trunk, [nn.Linear(8, 3) for _ in range(3)]).to(DT)
    weighting = make_weighting(strategy, 3).to(DT)
    opt = torch.optim.Adam(MultiTaskTrainer.parameter_groups(model, weighting, 1e-2, 0.05))
    trainer = MultiTaskTrainer(model, weighting, opt)
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(N, 5, generator=g, dtype=DT), torch.randint(0, 3, (3, N), generator=g))
               for _ in range(STEPS)]
    params = list(model.parameters()) + list(weighting.parameters())

    def step(b):
        return trainer.step(*b)["loss"]
    return weighting, params, step, batches


def _run_case(build):
    """Gradients and loss of the first step, then parameters and strategy state after STEPS steps."""
    owner, params, step, batches = build()
    loss = step(batches[0])
    grads = [p.grad.clone() for p in params]
    for b in batches[1:]:
        step(b)
    state = {k: v.clone() for k, v in owner.state_dict().items()} if isinstance(owner, nn.Module) else {}
    return {"grads": grads, "loss": loss.clone(), "params": [p.detach().clone() for p in params], "state": state}


CASES = {"kd": _kd, **{f"multitask_{s}": (lambda s=s: _mt(s)) for s in STRATEGIES}}


# ----------------------------------------------------------------------------- worker side
def _worker(mode, out_dir, timeout):
    torch.set_num_threads(1)
    from metafast import distributed

    rank, world = start_together(timeout)
    with distributed.leaving():  # together on success, Ctrl-C and this rank's error
        if mode == "grad":
            torch.save({name: _run_case(build) for name, build in CASES.items()},
                       os.path.join(out_dir, f"rank{rank}.pt"))
        else:  # the multitask job until Ctrl-C
            from metafast.jobs.multitask import MultiTaskConfig, run_multitask

            started = os.path.join(os.path.dirname(out_dir), f"rank{rank}.training")

            def callback(name, i):  # tells the parent that this rank is inside the training loop
                if i == 5:
                    open(started, "w").close()

            config = MultiTaskConfig(iterations=10 ** 6, strategies=("gradnorm",), tasks=3, train_size=2000,
                                     test_size=200, device="cpu", checkpoint_every=0)
            run_multitask(config, out_dir, progress=False, callback=callback)


# ----------------------------------------------------------------------------- test side
def _spawn(mode, out_dir, timeout, world=2):
    return spawn(__file__, mode, out_dir, timeout, world)


def test_shards_of_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    world = 2
    procs = _spawn("grad", tmp_path, 30, world)
    try:
        for p in procs:
            rc, _, err = _wait(p, 60)
            assert_exit(rc, err, 0)
    finally:
        _kill(procs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for name, build in CASES.items():
        ref = _run_case(build)  # one process, whole batches
        for r, res in enumerate(ranks):
            got = res[name]
            for i, (a, b) in enumerate(zip(got["grads"], ref["grads"])):
                assert _rel_err(a, b) <= TOL, f"{name} rank {r} grad {i}: rel. err {_rel_err(a, b):.3e}"
            assert abs(got["loss"].item() - ref["loss"].item()) <= TOL * abs(ref["loss"].item()), (name, r)
            for i, (a, b) in enumerate(zip(got["params"], ref["params"])):
                assert _rel_err(a, b) <= TOL, f"{name} rank {r} param {i} after {STEPS} steps: {_rel_err(a, b):.3e}"
            assert set(got["state"]) == set(ref["state"])
            for k in ref["state"]:  # uncertainty log-variances, GradNorm weights and initial losses
                assert torch.allclose(got["state"][k], ref["state"][k], rtol=TOL, atol=0, equal_nan=True), (name, k)
        # every rank took the same steps and holds the same strategy state, bit for bit
        for a, b in zip(ranks[0][name]["params"], ranks[1][name]["params"]):
            assert torch.equal(a, b), name
        for k in ranks[0][name]["state"]:
            assert torch.equal(ranks[0][name]["state"][k].nan_to_num(), ranks[1][name]["state"][k].nan_to_num()), (name, k)


def _torchrun(*args, timeout=120):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "metafast", *args]
    return subprocess.run(cmd, env=_env(METAFAST_DIST_TIMEOUT="30"), capture_output=True, text=True, timeout=timeout)


def test_torchrun_distill_rank0_writes(tmp_path):
    out = tmp_path / "kd"
    res = _torchrun("distill", "--train-size", "200", "--transfer-size", "200", "--test-size", "200",
                    "--teacher-steps", "20", "--student-steps", "20", "--batch-size", "33", "--checkpoint-every", "10",
                    "--no-progress", "--out", str(out))
    assert_exit(res.returncode, res.stderr, 0)
    assert res.stdout.count("held-out accuracy") == 1 and res.stdout.count("metrics written") == 1, res.stdout
    assert "distributed: 2 processes" in res.stdout, res.stdout
    assert sorted(os.listdir(out)) == ["config.json", "distilled", "metrics.json", "scratch", "teacher"]
    for phase in ("teacher", "scratch", "distilled"):
        assert os.listdir(out / phase) == ["checkpoint.pt"], os.listdir(out / phase)
        assert torch.load(out / phase / "checkpoint.pt", weights_only=True)["step"] == 20
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["distilled_student_accuracy"] <= 1


def test_torchrun_multitask_rank0_writes(tmp_path):
    out = tmp_path / "mt"
    res = _torchrun("multitask", "--iterations", "20", "--tasks", "3", "--device", "cpu", "--checkpoint-every", "10",
                    "--no-progress", "--out", str(out))
    assert_exit(res.returncode, res.stderr, 0)
    assert res.stdout.count("test accuracy per task") == 1 and "distributed: 2 processes" in res.stdout, res.stdout
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "metrics.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and list(metrics["results"]) == list(STRATEGIES)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["strategy_index"] == len(STRATEGIES)


def test_multitask_ctrl_c_on_one_rank_stops_all_then_resumes_in_one_process(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    procs = _spawn("multitask_job", out, 20)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "rank1.training").exists() and time.time() < deadline:
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGINT)
        results = [_wait(p, 40) for p in procs]
    finally:
        _kill(procs)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 5 <= ckpt["iteration"] < 10 ** 6 and ckpt["strategy_index"] == 0
    for rc, _, err in results:  # both ranks stop after the same step; rank 0 saved it
        assert_exit(rc, err, 1)
        assert "TrainingInterrupted" in err and "DistributedError" not in err and "LeaveWarning" not in err, err[-3000:]
        assert f"iteration {ckpt['iteration']}/" in err, err[-2000:]
    res = subprocess.run([sys.executable, "-m", "metafast", "multitask", "--resume", str(out), "--iterations",
                          str(ckpt["iteration"] + 5), "--no-progress"], env=_env(), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and list(metrics["results"]) == ["gradnorm"]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _worker(*sys.argv[1:])
