#!/usr/bin/env bash
# Flow-GRPO at SD3.5-Medium shape on a 2-GPU machine (no network), recorded in RESULTS.md
# (2026-11-30): the same epoch as gpu_grpo_epoch.sh on-policy (max_staleness 0, GPU 0) and one
# epoch ahead (max_staleness 1, GPU 1), side by side in one call; then the CPU chain job
# (tiny SOAR -> GRPO) on both GPUs: 2 learners over NCCL in bf16. Wheels carried in .whl/; results under $OUT.
set -euo pipefail
source benchmarks/device_env.sh
nvidia-smi -L | tee "$OUT/gpus.txt"
common=(--preset sd35-medium --resolution 512 --precision bf16 --gpus 1 --cpus 4 --reward-actors 2
        --reward-cpus 2 --steps 10 --group-size 24 --groups 2 --batch-size 9 --updates 2
        --epochs 4 --warmup 1)
for s in 0 1; do
  CUDA_VISIBLE_DEVICES=$s python3 benchmarks/bench_grpo_epoch.py "${common[@]}" \
    --max-staleness $s --out /tmp/grpo-s$s > "$OUT/staleness$s.txt" 2>&1 &
done
status=0
wait -n || status=$?
wait -n || status=$?
for s in 0 1; do grep -v "^\s*$" "$OUT/staleness$s.txt" | tail -8; done
# The chain on GPUs: SOAR hands its weights to GRPO (LoRA, full weights to the rollout worker).
python3 - <<'PY' 2>&1 | grep -v "^\s*$" | tail -6 | tee "$OUT/chain.txt"
import json, ray
from soar_ray.config import load_job
from soar_ray.stages.pipeline import run_pipeline
ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
job = load_job("jobs/tiny_soar_grpo.yaml", [
    "output_dir=/tmp/chain-gpu", "cluster.gpus_per_learner=0.5", "cluster.gpus_per_rollout_worker=0.5",
    "cluster.colocate_rollout_with_learners=true", "deepspeed.precision=bf16",
    "logging.progress_bar=false", "checkpoint.resume=never"])
outputs = run_pipeline(job, job.output_path)
rows = [json.loads(l) for l in open("/tmp/chain-gpu/metrics.jsonl")]
grpo = [r for r in rows if r["stage"] == "grpo" and "reward_mean" in r]
print("chain outputs", [str(p) for p in outputs])
print("soar loss", round(rows[0]["loss"], 4), "->", round([r for r in rows if r["stage"] == "soar"][-1]["loss"], 4),
      "grpo epochs", len(grpo), "log_ratio_first max", max(r["log_ratio_first"] for r in grpo),
      "policy_version", grpo[-1]["policy_version"])
PY
exit $status
