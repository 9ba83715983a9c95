#!/usr/bin/env bash
# Rows of benchmarks/reproduce_pfllib.py on a GPU machine with a fixed time budget: a queue of
# (algorithm, scenario) runs, PARALLEL at a time, one process each (each drives the GPU from its
# own core). A run starts only while at least MIN_START seconds of the budget are left, and stops
# after the first round that ends past the budget (its row then says how many rounds it ran).
# Rows land in $OUT/rows.json; merge them here with
#     python benchmarks/reproduce_pfllib.py --merge <dir>/rows.json
# Variables: OUT (results folder), JOBS ("algorithm/scenario" items, in the order to run; an item
# "algorithm/scenario:key=value,key=value" adds overrides of its own, part of its row's key),
# BUDGET (seconds from the start, default 540), PARALLEL (default 8: more only slow each run, benchmarks/results/shared_gpu.md), MIN_START (default 150),
# ROUNDS (default 20), DEVICE (default cuda), EXTRA (more "key=value" overrides), GRACE (default
# 30: a job still running GRACE seconds past the budget gets SIGTERM and writes the row of the
# rounds it finished, so that every row is collected in time). Keep BUDGET + GRACE about 30 s
# under the device call's limit: a call cut off before the collection returns no rows.
# CHECKPOINT_EVERY (default null: none) checkpoints each run in $WORK/runs, and a run whose folder
# is there continues from its checkpoint (rows that finished are kept). Only useful where WORK
# outlives the call: on the H200 of 2026-11-27 an ignored folder of the checkout did not survive
# into the next call of the same warm machine, and the second call's rows restarted from round 0.
# MARGIN (default 30): a run stops after the first round that ends later than MARGIN seconds
# before the budget's end.
# Data: Fashion-MNIST's four IDX files in $KTL_DATA_ROOT (default ./.data/fashion_mnist).
set -u
OUT=${OUT:-/tmp/pfllib_device}
ROUNDS=${ROUNDS:-20}
BUDGET=${BUDGET:-540}
PARALLEL=${PARALLEL:-8}
MIN_START=${MIN_START:-150}
DEVICE=${DEVICE:-cuda}
export END=$(($(date +%s) + BUDGET)) ROUNDS DEVICE MIN_START EXTRA=${EXTRA:-} GRACE=${GRACE:-30}
export CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-null}
source "$(dirname "$0")/device_common.sh"
device_prelude

job() {  # algorithm/scenario[:key=value,...]
  local item=${1%%:*} own= left=$((END - $(date +%s))) sets=()
  [ "$item" != "$1" ] && own=${1#*:}
  local a=${item%/*} s=${item#*/} name
  name=$(printf '%s' "$1" | tr -c 'A-Za-z0-9._=-' '_')
  if [ "$left" -lt "$MIN_START" ]; then echo "$1 not started ($left s left)"; return; fi
  for o in $EXTRA ${own//,/ }; do sets+=(--set "$o"); done
  timeout $((left + GRACE)) python3 benchmarks/reproduce_pfllib.py --algorithms "$a" --scenarios "$s" \
    --rounds "$ROUNDS" --deadline "$((left - ${MARGIN:-30}))" --results "$WORK/rows/$name.json" \
    --runs "$WORK/runs" "${sets[@]}" --set device="$DEVICE" --set threads=1 \
    --set federation.executor=sequential --set federation.checkpoint_every="$CHECKPOINT_EVERY" \
    >>"$WORK/logs/$name.log" 2>&1
  echo "$1 exit $? $(grep -c " round [0-9]*/" "$WORK/logs/$name.log") rounds logged"
}
export -f job
printf '%s\n' ${JOBS:?name the runs: JOBS="fedavg/pat fedavg/dir ..."} | xargs -P "$PARALLEL" -I{} bash -c 'job {}'
device_collect scenario
