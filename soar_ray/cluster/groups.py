"""Actor groups with rank wiring: the learner group and the rollout pool, placed in the job's
placement group and named by role (`learner-0`, `rollout-1`, ...) for the dashboard.

Both offer the same few generic calls over a worker method (`Learner.train`,
`RolloutWorker.load_weights`, ...): `submit` returns object refs at once, so the driver can keep
sampling while the learners train; `call` waits for the results.

Rollout workers are restartable: a call lost with its worker runs again on the restored worker
(`RolloutPool`).

Learner liveness: every learner call is timed per method; once a method has 3 timings, waiting
for it is bounded by max(`cluster.stall_timeout_s`, 10 x its median), at most
`cluster.call_timeout_s`. A learner past that bound, or one that died, stops the run with
`LearnerFailed` naming the learner (its actor name on the dashboard), its process and node. A
learner lost with its node takes its peers' collectives down first (they fail on the closed
connection a moment before Ray reports the loss): a failed call therefore probes every learner,
and names all that are dead or unreachable rather than a survivor's error.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import cycle
from typing import Any

import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    ObjectLostError,
    RayActorError,
    RayTaskError,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from soar_ray.cluster.actors import LearnerActor, RolloutActor, Step
from soar_ray.cluster.placement import Topology, learner_resources, rollout_resources
from soar_ray.config import JobConfig
from soar_ray.errors import LearnerFailed, RunStopped, WorkerRestarted

Method = Callable[..., Any]
STALL_FACTOR = 10
"""A learner call slower than this many times its method's median is stalled (at least
`cluster.stall_timeout_s`)."""
TIMED_CALLS = 3
"""Timings of a method before its calls get a deadline from them."""
LOSS_PROBE_S = 10.0
"""Seconds a failed learner call waits for every learner to answer a probe: a dead or unreachable
one answers with an error, a busy one (held in a collective by the failed rank) late, as alive."""
KILL_WAIT_S = 60.0
RESTART_POLL_S = 0.2
"""Seconds between asks whether Ray has restarted a lost rollout worker."""


def kill_actors(actors: Sequence[ray.actor.ActorHandle]) -> None:
    """Kill the actors and wait until they are gone: a name is free again only once its actor
    is dead, and a run that restarts creates actors of the same names at once."""
    for actor in actors:
        ray.kill(actor)
    deadline = time.monotonic() + KILL_WAIT_S
    for actor in actors:
        while time.monotonic() < deadline:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=1.0)
            except RayActorError:
                break
            except GetTimeoutError:
                continue
            time.sleep(0.05)


def placement(topology: Topology, bundle: int, resources: dict[str, float], name: str) -> dict:
    """Actor options that pin it to `bundle` of the job's placement group under `name`."""
    return {
        "name": name,
        "num_cpus": resources.get("CPU", 0.0),
        "num_gpus": resources.get("GPU", 0.0),
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=topology.group, placement_group_bundle_index=bundle
        ),
    }


class LearnerGroup:
    """N learner actors forming one torch.distributed group; calls go to every rank."""

    def __init__(self, job: JobConfig, topology: Topology) -> None:
        cluster = job.cluster
        self.world_size = cluster.num_learners
        resources = learner_resources(cluster)
        self.actors = [
            LearnerActor.options(**placement(topology, bundle, resources, f"learner-{rank}"))
            .remote(job, rank, self.world_size)
            for rank, bundle in enumerate(topology.learner_bundles)
        ]  # fmt: skip
        self.timeout_s, self.stall_timeout_s = cluster.call_timeout_s, cluster.stall_timeout_s
        self._timings: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=50))
        self._started: dict[ray.ObjectRef, tuple[str, float, int]] = {}  # method, start, rank
        try:
            nodes = ray.get([actor.node.remote() for actor in self.actors],
                            timeout=cluster.start_timeout_s)  # fmt: skip
            self.nodes: list[tuple[str, str, int]] = nodes
            """(Ray node id, node address, process id) of each rank."""
            self.where = [f"learner-{rank} (pid {pid} on {address})"
                          for rank, (_, address, pid) in enumerate(nodes)]  # fmt: skip
            # Rank 0 serves the rendezvous store, on loopback when every learner shares its node,
            # else on its node's address: never on all interfaces.
            host = "127.0.0.1" if len({node_id for node_id, *_ in nodes}) == 1 else nodes[0][1]
            port = ray.get(self.actors[0].listen.remote(host), timeout=cluster.start_timeout_s)
            self.rendezvous = (host, port)  # where rank 0's store listens
            ray.get([a.init_process_group.remote(host, port) for a in self.actors],
                    timeout=cluster.start_timeout_s)  # fmt: skip
        except BaseException:
            self.kill()  # a half-formed group holds its bundles for nothing
            raise

    def submit(self, method: Method, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """`method(learner, *args)` on every rank; refs at once (collectives need every rank)."""
        return self._timed(method, [actor.call.remote(method, *args, **kwargs)
                                    for actor in self.actors])  # fmt: skip

    def scatter(self, method: Method, per_rank: Sequence[tuple]) -> list[ray.ObjectRef]:
        """`method(learner, *per_rank[r])` on rank r; refs at once. Object refs among the
        arguments arrive resolved, so each rank fetches only its own shard."""
        if len(per_rank) != self.world_size:
            raise ValueError(f"{len(per_rank)} shards for {self.world_size} learners")
        return self._timed(method, [actor.call.remote(method, *args)
                                    for actor, args in zip(self.actors, per_rank)])  # fmt: skip

    def _timed(self, method: Method, refs: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
        started = (method.__qualname__, time.monotonic())
        self._started.update({ref: (*started, rank) for rank, ref in enumerate(refs)})
        return refs

    def call(self, method: Method, *args: Any, **kwargs: Any) -> list[Any]:
        """Every rank's result of `method(learner, *args)`, waited for."""
        return self.get(self.submit(method, *args, **kwargs))

    def first(self, method: Method, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        """Rank 0's result as a ref, once every rank is done (ZeRO-3 gathers are collective)."""
        refs = self.submit(method, *args, **kwargs)
        self.get(refs[1:])
        self._started.pop(refs[0])
        return refs[0]

    def get(self, refs: Sequence[ray.ObjectRef]) -> list[Any]:
        """The results of learner calls (refs from `submit` or `scatter`), waited for no longer
        than the method's deadline. A learner's `RunStopped` (one line saying what to do) is
        raised as itself, without the remote traceback around it; a learner that died or is past
        the deadline raises `LearnerFailed` naming it."""
        refs = list(refs)
        if not refs:
            return []
        method, start, _ = self._started[refs[0]]
        ranks = {ref: self._started.pop(ref)[2] for ref in refs}
        limit, pending = self.deadline(method), refs
        while pending:  # one at a time: a dead learner is reported while the others wait on it
            ready, pending = ray.wait(pending, num_returns=1,
                                      timeout=max(0.0, start + limit - time.monotonic()))  # fmt: skip
            if not ready:
                late = ", ".join(self.where[ranks[ref]] for ref in pending)
                raise LearnerFailed(
                    f"{late}: no answer to {method} after {time.monotonic() - start:.0f} s (the "
                    f"limit is max(cluster.stall_timeout_s {self.stall_timeout_s:g} s, "
                    f"{STALL_FACTOR} x the median of its earlier calls), at most "
                    f"cluster.call_timeout_s {self.timeout_s:g} s): a stopped or hung process, a "
                    "stuck collective or a lost GPU; the run stops"
                )
            self._raise_failure(ready[0], ranks[ready[0]], method)
        now = time.monotonic()
        self._timings[method].append(now - start)
        # Calls still out were queued behind these (a driver submits the next step's call
        # before it collects this one): each actor runs one call at a time, so theirs start now.
        self._started = {ref: (name, max(t, now), rank)
                         for ref, (name, t, rank) in self._started.items()}  # fmt: skip
        return ray.get(refs)

    def _raise_failure(self, ref: ray.ObjectRef, rank: int, method: str) -> None:
        """Raise what rank `rank`'s finished call failed with: a learner's `RunStopped` as itself;
        `LearnerFailed` naming every learner that is dead or unreachable (`lost`) when there is
        one, the rank's own error then only following from it; anything else as Ray raises it."""
        try:
            ray.get(ref)
            return
        except RayTaskError as exc:
            if isinstance(exc.cause, RunStopped):
                raise exc.cause from None
            lost = self.lost()
            if not lost:
                raise
            followed = f"learner-{rank}'s {type(exc.cause).__name__}"
        except RayActorError as exc:
            lost = {**self.lost(), rank: type(exc).__name__}
            followed = None
        ranks = sorted(lost)
        who = " and ".join(self.where[r] for r in ranks)
        why = ", ".join(sorted(set(lost.values())))
        them = "it" if len(ranks) == 1 else "them"
        raise LearnerFailed(
            f"{who} died during {method} ({why}: the process or its node is gone); the learners "
            f"cannot go on without {them} and the run stops"
            + (f" ({followed} followed from {them})" if followed else "")
        ) from None

    def lost(self, timeout_s: float = LOSS_PROBE_S) -> dict[int, str]:
        """Rank -> Ray's error for every learner that is dead or unreachable: its probe fails
        within `timeout_s`. A learner busy for longer counts as alive."""
        probes = [actor.__ray_ready__.remote() for actor in self.actors]
        ray.wait(probes, num_returns=len(probes), timeout=timeout_s)
        lost = {}
        for rank, probe in enumerate(probes):
            try:
                ray.get(probe, timeout=0)
            except RayActorError as exc:
                lost[rank] = type(exc).__name__
            except GetTimeoutError:
                continue  # busy, not lost
        return lost

    def deadline(self, method: str) -> float:
        """Seconds a call of `method` may take: `call_timeout_s` until it has been timed
        `TIMED_CALLS` times, then max(stall_timeout_s, STALL_FACTOR x its median), capped."""
        timings = self._timings[method]
        if len(timings) < TIMED_CALLS:
            return self.timeout_s
        stalled = max(self.stall_timeout_s, STALL_FACTOR * statistics.median(timings))
        return min(self.timeout_s, stalled)

    def kill(self) -> None:
        kill_actors(self.actors)


@dataclass(eq=False)
class RolloutCall:
    """One call on a rollout worker, remembered so it can run again: `method(worker, *args,
    **kwargs)` on actor `actor`; `refs` holds one ref per returned item."""

    method: Method
    args: tuple
    kwargs: dict[str, Any]
    num_returns: int
    actor: int
    refs: list[ray.ObjectRef] = field(default_factory=list)
    retries: int = 0
    sets_state: bool = False
    """A broadcast that sets the worker's state (stage, weights): the restore redoes it."""


class RolloutPool:
    """M rollout actors holding inference copies; `submit` spreads work round-robin. Actors are
    named `<prefix>-<i>` (dashboard); two pools alive at once need different prefixes.

    A rollout worker that dies is restarted by Ray (`cluster.max_actor_restarts`) and comes back
    with `model.pretrained`. Every consumer of results waits through `finished`: a call that
    failed because its worker died, was unreachable or restarted waits for the restart (at most
    `cluster.start_timeout_s`), restores the worker with `restore_steps()` (its owner's current
    stage and weights), and runs again, at most `cluster.max_task_retries` times; then the run
    stops naming the worker. An exception the worker code raised stops the run as it is. A rerun
    is not bitwise the lost call: the restarted worker's random stream starts afresh.
    """

    def __init__(self, job: JobConfig, topology: Topology, prefix: str = "rollout") -> None:
        cluster = job.cluster
        resources = rollout_resources(cluster)
        self.names = [f"{prefix}-{index}" for index in range(len(topology.rollout_bundles))]
        self.actors = [
            RolloutActor.options(
                **placement(topology, bundle, resources, self.names[index]),
                max_restarts=cluster.max_actor_restarts,
            ).remote(job, index)  # fmt: skip
            for index, bundle in enumerate(topology.rollout_bundles)
        ]
        self.timeout_s, self.start_timeout_s = cluster.call_timeout_s, cluster.start_timeout_s
        self.max_retries = cluster.max_task_retries
        self.restore_steps: Callable[[], list[Step]] = list
        """What gives a restarted worker the state the others hold; the pool's owner sets it."""
        self.replaced: Callable[[int], None] = lambda index: None
        """Told the index of a worker a restore has just replaced (the pool's owner sets it)."""
        self._turn = cycle(range(len(self.actors)))

    def __len__(self) -> int:
        return len(self.actors)

    def submit(self, method: Method, *args: Any, num_returns: int = 1,
               **kwargs: Any) -> RolloutCall:  # fmt: skip
        """`method(worker, *args, **kwargs)` on the next worker in turn, started at once; its
        results are `finished` (or `get`) away. Keep the last returned item small: waiting
        fetches it to see whether the call failed."""
        call = RolloutCall(method, args, kwargs, num_returns, next(self._turn))
        return self._send(call)

    def broadcast(self, method: Method, *args: Any) -> list[RolloutCall]:
        """`method(worker, *args)` setting every worker's state (stage, weights), which
        `restore_steps` must then give a restarted worker too. Calls on one actor run in
        submission order, so work submitted after a broadcast sees its effect."""
        return [self._send(RolloutCall(method, args, {}, 1, index, sets_state=True))
                for index in range(len(self.actors))]  # fmt: skip

    def call(self, method: Method, *args: Any) -> None:
        """`broadcast`, waited for."""
        self.wait(self.broadcast(method, *args))

    def wait(self, calls: Sequence[RolloutCall]) -> None:
        """Wait until every call has finished (rerun where its worker was lost)."""
        for _ in self.finished(calls):
            pass

    def get(self, call: RolloutCall) -> Any:
        """The results of one call (a list when it has several), waited for."""
        self.wait([call])
        values = ray.get(call.refs)
        return values[0] if call.num_returns == 1 else values

    def finished(self, calls: Sequence[RolloutCall]) -> Iterator[RolloutCall]:
        """Each call once its results exist, in the order they finish; a call lost with its
        worker is rerun first, so `call.refs` are then results that exist."""
        pending = {call.refs[-1]: call for call in calls}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.timeout_s)
            if not ready:
                raise TimeoutError(f"cluster.call_timeout_s: no rollout call finished within "
                                   f"{self.timeout_s:g} s")  # fmt: skip
            call = pending.pop(ready[0])
            lost = self._lost(call)
            if lost is None:
                yield call
                continue
            self._rerun(call, lost)
            pending[call.refs[-1]] = call

    def _lost(self, call: RolloutCall) -> str | None:
        """Why a finished call was lost with its worker (None if it was not); raises what the
        worker code itself raised."""
        try:
            ray.get(call.refs[-1])
        except RayTaskError as exc:
            if isinstance(exc.cause, WorkerRestarted):
                return "the worker had restarted"
            raise
        except (RayActorError, ObjectLostError) as exc:
            return type(exc).__name__
        return None

    def _rerun(self, call: RolloutCall, reason: str) -> None:
        """Restore the call's worker once Ray has restarted it, and send the call again (a
        state-setting call is redone by the restore itself)."""
        name, what = self.names[call.actor], call.method.__qualname__
        while True:
            call.retries += 1
            if call.retries > self.max_retries:
                raise RunStopped(
                    f"{name} was lost during {what} ({reason}) and its call has been retried "
                    f"cluster.max_task_retries = {self.max_retries} times (Ray restarts a worker "
                    "at most cluster.max_actor_restarts times); see why the worker dies in its "
                    "log (Actors page of the dashboard), then resume with checkpoint.resume: auto"
                )
            print(f"soar-ray: {name} was lost during {what} ({reason}): restoring it and "
                  f"running the call again (retry {call.retries} of {self.max_retries})",
                  flush=True)  # fmt: skip
            try:
                restore = self._restore(call.actor, f"it was lost during {what}")
            except ActorDiedError:  # lost again before it was restored, or no restart left
                reason = "ActorDiedError"
                continue
            if call.sets_state:
                call.refs = [restore]  # the restore's result stands for the call's
            else:
                self._send(call)
            return

    def _restore(self, index: int, why: str) -> ray.ObjectRef:
        """The ref of a finished `restore` of worker `index`, once Ray has restarted it (at
        most `cluster.start_timeout_s`)."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            restore = self.actors[index].restore.remote(self.restore_steps())
            try:
                if ray.get(restore, timeout=max(0.0, deadline - time.monotonic())):
                    self.replaced(index)
                return restore
            except ActorUnavailableError:  # Ray has not noticed the death yet: ask again
                if time.monotonic() < deadline:
                    time.sleep(RESTART_POLL_S)
                    continue
            except GetTimeoutError:
                pass
            raise RunStopped(
                f"{self.names[index]} did not come back within cluster.start_timeout_s = "
                f"{self.start_timeout_s:g} s after {why}; resume with checkpoint.resume: auto"
            )

    def nodes(self, timeout_s: float) -> list[tuple[str, str]]:
        """(Ray node id, node address) of each worker, asked now (a restart may move one); the
        answer waits for the calls queued before it, at most `timeout_s`."""
        return ray.get([actor.node.remote() for actor in self.actors], timeout=timeout_s)

    def _send(self, call: RolloutCall) -> RolloutCall:
        remote = self.actors[call.actor].call.options(num_returns=call.num_returns).remote
        refs = remote(call.method, *call.args, **call.kwargs)
        call.refs = [refs] if call.num_returns == 1 else list(refs)
        return call

    def kill(self) -> None:
        kill_actors(self.actors)
