#!/usr/bin/env bash
# The shapes study (benchmarks/shapes_geneval.py) on the lent GPU machine (no network): the GPU
# profile for the split seeds given (default 0), under a wall-clock guard; results.json, the
# log, the study's job files and a few sample grids come back under $OUT. The study resumes, so
# a split cut short by the guard says how far it got. Wheels carried in .whl/.
#   bash benchmarks/gpu_shapes_geneval.sh 0 540
set -uo pipefail
source benchmarks/device_env.sh
split=${1:-0}
limit=${2:-540}
nvidia-smi -L | tee "$OUT/gpus.txt"
start=$(date +%s)
timeout "$limit" python3 benchmarks/shapes_geneval.py --out /tmp/shapes --profile gpu \
  --split-seeds "$split" --phases train > "$OUT/log.txt" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt"
cp /tmp/shapes/results.json "$OUT/" 2>/dev/null || echo "no results.json"
root=/tmp/shapes/split-$split
mkdir -p "$OUT/grids"
for run in "$root"/*/; do
  name=$(basename "$run")
  [ -f "$run/job.yaml" ] && cp "$run/job.yaml" "$OUT/grids/$name.yaml"
  [ -f "$run/metrics.jsonl" ] && cp "$run/metrics.jsonl" "$OUT/grids/$name.metrics.jsonl"
  grid=$(ls "$run"/eval/final-held_out-*/grid.png 2>/dev/null | head -1)
  [ -n "$grid" ] && cp "$grid" "$OUT/grids/$name-held_out.png"
done
grep -E "soar-ray: (job|stage)|Error|error:" "$OUT/log.txt" | tail -40
