#!/usr/bin/env bash
# Where a SOAR learner step's time goes at the SD3.5-Medium shape (random weights), one H200:
# benchmarks/profile_soar_step.py for the engine the runs use today and the variants issue 10
# weighs, each in its own process, results under $OUT (one JSON line per variant, the tables in
# one file). Wheels carried in .whl/.
#   bash benchmarks/gpu_profile_soar.sh
set -uo pipefail
source benchmarks/device_env.sh
nvidia-smi -L | tee "$OUT/gpus.txt"
common="--preset sd35-medium --resolution 512 --batch-size 4 --aux-points 6 --warmup 3 --steps 5"
variant() {  # name, then extra arguments
  local name=$1; shift
  timeout 240 python3 benchmarks/profile_soar_step.py $common --out "/tmp/prof-$name" "$@" \
    > "/tmp/prof-$name.log" 2>&1 || { echo "$name failed"; tail -20 "/tmp/prof-$name.log"; }
  [ -f "/tmp/prof-$name/profile.json" ] || return 0
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); r['variant']=sys.argv[2]; print(json.dumps(r))" \
    "/tmp/prof-$name/profile.json" "$name" | tee -a "$OUT/profiles.jsonl"
  { echo "== $name"; cat "/tmp/prof-$name/profile_table.txt"; } >> "$OUT/tables.txt"
}
variant zero2-ckpt-333 --engine zero2 --t5-tokens 256
variant local-ckpt-333 --engine local --t5-tokens 256
variant local-nockpt-333 --engine local --t5-tokens 256 --checkpointing false
variant zero2-ckpt-154 --engine zero2 --t5-tokens 77
