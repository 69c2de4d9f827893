#!/usr/bin/env bash
# One Flow-GRPO epoch at SD3.5-Medium shape on one GPU, recorded in RESULTS.md (2026-11-30): the
# real stage on an embedded local Ray, one learner and one rollout worker sharing the GPU,
# jpeg_compressibility scored by 2 CPU reward actors, random weights, 3 epochs (the first is the
# warm-up). Run on the lent device machine (no network) with the wheels carried in .whl/ (see
# RESULTS.md, 2026-11-26 GPU section, for how they were made); results under $OUT.
set -euo pipefail
source benchmarks/device_env.sh
nvidia-smi -L | tee "$OUT/gpus.txt"
{
  echo "cpu cores: $(nproc)"
  python3 - <<'PY'
import platform, torch, ray, deepspeed, diffusers, peft, transformers
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "ray", ray.__version__, "deepspeed", deepspeed.__version__, "diffusers",
      diffusers.__version__, "peft", peft.__version__, "transformers", transformers.__version__)
print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory / 2**30, "GiB")
PY
} 2>&1 | grep -v "^\s*$" | tee "$OUT/versions.txt"
# GPU utilisation once a second while the stage runs.
nvidia-smi dmon -s um -d 1 > "$OUT/dmon.txt" 2>&1 &
dmon=$!
status=0
python3 benchmarks/bench_grpo_epoch.py --preset sd35-medium --resolution 512 --precision bf16 \
  --gpus 1 --cpus 4 --reward-actors 2 --reward-cpus 2 --steps 10 --group-size 24 --groups 2 \
  --batch-size 9 --updates 2 --epochs 3 --warmup 1 --out /tmp/grpo-gpu > "$OUT/log.txt" 2>&1 \
  || status=$?
kill "$dmon" || true
grep -v "^\s*$" "$OUT/log.txt" | tail -25
cp /tmp/grpo-gpu/metrics.jsonl "$OUT/metrics.jsonl" || true
exit $status
