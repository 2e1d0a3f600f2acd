#!/usr/bin/env bash
# ONE command for a lent GPU machine (H100/H200): build the extension, run the GPU tests, run the
# microbenchmarks and the meta-step benchmark, write JSON rows. Budget: under 8 minutes.
#
#   bash bench/device_check.sh            # rows go to bench/results/ and, when set, to $OUT/
#
# The GPU machine has no network: pure-Python test dependencies missing there are installed from
# .device_wheels/ (carry it; fill it here with
#   pip download --no-deps -d .device_wheels pytest pluggy iniconfig packaging pytest-timeout tqdm).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export METAFAST_CUDA_ARCHS=${METAFAST_CUDA_ARCHS:-90}
OUT=${OUT:-}
LOG=${OUT:-/tmp}/device_check.log
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

step "test dependencies"
for mod in pytest pytest_timeout tqdm; do
  $PY -c "import $mod" 2>/dev/null || { [ -d .device_wheels ] && $PY -m pip install -q --no-index --find-links .device_wheels "${mod/_/-}"; }
done

step "build metafast._C (sm_${METAFAST_CUDA_ARCHS})"
MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -5
$PY -c "import metafast._C, torch; print('extension ops:', sorted(n for n in dir(torch.ops.metafast) if n.endswith('cuda')))" || status=1
$PY -m metafast info || status=1

step "pytest -m gpu"
timeout 150 $PY -m pytest -m gpu -q --timeout 60 -p no:cacheprovider tests 2>&1 | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "microbenchmarks"
for b in inner_update task_cross_entropy kd_loss multitask_heads; do
  [ -f "bench/bench_$b.py" ] || continue
  timeout 60 $PY "bench/bench_$b.py" --device cuda --out bench/results || status=1
done

step "meta-step: metafast vs torch.func vs per-task loop (eager and CUDA graph)"
timeout 120 $PY bench/bench_maml_step.py --device cuda --cuda-graph --out bench/results || status=1

if [ -n "$OUT" ]; then
  cp bench/results/*cuda*.json "$OUT"/ 2>/dev/null || true
fi
step "done (status $status)"
exit $status
