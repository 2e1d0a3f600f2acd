"""Every figure in the README's benchmark tables is a field of a row in bench/results.

The tables (those of the Benchmarks section, the demo's MSE and the distributed scaling) are rendered
from the results files (bench/readme_tables.py);
these tests fail when a table was edited by hand, when the results changed without the README, or
when a GPU table quotes rows not measured on the code at HEAD.
"""
import math
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import readme_tables  # noqa: E402

NUMBER = re.compile(r"^(\d+(?:\.\d+)?(?:e[-+]?\d+)?)x?(?: |$)")


def _section() -> str:
    with open(readme_tables.README) as f:
        text = f.read()
    start = text.index("## Benchmarks\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _blocks():
    """{name: the lines between its markers} of the whole README (the demo's and the distributed
    table sit beside the text they belong to, the others in the Benchmarks section)."""
    with open(readme_tables.README) as f:
        text = f.read()
    out, name, lines = {}, None, []
    for line in text.splitlines():
        m = readme_tables.BEGIN.fullmatch(line.strip())
        if m:
            name, lines = m.group(1), []
        elif line.strip() == readme_tables.END:
            out[name], name = lines, None
        elif name is not None:
            lines.append(line)
    return out


def _values(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, str) and re.fullmatch(r"\d+", obj):  # an all-digit commit hash
        yield obj
    elif isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _values(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _values(v)


def _matches(token: str, values) -> bool:
    """Whether a value printed the way ``token`` is printed gives ``token``."""
    if token in values:
        return True
    values = [v for v in values if isinstance(v, float)]
    if "e" in token:
        digits = len(token.split("e")[0].split(".")[1]) if "." in token else 0
        return any(f"{v:.{digits}e}" == token for v in values)
    digits = len(token.split(".")[1]) if "." in token else 0
    return any(math.isfinite(v) and f"{v:.{digits}f}" == token for v in values)


def test_benchmark_section_has_no_hand_written_table():
    inside = set()
    for lines in _blocks().values():
        inside.update(line for line in lines if line.startswith("|"))
    stray = [line for line in _section().splitlines() if line.startswith("|") and line not in inside]
    assert not stray, f"tables in README's Benchmarks section outside a bench-table block: {stray[:3]}"
    assert set(_blocks()) == set(readme_tables.TABLES), sorted(_blocks())


@pytest.mark.parametrize("name", sorted(readme_tables.TABLES))
def test_table_is_rendered_from_its_results(name):
    assert _blocks()[name] == readme_tables.render(name), \
        f"README table {name} differs from bench/results: run python bench/readme_tables.py"


@pytest.mark.parametrize("name", sorted(readme_tables.TABLES))
def test_every_table_number_is_in_a_results_file(name):
    files = [f.strip() for f in readme_tables.TABLES[name][0].split(",") if f.strip()]
    values = []
    for f in files:
        values += list(_values(readme_tables.load(f)))  # a missing file has no rows
    checked = 0
    for line in _blocks()[name]:
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        for cell in line.strip("|").split("|")[1:]:  # the first column is the case's label
            m = NUMBER.match(cell.strip())
            if m:
                checked += 1
                assert _matches(m.group(1), values), f"{name}: {cell.strip()!r} is in no row of {files}"
    if any(line.startswith("|") for line in _blocks()[name]):
        assert checked > 0, f"{name}: no number checked"


def test_gpu_table_only_from_rows_at_head(monkeypatch):
    rows = [{"bench": "maml_step", "device": "NVIDIA H100", "torch": "2.11.0", "commit": "0000000", "dirty": False,
             "date": "2026-12-07", "workload": "sinusoid", "method": "metafast", "ms": 1.0,
             "speedup_vs_torch_func": 30.0, "speedup_vs_loop": 80.0, "grad_rel_err_vs_loop": 1e-7}]
    monkeypatch.setattr(readme_tables, "load", lambda name: rows)
    monkeypatch.setattr(readme_tables, "code_at_head", lambda commit: False)
    assert "compiled and interpreted only" in "\n".join(readme_tables.render("maml_step_cuda"))
    monkeypatch.setattr(readme_tables, "code_at_head", lambda commit: True)
    assert "| **metafast** | 1.00 | 30.00x | 80.00x |" in "\n".join(readme_tables.render("maml_step_cuda"))
    rows[0]["dirty"] = True  # a dirty tree is not HEAD's code either
    assert "compiled and interpreted only" in "\n".join(readme_tables.render("maml_step_cuda"))


def test_a_number_not_in_the_results_is_caught():
    assert _matches("6.35", [6.3512]) and not _matches("6.36", [6.3512])
    assert _matches("1.8e-07", [1.79e-7]) and not _matches("1.9e-07", [1.79e-7])


def _demo_row(shots, steps, mse, diverged=0, **kw):
    row = {"bench": "demo", "device": "cpu (x86_64, 2 threads)", "torch": "2.14.1", "commit": "abc1234",
           "dirty": False, "date": "2026-12-07", "shots": shots, "steps": steps, "mse": mse,
           "ci95": None if mse is None else mse / 10, "diverged": diverged, "eval_tasks": 600, "iterations": 40000,
           "seed": 0, "threads": 2, "end_to_end_s": 31.6, "train_s": 27.2, "ms_per_iteration": 0.6789,
           "meta_step": "fused inner loop", "command": "metafast train", "quick": False,
           "load_avg_1min_before": 0.52, "load_avg_1min_after": 1.96}
    row.update(kw)
    return row


def test_demo_table_renders_mse_diverged_tasks_and_the_run(monkeypatch):
    rows = [_demo_row(5, 1, 0.6491), _demo_row(5, 10, None, diverged=1), _demo_row(10, 1, 0.3554),
            _demo_row(10, 10, 0.1044), _demo_row(5, 1, 9.9, quick=True)]
    monkeypatch.setattr(readme_tables, "load", lambda name: rows)
    lines = readme_tables.render("demo_cpu")
    assert lines[0] == ("One default run (`metafast train`: 40,000 iterations, seed 0, 2 CPU threads, host load "
                        "average 0.5 before and 2.0 after): 32 s end to end, 27 s of training at 0.68 ms per "
                        "meta-step (fused inner loop); held-out MSE on 600 tasks, mean ± 95% CI:")
    assert lines[2:6] == ["|  | 1 step | 10 steps |", "| --- | ---: | ---: |",
                          "| K=5 | 0.649 ± 0.065 | diverged (1/600) |", "| K=10 | 0.355 ± 0.036 | 0.104 ± 0.010 |"]
    assert "9.9" not in "\n".join(lines)  # a quick (smoke) run's rows are not the demo's
    monkeypatch.setattr(readme_tables, "load", lambda name: rows[-1:])
    assert "No row of the demo run yet" in readme_tables.render("demo_cpu")[0]


def test_demo_bench_writes_the_runs_metrics_as_rows(tmp_path, monkeypatch):
    """bench_demo.py runs `metafast train` as a process (a smoke run of 30 iterations here) and its rows
    are that run's metrics.json: every (K, steps) with MSE, CI, source and the run's settings."""
    import subprocess

    monkeypatch.delenv("OUT", raising=False)
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("OUT", None)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_demo.py"), "--iterations", "30",
                          "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    import json

    with open(tmp_path / "demo_cpu.json") as f:
        rows = json.load(f)
    assert [(r["shots"], r["steps"]) for r in rows] == [(5, 1), (5, 5), (5, 10), (10, 1), (10, 5), (10, 10)]
    for r in rows:
        assert r["iterations"] == 30 and r["quick"] is True and r["seed"] == 0 and r["eval_tasks"] == 600
        assert r["commit"] not in ("", "unknown") and isinstance(r["dirty"], bool) and r["device"].startswith("cpu")
        assert math.isfinite(r["mse"]) and r["mse"] > 0 and 0 < r["ci95"] < r["mse"]
        assert r["end_to_end_s"] > r["train_s"] > 0 and r["meta_step"]
    # the rows' MSE is what the command printed (4 decimals)
    assert f"{rows[0]['mse']:.4f} +- {rows[0]['ci95']:.4f}" in res.stdout, res.stdout
