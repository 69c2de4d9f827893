#!/usr/bin/env bash
# Issue 10's GPU measurements on the lent device machine (no network; wheels carried in .whl/):
# the sections named (default: all), each variant in a process of its own, one JSON line per
# variant in $OUT/perf.jsonl, the summary table in $OUT/perf.md and the logs in $OUT/logs.tgz.
# Every number comes with the card, the shape (resolution, text tokens, batch) and the date.
#   soar     the SOAR learner step (benchmarks/profile_soar_step.py) at SD3.5-Medium shape, 512 px,
#            4 images, 6 aux points, plain-torch engine: activation checkpointing on every block,
#            on the first 12 or 6 of 24, off; at 333 and 154 text tokens; DeepSpeed ZeRO-2
#   compile  the same step with torch.compile'd blocks (deepspeed.compile_blocks), checkpointing on
#            every block and on the first 12; the first 12 also at 154 tokens and under ZeRO-2 and
#            ZeRO-1 (DeepSpeed's bf16 optimizer)
#   sync     a full SD3.5-Medium weight push, object store vs NCCL (benchmarks/bench_weight_sync.py),
#            and a LoRA r32 push (2-GPU machines only: a learner and a rollout worker)
#   grpo     one Flow-GRPO epoch at its reference shape (benchmarks/bench_grpo_epoch.py): activation
#            checkpointing on, eager blocks
#   grpo-fast  the same with checkpointing off and the learner's and rollout worker's blocks compiled
#   grpo-scaling-1 / grpo-scaling-2  grpo-fast on 1 and on 2 learner + rollout worker pairs, one
#            pair a GPU, 2 groups of 24 a pair an epoch (grpo-scaling-1 is grpo-fast)
#            (each GRPO section: medians of epochs 3-4; two pairs' sampling is still warming up in
#            epoch 2)
#   scaling  the SOAR stage on 1 and 2 learners, 4 images per GPU, ZeRO-2, compiled blocks,
#            checkpointing on the first 12 (2-GPU machines only; scaling-1 / scaling-2: one of them)
#   memory   the largest SOAR batch of one learner and its peak GiB (benchmarks/bench_memory.py) at
#            512 and 1024 px, checkpointing on and off, plain torch, ZeRO-2 and ZeRO-3 (one rank)
#   grpo-memory  the largest Flow-GRPO micro-batch of one learner (benchmarks/bench_grpo_memory.py:
#            LoRA r32, ZeRO-2, 154 text tokens) at 512 px with checkpointing off and on, 1024 px off
#   bash benchmarks/gpu_perf.sh soar          # one section a call: each takes minutes
#   VARIANTS="zero2-12-333-compiled local-12-154-compiled" bash benchmarks/gpu_perf.sh compile
#                                             # only the variants named (soar, compile, memory)
#   bash benchmarks/device_detached.sh perf 570 bash benchmarks/gpu_perf.sh
#                                             # every section in one run, across back-to-back calls
set -uo pipefail
source benchmarks/device_env.sh
gpus=$(nvidia-smi -L | tee "$OUT/gpus.txt" | wc -l)
sections=${*:-soar compile sync grpo grpo-fast grpo-scaling-2 scaling memory grpo-memory}
wanted() {  # variant name: whether $VARIANTS (default: all) names it
  [ -z "${VARIANTS:-}" ] || [[ " $VARIANTS " == *" $1 "* ]]
}
record() {  # name, JSON file: the file's object with the variant's name, appended to perf.jsonl
  [ -f "$2" ] || { echo "$1: no result"; return 0; }
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); r['variant']=sys.argv[2]; print(json.dumps(r))" \
    "$2" "$1" | tee -a "$OUT/perf.jsonl"
}
logs=/tmp/perf-logs  # every variant's log; they come back as one $OUT/logs.tgz (a device call
mkdir -p "$logs"     # brings back 8 files at most)
run() {  # name, seconds, command...: run it under a guard, its log kept under $logs
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$logs/$name.log" 2>&1 || { echo "$name failed: exit $?"; tail -15 "$logs/$name.log"; }
}
measure() {  # name, seconds, JSON file, command...: run, then record the file it writes (a file
  # left by an earlier call on a still-warm machine is removed first, never recorded)
  local name=$1 limit=$2 result=$3; shift 3
  rm -f "$result"
  run "$name" "$limit" "$@"
  record "$name" "$result"
}
soar_common="--preset sd35-medium --resolution 512 --batch-size 4 --aux-points 6 --warmup 2 --steps 4 --profile-steps 1"
for section in $sections; do
  case $section in
    soar)
      for variant in "local-all-333 true 256 local" "local-12-333 12 256 local" \
                     "local-6-333 6 256 local" "local-none-333 false 256 local" \
                     "local-all-154 true 77 local" "zero2-all-333 true 256 zero2"; do
        set -- $variant
        wanted "$1" || continue
        measure "soar-$1" 200 "/tmp/perf-soar-$1/profile.json" python3 benchmarks/profile_soar_step.py \
          $soar_common --checkpointing "$2" --t5-tokens "$3" --engine "$4" --out "/tmp/perf-soar-$1"
      done ;;
    compile)
      for variant in "local-all-333-compiled true 256 local" "local-12-333-compiled 12 256 local" \
                     "zero2-12-333-compiled 12 256 zero2" "zero1-12-333-compiled 12 256 zero1" \
                     "local-12-154-compiled 12 77 local"; do
        set -- $variant
        wanted "$1" || continue
        measure "soar-$1" 300 "/tmp/perf-soar-$1/profile.json" python3 benchmarks/profile_soar_step.py \
          $soar_common --checkpointing "$2" --t5-tokens "$3" --engine "$4" --compile \
          --out "/tmp/perf-soar-$1"
      done ;;
    sync)
      [ "$gpus" -ge 2 ] || { echo "sync: needs 2 GPUs (a learner and a rollout worker), this machine has $gpus"; continue; }
      measure sync-full 240 /tmp/perf-sync/weight_sync.json python3 benchmarks/bench_weight_sync.py \
        --preset sd35-medium --out /tmp/perf-sync
      measure sync-lora 180 /tmp/perf-sync-lora/weight_sync.json python3 \
        benchmarks/bench_weight_sync.py --preset sd35-medium --lora-rank 32 --out /tmp/perf-sync-lora ;;
    grpo|grpo-fast|grpo-scaling-1|grpo-scaling-2)
      flags=(); [ "$section" = grpo ] || flags=(--checkpointing false --compile)
      pairs=${section#grpo-scaling-}; [[ $pairs =~ ^[12]$ ]] || pairs=1
      [ "$gpus" -ge "$pairs" ] || { echo "$section: needs $pairs GPUs, this machine has $gpus"; continue; }
      measure "$section" 480 "/tmp/perf-$section/result.json" python3 benchmarks/bench_grpo_epoch.py \
        --preset sd35-medium --resolution 512 --precision bf16 --gpus 1 --pairs "$pairs" --cpus 4 \
        --reward-actors $((2 * pairs)) --reward-cpus 2 --steps 10 --group-size 24 --groups 2 \
        --batch-size 9 --updates 2 --epochs 4 --warmup 2 "${flags[@]}" --out "/tmp/perf-$section"
      grep -v "^\s*$" "$logs/$section.log" | tail -6 ;;
    scaling|scaling-1|scaling-2)
      counts=${section#scaling}; counts=${counts#-}
      [ "$gpus" -ge "${counts:-2}" ] || { echo "$section: needs ${counts:-2} GPUs, this machine has $gpus"; continue; }
      for learners in ${counts:-1 2}; do
        measure "scaling-$learners" 290 "/tmp/perf-scaling-$learners/result.json" python3 \
          benchmarks/bench_soar_stage.py --preset sd35-medium --resolution 512 --batch-size 4 \
          --num-learners "$learners" --cpus-per-learner 8 --checkpointing 12 --compile \
          --steps 6 --warmup 2 --out "/tmp/perf-scaling-$learners"
      done ;;
    memory)
      for variant in "512-local true 1,2,4,6,8,12,16" "512-local-none false 1,2,4,6,8" \
                     "1024-local true 1,2,3,4,6" "1024-zero2 true 1,2,3,4,6" \
                     "512-zero2 true 4,8,16,24" "512-zero3 true 4,8,16,24" \
                     "1024-zero2-large true 6,8,12" "1024-zero3 true 6,8,12"; do
        set -- $variant
        wanted "$1" || continue
        engine=${1#*-}; engine=${engine%-none}; engine=${engine%-large}
        measure "memory-$1" 240 "/tmp/perf-memory-$1/memory.json" python3 benchmarks/bench_memory.py \
          --preset sd35-medium --resolution "${1%%-*}" --engine "$engine" --checkpointing "$2" \
          --batch-sizes "$3" --out "/tmp/perf-memory-$1"
      done ;;
    grpo-memory)
      for variant in "512-none false 9,18,27,36,54" "512-all true 18,36,54,72" \
                     "1024-none false 3,6,9,18"; do
        set -- $variant
        wanted "grpo-memory-$1" || continue
        measure "grpo-memory-$1" 240 "/tmp/perf-grpo-memory-$1/memory.json" python3 \
          benchmarks/bench_grpo_memory.py --preset sd35-medium --resolution "${1%%-*}" \
          --engine zero2 --checkpointing "$2" --batch-sizes "$3" --out "/tmp/perf-grpo-memory-$1"
      done ;;
    *) echo "unknown section $section (soar, compile, sync, grpo, grpo-fast, grpo-scaling-1|-2, scaling[-1|-2], memory, grpo-memory)"; exit 2 ;;
  esac
done
python3 - "$OUT/perf.jsonl" > "$OUT/perf.md" <<'PY'
import json, sys
from pathlib import Path
path = Path(sys.argv[1])
rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
def trace_ends(r):
    """The first and the last step's loss and gradient norm (engines agree from step 1 on)."""
    if "trace" not in r:
        return "not recorded"
    first, last = r["trace"][0], r["trace"][-1]
    return f"{first['loss']:.5f}, {first['grad_norm']:.4g}; {last['loss']:.5f}, {last['grad_norm']:.4g}"
soar = [r for r in rows if r["variant"].startswith("soar-")]
if soar:
    print(f"SOAR step, {soar[0]['device']}, {soar[0]['date']}: {soar[0]['preset']}, "
          f"{soar[0]['resolution']} px, batch {soar[0]['batch']}, {soar[0]['aux_points']} aux points\n")
    print("| variant | engine | checkpointing | compiled | text tokens | step ms | images/s | peak GiB "
          "| loss, grad norm: 1st step; last | host syncs a step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in soar:
        syncs = r.get("host_syncs")
        where = "not counted" if syncs is None else f"{sum(syncs.values())}" + "".join(
            f"; {k} x{v}" for k, v in syncs.items())
        print(f"| {r['variant']} | {r['engine']} | {r['checkpointing']} | {r.get('compile', False)} | "
              f"{r['text_tokens']} | {r['step_ms']:.0f} | {r['images_per_s']:.2f} | "
              f"{r['peak_gib']:.1f} | {trace_ends(r)} | {where} |")
def largest_batches(found, heading):
    """The largest-batch table of bench_memory.py / bench_grpo_memory.py results."""
    if not found:
        return
    print(f"\n{heading}, {found[0]['device']}, {found[0]['date']}: {found[0]['preset']}, "
          f"{found[0]['text_tokens']} text tokens\n")
    print("| variant | px | engine | checkpointing | largest batch | its peak GiB | images/s |")
    print("|---|---|---|---|---|---|---|")
    for r in found:
        fit = [row for row in r["rows"] if not row.get("out_of_memory")]
        last = fit[-1] if fit else {"peak_gib": float("nan"), "images_per_s": float("nan")}
        print(f"| {r['variant']} | {r['resolution']} | {r['engine']} | {r['checkpointing']} | "
              f"{r['largest_batch']} | {last['peak_gib']:.1f} | {last['images_per_s']:.2f} |")
largest_batches([r for r in rows if r["variant"].startswith("memory-")],
                "Largest SOAR batch of one learner (6 aux points)")
grpo_memory = [r for r in rows if r["variant"].startswith("grpo-memory-")]
largest_batches(grpo_memory, "Largest Flow-GRPO micro-batch of one learner (LoRA r32, 9 trained steps)")
grpo = [r for r in rows if r["variant"].startswith("grpo") and r not in grpo_memory]
if grpo:
    print(f"\nFlow-GRPO epoch, {grpo[0]['device']}, {grpo[0]['date']}: {grpo[0]['preset']}, "
          f"{grpo[0]['resolution']} px, {grpo[0]['text_tokens']} text tokens, group "
          f"{grpo[0]['group_size']}, batch {grpo[0]['batch']}, a learner and a rollout worker a GPU; "
          f"medians of epochs {grpo[0]['epochs_measured']}\n")
    print("| variant | GPUs | checkpointing | compiled | sampling images/s | training images/s "
          "| epoch images/s | per GPU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in grpo:
        print(f"| {r['variant']} | {r['gpus']:g} | {r['checkpointing']} | {r['compile']} | "
              f"{r['sampling_images_per_s']:.2f} | {r['training_images_per_s']:.2f} | "
              f"{r['epoch_images_per_s']:.2f} | {r['epoch_images_per_s_per_gpu']:.2f} | "
              f"{r.get('gpu_peak_memory_gib', float('nan')):.1f} |")
for r in rows:
    if not r["variant"].startswith(("soar-", "memory-", "grpo")):
        print(f"\n{r['variant']}: {json.dumps(r)}")
PY
tar -czf "$OUT/logs.tgz" -C "$(dirname "$logs")" "$(basename "$logs")"
cat "$OUT/perf.md"
