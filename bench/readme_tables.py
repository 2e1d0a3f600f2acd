"""The README's benchmark tables, rendered from bench/results/*.json (standard library only).

Each table sits between ``<!-- bench-table: NAME -->`` and ``<!-- /bench-table -->`` in README.md;
NAME is one of TABLES. Every figure in a table is a field of a row of the results file the table
names, printed with the precision shown; the caption under it gives device, torch, commit (clean or
dirty) and date of those rows. GPU tables are rendered only from rows measured on the code at HEAD
(the rows' commit differs from HEAD in nothing but bench/results and Markdown, and was clean);
otherwise the table says the GPU code is compiled and interpreted only.

    python bench/readme_tables.py           # rewrite the tables in README.md
    python bench/readme_tables.py --check   # exit 1 if README.md's tables differ from the results
"""
import json
import os
import re
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Tuple

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
RESULTS = os.path.join(BENCH_DIR, "results")
README = os.path.join(ROOT, "README.md")
BEGIN = re.compile(r"<!-- bench-table: ([\w-]+) -->")
END = "<!-- /bench-table -->"


def load(name: str) -> List[dict]:
    path = os.path.join(RESULTS, f"{name}.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def code_at_head(commit: str) -> bool:
    """Whether ``commit``'s code is HEAD's: no difference but bench/results and Markdown files."""
    try:
        out = subprocess.run(["git", "diff", "--quiet", commit, "HEAD", "--", ".", ":(exclude)bench/results",
                              ":(exclude)*.md"], cwd=ROOT, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


def x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def err(v: Optional[float]) -> str:
    return "-" if v is None else ("0" if v == 0 else f"{v:.1e}")


def caption(rows: List[dict], name: str) -> str:
    """Device, torch, commit with its dirty state, and date of ``rows`` (of the files ``name``)."""
    def one(key):
        vals = sorted({str(r.get(key)) for r in rows})
        return ", ".join(vals)

    dirty = {r.get("dirty") for r in rows}
    state = "clean" if dirty == {False} else ("dirty" if True in dirty else "dirty flag not recorded")
    files = ", ".join(f"`bench/results/{n.strip()}.json`" for n in name.split(","))
    return (f"Rows: {files}; device {one('device')}, torch {one('torch')}, "
            f"commit {one('commit')} ({state}), {one('date')}.")


def table(header: List[str], body: List[List[str]]) -> List[str]:
    align = ["---" if i == 0 or not any(c[:1].isdigit() for c in (r[i] for r in body)) else "---:"
             for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"] + \
           ["| " + " | ".join(r) + " |" for r in body]


WORKLOAD_LABEL = {
    "sinusoid": "sinusoid MLP 1-40-40-1, 25 tasks, K=10, 1 step",
    "omniglot": "Omniglot Conv4 5-way 1-shot, 32 tasks, 1 step",
    "sinusoid_1000x5": "sinusoid MLP 1-40-40-1, 1000 tasks, 5 steps",
    "anil_head": "ANIL head 64->5, 32 tasks 5-way 5-shot, 10 steps",
    "resnet12": "ResNet-12 narrow 32x32 5-way 1-shot, 3 queries, 4 tasks, 1 step",
}


def _meta_step(name: str) -> Tuple[List[str], List[dict]]:
    rows = [r for r in load(name) if not r.get("quick")]
    body = []
    for r in rows:
        method = f"**{r['method']}**" if r["method"].startswith("metafast") else r["method"]
        note = " (wrong: vmap through BatchNorm)" if r["method"] == "torch.func" and "note" in r else ""
        body.append([WORKLOAD_LABEL.get(r["workload"], r["workload"]), method, ms(r["ms"]),
                     x(r.get("speedup_vs_torch_func")), x(r.get("speedup_vs_loop")),
                     x(r.get("speedup_vs_learn2learn")), err(r.get("grad_rel_err_vs_loop")) + note])
    return table(["workload", "method", "ms", "vs torch.func", "vs per-task loop", "vs learn2learn",
                  "meta-grad rel. err"], body), rows


def _fused(name: str) -> Tuple[List[str], List[dict]]:
    rows = [r for r in load(name) if not r.get("quick")]
    body = []
    for w in dict.fromkeys(r["workload"] for r in rows):
        by = {r["method"]: r for r in rows if r["workload"] == w}
        f, u, t = by.get("metafast"), by.get("metafast (unfused)"), by.get("torch.func")
        body.append([WORKLOAD_LABEL.get(w, w), ms(t and t["ms"]), ms(f and f["ms"]), ms(u and u["ms"]),
                     x(f and f.get("speedup_vs_torch_func")), x(f and f.get("speedup_vs_loop"))])
    return table(["workload", "torch.func ms", "metafast fused ms", "metafast unfused ms", "fused vs torch.func",
                  "fused vs loop"], body), rows


def _shape(s) -> str:
    return "[" + ", ".join(str(v) for v in s) + "]"


# Kernel microbenchmarks: (results file, row filter, case label, ratio key, what the ratio is against).
MICRO: List[Tuple[str, Callable[[dict], bool], Callable[[dict], str], str, str]] = [
    ("task_cross_entropy_cpu", lambda r: r["impl"] == "metafast[torch]" and r["mode"] == "fwd+bwd",
     lambda r: f"task_cross_entropy fwd+bwd, T={r['T']} N={r['N']} C={r['C']}", "speedup_vs_eager",
     "a per-task log_softmax + nll loop"),
    ("kd_loss_cpu", lambda r: r["impl"] == "metafast[torch]",
     lambda r: f"kd_loss fwd+bwd, B={r['B']} C={r['C']}", "speedup_vs_eager", "eager PyTorch"),
    ("multitask_heads_cpu", lambda r: r["impl"] == "metafast[torch]" and r["mode"] == "fwd+bwd",
     lambda r: f"multitask heads fwd+bwd ({r['features']} features), H={r['H']} N={r['N']} I={r['I']} O={r['O']}",
     "speedup_vs_loop", "a loop over heads"),
    ("batch_norm_cpu", lambda r: r["impl"] == "metafast[cxx]",
     lambda r: f"batch_norm forward, {_shape(r['shape'])}", "speedup_vs_aten", "ATen's native_batch_norm"),
    ("batch_norm_rop_cpu", lambda r: r["impl"] == "metafast[cxx]",
     lambda r: f"batch_norm_rop {r['op']}, {_shape(r['shape'])}", "speedup_vs_reference", "the PyTorch reference"),
    ("to_nchw_cpu", lambda r: r["impl"] == "metafast[cxx]",
     lambda r: f"to_nchw, {_shape(r['shape'])} channels_last", "speedup_vs_torch", "x.contiguous()"),
]


def _micro(_: str) -> Tuple[List[str], List[dict]]:
    body, used = [], []
    for name, keep, label, key, against in MICRO:
        rows = load(name)
        for r in rows:
            if keep(r):
                body.append([label(r), str(r.get("threads") or 1), ms(r["ms"]), f"{x(r[key])} vs {against}", r["commit"]])
                used.append(r)
    return table(["op, shape (CPU)", "threads", "metafast ms", "speed-up", "commit"], body), used


def _sampler(name: str) -> Tuple[List[str], List[dict]]:
    rows = load(name)
    body = [[r["what"], str(r["tasks"]), ms(r["ms"]), f"{r['vs_meta_step']:.4f}"] for r in rows]
    return table(["episode sampler (CPU)", "tasks", "ms", "of a Conv4 meta-step"], body), rows


def _gpu(name: str) -> Tuple[List[str], List[dict]]:
    rows = [r for r in load(name) if not r.get("quick")]
    fresh = [r for r in rows if r.get("dirty") is False and code_at_head(str(r.get("commit")))]
    if not fresh:
        return ["GPU: compiled and interpreted only. No GPU row was measured on the code at HEAD "
                "(`bash bench/device_check.sh` on a GPU machine writes them)."], []
    lines, _ = _meta_step(name)
    return lines, fresh


def _demo(name: str) -> Tuple[List[str], List[dict]]:
    """`make demo`'s run (bench/bench_demo.py): a sentence on the run, then held-out MSE ± 95% CI."""
    rows = [r for r in load(name) if not r.get("quick")]
    if not rows:
        return ["No row of the demo run yet (`python bench/bench_demo.py` writes them)."], []
    r0 = rows[0]
    shots = list(dict.fromkeys(r["shots"] for r in rows))
    steps = list(dict.fromkeys(r["steps"] for r in rows))
    at = {(r["shots"], r["steps"]): r for r in rows}

    def cell(r: Optional[dict]) -> str:
        if r is None:
            return "-"
        if r["mse"] is None:
            return f"diverged ({r['diverged']}/{r['eval_tasks']})"
        return f"{r['mse']:.3f} ± {r['ci95']:.3f}"

    intro = (f"One default run (`{r0['command']}`: {r0['iterations']:,} iterations, seed {r0['seed']}, "
             f"{r0['threads']} CPU threads, host load average {r0['load_avg_1min_before']:.1f} before and "
             f"{r0['load_avg_1min_after']:.1f} after): {r0['end_to_end_s']:.0f} s end to end, {r0['train_s']:.0f} s "
             f"of training at {r0['ms_per_iteration']:.2f} ms per meta-step ({r0['meta_step']}); held-out MSE on "
             f"{r0['eval_tasks']} tasks, mean ± 95% CI:")
    body = [[f"K={k}"] + [cell(at.get((k, s))) for s in steps] for k in shots]
    return [intro, ""] + table([""] + [f"{s} step" + ("s" if s != 1 else "") for s in steps], body), rows


def _distributed(name: str) -> Tuple[List[str], List[dict]]:
    """Data-parallel scaling of the sinusoid meta-step (bench/bench_distributed.py)."""
    rows = load(name)
    body = [[f"{r['processes']} x {r['threads_per_process']}", str(r["meta_batch_per_process"]), ms(r["ms_per_step"]),
             f"{r['tasks_per_s']:.0f}", x(r["speedup_vs_1x1"]), ms(r.get("all_reduce_ms"))] for r in rows]
    return table(["processes x threads (CPU, gloo)", "tasks per process", "ms per step", "tasks/s",
                  "vs 1 x 1", "all_reduce ms"], body), rows


def _memory(name: str) -> Tuple[List[str], List[dict]]:
    """Peak memory one second-order meta-step adds, per K and method (bench/bench_memory.py)."""
    rows = load(name)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    at = {(r["method"], r["steps"]): r for r in rows}

    def cell(r: Optional[dict]) -> str:
        if r is None or r.get("peak_mb") is None:
            return r["note"].split(":")[0] if r and r.get("note") else "-"
        return f"{r['peak_mb']:.0f} MB, {r['s_per_step']:.1f} s"

    body = [[str(k)] + [cell(at.get((m, k))) for m in methods] for k in dict.fromkeys(r["steps"] for r in rows)]
    return table(["inner steps K"] + methods, body), rows


TABLES: Dict[str, Tuple[str, Callable[[str], Tuple[List[str], List[dict]]]]] = {
    "demo_cpu": ("demo_cpu", _demo),
    "distributed_cpu": ("distributed_cpu", _distributed),
    "maml_step_cpu": ("maml_step_cpu", _meta_step),
    "fused_inner_loop_cpu": ("fused_inner_loop_cpu", _fused),
    "micro_cpu": (", ".join(m[0] for m in MICRO), _micro),
    "sampler_cpu": ("sampler_cpu", _sampler),
    "maml_step_cuda": ("maml_step_cuda", _gpu),
    "memory_cpu": ("memory_cpu", _memory),
    "memory_resnet12_narrow_cpu": ("memory_resnet12_narrow_cpu", _memory),
    "memory_resnet12_narrow_tasks16_cpu": ("memory_resnet12_narrow_tasks16_cpu", _memory),
}


def render(name: str) -> List[str]:
    """The lines of table ``name`` (its table and caption)."""
    if name not in TABLES:
        raise KeyError(f"README bench-table: expected one of {sorted(TABLES)}, got {name!r}")
    file, fn = TABLES[name]
    lines, rows = fn(file)
    if rows and file:
        lines = lines + ["", caption(rows, file)]
    return lines


def rewrite(text: str) -> str:
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = BEGIN.fullmatch(lines[i].strip())
        out.append(lines[i])
        i += 1
        if not m:
            continue
        while i < len(lines) and lines[i].strip() != END:
            i += 1
        if i == len(lines):
            raise ValueError(f"README: <!-- bench-table: {m.group(1)} --> has no {END}")
        out += render(m.group(1)) + [lines[i]]
        i += 1
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def main(argv: List[str]) -> int:
    with open(README) as f:
        text = f.read()
    new = rewrite(text)
    if argv == ["--check"]:
        if new != text:
            print("README.md's benchmark tables differ from bench/results: run python bench/readme_tables.py")
            return 1
        print("README.md's benchmark tables match bench/results")
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    if new != text:
        with open(README, "w") as f:
            f.write(new)
        print("README.md: benchmark tables rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
