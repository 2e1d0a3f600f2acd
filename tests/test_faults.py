"""Faults a training run must survive: SIGKILL while a checkpoint is written, a truncated or corrupted
checkpoint, a full disk, NaN in the data mid-run. Each ends in a clear error (or a clean resume), and
the last good checkpoint is never lost or overwritten. (A rank killed mid-all_reduce:
test_distributed.test_a_dead_rank_ends_the_job_with_a_clear_error.)"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from metafast import cli
from metafast.train import checkpoint as ckpt
from metafast.train import sinusoid as job
from metafast.train.sinusoid import SinusoidConfig, train_sinusoid

QUIET = dict(progress=False, log=lambda s: None, plot=False)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("TRITON_INTERPRET", None)
    return env


def _small_run(out_dir, iterations, **kw):
    cfg = dict(iterations=iterations, meta_batch=5, device="cpu", checkpoint_every=0)
    cfg.update(kw)
    return train_sinusoid(SinusoidConfig(**cfg), str(out_dir), **QUIET)


def _temp_files(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


# ----------------------------------------------------------------------------- SIGKILL mid-write
_KILLED_WRITER = textwrap.dedent("""
    import io, sys, time
    from metafast import cli
    from metafast.train import checkpoint

    real_atomic_write, marker, calls = checkpoint.atomic_write, sys.argv[2], [0]

    def stalled_write(path, write):
        calls[0] += path.endswith("checkpoint.pt")
        if calls[0] != 2:
            return real_atomic_write(path, write)

        def half_then_stall(f):  # the second periodic checkpoint: half of it in the temp file, then SIGKILL
            buf = io.BytesIO()
            write(buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            open(marker, "w").close()
            time.sleep(600)

        return real_atomic_write(path, half_then_stall)

    checkpoint.atomic_write = stalled_write
    sys.exit(cli.main(["train", "--iterations", "40", "--checkpoint-every", "5", "--meta-batch", "5",
                       "--device", "cpu", "--out", sys.argv[1], "--no-progress"]))
""")


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one_and_resume_continues(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(out), str(marker)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the second checkpoint write did not start within 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    left = _temp_files(out)  # the half-written temp file the kill left, named with the writer's pid
    assert left == [n for n in left if n.startswith(f".checkpoint.pt.{proc.pid}.")] and len(left) == 1, left
    assert ckpt.load_checkpoint(str(out))["iteration"] == 5  # checkpoint.pt untouched
    res = subprocess.run([sys.executable, "-m", "metafast", "train", "--resume", str(out), "--iterations", "12",
                          "--no-progress"], env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming {out} at iteration 5/12" in res.stdout, res.stdout
    assert f"removed {out / left[0]}" in res.stdout, res.stdout  # removed on opening the run, before any write
    assert _temp_files(out) == []
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iteration"] == 12 and metrics["timing"]["iterations_this_run"] == 7
    assert ckpt.load_checkpoint(str(out))["iteration"] == 12


# ----------------------------------------------------------------------------- damaged checkpoints
def _flip_tensor_byte(data: bytes) -> bytes:
    """One bit flipped inside the first parameter's data (torch.load alone reads it without complaint)."""
    state = torch.load(__import__("io").BytesIO(data), weights_only=True)
    first = next(iter(state["maml"].values())).contiguous().reshape(-1)
    needle = first[:4].numpy().tobytes()
    at = data.find(needle)
    assert at > 0, "the parameter's bytes are not stored verbatim"
    out = bytearray(data)
    out[at + 1] ^= 0x10
    return bytes(out)


DAMAGE = {
    "truncated_half": lambda d: d[: len(d) // 2],
    "truncated_tail": lambda d: d[:-7],
    "empty": lambda d: b"",
    "text": lambda d: b"not a checkpoint\n",
    "flipped_tensor_bit": _flip_tensor_byte,
    "flipped_key": lambda d: d.replace(b"iteration", b"iteratioN", 1),
}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    _small_run(out, 3)
    return out, (out / "checkpoint.pt").read_bytes()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_by_name_and_left_alone(tmp_path, good_run, damage, capsys):
    _, good = good_run
    out = tmp_path / "run"
    out.mkdir()
    path = out / "checkpoint.pt"
    bad = DAMAGE[damage](good)
    assert bad != good
    path.write_bytes(bad)
    with pytest.raises(ValueError, match=f"{path}.*(truncated or corrupted|corrupted|not a metafast checkpoint)"):
        ckpt.load_checkpoint(str(out))
    with pytest.raises(ValueError, match=f"{out} already holds a checkpoint"):
        _small_run(out, 6)  # a fresh run refuses the directory
    with pytest.raises(ValueError, match=str(path)):
        train_sinusoid(SinusoidConfig(iterations=6, meta_batch=5, device="cpu"), str(out), resume=True, **QUIET)
    rc = cli.main(["train", "--resume", str(out), "--iterations", "6", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and str(path) in err, err
    assert path.read_bytes() == bad and sorted(os.listdir(out)) == ["checkpoint.pt"]  # nothing overwritten


def test_the_undamaged_checkpoint_loads(good_run):
    out, good = good_run
    assert ckpt.load_checkpoint(str(out))["iteration"] == 3


# ----------------------------------------------------------------------------- a full disk
_SIZE_LIMITED = textwrap.dedent("""
    import resource, signal, sys
    from metafast import cli
    import metafast.train.sinusoid  # noqa: F401  (imports first: the limit is for the run's writes)

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    sys.exit(cli.main(["train", "--resume", sys.argv[1], "--iterations", "6", "--no-progress"]))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and SIGXFSZ")
def test_a_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    _small_run(out, 3)
    path = out / "checkpoint.pt"
    good = path.read_bytes()
    res = subprocess.run([sys.executable, "-c", _SIZE_LIMITED, str(out), str(len(good) // 2)], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "OSError" in last and f"cannot write {path}" in last and "File too large" in last, res.stderr[-3000:]
    assert "terminate called" not in res.stderr
    assert path.read_bytes() == good and _temp_files(out) == []
    assert ckpt.load_checkpoint(str(out))["iteration"] == 3


def test_a_failed_write_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint({"iteration": 1}, str(path))

    def no_space(fd):  # where a full disk often shows: the data does not fit when it is flushed
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", no_space)
    with pytest.raises(OSError, match=f"cannot write {path}: No space left on device") as info:
        ckpt.save_checkpoint({"iteration": 2}, str(path))
    assert info.value.errno == 28
    monkeypatch.undo()
    assert ckpt.load_checkpoint(str(path))["iteration"] == 1 and _temp_files(tmp_path) == []


# ----------------------------------------------------------------------------- NaN in the data mid-run
@pytest.mark.parametrize("field", ["support_y", "query_x"])
def test_nan_in_the_data_mid_run_names_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch, field):
    calls = [0]
    sample = job.SinusoidTasks.sample

    def poisoned(self, *a, **k):
        batch = sample(self, *a, **k)
        calls[0] += 1
        if calls[0] == 8:  # iteration 8 of 20: the periodic checkpoint of iteration 5 exists
            getattr(batch, field)[1, 0] = float("nan")
        return batch

    monkeypatch.setattr(job.SinusoidTasks, "sample", poisoned)
    with pytest.raises(FloatingPointError, match=r"iteration 8/20: .*NaN/inf for tasks \[1\]"):
        _small_run(tmp_path, 20, checkpoint_every=5)
    state = ckpt.load_checkpoint(str(tmp_path))
    assert state["iteration"] == 5 and all(torch.isfinite(v).all() for v in state["maml"].values())
    assert not (tmp_path / "metrics.json").exists()
