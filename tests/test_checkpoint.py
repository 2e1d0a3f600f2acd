"""Atomic checkpoints and exact resume of the sinusoid job."""
import os

import pytest
import torch

from metafast.train import checkpoint as ckpt
from metafast.train import sinusoid as job
from metafast.train.progress import RunningLoss
from metafast.train.sinusoid import SinusoidConfig, TrainingInterrupted, train_sinusoid


# ----------------------------------------------------------------------------- atomic writes
def _leftovers(directory):
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_atomic_write_replaces_content(tmp_path):
    path = str(tmp_path / "f.bin")
    ckpt.atomic_write(path, lambda f: f.write(b"old"))
    ckpt.atomic_write(path, lambda f: f.write(b"new"))
    assert open(path, "rb").read() == b"new"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failed_write_keeps_old_file(tmp_path, exc):
    path = str(tmp_path / "f.bin")
    ckpt.atomic_write(path, lambda f: f.write(b"old"))

    def partial(f):
        f.write(b"half-written")
        raise exc("disk full")

    with pytest.raises(exc):
        ckpt.atomic_write(path, partial)
    assert open(path, "rb").read() == b"old"
    assert _leftovers(tmp_path) == []


def test_failed_rename_keeps_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "f.bin")
    ckpt.atomic_write(path, lambda f: f.write(b"old"))
    monkeypatch.setattr(ckpt.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("rename failed")))
    with pytest.raises(OSError, match="rename failed"):
        ckpt.atomic_write(path, lambda f: f.write(b"new"))
    assert open(path, "rb").read() == b"old"
    assert _leftovers(tmp_path) == []


def test_stale_temp_files_of_dead_writers_are_removed_on_the_next_write(tmp_path):
    """A writer killed mid-write leaves .f.bin.<pid>.<random>.tmp: the next write of f.bin removes it when
    that pid is gone, and keeps a live writer's temp file and every other file."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)  # exited and reaped: no such process now
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {"stale": f".f.bin.{dead_pid}.abc_12XY.tmp", "live": f".f.bin.{live.pid}.zz9.tmp",
                 "own": f".f.bin.{os.getpid()}.q1.tmp", "other_file": f".g.bin.{dead_pid}.abc.tmp",
                 "no_pid": ".f.bin.abcdefgh.tmp", "not_temp": f".f.bin.{dead_pid}.abc.tmp.keep"}
        for n in names.values():
            (tmp_path / n).write_bytes(b"half")
        ckpt.atomic_write(str(tmp_path / "f.bin"), lambda f: f.write(b"new"))
        left = set(os.listdir(tmp_path))
        assert left == {"f.bin"} | set(names.values()) - {names["stale"]}, left
        assert ckpt.remove_stale_temp_files(str(tmp_path / "f.bin")) == []  # nothing more to remove
    finally:
        live.kill()
        live.wait()
    assert ckpt.remove_stale_temp_files(str(tmp_path / "f.bin")) == [str(tmp_path / names["live"])]
    assert ckpt.remove_stale_temp_files(str(tmp_path / "missing_dir" / "f.bin")) == []


def test_atomic_write_respects_umask(tmp_path):
    path = str(tmp_path / "f.bin")
    ckpt.atomic_write(path, lambda f: f.write(b"x"))
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~ckpt._UMASK


def test_checkpoint_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(3)
    gen.manual_seed(3)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": 17,
             "rng": {"tasks": gen.get_state(), "torch_cpu": torch.get_rng_state()}, "config": {"lr": 1e-3, "x": [1, 2]}}
    path = str(tmp_path / "checkpoint.pt")
    ckpt.save_checkpoint(state, path)
    for where in (path, str(tmp_path)):  # a file or the directory holding checkpoint.pt
        back = ckpt.load_checkpoint(where)
        assert back["iteration"] == 17 and back["config"] == {"lr": 1e-3, "x": [1, 2]}
        for k, v in model.state_dict().items():
            assert torch.equal(back["model"][k], v)
        assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
        g2 = torch.Generator()
        g2.set_state(back["rng"]["tasks"])
        assert torch.equal(torch.rand(5, generator=g2), torch.rand(5, generator=gen))
        gen.set_state(state["rng"]["tasks"])


def test_failed_checkpoint_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    ckpt.save_checkpoint({"iteration": 1, "w": torch.arange(4.0)}, path)

    def broken_save(obj, f):
        f.write(b"\x80garbage")  # a partial pickle, then the failure
        raise OSError("no space left on device")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="no space"):
        ckpt.save_checkpoint({"iteration": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    back = ckpt.load_checkpoint(path)
    assert back["iteration"] == 1 and torch.equal(back["w"], torch.arange(4.0))
    assert _leftovers(tmp_path) == []


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ckpt.load_checkpoint(str(tmp_path))
    torch.save({"something": 1}, str(tmp_path / "checkpoint.pt"))
    with pytest.raises(ValueError, match="not a metafast checkpoint"):
        ckpt.load_checkpoint(str(tmp_path))
    with pytest.raises(TypeError, match="state must be a dict"):
        ckpt.save_checkpoint([1, 2], str(tmp_path / "x.pt"))


def test_running_loss_round_trip():
    r = RunningLoss()
    assert r.value() != r.value()  # NaN before any update
    for v in (3.0, 2.0, 1.5):
        r.update(torch.tensor(v))
    # bias-corrected EMA: sum_i (1-d) d^(n-1-i) v_i / (1 - d^n)
    d = 0.98
    expected = ((1 - d) * (d * d * 3.0 + d * 2.0 + 1.5)) / (1 - d ** 3)
    assert r.value() == pytest.approx(expected, rel=1e-12)
    r2 = RunningLoss.from_state(r.state())
    r.update(torch.tensor(0.7))
    r2.update(torch.tensor(0.7))
    assert r.value() == r2.value()


# ----------------------------------------------------------------------------- exact resume
ITERS = 24


def _config(**kw):
    kw.setdefault("checkpoint_every", 0)
    return SinusoidConfig(iterations=ITERS, device="cpu", **kw)


def _run(out, callback=None, resume=False, **kw):
    return train_sinusoid(_config(**kw), str(out), resume=resume, progress=False, callback=callback,
                          log=lambda s: None, plot=False)


def _stop_at(n, exc):
    def cb(it):
        if it == n:
            raise exc
    return cb


def _assert_same_run(dir_a, dir_b, metrics_a, metrics_b):
    a, b = ckpt.load_checkpoint(str(dir_a)), ckpt.load_checkpoint(str(dir_b))
    assert a["iteration"] == b["iteration"] == ITERS
    for k, v in a["maml"].items():
        if not torch.equal(v, b["maml"][k]):
            diff = (v - b["maml"][k]).abs().max().item()
            raise AssertionError(f"parameter {k} differs after resume (max abs diff {diff:.3e})")
    for (i, sa), sb in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"optimizer state {i}.{k} differs"
    assert torch.equal(a["rng"]["tasks"], b["rng"]["tasks"])
    assert metrics_a["mse"] == metrics_b["mse"] and metrics_a["ci95"] == metrics_b["ci95"]
    assert metrics_a["train_loss"] == metrics_b["train_loss"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, _run(out)


def test_resume_after_ctrl_c_is_exact(tmp_path, uninterrupted):
    dir_a, metrics_a = uninterrupted
    with pytest.raises(TrainingInterrupted, match="interrupted at iteration 9/24") as info:
        _run(tmp_path, callback=_stop_at(9, KeyboardInterrupt))
    assert info.value.checkpoint == str(tmp_path / "checkpoint.pt") and info.value.iteration == 9
    assert ckpt.load_checkpoint(str(tmp_path))["iteration"] == 9
    assert not (tmp_path / "metrics.json").exists()
    metrics_b = _run(tmp_path, resume=True)
    _assert_same_run(dir_a, tmp_path, metrics_a, metrics_b)
    assert metrics_b["timing"]["iterations_this_run"] == ITERS - 9


def test_resume_from_periodic_checkpoint_after_crash_is_exact(tmp_path, uninterrupted):
    dir_a, metrics_a = uninterrupted
    # a crash (not Ctrl-C) at iteration 17 saves nothing: the periodic checkpoint of iteration 15 remains
    with pytest.raises(RuntimeError, match="power cut"):
        _run(tmp_path, callback=_stop_at(17, RuntimeError("power cut")), checkpoint_every=5)
    assert ckpt.load_checkpoint(str(tmp_path))["iteration"] == 15
    metrics_b = _run(tmp_path, resume=True, checkpoint_every=5)
    _assert_same_run(dir_a, tmp_path, metrics_a, metrics_b)


def test_extending_a_finished_run_is_exact(tmp_path, uninterrupted):
    dir_a, metrics_a = uninterrupted
    short = train_sinusoid(SinusoidConfig(iterations=10, device="cpu", checkpoint_every=0), str(tmp_path),
                           progress=False, log=lambda s: None, plot=False)
    assert short["iteration"] == 10
    metrics_b = _run(tmp_path, resume=True)
    _assert_same_run(dir_a, tmp_path, metrics_a, metrics_b)
    # resuming a finished run only re-evaluates
    again = _run(tmp_path, resume=True)
    assert again["mse"] == metrics_a["mse"] and again["timing"]["iterations_this_run"] == 0


def test_resume_refuses_a_different_setup(tmp_path, uninterrupted):
    dir_a, _ = uninterrupted
    with pytest.raises(ValueError, match="meta_batch: checkpoint has 25, asked for 5"):
        train_sinusoid(_config(meta_batch=5), str(dir_a), resume=True, progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="iterations must be >= 24"):
        train_sinusoid(SinusoidConfig(iterations=3, device="cpu"), str(dir_a), resume=True, progress=False,
                       log=lambda s: None)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        _run(dir_a)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        _run(tmp_path, resume=True)


def test_interrupt_inside_a_step_saves_nothing(tmp_path, monkeypatch):
    # A second Ctrl-C can land inside a step, where parameters may be half updated: the periodic
    # checkpoint must then stay as it is rather than be overwritten with an inconsistent state.
    calls = {"n": 0}
    sample = job.SinusoidTasks.sample

    def interrupted_sample(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return sample(self, *a, **k)

    monkeypatch.setattr(job.SinusoidTasks, "sample", interrupted_sample)
    with pytest.raises(TrainingInterrupted, match="interrupted inside iteration 6") as info:
        _run(tmp_path, checkpoint_every=5)
    assert info.value.checkpoint is None
    assert ckpt.load_checkpoint(str(tmp_path))["iteration"] == 5
