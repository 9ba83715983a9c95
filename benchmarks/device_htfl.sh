#!/usr/bin/env bash
# The HtFL table of benchmarks/reproduce_htfl.py on a GPU machine with a fixed time budget: one
# process per (group, algorithm), all at once (each drives the GPU from its own core), each
# stopping after the first round that ends past its budget (a partial row says how many rounds
# it ran). Rows land in $OUT/rows.json; merge them here with
#     python benchmarks/reproduce_htfl.py --merge <dir>/rows.json
# Variables: OUT (results folder), CPU4 and HTFE8 (algorithms for HtFE-img-cpu-4 and
# HtFE-img-8; empty: none), BUDGET_CPU4 and BUDGET_HTFE8 (seconds of training each), ROUNDS (default 20),
# GRACE (seconds a job may run past its budget before SIGTERM ends it with the row of the rounds
# it finished, default 120), DEVICE
# (default cuda), EXTRA (more "key=value" overrides, space-separated).
# Data: Fashion-MNIST's four IDX files in $KTL_DATA_ROOT (default ./.data/fashion_mnist).
set -u
OUT=${OUT:-/tmp/htfl_device}
ROUNDS=${ROUNDS:-20}
BUDGET_CPU4=${BUDGET_CPU4:-400}
BUDGET_HTFE8=${BUDGET_HTFE8:-330}
CPU4=${CPU4-"fd fedgen fedgh fedkd fedl2g fedmrl fedproto fedtgp fml lg-fedavg local"}
HTFE8=${HTFE8-"fedproto fedtgp local"}
DEVICE=${DEVICE:-cuda}
SETS=()
for o in ${EXTRA:-}; do SETS+=(--set "$o"); done
source "$(dirname "$0")/device_common.sh"
device_prelude

job() {  # group algorithm budget
  timeout $(($3 + ${GRACE:-120})) python3 benchmarks/reproduce_htfl.py --group "$1" --algorithms "$2" \
    --rounds "$ROUNDS" --deadline "$3" --results "$WORK/rows/$1-$2.json" --runs "$WORK/runs" \
    "${SETS[@]}" --set device="$DEVICE" --set threads=1 --set federation.executor=sequential \
    --set federation.checkpoint_every=null >"$WORK/logs/$1-$2.log" 2>&1
  echo "$1/$2 exit $? $(grep -c "round [0-9]*/" "$WORK/logs/$1-$2.log") rounds logged"
}
for a in $CPU4; do job HtFE-img-cpu-4 "$a" "$BUDGET_CPU4" & done
for a in $HTFE8; do job HtFE-img-8 "$a" "$BUDGET_HTFE8" & done
wait
device_collect group
