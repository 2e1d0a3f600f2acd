"""Resource use of the CUDA kernels, from a build of metafast._C with ``-Xptxas -v``.

    CUDA_HOME=/usr/local/cuda METAFAST_CUDA_ARCHS=90 NVCC_APPEND_FLAGS="-Xptxas -v" \
        python setup.py build_ext --inplace > build.log 2>&1
    python bench/ptxas_report.py build.log [metafast/_C*.so] > bench/results/ptxas_sm90.txt

One line per kernel instantiation: registers, stack frame, spill stores/loads, static shared
memory, and the threads per block it is declared for (``__launch_bounds__``: the .nv.info
MAX_THREADS attribute of the built library, read with cuobjdump when the .so is given and cuobjdump
exists, else the value csrc/ declares, LAUNCH_BOUNDS below) with the register ceiling that implies
(65536 registers per SM for the threads of one block: min(255, 65536 / threads), rounded down to a
multiple of 8). A kernel at its ceiling, or spilling, is flagged.
"""
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def demangle(names: List[str]) -> Dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short(name: str) -> str:
    """'void metafast::op::(anonymous namespace)::kernel<float, 4>(args...)' -> 'op::kernel<float, 4>'."""
    name = re.sub(r"^void ", "", name)
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the argument list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
            cut = i
            break
    name = name[:cut].replace("(anonymous namespace)::", "").replace("metafast::", "")
    return re.sub(r"\s+", " ", name)


def max_threads(so: Optional[str]) -> Dict[str, int]:
    """{mangled kernel: MAX_THREADS} from the library's .nv.info sections (cuobjdump -elf)."""
    tool = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    if not so or not shutil.which(tool):
        return {}
    text = subprocess.run([tool, "-elf", so], capture_output=True, text=True).stdout
    out, kernel = {}, None
    for line in text.splitlines():
        m = re.search(r"\.nv\.info\.(\w+)", line)
        if m:
            kernel = m.group(1)
        m = re.search(r"EIATTR_MAX_THREADS.*", line)
        if m and kernel:
            out[kernel] = None  # the value follows on the next lines
        elif kernel in out and out[kernel] is None:
            vals = re.findall(r"0x([0-9a-f]+)", line)
            if vals:
                out[kernel] = int(vals[0], 16)
    return {k: v for k, v in out.items() if v}


def _block_threads(name: str) -> int:
    """csrc/online_softmax.cuh's block_threads(TPR) for a kernel<scalar, acc, TPR, VPT> instantiation."""
    m = re.search(r"<[^<>]*?,[^<>]*?, (\d+), \d+>", name)
    tpr = int(m.group(1)) if m else 0
    return tpr if tpr > 32 else 256


# Threads per block each kernel family is declared or launched with (csrc/): kThreads = 256 in
# fused_inner_loop.cu and inner_update_common.cuh, block_threads(TPR) in kd_loss.cu and
# task_cross_entropy.cu, 32 * kWarpsPerBlock = 256 for multitask_heads.cu's ce_kernel (no bound).
LAUNCH_BOUNDS = [("fused_inner_loop::", lambda n: 256), ("inner_update::", lambda n: 256),
                 ("inner_update_multi::", lambda n: 256), ("kd_loss::", _block_threads),
                 ("task_cross_entropy::", _block_threads), ("multitask_heads::", lambda n: 256)]


def declared_threads(short_name: str) -> Optional[int]:
    for prefix, fn in LAUNCH_BOUNDS:
        if short_name.startswith(prefix):
            return fn(short_name)
    return None


def parse(log: str) -> List[dict]:
    rows, cur = [], None
    with open(log, errors="replace") as f:
        for line in f:
            m = ENTRY.search(line)
            if m:
                cur = {"mangled": m.group(1), "arch": m.group(2)}
                rows.append(cur)
                continue
            if cur is None:
                continue
            m = PROPS.search(line)
            if m:
                cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
            m = USED.search(line)
            if m and "regs" not in cur:
                cur["regs"] = int(m.group(1))
                smem = re.search(r"(\d+) bytes smem", line)
                cur["smem"] = int(smem.group(1)) if smem else 0
    return rows


def report(log: str, so: Optional[str] = None) -> str:
    rows = parse(log)
    names = demangle([r["mangled"] for r in rows])
    bounds = max_threads(so)
    lines = [f"# ptxas -v resource use of metafast._C's CUDA kernels ({rows[0]['arch'] if rows else '?'}), "
             f"from {log.split('/')[-1]}" + (f" and {so.split('/')[-1]}" if so else ""),
             "# regs: registers per thread; ceiling: min(255, 65536 / launch bound) rounded down to 8;",
             "# stack/spills in bytes per thread; smem: static shared memory per block (dynamic smem not included)",
             f"{'kernel':<72} {'regs':>4} {'bound':>5} {'ceil':>4} {'stack':>5} {'spill st/ld':>11} {'smem':>6}  flag"]
    for r in rows:
        name = short(names[r["mangled"]])
        b = bounds.get(r["mangled"]) or declared_threads(name)
        ceil = min(255, (65536 // b) // 8 * 8) if b else None
        flag = []
        if r.get("spill_st") or r.get("spill_ld"):
            flag.append("SPILLS")
        if ceil and r.get("regs", 0) >= ceil:
            flag.append("AT CEILING")
        lines.append(f"{name[:72]:<72} {r.get('regs', '?'):>4} {b or '-':>5} {ceil or '-':>4} "
                     f"{r.get('stack', '?'):>5} {str(r.get('spill_st', '?')) + '/' + str(r.get('spill_ld', '?')):>11} "
                     f"{r.get('smem', 0):>6}  {' '.join(flag)}")
    n_spill = sum(1 for r in rows if r.get("spill_st") or r.get("spill_ld"))
    lines.append(f"# {len(rows)} kernels; {n_spill} spill")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    sys.stdout.write(report(*sys.argv[1:]))
