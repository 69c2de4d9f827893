#!/usr/bin/env bash
# SD3.5-Medium shapes under ZeRO-3 on 2 GPUs (carried wheels installed by device_env.sh, as for
# gpu_soar_stage.sh); results under $OUT.
set -euo pipefail
source benchmarks/device_env.sh
python3 benchmarks/bench_soar_stage.py --preset sd35-medium --resolution 512 --batch-size 4 \
  --num-learners 2 --cpus-per-learner 8 --steps 8 --warmup 3 --zero-stage 3 \
  --out /tmp/bench-z3 2>&1 | grep -v "^\s*$" | tail -4 | tee "$OUT/sd35m-zero3.txt"
