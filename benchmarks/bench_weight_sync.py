"""Weight sync throughput: one push of a stage's trainable weights from a learner into the rollout
workers, through the Ray object store and through the collective weight group (NCCL on GPUs,
gloo on CPU), on this machine. Prints a markdown table and writes weight_sync.json to --out.

The members are the real `Learner` (plain-torch engine, one stage set up) and `RolloutWorker`
classes holding the preset's transformer only (random weights, no text encoders or VAE), in thin
Ray actors of one GPU each when the machine has GPUs. Each push is the calls the two backends of
soar_ray/cluster/weights.py make: object store `export_weights` on the learner, then every
worker's `load_weights`; collective `send_weights` on the learner and every worker's
`receive_weights`. `learner_s` is how long the learner is held, `push_s` until every worker holds
the weights. Every worker's weights are zeroed before the first push and compared with the
learner's after the last one.

    python benchmarks/bench_weight_sync.py --preset tiny                      # CPU, gloo
    python benchmarks/bench_weight_sync.py --preset sd35-medium --out DIR     # 1 + 2 GPUs, NCCL
    python benchmarks/bench_weight_sync.py --preset sd35-medium --lora-rank 64 --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

# Ray binds to 127.0.0.1 only (Linux replaces loopback by the host's address unless this is 0).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
import torch  # noqa: E402

from soar_ray.build import build_learner, build_sd3  # noqa: E402
from soar_ray.config import JobConfig, load_job  # noqa: E402
from soar_ray.models import trainable_parameters  # noqa: E402
from soar_ray.workers.learner import Learner  # noqa: E402
from soar_ray.workers.rollout import RolloutWorker  # noqa: E402


@ray.remote
class Member:
    """Learner rank 0 or rollout worker `index` on the preset's transformer, stage 0 set up."""

    def __init__(self, job: JobConfig, index: int | None) -> None:
        device = "cuda" if job.cluster.gpus_per_learner > 0 else "cpu"
        model = build_sd3(job, device, components=("transformer",))
        if index is None:
            self.member = build_learner(job, model, distributed=False)
            self.member.setup_stage(0)
        else:
            self.member = RolloutWorker(job, model, seed=index, index=index)
            self.member.set_stage(0)

    def call(self, method, *args: Any, **kwargs: Any) -> Any:
        return method(self.member, *args, **kwargs)


def checksums(member: Learner | RolloutWorker) -> dict[str, float]:
    """Sum of every trainable weight, in float64: equal on both sides when the push arrived."""
    names = member.trainable if isinstance(member, RolloutWorker) else None
    params = dict(member.model.transformer.named_parameters())
    if names is None:
        names = [name for name, _ in trainable_parameters(member.model.transformer)]
    return {name: float(params[name].detach().double().sum()) for name in names}


def zero_trainable(worker: RolloutWorker) -> None:
    params = dict(worker.model.transformer.named_parameters())
    with torch.no_grad():
        for name in worker.trainable:
            params[name].zero_()


def timed(refs_learner: ray.ObjectRef, refs_workers: list[ray.ObjectRef],
          start: float) -> tuple[float, float]:  # fmt: skip
    """(seconds until the learner's call returned, seconds until every call returned)."""
    ray.get(refs_learner)
    learner_s = time.perf_counter() - start
    ray.get(refs_workers)
    return learner_s, time.perf_counter() - start


def push_object_store(learner, workers, version: int) -> tuple[float, float]:
    start = time.perf_counter()
    weights = learner.call.remote(Learner.export_weights)
    ray.wait([weights])  # the sync's `first`: the export exists before the workers ask for it
    loads = [w.call.remote(RolloutWorker.load_weights, weights, version) for w in workers]
    return timed(weights, loads, start)


def push_collective(learner, workers, version: int) -> tuple[float, float]:
    start = time.perf_counter()
    send = learner.call.remote(Learner.send_weights)
    receives = [w.call.remote(RolloutWorker.receive_weights, version) for w in workers]
    return timed(send, receives, start)


def join_group(learner, workers, timeout_s: float) -> float:
    """The weight group of the learner and every worker on 127.0.0.1 (one host); its seconds."""
    start = time.perf_counter()
    host, size = "127.0.0.1", 1 + len(workers)
    port = ray.get(learner.call.remote(Learner.listen_weight_group, host))
    binds = [host] * size
    ray.get([learner.call.remote(Learner.join_weight_group, host, port, size, host, timeout_s,
                                 timeout_s),
             *(w.call.remote(RolloutWorker.join_weight_group, host, port, size, binds, timeout_s,
                             timeout_s) for w in workers)])  # fmt: skip
    return time.perf_counter() - start


def bench(args: argparse.Namespace, job: JobConfig, gpus: int) -> list[dict]:
    options = {"num_gpus": 1 if gpus else 0, "num_cpus": 0.5}  # 3 members fit 2 cores
    learner = Member.options(**options).remote(job, None)
    workers = [Member.options(**options).remote(job, i) for i in range(args.num_workers)]
    expected = ray.get(learner.call.remote(checksums))
    num_bytes = ray.get(learner.call.remote(lambda m: sum(p.nbytes for p in m.params)))
    setup_s = join_group(learner, workers, timeout_s=600)
    results = []
    for backend, push in (("object_store", push_object_store), ("collective", push_collective)):
        ray.get([w.call.remote(zero_trainable) for w in workers])
        times = [push(learner, workers, version) for version in range(args.warmup + args.repeats)]
        held = ray.get([w.call.remote(checksums) for w in workers])
        assert all(h == expected for h in held), f"{backend}: a worker's weights differ"
        learner_s = statistics.median(t[0] for t in times[args.warmup :])
        push_s = statistics.median(t[1] for t in times[args.warmup :])
        results.append({
            "backend": backend, "mb": num_bytes / 1e6, "push_s": push_s, "learner_s": learner_s,
            "gb_per_s": num_bytes / 1e9 / push_s, "workers": args.num_workers,
            "repeats": [t[1] for t in times[args.warmup :]],
            **({"group_setup_s": setup_s} if backend == "collective" else {}),
        })  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "sd35-medium", "sd35-large"])
    parser.add_argument("--num-workers", type=int, default=None,
                        help="rollout workers (2 on CPU, else min(2, GPUs - 1))")  # fmt: skip
    parser.add_argument("--lora-rank", type=int, default=0, help="> 0: push LoRA adapters only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    if args.num_workers is None:
        args.num_workers = min(2, gpus - 1) if gpus else 2
    if args.num_workers < 1 or (gpus and gpus < 1 + args.num_workers):
        parser.error(f"a learner and {max(args.num_workers, 1)} rollout workers need "
                     f"{1 + max(args.num_workers, 1)} GPUs (one each: NCCL takes one rank per "
                     f"GPU); this machine has {gpus}")  # fmt: skip
    if not gpus and args.preset != "tiny":
        print(f"soar-ray: no GPU: {args.preset} weights move through gloo on this CPU (slow)")
    stage = "{algorithm: soar"
    if args.lora_rank:
        stage += f", lora: {{enabled: true, r: {args.lora_rank}, alpha: {args.lora_rank}}}"
    job = load_job("jobs/tiny.yaml", [
        f"model.preset={args.preset}", f"stages=[{stage}}}]", "deepspeed.enabled=false",
        "cluster.num_learners=1", f"cluster.gpus_per_learner={1 if gpus else 0}",
        f"deepspeed.precision={'bf16' if gpus else 'fp32'}",
    ])  # fmt: skip
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
    results = bench(args, job, gpus)
    device = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else "CPU"
    what = f"LoRA r={args.lora_rank}" if args.lora_rank else "full"
    print(f"# weight sync, {datetime.date.today()}, {device}, {args.preset} {what}, "
          f"{args.num_workers} rollout workers, torch {torch.__version__}")  # fmt: skip
    print("| backend | MB | seconds | GB/s | learner held s |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r['mb']:.3f} | {r['push_s']:.4f} | {r['gb_per_s']:.3f} | "
              f"{r['learner_s']:.4f} |")  # fmt: skip
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_weight_sync_"))
    out.mkdir(parents=True, exist_ok=True)
    record = {"date": str(datetime.date.today()), "device": device, "preset": args.preset,
              "lora_rank": args.lora_rank, "torch": torch.__version__,
              "results": results}  # fmt: skip
    (out / "weight_sync.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out / 'weight_sync.json'}")


if __name__ == "__main__":
    main()
