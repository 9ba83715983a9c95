# Sourced by benchmarks/device_*.sh: what every GPU table run does before and after its jobs.
#   device_prelude       exports (checkout on PYTHONPATH, one thread, data root), makes $OUT and
#                        $WORK/{rows,logs}, prints the GPU and torch, stops if fl_core won't import
#   device_collect KEY   merges $WORK/rows/*.json into $OUT/rows.json, prints one line per row
#                        (KEY: the row field beside the algorithm, e.g. group or scenario), and
#                        packs the logs and every run's metrics.jsonl into $OUT/logs.tgz
device_prelude() {
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
  export KTL_DATA_ROOT=${KTL_DATA_ROOT:-$PWD/.data/fashion_mnist}
  export WORK=${WORK:-$(mktemp -d)}
  mkdir -p "$OUT" "$WORK/rows" "$WORK/logs"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  python3 -c "import pydantic, scipy, fl_core.engine; print('pydantic', pydantic.VERSION)" || exit 1
}

device_collect() {
  python3 - "$WORK/rows" "$OUT/rows.json" "$1" <<'PY'
import json, sys
from pathlib import Path
rows = [r for f in sorted(Path(sys.argv[1]).glob("*.json")) for r in json.loads(f.read_text())]
Path(sys.argv[2]).write_text(json.dumps(rows, indent=2))
for r in rows:
    print(f"{r[sys.argv[3]]:15s} {r['algorithm']:10s} {r.get('rounds_run', r['rounds']):3d} rounds  "
          f"best {100 * r['best_test_acc']:.2f} ({r['best_round']})  {r['seconds_per_round']:.1f} s/round")
PY
  # the per-round metrics of every run (also of one killed before its row was written) and logs
  tar czf "$OUT/logs.tgz" -C "$WORK" logs $(cd "$WORK" && find runs -name metrics.jsonl)
}
