#!/usr/bin/env bash
# ONE command for a lent GPU machine (H100/H200): build the extension, run the GPU tests, run the
# meta-step benchmark and the kernel microbenchmarks, write JSON rows. Every step has its own time
# limit; the benchmarks run before the tests, whose parallel Triton compiles load the machine.
# About 9 minutes in all (build ~1, benchmarks ~3, tests ~5).
#
#   bash bench/device_check.sh            # rows go to bench/results/ and, when set, to $OUT/
#   STEPS="tests maml" bash bench/device_check.sh     # a subset (build always runs)
#
# The GPU machine has no network: pure-Python test dependencies missing there are installed from
# .device_wheels/ (carry it; fill it here with
#   pip download --no-deps -d .device_wheels pytest pluggy iniconfig packaging pytest-timeout tqdm).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export METAFAST_CUDA_ARCHS=${METAFAST_CUDA_ARCHS:-90}
unset TRITON_INTERPRET METAFAST_BACKEND
OUT=${OUT:-}
STEPS=${STEPS:-"maml micro tests"}
LOG=${OUT:-/tmp}/device_check.log
exec > >(tee "$LOG") 2>&1
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
collect() { [ -n "$OUT" ] && cp bench/results/*_cuda*.json "$OUT"/ 2>/dev/null; true; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

step "test dependencies"
for mod in pytest pytest_timeout; do
  $PY -c "import $mod" 2>/dev/null || { [ -d .device_wheels ] && $PY -m pip install -q --no-index --find-links .device_wheels "${mod/_/-}"; }
done
XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"

step "build metafast._C (sm_${METAFAST_CUDA_ARCHS}): pip install -e (maps kernels/ to metafast.kernels)"
MAX_JOBS=${MAX_JOBS:-16} timeout 240 $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -15
$PY -c "import metafast._C, torch; print('extension ops:', sorted(n for n in dir(torch.ops.metafast) if not n.startswith('_')))" || status=1
$PY -m metafast info || status=1

if want maml; then
  step "meta-step: metafast vs torch.func vs per-task loop (eager and CUDA graph)"
  timeout 120 $PY bench/bench_maml_step.py --device cuda --cuda-graph --out bench/results || status=1
  collect
fi

if want micro; then
  step "microbenchmarks"
  for b in fused_inner_loop inner_update inner_update_multi task_cross_entropy kd_loss multitask_heads; do
    [ -f "bench/bench_$b.py" ] || continue
    timeout 60 $PY "bench/bench_$b.py" --device cuda --out bench/results || status=1
    collect
  done
fi

if want tests; then
  step "pytest -m gpu"
  # the whole report goes to its own file; the log keeps the summary
  timeout ${TEST_TIMEOUT:-300} $PY -m pytest -m gpu -v -rfE --tb=short --timeout 120 -p no:cacheprovider $XDIST tests \
    > "${OUT:-/tmp}/pytest_gpu.log" 2>&1
  [ $? -eq 0 ] || status=1
  grep -E "^(FAILED|ERROR)|passed|failed" "${OUT:-/tmp}/pytest_gpu.log" | tail -40  # one line per test there
fi

step "done (status $status)"
exit $status
