"""The metafast command: the default train job end to end, Ctrl-C, bad arguments, info, bench."""
import ast
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest
import torch

import metafast
from metafast import cli
from metafast.runtime import checkpoint as ckpt
from metafast.commands import bench as bench_command, train as train_command
from metafast.jobs.sinusoid import SinusoidConfig, train_sinusoid


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------- train
def test_default_job_smoke(tmp_path, capsys):
    out_dir = tmp_path / "run"
    rc, out, err = _run(capsys, "train", "--iterations", "20", "--out", str(out_dir), "--no-progress")
    assert rc == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["diverged"] == {k: {s: 0 for s in ("1", "5", "10")} for k in ("5", "10")}
    for key in ("mse", "ci95"):
        assert sorted(metrics[key], key=int) == ["5", "10"]
        for k in ("5", "10"):
            assert sorted(metrics[key][k], key=int) == ["1", "5", "10"]
            for v in metrics[key][k].values():
                assert math.isfinite(v) and v > 0, (key, k, v)
    # 600 tasks with amplitudes up to 5: the CI is a small fraction of the mean, nowhere near zero
    assert 0 < metrics["ci95"]["10"]["10"] < metrics["mse"]["10"]["10"]
    cfg = metrics["config"]
    assert cfg["iterations"] == 20 and cfg["meta_batch"] == 25 and cfg["inner_lr"] == 0.01
    assert cfg["first_order"] is False and metrics["iteration"] == 20 and metrics["eval"]["tasks"] == 600
    assert metrics["timing"]["iterations_this_run"] == 20 and metrics["timing"]["ms_per_iteration"] > 0
    png = (out_dir / "sinusoid_fits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    state = ckpt.load_checkpoint(str(out_dir))
    assert state["iteration"] == 20
    shapes = [tuple(v.shape) for v in state["model"].values()]
    assert shapes == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]  # MLP 1-40-40-1
    assert "held-out MSE on 600 tasks" in out and "K=10" in out


def test_training_reduces_heldout_error(tmp_path):
    # On the fixed held-out tasks, 100 meta-steps (a larger meta-lr than the paper's, to be quick)
    # must clearly beat the same run after 1 step; measured: about 3.9 -> 1.9.
    cfg = dict(device="cpu", checkpoint_every=0, meta_batch=10, meta_lr=0.005)
    quiet = dict(progress=False, log=lambda s: None, plot=False)
    m0 = train_sinusoid(SinusoidConfig(iterations=1, **cfg), str(tmp_path / "a"), **quiet)
    m1 = train_sinusoid(SinusoidConfig(iterations=100, **cfg), str(tmp_path / "b"), **quiet)
    for k in ("5", "10"):
        before, after = m0["mse"][k]["10"], m1["mse"][k]["10"]
        assert after < 0.7 * before, (k, before, after)


def test_default_config_is_the_papers_setup():
    args = cli.build_parser().parse_args(["train"])
    assert args.dataset == "sinusoid"
    assert all(getattr(args, k) is None for k in train_command.SINUSOID_FIELDS)  # everything from SinusoidConfig
    c = SinusoidConfig()
    assert (c.meta_batch, c.shots, c.queries, c.inner_lr, c.inner_steps, c.meta_lr, c.first_order) == \
        (25, 10, 10, 0.01, 1, 1e-3, False)
    assert c.iterations >= 2000


@pytest.mark.parametrize("argv,match", [
    (["--iterations", "0"], "argument --iterations: expected an integer >= 1, got 0"),
    (["--iterations", "many"], "argument --iterations: expected an integer >= 1, got 'many'"),
    (["--meta-batch", "0"], "argument --meta-batch: expected an integer >= 1"),
    (["--inner-lr", "-0.1"], "argument --inner-lr: expected a positive finite number"),
    (["--meta-lr", "nan"], "argument --meta-lr: expected a positive finite number"),
    (["--inner-steps", "1.5"], "argument --inner-steps: expected an integer >= 1"),
    (["--seed", "-1"], "argument --seed: expected an integer >= 0"),
    (["--checkpoint-every", "-5"], "argument --checkpoint-every: expected an integer >= 0"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_train_arguments(capsys, argv, match):
    rc, out, err = _run(capsys, "train", *argv)
    assert rc == 2 and match in err, err


def test_resume_argument_errors(tmp_path, capsys):
    rc, _, err = _run(capsys, "train", "--resume", str(tmp_path / "missing"))
    assert rc == 2 and "--resume" in err and "no checkpoint at" in err, err
    rc, _, err = _run(capsys, "train", "--resume", str(tmp_path), "--out", str(tmp_path / "elsewhere"))
    assert rc == 2 and "--out and --resume both given" in err, err
    # a checkpoint at iteration 50 written by a run with meta-batch 25
    state = {"task": "sinusoid", "config": SinusoidConfig(iterations=100).to_dict(), "iteration": 50}
    ckpt.save_checkpoint(state, str(tmp_path / "checkpoint.pt"))
    rc, _, err = _run(capsys, "train", "--resume", str(tmp_path), "--meta-batch", "5")
    assert rc == 2 and "meta_batch: checkpoint has 25, asked for 5" in err, err
    rc, _, err = _run(capsys, "train", "--resume", str(tmp_path), "--iterations", "10")
    assert rc == 2 and "--iterations 10" in err and "already at iteration 50" in err, err
    rc, _, err = _run(capsys, "train", "--out", str(tmp_path), "--iterations", "3", "--no-progress")
    assert rc == 2 and "already holds a checkpoint" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_gpu(tmp_path, capsys):
    rc, _, err = _run(capsys, "train", "--device", "cuda", "--out", str(tmp_path), "--iterations", "1")
    assert rc == 2 and "device 'cuda'" in err and "torch.cuda.is_available() is False" in err, err


def test_ctrl_c_saves_checkpoint_and_resumes(tmp_path):
    """A real SIGINT to `python -m metafast train`: checkpoint, resume hint, exit 130; the resumed run
    equals an uninterrupted run of the same length."""
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "metafast", "train", "--iterations", "1000000", "--checkpoint-every", "10",
           "--device", "cpu", "--out", str(out_dir), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out_dir / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no periodic checkpoint within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert f"resume with: metafast train --resume {out_dir}" in err, err
    stopped = ckpt.load_checkpoint(str(out_dir))["iteration"]
    assert 10 <= stopped < 1_000_000
    quiet = dict(progress=False, log=lambda s: None, plot=False)
    cfg = dict(iterations=stopped + 3, device="cpu", checkpoint_every=10)
    resumed = train_sinusoid(SinusoidConfig(**cfg), str(out_dir), resume=True, **quiet)
    straight = train_sinusoid(SinusoidConfig(**cfg), str(tmp_path / "straight"), **quiet)
    a, b = ckpt.load_checkpoint(str(out_dir)), ckpt.load_checkpoint(str(tmp_path / "straight"))
    for k in a["maml"]:
        assert torch.equal(a["maml"][k], b["maml"][k]), k
    assert resumed["mse"] == straight["mse"]


@pytest.mark.parametrize("choice,called", [(None, True), ("keep", True), ("default", False)])
def test_train_keeps_freed_memory_unless_told_not_to(capsys, monkeypatch, choice, called):
    from metafast.runtime import allocator

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setitem(train_command.JOBS, "sinusoid", lambda args: 0)
    rc, _, _ = _run(capsys, "train", *([] if choice is None else ["--allocator", choice]))
    assert rc == 0 and calls == ([1] if called else [])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_large_blocks():
    # a fresh process mallocs, touches and frees a 24 MB block four times: with glibc's defaults the
    # second one is fresh pages again (the first was unmapped; the heap grows), kept memory faults
    # in none after the first
    script = textwrap.dedent("""
        import ctypes, resource, sys
        from metafast.runtime.allocator import keep_freed_memory
        if sys.argv[1] == "keep":
            assert keep_freed_memory()
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        faults = []
        for _ in range(4):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            p = libc.malloc(24 << 20)
            libc.memset(p, 1, 24 << 20)
            libc.free(p)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        print(sum(faults[1:]))
    """)
    # glibc's defaults need an environment without allocator tunables (the README advises GLIBC_TUNABLES)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    later = {mode: int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                      check=True, env=env).stdout.split()[-1]) for mode in ("keep", "default")}
    assert later["keep"] < 500 and later["default"] > 3000, later


# ----------------------------------------------------------------------------- other commands
@pytest.mark.parametrize("command", [["train"], ["eval", "run_dir"], ["distill"], ["multitask"], ["bench"], ["info"]])
def test_unknown_options_are_rejected(capsys, command):
    rc, out, err = _run(capsys, *command, "--no-such-option")
    assert rc == 2 and "unrecognized arguments: --no-such-option" in err


def test_no_command_prints_help(capsys):
    rc, _, err = _run(capsys)
    assert rc == 2 and "train" in err and "bench" in err and "info" in err


def test_info_prints_versions_and_backends(capsys, monkeypatch):
    fake = types.ModuleType("metafast._backend")
    fake.describe = lambda: {"versions": {"torch": "9.9"}, "ops": {"inner_update": {"active": "torch",
                             "unavailable": {"cuda": "no GPU"}}}, "notes": []}
    monkeypatch.setitem(sys.modules, "metafast._backend", fake)
    rc, out, _ = _run(capsys, "info")
    assert rc == 0
    assert f"torch: {torch.__version__}" in out and f"metafast: {metafast.__version__}" in out
    lines = out.splitlines()
    i = lines.index("backends:")
    assert lines[i + 1:i + 9] == ["  versions:", "    torch: 9.9", "  ops:", "    inner_update:",
                                  "      active: torch", "      unavailable:", "        cuda: no GPU", "  notes: none"]


def test_info_without_backend_module(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "metafast._backend", None)  # import now fails: module absent
    rc, out, _ = _run(capsys, "info")
    assert rc == 0 and "metafast._backend is not part of this installation" in out


def test_bench_without_bench_dir(capsys, monkeypatch):
    monkeypatch.setattr(bench_command, "find_bench_dir", lambda: None)
    rc, _, err = _run(capsys, "bench")
    assert rc == 2 and "bench/ directory of a metafast source checkout" in err, err


def test_bench_runs_scripts_as_processes_and_reports_failures(tmp_path, capfd, monkeypatch):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "common.py").write_text("")
    # a microbenchmark: a top-level run() and the command line --device D --out DIR [--quick]
    (bench / "bench_alpha.py").write_text(textwrap.dedent("""
        import os, sys
        def run(device, quick=False):
            return []
        if __name__ == "__main__":
            print("alpha argv", sys.argv[1:], "cwd", os.path.basename(os.getcwd()))
            os.makedirs(sys.argv[sys.argv.index("--out") + 1], exist_ok=True)
            open(os.path.join(sys.argv[sys.argv.index("--out") + 1], "alpha_cpu.json"), "w").write("[]")
    """))
    (bench / "bench_beta.py").write_text("import sys\ndef run(device, quick=False):\n    pass\n"
                                         "sys.exit('beta exploded')\n")
    (bench / "bench_gamma.py").write_text("raise SystemExit('gamma must not run')\n")  # no run(): skipped
    monkeypatch.setattr(bench_command, "find_bench_dir", lambda: bench)
    rows = tmp_path / "rows"
    rc = cli.main(["bench", "--device", "cpu", "--quick", "--out", str(rows)])
    out, err = capfd.readouterr()
    assert rc == 1
    assert "== bench_alpha on cpu (quick)" in out
    argv = re.search(r"alpha argv (\[.*\]) cwd (\S+)", out)
    assert argv and argv.group(2) == tmp_path.name, out
    argv = ast.literal_eval(argv.group(1))  # --out is a fresh directory of this script's own, never --out DIR
    assert argv[:3] == ["--device", "cpu", "--out"] and argv[4:] == ["--quick"] and argv[3] != str(rows), argv
    assert (rows / "alpha_cpu.json").read_text() == "[]"  # --out keeps a copy of the rows
    assert "bench_gamma: skipped" in out and "gamma must not run" not in err
    assert "beta exploded" in err and "bench_beta failed (exit status 1)" in err
    assert "1 of 2 benchmarks failed (bench_beta)" in err
    rc = cli.main(["bench", "--device", "cpu", "--only", "alpha"])
    out, _ = capfd.readouterr()
    assert rc == 0 and "bench_alpha on cpu\n" in out and "bench_beta" not in out and "'--quick'" not in out


_TARGETED_BENCH = """
import json, os, sys
def run(device, quick=False):
    return []
if __name__ == "__main__":
    out = sys.argv[sys.argv.index("--out") + 1]
    assert not os.listdir(out), "the output directory of a run starts empty"
    base = {"bench": "%(name)s", "device": "cpu", "commit": "abc1234", "dirty": False, "date": "2026-12-07"}
    rows = [dict(base, impl="metafast", B=8, C=100, ms=1.0, speedup_vs_eager=%(speedup)r,
                 targets={"cpu: >= 2x eager": %(speedup)r >= 2}, target_values={"cpu: >= 2x eager": %(speedup)r},
                 target_met=%(speedup)r >= 2),
            dict(base, impl="eager", B=8, C=100, ms=%(speedup)r)]
    with open(os.path.join(out, "%(name)s_cpu.json"), "w") as f:
        json.dump(rows, f)
    sys.exit(%(rc)d)
"""


def test_bench_prints_targets_and_fails_on_a_missed_one(tmp_path, capfd, monkeypatch):
    """Each script's rows of this run are read back: one line per target with the measured value and
    PASS/FAIL; a missed target makes the command exit 1 even when the script itself exited 0."""
    bench = tmp_path / "bench"
    bench.mkdir()
    for name, speedup, rc in (("fast", 2.5, 0), ("slow", 1.25, 0), ("broken", 3.0, 1)):
        (bench / f"bench_{name}.py").write_text(_TARGETED_BENCH % dict(name=name, speedup=speedup, rc=rc))
    monkeypatch.setattr(bench_command, "find_bench_dir", lambda: bench)
    out_dir = tmp_path / "rows"
    out_dir.mkdir()
    (out_dir / "slow_cpu.json").write_text(json.dumps([{"targets": {"stale": False}}]))  # an earlier run's rows
    rc = cli.main(["bench", "--device", "cpu", "--only", "fast", "--out", str(out_dir)])
    out, err = capfd.readouterr()
    assert rc == 0, err
    lines = out.splitlines()
    head = lines.index("-- bench_fast: targets")
    assert lines[head + 1].split() == ["case", "target", "measured", "result"]
    assert lines[head + 2].split() == ["metafast", "B=8", "C=100", "cpu:", ">=", "2x", "eager", "2.5", "PASS"]
    assert lines[head + 3] == "-- bench_fast: 1 of 1 targets met" and "stale" not in out
    rc = cli.main(["bench", "--device", "cpu", "--only", "slow", "--out", str(out_dir)])
    out, err = capfd.readouterr()
    assert rc == 1
    assert re.search(r"metafast B=8 C=100\s+cpu: >= 2x eager\s+1.25\s+FAIL", out), out
    assert "-- bench_slow: 0 of 1 targets met" in out and "stale" not in out  # only this run's rows
    assert "1 of 1 benchmarks failed (bench_slow); 1 target(s) missed" in err
    assert json.loads((out_dir / "slow_cpu.json").read_text())[0]["target_values"] == {"cpu: >= 2x eager": 1.25}
    rc = cli.main(["bench", "--device", "cpu"])  # all three: a failing script fails even with its targets met
    out, err = capfd.readouterr()
    assert rc == 1 and "bench_broken failed (exit status 1)" in err
    assert "2 of 3 benchmarks failed (bench_broken, bench_slow); 1 target(s) missed" in err
    assert re.search(r"cpu: >= 2x eager\s+3\s+PASS", out), out


def test_bench_target_lines_flag_a_verdict_beyond_the_listed_targets():
    rows = [{"method": "metafast", "workload": "sinusoid", "targets": {"cpu: >= 5x torch.func": True},
             "target_values": {"cpu: >= 5x torch.func": 6.0}, "target_met": False},
            {"method": "torch.func", "workload": "sinusoid", "ms": 3.0}]
    assert bench_command.target_lines(rows) == [
        ("sinusoid metafast", "cpu: >= 5x torch.func", "6", True),
        ("sinusoid metafast", "target_met (the row's overall verdict)", "-", False)]


def test_cli_does_not_import_bench():
    # the library never imports bench/: `metafast bench` runs the scripts as processes
    res = subprocess.run([sys.executable, "-c", "import sys, metafast.cli; "
                          "print(sorted(m for m in sys.modules if m == 'bench' or m.startswith('bench.')))"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr[-2000:]


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "metafast", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "train" in res.stdout and "bench" in res.stdout


def test_bench_maml_step_times_one_method_in_a_child_process():
    # the isolated rounds' child: builds the workload as the parent does and prints {"ms": ...}
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_maml_step.py")
    res = subprocess.run([sys.executable, script, "--time-one", "metafast", "--workload", "sinusoid", "--quick",
                          "--warmup", "1", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["ms"] > 0
    res = subprocess.run([sys.executable, script, "--time-one", "nonesuch", "--workload", "sinusoid", "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "method: expected metafast or one of" in res.stderr
