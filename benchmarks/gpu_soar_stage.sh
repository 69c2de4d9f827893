#!/usr/bin/env bash
# The SOAR-stage GPU runs recorded in RESULTS.md, on a 2-GPU machine with no network:
# wheels carried in .whl/ (see benchmarks/RESULTS.md for how they were made), results under $OUT.
set -euo pipefail
source benchmarks/device_env.sh
nvidia-smi -L | tee "$OUT/gpus.txt"
# 1. The tiny job on GPUs: 2 bf16 ZeRO-2 learners over NCCL, a rollout worker sharing their GPUs.
python3 - <<'PY' 2>&1 | grep -v "^\s*$" | tail -15 | tee "$OUT/tiny.txt"
import json, ray
from soar_ray.config import load_job
from soar_ray.stages.pipeline import run_pipeline
ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
job = load_job("jobs/tiny.yaml", [
    "output_dir=/tmp/tiny-gpu", "cluster.gpus_per_learner=0.5", "cluster.gpus_per_rollout_worker=0.5",
    "cluster.colocate_rollout_with_learners=true", "deepspeed.precision=bf16", "stages.0.num_steps=60",
    "logging.progress_bar=false"])
run_pipeline(job, job.output_path)
rows = [json.loads(l) for l in open("/tmp/tiny-gpu/metrics.jsonl")]
print("tiny losses", [round(r["loss"], 4) for r in rows[::10]], "last", round(rows[-1]["loss"], 4))
print("tiny median samples/s", sorted(r["samples_per_s"] for r in rows)[len(rows) // 2],
      "peak GiB", max(r["gpu_peak_memory_gib"] for r in rows))
PY
cp /tmp/tiny-gpu/samples/0-soar-step-000060.png "$OUT/tiny-samples.png" || true
# 2. SD3.5-Medium shapes (random weights), 512 px, 4 images per GPU, fused and sequential aux.
for aux in fused sequential; do
  python3 benchmarks/bench_soar_stage.py --preset sd35-medium --resolution 512 --batch-size 4 \
    --num-learners 2 --cpus-per-learner 8 --steps 8 --warmup 3 --aux-eval $aux \
    --out /tmp/bench-$aux 2>&1 | grep -v "^\s*$" | tail -4 | tee "$OUT/sd35m-$aux.txt"
done
