#!/usr/bin/env bash
# The HtFL table of benchmarks/reproduce_htfl.py on a GPU machine with a fixed time budget: one
# process per (group, algorithm), all at once (each drives the GPU from its own core), each
# stopping after the first round that ends past its budget (a partial row says how many rounds
# it ran). Rows land in $OUT/rows.json; merge them here with
#     python benchmarks/reproduce_htfl.py --merge <dir>/rows.json
# Variables: OUT (results folder), CPU4 and HTFE8 (algorithms for HtFE-img-cpu-4 and
# HtFE-img-8), BUDGET_CPU4 and BUDGET_HTFE8 (seconds of training each), ROUNDS (default 20),
# GRACE (seconds a job may run past its budget before it is killed, default 120), DEVICE
# (default cuda), EXTRA (more "key=value" overrides, space-separated).
# Data: Fashion-MNIST's four IDX files in $KTL_DATA_ROOT (default ./.data/fashion_mnist).
set -u
OUT=${OUT:-/tmp/htfl_device}
ROUNDS=${ROUNDS:-20}
BUDGET_CPU4=${BUDGET_CPU4:-400}
BUDGET_HTFE8=${BUDGET_HTFE8:-330}
CPU4=${CPU4:-"fd fedgen fedgh fedkd fedl2g fedmrl fedproto fedtgp fml lg-fedavg local"}
HTFE8=${HTFE8:-"fedproto fedtgp local"}
DEVICE=${DEVICE:-cuda}
SETS=()
for o in ${EXTRA:-}; do SETS+=(--set "$o"); done
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 KTL_DATA_ROOT=${KTL_DATA_ROOT:-$PWD/.data/fashion_mnist}
WORK=$(mktemp -d)
mkdir -p "$OUT" "$WORK/rows" "$WORK/logs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 -c "import pydantic, fl_core.engine; print('pydantic', pydantic.VERSION)" || exit 1

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
python3 - "$WORK/rows" "$OUT/rows.json" <<'EOF'
import json, sys
from pathlib import Path
rows = [r for f in sorted(Path(sys.argv[1]).glob("*.json")) for r in json.loads(f.read_text())]
Path(sys.argv[2]).write_text(json.dumps(rows, indent=2))
for r in rows:
    print(f"{r['group']:15s} {r['algorithm']:10s} {r['rounds_run']:3d} rounds  "
          f"best {100 * r['best_test_acc']:.2f} ({r['best_round']})  {r['seconds_per_round']:.1f} s/round")
EOF
# the per-round metrics of every run (also of one killed before its row was written) and the logs
tar czf "$OUT/logs.tgz" -C "$WORK" logs $(cd "$WORK" && find runs -name metrics.jsonl)
