#!/usr/bin/env bash
# Rows of benchmarks/reproduce_pfllib.py on a GPU machine with a fixed time budget: a queue of
# (algorithm, scenario) runs, PARALLEL at a time, one process each (each drives the GPU from its
# own core). A run starts only while at least MIN_START seconds of the budget are left, and stops
# after the first round that ends past the budget (its row then says how many rounds it ran).
# Rows land in $OUT/rows.json; merge them here with
#     python benchmarks/reproduce_pfllib.py --merge <dir>/rows.json
# Variables: OUT (results folder), JOBS ("algorithm/scenario" items, in the order to run),
# BUDGET (seconds from the start, default 540), PARALLEL (default 15), MIN_START (default 150),
# ROUNDS (default 20), DEVICE (default cuda), EXTRA (more "key=value" overrides).
# Data: Fashion-MNIST's four IDX files in $KTL_DATA_ROOT (default ./.data/fashion_mnist).
set -u
OUT=${OUT:-/tmp/pfllib_device}
ROUNDS=${ROUNDS:-20}
BUDGET=${BUDGET:-540}
PARALLEL=${PARALLEL:-15}
MIN_START=${MIN_START:-150}
DEVICE=${DEVICE:-cuda}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 KTL_DATA_ROOT=${KTL_DATA_ROOT:-$PWD/.data/fashion_mnist}
export END=$(($(date +%s) + BUDGET)) ROUNDS DEVICE MIN_START EXTRA=${EXTRA:-}
export WORK=$(mktemp -d)
mkdir -p "$OUT" "$WORK/rows" "$WORK/logs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 -c "import pydantic, scipy, fl_core.engine; print('pydantic', pydantic.VERSION)" || exit 1

job() {  # algorithm/scenario
  local a=${1%/*} s=${1#*/} left=$((END - $(date +%s))) sets=()
  if [ "$left" -lt "$MIN_START" ]; then echo "$1 not started ($left s left)"; return; fi
  for o in $EXTRA; do sets+=(--set "$o"); done
  timeout $((left + 90)) python3 benchmarks/reproduce_pfllib.py --algorithms "$a" --scenarios "$s" \
    --rounds "$ROUNDS" --deadline "$((left - 30))" --results "$WORK/rows/$a-$s.json" \
    --runs "$WORK/runs" "${sets[@]}" --set device="$DEVICE" --set threads=1 \
    --set federation.executor=sequential --set federation.checkpoint_every=null \
    >"$WORK/logs/$a-$s.log" 2>&1
  echo "$1 exit $? $(grep -c " round [0-9]*/" "$WORK/logs/$a-$s.log") rounds logged"
}
export -f job
printf '%s\n' ${JOBS:?name the runs: JOBS="fedavg/pat fedavg/dir ..."} | xargs -P "$PARALLEL" -I{} bash -c 'job {}'
python3 - "$WORK/rows" "$OUT/rows.json" <<'EOF'
import json, sys
from pathlib import Path
rows = [r for f in sorted(Path(sys.argv[1]).glob("*.json")) for r in json.loads(f.read_text())]
Path(sys.argv[2]).write_text(json.dumps(rows, indent=2))
for r in rows:
    print(f"{r['algorithm']:10s} {r['scenario']:4s} {r['rounds']:3d} rounds  "
          f"best {100 * r['best_test_acc']:.2f} ({r['best_round']})  {r['seconds_per_round']:.1f} s/round")
EOF
# the per-round metrics of every run (also of one killed before its row was written) and the logs
tar czf "$OUT/logs.tgz" -C "$WORK" logs $(cd "$WORK" && find runs -name metrics.jsonl)
