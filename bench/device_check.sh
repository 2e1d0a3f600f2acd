#!/usr/bin/env bash
# The device check: ONE command for a lent GPU machine (H100/H200) inside ONE global deadline
# (BUDGET, default 540 s, leaving a 600 s call time to spare). The steps run in this order, each
# capped at its own limit or at what remains, whichever is less:
#   manifest  commit + dirty (bench/source.json), versions, nvidia-smi, load  -> $OUT/manifest.json
#   deps      pytest & co. from .device_wheels/ when missing (the machine has no network)
#   build     pip install -e . (metafast._C for sm_$METAFAST_CUDA_ARCHS)      -> $OUT/build.log
#   info      python -m metafast info
#   shard     strict correctness shard: fused CUDA kernels + BatchedMAML on CUDA, one line per test
#             (METAFAST_STRICT=1, pytest -v)                                   -> $OUT/tests_shard.log
#   bench:*   the target rows of each benchmark, then bench_memory's peak memory at K = 1, 10 (capped
#             at 90 s) and its ResNet-12 run (150 s); every row streams to $OUT/rows.jsonl as measured
#   tests     the remaining gpu tests, pytest-xdist workers with few threads  -> $OUT/tests_gpu.log
#   summary   each step's exit code, wall time, pass/fail and row/target counts -> $OUT/summary.json
# plus $OUT/device_check.log (everything printed): 7 files, under the 8 a call brings back.
#
# Before the call, where .git exists (it does not travel), on a committed tree:
#   python3 bench/source.py stamp          # bench/source.json: commit + dirty state (git-ignored)
#   bash bench/device_wheels.sh            # .device_wheels/ (a fallback: the image has these packages)
# then one call: run(command="bash bench/device_check.sh", timeout_s=600,
#                    carry=["bench/source.json", ".device_wheels"])
#   bash bench/device_check.sh --prebuilt  # instead of compiling there, use a carried metafast/_C*.so
#                                          # built here for torch 2.11.0+cu130 / Python 3.12 (NOTES.md)
#   bash bench/device_check.sh --rehearse  # on a CPU: the same plumbing, device steps stubbed (CI runs it)
# After it, here: python bench/device_check.py import-rows <files_at>/rows.jsonl  (rows -> bench/results/),
# commit summary.json and the log beside them, then python bench/readme_tables.py.
#
# Exit status: 0 only when every step exited 0 (a benchmark exits non-zero when metafast failed, a
# promised row is missing or a gradient check failed; a missed speed target is reported, not fatal).
set -uo pipefail
cd "$(dirname "$0")/.."

REHEARSE=0
PREBUILT=0
for arg in "$@"; do
  case "$arg" in
    --rehearse) REHEARSE=1 ;;
    --prebuilt) PREBUILT=1 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$arg' (expected --rehearse, --prebuilt, --help)" >&2; exit 2 ;;
  esac
done

PY=${PY:-python3}
BUDGET=${BUDGET:-540}
RESERVE=10                      # seconds kept for the summary
if [ "$REHEARSE" = 1 ]; then
  OUT=${OUT:-$(mktemp -d /tmp/device_check_rehearsal.XXXXXX)}
  DEVICE=cpu
  BENCH_OUT="--out $OUT/results"   # the committed CPU rows stay as they are
else
  BENCH_OUT=""
  OUT=${OUT:-/tmp/device_check_out}
  DEVICE=cuda
fi
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export METAFAST_CUDA_ARCHS=${METAFAST_CUDA_ARCHS:-90}
unset TRITON_INTERPRET METAFAST_BACKEND
rm -f "$OUT/rows.jsonl"         # rows of this run only
STEPS_FILE=$(mktemp /tmp/device_check_steps.XXXXXX)
START=$(date +%s)
DEADLINE=$((START + BUDGET))
TEST_WORKERS=${TEST_WORKERS:-6}
# The strict shard: what has never run on a GPU and everything else leans on.
SHARD=${SHARD:-"tests/test_fused_inner_loop_cxx.py tests/test_fused_inner_loop.py tests/test_batched_maml_cuda.py"}
# The benchmarks' target rows: "name|results file|cap s|arguments" (inner_update: every bench_inner_update*.py).
BENCHES=(
  "maml_step|maml_step_${DEVICE}|110|--device $DEVICE --cuda-graph"
  "fused_inner_loop|fused_inner_loop_${DEVICE}|70|--device $DEVICE"
  "inner_update|inner_update_${DEVICE}|45|--device $DEVICE"  # its target needs T*P >= 16M: not --quick
  "task_cross_entropy|task_cross_entropy_${DEVICE}|45|--device $DEVICE --quick"
  "kd_loss|kd_loss_${DEVICE}|45|--device $DEVICE --quick"
  "multitask_heads|multitask_heads_${DEVICE}|45|--device $DEVICE --quick"
  # peak memory (max_memory_allocated) of every method at K = 1 and 10 (the K=10 target), each (method, K) a
  # fresh process: ~10 processes of a few seconds; rows stream, so a cut-short run keeps what it measured
  "memory|memory_${DEVICE}|90|--device $DEVICE --steps 1 10 --no-plot"
  # ResNet-12 wide miniImageNet 5w5s meta-batch 4, K=10: the low mode against learn2learn (expected out of
  # memory: ~120 GB by estimate), meta-gradients against the low mode in float64
  "memory|memory_resnet12_${DEVICE}|150|--device $DEVICE --model resnet12 --tasks 4 --steps 10 --methods metafast_low learn2learn --no-plot"
)

left() { echo $((DEADLINE - RESERVE - $(date +%s))); }

# step NAME CAP KIND LOGFILE FILE -- COMMAND...: run COMMAND under min(CAP, time left); record
# {name, rc, wall_s, cap_s, kind, log, file} in STEPS_FILE. LOGFILE "" streams into the main log.
step() {
  local name=$1 cap=$2 kind=$3 log=$4 file=$5 rc t0 t1 wall
  shift 6
  local remain
  remain=$(left)
  (( cap > remain )) && cap=$remain
  echo
  echo "=== $name (cap ${cap} s; $((DEADLINE - $(date +%s))) s of ${BUDGET} left; $(date -u +%H:%M:%S))"
  t0=$(date +%s.%N)
  if (( cap < 5 )); then
    echo "skipped: the deadline leaves no time"
    rc=125
  elif [ -n "$log" ]; then
    timeout -k 5 "$cap" "$@" > "$log" 2>&1
    rc=$?
    tail -n 30 "$log"
  else
    timeout -k 5 "$cap" "$@"
    rc=$?
  fi
  t1=$(date +%s.%N)
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  (( rc == 124 || rc == 137 )) && echo "TIMED OUT after ${cap} s"
  echo "--- $name: rc $rc, ${wall} s"
  printf '{"name": "%s", "rc": %d, "wall_s": %s, "cap_s": %d, "kind": "%s", "log": "%s", "file": "%s", "timed_out": %s}\n' \
    "$name" "$rc" "$wall" "$cap" "$kind" "$log" "$file" "$( (( rc == 124 || rc == 137 )) && echo true || echo false)" \
    >> "$STEPS_FILE"
  return 0
}

# pytest's arguments: verbose (one line per test, so a cut-short run keeps its outcomes), short tracebacks.
pytest_args() { echo "-v -rfE --tb=short -p no:cacheprovider --timeout ${TEST_TIMEOUT:-90}"; }

check_deps() {
  local missing=""
  for mod in pytest pytest_timeout xdist pygments; do
    $PY -c "import $mod" 2>/dev/null || missing="$missing $mod"
  done
  if [ -z "$missing" ]; then echo "test packages present"; return 0; fi
  echo "missing:$missing"
  if [ "$REHEARSE" = 1 ]; then
    echo "(rehearsal: not installing; on the device: pip install --no-index --find-links .device_wheels)"
    return 0
  fi
  [ -d .device_wheels ] || { echo "no .device_wheels/ carried (bash bench/device_wheels.sh, then carry it)"; return 1; }
  $PY -m pip install -q --no-index --no-cache-dir --find-links .device_wheels \
    pytest pygments pluggy iniconfig packaging pytest-timeout pytest-xdist execnet ninja
}

build() {
  if [ "$REHEARSE" = 1 ]; then
    echo "(rehearsal: no build) import check only"
    $PY -c "import metafast, metafast.kernels; print('metafast from', metafast.__file__)"
    return $?
  fi
  if [ "$PREBUILT" = 1 ] && ls metafast/_C*.so >/dev/null 2>&1; then
    echo "prebuilt extension: $(ls metafast/_C*.so); installing the package without compiling"
    METAFAST_SKIP_CUDA_BUILD=1 $PY -m pip install -v --no-deps --no-build-isolation -e . || return $?
  else
    MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install -v --no-deps --no-build-isolation -e . || return $?
  fi
  $PY -c "import metafast._C, torch; print('extension ops:', sorted(n for n in dir(torch.ops.metafast) if not n.startswith('_')))"
}

bench_step() {  # bench_step SPEC
  local name file cap args script
  IFS='|' read -r name file cap args <<< "$1"
  for script in bench/bench_"$name".py bench/bench_"$name"_*.py; do
    [ -f "$script" ] || continue
    local label stem=${file%_"${DEVICE}"}
    label=$(basename "$script" .py | sed 's/^bench_//')
    [ "$stem" != "$name" ] && label=$stem  # a second run of one script (memory_resnet12)
    if [ "$REHEARSE" = 1 ] && [ "$name" != task_cross_entropy ]; then
      # stubbed (one benchmark runs for real on the CPU): the script imports and takes every argument
      step "bench:$label" "$cap" bench-stub "" "" -- \
        $PY bench/device_check.py takes-args "$script" "$args"
    else
      # shellcheck disable=SC2086  (the rehearsal's CPU run gets 4x the GPU cap: a shared 2-core host)
      step "bench:$label" "$(( REHEARSE ? 4 * cap : cap ))" bench "" "$file" -- \
        $PY "$script" $args $BENCH_OUT
    fi
  done
}

main() {
  echo "device_check: $( [ "$REHEARSE" = 1 ] && echo REHEARSAL on the CPU || echo GPU run ), budget ${BUDGET} s, OUT=$OUT"
  step manifest 30 plain "" "" -- $PY bench/device_check.py manifest "$OUT"
  step deps 30 plain "" "" -- bash -c check_deps
  step build 240 plain "$OUT/build.log" "" -- bash -c build
  step info 90 plain "" "" -- $PY -m metafast info

  local n=""
  if $PY -c "import xdist" 2>/dev/null; then n="-n $TEST_WORKERS --dist loadfile"; fi
  # shellcheck disable=SC2086
  step shard 100 pytest "$OUT/tests_shard.log" "" -- env METAFAST_STRICT=1 $PY -m pytest -m gpu $(pytest_args) $SHARD

  local spec
  for spec in "${BENCHES[@]}"; do bench_step "$spec"; done

  local ignore="" f
  for f in $SHARD; do ignore="$ignore --ignore=$f"; done
  # shellcheck disable=SC2086
  step tests 600 pytest "$OUT/tests_gpu.log" "" -- env METAFAST_STRICT=1 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 \
    $PY -m pytest -m gpu $(pytest_args) $n $ignore tests

  echo
  echo "=== summary ($(( $(date +%s) - START )) s)"
  $PY bench/device_check.py summary "$STEPS_FILE" "$OUT"
  $PY -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['ok'] else 1)" "$OUT/summary.json"
}

# functions the steps call through `timeout` run in a child bash
export -f check_deps build
export PY REHEARSE PREBUILT
main 2>&1 | tee "$OUT/device_check.log"
rc=${PIPESTATUS[0]}
rm -f "$STEPS_FILE"
echo "device_check: exit $rc; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
