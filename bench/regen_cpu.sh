#!/usr/bin/env bash
# Rerun every CPU benchmark row at the current commit and rewrite the README's benchmark tables.
# Each benchmark streams its rows to bench/results/<bench>_cpu.json (commit, dirty flag, device,
# date in every row) and exits non-zero when metafast fails, a row is missing or a gradient check
# fails; every benchmark runs even when one fails, and the script exits non-zero if any did.
#
#   bash bench/regen_cpu.sh                 # all of them (tens of minutes on a 2-core host)
#   ONLY="kd_loss to_nchw" bash bench/regen_cpu.sh
#
# Run it on a clean tree (commit first): rows measured on a dirty tree say so, and the README then
# says "dirty" next to their commit.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET METAFAST_BACKEND OUT
$PY bench/source.py
if [ "$($PY -c 'import sys; sys.path.insert(0, "bench"); from source import source; print(source()["dirty"])')" != False ]; then
  echo "warning: the tree is dirty (or its state unknown): the rows will say so"
fi
BENCHES=(maml_step fused_inner_loop task_cross_entropy kd_loss multitask_heads batch_norm batch_norm_rop to_nchw
         sampler distributed demo)
for s in bench/bench_inner_update*.py; do [ -f "$s" ] && BENCHES+=("$(basename "$s" .py | sed 's/^bench_//')"); done
failed=()
for b in "${BENCHES[@]}"; do
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $b "* ]]; then continue; fi
  echo "=== $b ($(date -u +%H:%M:%S))"
  if ! $PY "bench/bench_$b.py" --device cpu; then failed+=("$b"); fi
done
$PY bench/readme_tables.py
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all CPU rows regenerated; README tables rewritten (check: python bench/readme_tables.py --check)"
