"""bench/device_check.sh --rehearse: the GPU machine's one command, run on the CPU with its device
steps stubbed, must go through every step in order and leave a summary.json that says what ran.

A broken script found here costs seconds; found on a GPU machine it costs the whole window.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "device_check.sh")
STEPS = ["manifest", "deps", "build", "info", "shard", "bench:maml_step", "bench:fused_inner_loop",
         "bench:task_cross_entropy", "bench:kd_loss", "bench:multitask_heads", "bench:memory",
         "bench:memory_resnet12", "tests"]


def _rehearse(out, budget=None):
    env = dict(os.environ, OUT=str(out), PY=sys.executable,
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("TRITON_INTERPRET", None)
    if budget is not None:
        env["BUDGET"] = str(budget)
    res = subprocess.run(["bash", SCRIPT, "--rehearse"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=900)
    with open(os.path.join(out, "summary.json")) as f:
        return res, json.load(f)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    res, summary = _rehearse(out)
    return out, res, summary


def test_rehearsal_runs_every_step_in_order_and_passes(rehearsal):
    out, res, summary = rehearsal
    names = [s["name"] for s in summary["steps"]]
    assert [n for n in names if not n.startswith("bench:inner_update")] == STEPS, names
    assert any(n.startswith("bench:inner_update") for n in names), names
    failed = {s["name"]: s["rc"] for s in summary["steps"] if s["rc"] != 0}
    assert not failed, f"steps failed: {failed}\n{res.stdout[-4000:]}"
    assert summary["ok"] is True and res.returncode == 0, res.stdout[-4000:]
    for s in summary["steps"]:
        assert s["wall_s"] >= 0 and s["cap_s"] > 0 and s["timed_out"] is False, s


def test_rehearsal_counts_tests_of_both_pytest_steps(rehearsal):
    _, _, summary = rehearsal
    steps = {s["name"]: s for s in summary["steps"]}
    for name in ("shard", "tests"):
        t = steps[name]["tests"]
        # on a CPU every gpu test is collected and skipped: the closing line was read
        assert t["complete"] == 1 and t.get("skipped", 0) > 0 and t.get("failed", 0) == 0, (name, t)


def test_rehearsal_streams_rows_with_source_and_writes_manifest(rehearsal):
    out, _, summary = rehearsal
    with open(os.path.join(out, "rows.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert rows and {r["file"] for r in rows} == {"task_cross_entropy_cpu"}
    assert summary["rows"]["task_cross_entropy_cpu"]["rows"] == len(rows)
    for r in rows:
        assert r["commit"] not in ("", "unknown") and isinstance(r["dirty"], bool), r
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["source"]["commit"] == rows[0]["commit"]
    assert "torch" in manifest["versions"], manifest["versions"]
    # at most 8 files come back from a device call; nothing below the top level is needed
    back = [p for p in os.listdir(out) if os.path.isfile(os.path.join(out, p))]
    assert len(back) <= 8 and {"summary.json", "device_check.log", "rows.jsonl"} <= set(back), back


def test_deadline_skips_what_does_not_fit_and_still_summarises(tmp_path):
    res, summary = _rehearse(tmp_path, budget=12)
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["tests"]["rc"] == 125 and "skipped: the deadline leaves no time" in res.stdout
    assert summary["ok"] is False and res.returncode != 0
    assert sum(s["wall_s"] for s in summary["steps"]) < 12 + 10 * len(STEPS), summary


# ---- the benchmarks' side: rows stream, failures exit non-zero, rows carry their source

def test_row_sink_streams_each_row_and_counts_what_is_missing(tmp_path, monkeypatch):
    from bench.common import RowSink, finish

    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    sink = RowSink("demo_cpu", str(tmp_path))
    sink.expect(3)
    sink.add({"bench": "demo", "ms": 1.0})
    with open(tmp_path / "demo_cpu.json") as f:
        assert json.load(f) == [{"bench": "demo", "ms": 1.0}]  # on disk before the next row exists
    sink.add({"bench": "demo", "ms": 2.0})
    with open(tmp_path / "out" / "rows.jsonl") as f:
        assert [json.loads(line)["ms"] for line in f] == [1.0, 2.0]
    assert finish(sink) == 1 and "1 of 3 expected rows missing" in sink.failures[-1]
    sink.add({"bench": "demo", "ms": 3.0})
    sink.failures.clear()
    assert finish(sink) == 0


def test_rows_record_commit_and_dirty_flag_without_git(tmp_path, monkeypatch):
    from bench import source

    stamp = tmp_path / "source.json"
    monkeypatch.setattr(source, "STAMP", str(stamp))
    monkeypatch.delenv("METAFAST_COMMIT", raising=False)
    source.source.cache_clear()
    git = source.stamp(str(stamp))  # here, where .git exists
    monkeypatch.setattr(source, "from_git", lambda: None)  # there, where it does not
    source.source.cache_clear()
    try:
        s = source.source()
        assert (s["commit"], s["dirty"], s["via"]) == (git["commit"], git["dirty"], "bench/source.json")
        monkeypatch.setenv("METAFAST_COMMIT", "abc1234")
        monkeypatch.setenv("METAFAST_DIRTY", "1")
        source.source.cache_clear()
        assert source.source() == {"commit": "abc1234", "dirty": True, "via": "env"}
    finally:
        source.source.cache_clear()


def _maml_step_with(meta_grad, tmp_path, monkeypatch, capsys):
    """bench_maml_step's quick sinusoid run with metafast's meta_grad replaced: (rc, stdout, rows)."""
    import bench.bench_maml_step as b

    right = b.Metafast.meta_grad
    monkeypatch.setattr(b.Metafast, "meta_grad", lambda self, *batch: meta_grad(right, self, *batch))
    monkeypatch.delenv("OUT", raising=False)
    rc = b.main(["--device", "cpu", "--workload", "sinusoid", "--quick", "--shared-process", "--threads", "1",
                 "--out", str(tmp_path)])
    with open(tmp_path / "maml_step_cpu_sinusoid_quick.json") as f:
        return rc, capsys.readouterr().out, json.load(f)


def test_maml_step_exits_non_zero_when_metafast_fails(tmp_path, monkeypatch, capsys):
    def broken(right, self, *batch):
        raise RuntimeError("kernel exploded")

    rc, out, rows = _maml_step_with(broken, tmp_path, monkeypatch, capsys)
    assert rc == 1 and "FAILED: sinusoid: metafast failed: RuntimeError: kernel exploded" in out, out
    assert {r["method"] for r in rows} >= {"torch.func", "per-task loop"} and "metafast" not in {r["method"] for r in rows}


def test_maml_step_exits_non_zero_on_a_wrong_meta_gradient(tmp_path, monkeypatch, capsys):
    rc, out, rows = _maml_step_with(lambda right, self, *batch: right(self, *batch) * 1.01, tmp_path, monkeypatch,
                                    capsys)
    assert rc == 1 and "metafast meta-gradient rel err 1.0e-02 > 1.0e-04" in out, out
    row = next(r for r in rows if r["method"] == "metafast")
    # on the CPU the CPU speed target and the meta-gradient's tolerance are checked; a wrong gradient fails
    assert list(row["targets"]) == ["cpu: >= 5x torch.func", "meta-grad rel. err <= 1.0e-04"]
    assert row["targets"]["meta-grad rel. err <= 1.0e-04"] is False and row["target_met"] is False
    assert abs(row["target_values"]["meta-grad rel. err <= 1.0e-04"] - 1e-2) < 1e-3


def test_ptxas_report_flags_spills_and_the_register_ceiling(tmp_path):
    from bench import ptxas_report

    log = tmp_path / "build.log"
    log.write_text(
        "ptxas info    : Compiling entry function '_ZN8metafast7kd_loss10fwd_kernelIffLi512ELi8EEEvv' for 'sm_90'\n"
        "ptxas info    : Function properties for _ZN8metafast7kd_loss10fwd_kernelIffLi512ELi8EEEvv\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 128 registers, used 1 barriers, 256 bytes smem, 400 bytes cmem[0]\n"
        "ptxas info    : Compiling entry function '_ZN8metafast16fused_inner_loop14forward_kernelIfEEvv' for 'sm_90'\n"
        "ptxas info    : Function properties for _ZN8metafast16fused_inner_loop14forward_kernelIfEEvv\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 80 registers, used 1 barriers, 64 bytes smem\n")
    lines = ptxas_report.report(str(log)).splitlines()
    kd = next(line for line in lines if line.startswith("kd_loss::fwd_kernel"))
    fused = next(line for line in lines if line.startswith("fused_inner_loop::forward_kernel"))
    # 512 threads per block leave 128 registers each: at the ceiling, and spilling
    assert kd.split()[-9:] == ["128", "512", "128", "8", "4/4", "256", "SPILLS", "AT", "CEILING"], kd
    assert fused.split()[-6:] == ["80", "256", "255", "0", "0/0", "64"], fused
    assert lines[-1] == "# 2 kernels; 1 spill"
