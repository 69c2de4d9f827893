#!/usr/bin/env bash
# The shapes study (benchmarks/shapes_geneval.py) on the lent GPU machine (no network): a GPU
# profile (default gpu; gpu-compiled: compiled blocks) for the split seeds given (default 0,1; all
# runs share the machine's GPUs, 4 at a time per GPU, or PARALLEL=N at a time), under a
# wall-clock guard, then its report. Back under $OUT: log.txt, study.tar.gz (results.json, every
# run's job file, metrics, driver log tail and held-out sample grid), table.md and report.tar.gz
# (the table and the plots); every 15 s the log notes the host's load and the GPUs' use. Leave the
# call about 40 s after the guard for the bundle and the report. The study resumes: on a machine
# still warm from the last call, the same command continues it. Wheels in .whl/.
#   bash benchmarks/gpu_shapes_geneval.sh 0,1 570 [gpu-compiled]
#   PARALLEL=8 bash benchmarks/gpu_shapes_geneval.sh 0,1 570 gpu-compiled   # both splits, one GPU
# The whole protocol in one go across back-to-back calls, each waiting on it (device_detached.sh):
#   PARALLEL=8 bash benchmarks/device_detached.sh study 570 bash benchmarks/gpu_shapes_geneval.sh 0,1 1500 gpu-compiled
set -uo pipefail
source benchmarks/device_env.sh
splits=${1:-0,1}
limit=${2:-570}
profile=${3:-gpu}
study=/tmp/shapes
nvidia-smi -L | tee "$OUT/log.txt"
env | grep -E '^RAY_' | sed 's/=.*//' | sed 's/^/environment sets /' | tee -a "$OUT/log.txt"
start=$(date +%s)
# Every 15 s: the host's load average and each GPU's utilisation and memory, into the log.
(while sleep 15; do
  echo "load at $(( $(date +%s) - start )) s: $(cut -d' ' -f1-3 /proc/loadavg); GPU % and MiB:" \
    "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits | paste -sd';')"
done >> "$OUT/log.txt") &
sampler=$!
timeout "$limit" python3 benchmarks/shapes_geneval.py --out "$study" --profile "$profile" \
  --split-seeds "$splits" ${PARALLEL:+--parallel "$PARALLEL"} --phases train >> "$OUT/log.txt" 2>&1
echo "train: exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt"
kill "$sampler"
bundle=/tmp/bundle
mkdir -p "$bundle"
cp "$study"/results.json "$bundle"/ 2>/dev/null
for run in "$study"/split-*/*/; do
  name=$(basename "$(dirname "$run")")-$(basename "$run")
  mkdir -p "$bundle/$name"
  for file in job.yaml metrics.jsonl result.json seconds.json; do
    [ -f "$run/$file" ] && cp "$run/$file" "$bundle/$name/"
  done
  [ -f "$run/driver.log" ] && tail -40 "$run/driver.log" > "$bundle/$name/driver.log"
  last=$(ls -d "$run"/eval/step-*-held_out-* 2>/dev/null | sort | tail -1)
  for grid in "$last/grid.png" "$run"/eval/final-held_out-*/grid.png; do
    [ -f "$grid" ] && cp "$grid" "$bundle/$name/$(basename "$(dirname "$grid")").png"
  done
done
tar -czf "$OUT/study.tar.gz" -C "$bundle" .
# The report after the bundle: a call cut during it still brings every run's numbers back.
python3 benchmarks/shapes_geneval.py --out "$study" --profile "$profile" --split-seeds "$splits" \
  --phases report >> "$OUT/log.txt" 2>&1 || echo "report failed" | tee -a "$OUT/log.txt"
# The device call brings back 8 files at most: the plots travel in one archive.
(cd "$study" && tar -czf "$OUT/report.tar.gz" table.md ./*.png) 2>/dev/null
cp "$study"/table.md "$OUT"/ 2>/dev/null
ls -la "$OUT"
grep -E "^shapes:|Error|error" "$OUT/log.txt" | tail -60
cat "$study/table.md" 2>/dev/null
