"""The reward pool (DESIGN.md, Topology): per reward model K stateless scoring actors.

    pool = RewardPool.for_job(job, topology)
    handle = pool.submit(images, prompts, metadata, weights)  # at once; the actors score meanwhile
    ...                                                       # sample the next batch
    out = handle.result()                                     # out.scores: the weighted total

Actors are named `reward-<name>-<i>` (dashboard), use `cluster.reward_actors.<name>` resources
(in the job's placement group when given its topology), restart up to `cluster.max_actor_restarts`
times, and a call in flight on an actor that dies is run again after the restart
(`cluster.max_task_retries`), so a lost actor loses no batch. A batch is cut into chunks of
`rewards.<name>.batch_size` spread round-robin over the reward's actors. Images travel as uint8
arrays through the object store: a list is put once per chunk and shared by every reward that
scores the chunk; an object ref of a uint8 array [N, H, W, 3] (a rollout worker's output) goes to
the actors as it is, each slicing its chunk, so the images never pass through the driver and
scoring starts as soon as they exist. Gauges `soar_ray_reward_<name>_{mean,std,latency_seconds}`
go to the Ray metrics endpoint.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.metrics import Gauge

from rewards.base import ImageLike, check_batch, to_uint8
from soar_ray.cluster.groups import kill_actors, placement
from soar_ray.cluster.placement import Topology, reward_resources
from soar_ray.config import ClusterConfig, JobConfig, RewardActorsConfig, RewardConfig
from soar_ray.metrics import ray_report_interval_s
from soar_ray.workers.scorer import Metadata, RewardScoreError, RewardScorer, ScoredChunk

GAUGE_HELP = {
    "mean": "mean score of the last collected batch",
    "std": "standard deviation of the scores of the last collected batch",
    "latency_seconds": "seconds the slowest scoring call of the last batch took",
}
GAUGE_STATS = tuple(GAUGE_HELP)
_GAUGES: dict[str, Gauge] = {}


@ray.remote
class RewardActor:
    """One reward model in its own process; a thin wrapper of RewardScorer."""

    def __init__(self, name: str, config: RewardConfig) -> None:
        self.scorer = RewardScorer(name, config)

    def score(
        self,
        images: list[np.ndarray] | np.ndarray,
        prompts: list[str],
        metadata: list[Any],
        window: tuple[int, int] | None = None,
    ) -> ScoredChunk:
        """Score `images`, or `images[start:stop]` for a `window` (start, stop)."""
        if window is not None:
            images = list(images[window[0] : window[1]])
        return self.scorer.score(images, prompts, metadata)

    def pid(self) -> int:
        """The actor's process id; it changes when Ray restarts the actor."""
        return os.getpid()


@dataclass(frozen=True)
class PoolOutput:
    """Scores of one submitted batch of N images."""

    scores: np.ndarray
    """Weighted total sum_k weight_k * score_k [N] (SPEC §3); NaN where a sample was dropped."""
    components: dict[str, np.ndarray]
    """Every reward's scores under its name and every reward's own components, each [N]."""
    dropped: dict[str, np.ndarray]
    """Reward name -> indices of the samples it dropped (`on_bad_score: drop`)."""
    seconds: dict[str, float]
    """Reward name -> seconds its slowest scoring call took."""

    @property
    def kept(self) -> np.ndarray:
        """Mask [N] of the samples no reward dropped."""
        kept = np.ones(len(self.scores), dtype=bool)
        for indices in self.dropped.values():
            kept[indices] = False
        return kept

    @property
    def num_dropped(self) -> int:
        """Samples dropped by at least one reward."""
        return int((~self.kept).sum())


@dataclass(frozen=True)
class ScoringCall:
    """One scoring call in flight: images [start, stop) of the batch scored by `reward`."""

    reward: str
    actor: int
    """Index of the reward's actor that runs the call."""
    start: int
    stop: int
    ref: ray.ObjectRef


def gauge_name(reward: str, stat: str) -> str:
    """`soar_ray_reward_<name>_<stat>`, with characters Prometheus refuses replaced by `_`."""
    return f"soar_ray_reward_{re.sub(r'[^A-Za-z0-9_]', '_', reward)}_{stat}"


def _gauge(name: str, description: str) -> Gauge:
    """The process-wide gauge `name` (several pools in one process share it)."""
    if name not in _GAUGES:
        _GAUGES[name] = Gauge(name, description=description)
    return _GAUGES[name]


class RewardGauges:
    """Ray metrics gauges per reward: mean and std of a batch's kept scores, scoring latency.

    Ray's agent forgets a gauge not set for two report intervals, and a GRPO epoch is often
    longer, so a thread sets the latest values again every half interval until `close()`.
    """

    def __init__(self, rewards: Sequence[str], refresh_s: float | None = None) -> None:
        self.gauges = {
            reward: {
                stat: _gauge(gauge_name(reward, stat), f"{reward}: {GAUGE_HELP[stat]}")
                for stat in GAUGE_STATS
            }
            for reward in rewards
        }
        self._latest: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        period_s = refresh_s if refresh_s is not None else ray_report_interval_s() / 2
        self._thread = threading.Thread(target=self._keep_alive, args=(period_s,), daemon=True,
                                        name="soar-ray-reward-gauges")  # fmt: skip
        self._thread.start()

    def record(self, reward: str, scores: np.ndarray, seconds: float) -> None:
        """Set the reward's gauges from the scores of its kept samples."""
        with self._lock:
            if scores.size:
                self._latest[reward, "mean"] = float(scores.mean())
                self._latest[reward, "std"] = float(scores.std())
            self._latest[reward, "latency_seconds"] = seconds
            self._set_all()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _set_all(self) -> None:
        for (reward, stat), value in self._latest.items():
            self.gauges[reward][stat].set(value)

    def _keep_alive(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            with self._lock:
                self._set_all()


def combine(
    weights: Mapping[str, float],
    num_samples: int,
    calls: Sequence[ScoringCall],
    scored: Sequence[ScoredChunk],
) -> PoolOutput:
    """Reassemble every reward's scoring calls into the weighted total and all components."""
    per_reward = {name: np.full(num_samples, np.nan) for name in weights}
    own: dict[tuple[str, str], np.ndarray] = {}
    dropped: dict[str, list[np.ndarray]] = {name: [] for name in weights}
    seconds = dict.fromkeys(weights, 0.0)
    for call, out in zip(calls, scored):
        per_reward[call.reward][call.start : call.stop] = out.scores
        for key, values in out.components.items():
            column = own.setdefault((call.reward, key), np.full(num_samples, np.nan))
            column[call.start : call.stop] = values
        dropped[call.reward].append(out.dropped + call.start)
        seconds[call.reward] = max(seconds[call.reward], out.seconds)
    components = dict(per_reward)
    for (reward, key), values in own.items():
        if key in components:
            raise ValueError(f"reward {reward!r}: component name {key!r} is used twice")
        components[key] = values
    total = sum(weight * per_reward[name] for name, weight in weights.items())
    indices = {name: np.concatenate(parts).astype(np.int64) for name, parts in dropped.items()}
    return PoolOutput(np.asarray(total, dtype=np.float64), components, indices, seconds)


def merge_outputs(outputs: list[PoolOutput]) -> PoolOutput:
    """One PoolOutput of consecutive batches."""
    offsets = np.cumsum([0] + [len(o.scores) for o in outputs])
    names = outputs[0].components
    return PoolOutput(
        np.concatenate([o.scores for o in outputs]),
        {k: np.concatenate([o.components[k] for o in outputs]) for k in names},
        {k: np.concatenate([o.dropped[k] + off for o, off in zip(outputs, offsets)])
         for k in outputs[0].dropped},
        {k: sum(o.seconds[k] for o in outputs) for k in outputs[0].seconds},
    )  # fmt: skip


class RewardHandle:
    """Scores in flight for one batch; `result()` waits for them."""

    def __init__(self, pool: RewardPool, weights: Mapping[str, float], num_samples: int,
                 calls: list[ScoringCall]) -> None:  # fmt: skip
        self._pool, self.weights, self._num_samples, self.calls = pool, weights, num_samples, calls
        self._output: PoolOutput | None = None

    def done(self) -> bool:
        """True when every scoring call of the batch has finished (never blocks)."""
        refs = [call.ref for call in self.calls]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return len(ready) == len(refs)

    def result(self, timeout: float | None = None) -> PoolOutput:
        """The batch's scores; waits up to `timeout` s (default `cluster.call_timeout_s`)."""
        if self._output is None:
            timeout = self._pool.timeout_s if timeout is None else timeout
            try:
                scored = ray.get([call.ref for call in self.calls], timeout=timeout)
            except RayTaskError as exc:
                if isinstance(exc.cause, RewardScoreError):
                    raise exc.cause from None  # its message names the reward and the prompt
                raise
            output = combine(self.weights, self._num_samples, self.calls, scored)
            kept = output.kept
            for name in self.weights:
                scores = output.components[name][kept]
                self._pool.gauges.record(name, scores, output.seconds[name])
            self._output = output
        return self._output


class RewardPool:
    """Per reward name K scoring actors; `submit` spreads a batch over them asynchronously."""

    def __init__(
        self,
        weights: Mapping[str, float],
        configs: Mapping[str, RewardConfig],
        cluster: ClusterConfig,
        actor_prefix: str = "reward",
        topology: Topology | None = None,
    ) -> None:
        """Every reward in `weights` gets actors; `weights` are also the default of `submit`.
        Actors are named `<actor_prefix>-<reward>-<i>`; two pools alive at once in one Ray
        namespace need different prefixes. With a `topology`, actor i of reward r runs in the
        bundle `topology.reward_bundles[r][i]` of the job's placement group."""
        if not weights:
            raise ValueError("RewardPool: weights must name at least one reward")
        self.weights = {name: float(weight) for name, weight in weights.items()}
        self.configs = {name: configs.get(name, RewardConfig()) for name in self.weights}
        self.timeout_s = cluster.call_timeout_s
        self.actors = {
            name: self._start_actors(name, cluster, actor_prefix, topology) for name in self.weights
        }
        self._turn = dict.fromkeys(self.weights, 0)
        self.gauges = RewardGauges(list(self.weights))
        self._wait_ready(cluster.start_timeout_s)

    @classmethod
    def for_job(cls, job: JobConfig, topology: Topology | None = None) -> RewardPool | None:
        """The job's pool: actors for every reward its GRPO stages train on or evaluate with
        (`job.reward_names`); None for a job without rewards. Stages pass their weights."""
        if not job.reward_names:
            return None
        return cls(dict.fromkeys(job.reward_names, 1.0), job.rewards, job.cluster,
                   topology=topology)  # fmt: skip

    def _start_actors(
        self, name: str, cluster: ClusterConfig, prefix: str, topology: Topology | None
    ) -> list[ray.actor.ActorHandle]:
        spec = cluster.reward_actors.get(name, RewardActorsConfig())
        options = {
            "max_restarts": cluster.max_actor_restarts,
            "max_task_retries": cluster.max_task_retries,
        }
        actors = []
        for i in range(spec.num_actors):
            actor_name = f"{prefix}-{name}-{i}"
            if topology is not None:
                bundle = topology.reward_bundles[name][i]
                where = placement(topology, bundle, reward_resources(cluster, name), actor_name)
            else:
                where = {"name": actor_name, "num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus}
            actors.append(RewardActor.options(**where, **options).remote(name, self.configs[name]))
        return actors

    def _wait_ready(self, timeout_s: float) -> None:
        """Wait until every actor has loaded its model; a load error names the reward."""
        for name, actors in self.actors.items():
            try:
                ray.get([actor.pid.remote() for actor in actors], timeout=timeout_s)
            except GetTimeoutError:
                self.shutdown()
                raise TimeoutError(
                    f"cluster.start_timeout_s: the actors of reward {name!r} did not start "
                    f"within {timeout_s:g} s; check cluster.reward_actors.{name} resources"
                ) from None
            except RayActorError as exc:
                self.shutdown()
                # A failed model load ends in its own "Type: message" line; the rest is traceback.
                reason = str(exc).strip().splitlines()[-1] if exc.actor_init_failed else str(exc)
                raise RuntimeError(
                    f"reward {name!r}: a scoring actor failed to start: {reason}"
                ) from exc

    def submit(
        self,
        images: Sequence[ImageLike] | ray.ObjectRef,
        prompts: Sequence[str],
        metadata: Metadata = None,
        weights: Mapping[str, float] | None = None,
    ) -> RewardHandle:
        """Start scoring a batch on the actors of every reward in `weights` (default: the pool's
        weights); returns at once. `images`: images, or a ref of a uint8 array [N, H, W, 3]."""
        weights = self.weights if weights is None else {k: float(v) for k, v in weights.items()}
        unknown = sorted(set(weights) - set(self.actors))
        if unknown:
            raise ValueError(f"RewardPool.submit: no actors for rewards {unknown}")
        by_ref = isinstance(images, ray.ObjectRef)
        num = len(prompts) if by_ref else len(images)
        rows = check_batch("reward pool", range(num) if by_ref else images, prompts, metadata)
        if num == 0:
            raise ValueError("RewardPool.submit: no images")
        arrays = None if by_ref else [to_uint8(image) for image in images]
        puts: dict[tuple[int, int], ray.ObjectRef] = {}
        calls = []
        for name in weights:
            actors, batch_size = self.actors[name], self.configs[name].batch_size
            for start in range(0, num, batch_size):
                stop = min(start + batch_size, num)
                if by_ref:
                    args = (images, list(prompts[start:stop]), rows[start:stop], (start, stop))
                else:
                    if (start, stop) not in puts:
                        puts[start, stop] = ray.put(arrays[start:stop])
                    args = (puts[start, stop], list(prompts[start:stop]), rows[start:stop])
                index = self._turn[name] % len(actors)
                self._turn[name] += 1
                calls.append(ScoringCall(name, index, start, stop,
                                         actors[index].score.remote(*args)))  # fmt: skip
        return RewardHandle(self, weights, num, calls)

    def shutdown(self) -> None:
        """Kill every actor (no restart), waiting until their names are free, and stop refreshing
        the gauges."""
        self.gauges.close()
        kill_actors([actor for actors in self.actors.values() for actor in actors])

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
