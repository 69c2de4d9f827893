"""Collective weight transfer: learner rank 0 broadcasts flat buckets of weights into the rollout
workers over a process group of their own (NCCL when the weights live on CUDA, gloo on CPU: the
same code), beside the learners' default group, which stays untouched.

The group has 1 + M ranks: learner rank 0 is rank 0, rollout worker i is rank i + 1. Rank 0 serves
a `TCPStore` on a socket it bound to one address (never every interface) and every member builds
its `ProcessGroupGloo` / `ProcessGroupNCCL` straight from that store, so `init_process_group` is
never called a second time.

One push: rank 0 broadcasts a header (JSON: the names, shapes and dtypes it sends, and the bucket
size), then the weights in flat buckets: tensors of one dtype concatenated in header order, at
most `BUCKET_BYTES` a bucket (a larger tensor goes alone). Both sides derive the buckets from the
header with `plan_buckets`. A receiver checks the header against its own trainable parameters;
when they differ it still takes every bucket (so the collective completes for everyone) and then
raises an error naming the first differing parameter. Rank 0 returns once the broadcasts are under
way; it keeps the buckets (`Push`): in flight until the receivers reach them, then the last pushed
weights, which a restored rollout worker gets through the object store.
"""

from __future__ import annotations

import itertools
import json
import math
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from soar_ray.errors import RunStopped, WeightGroupBroken

BUCKET_BYTES = 256 * 2**20
"""Largest flat bucket of one broadcast: few calls, and a bounded extra copy on a receiver."""

Entry = tuple[str, tuple[int, ...], str]
"""(name, shape, dtype name) of one tensor a push sends."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"weight transfer: unknown dtype {name!r} in a push header")
    return dtype


def spec_of(named: list[tuple[str, torch.Tensor]]) -> list[Entry]:
    """The header entries of tensors by name: what a push of them sends."""
    return [(name, tuple(tensor.shape), dtype_name(tensor.dtype)) for name, tensor in named]


@dataclass(frozen=True)
class Bucket:
    """One flat broadcast: the header entries it holds, in order, all of dtype `dtype`."""

    dtype: str
    entries: tuple[int, ...]
    numel: int


def plan_buckets(spec: list[Entry], bucket_bytes: int = BUCKET_BYTES) -> list[Bucket]:
    """Buckets of same-dtype tensors in header order (dtypes in order of first appearance), each
    closed before it would pass `bucket_bytes`; a tensor larger than that gets one of its own."""
    by_dtype: dict[str, list[int]] = {}
    for index, (_, _, dtype) in enumerate(spec):
        by_dtype.setdefault(dtype, []).append(index)
    buckets = []
    for dtype, indices in by_dtype.items():
        itemsize = torch.empty((), dtype=to_dtype(dtype)).element_size()
        entries: list[int] = []
        numel = 0
        for index in indices:
            size = math.prod(spec[index][1])
            if entries and (numel + size) * itemsize > bucket_bytes:
                buckets.append(Bucket(dtype, tuple(entries), numel))
                entries, numel = [], 0
            entries.append(index)
            numel += size
        if entries:
            buckets.append(Bucket(dtype, tuple(entries), numel))
    return buckets


def bucket_views(spec: list[Entry], bucket: Bucket, flat: torch.Tensor):
    """(header index, view of `flat` in that tensor's shape) of each tensor of `bucket`: where it
    lies in the flat bucket, for packing and unpacking alike."""
    offset = 0
    for index in bucket.entries:
        shape = spec[index][1]
        size = math.prod(shape)
        yield index, flat[offset : offset + size].view(shape)
        offset += size


def first_difference(sent: list[Entry], held: list[Entry]) -> str | None:
    """How the first differing entry of two headers differs (None when they are equal)."""
    for index, (a, b) in enumerate(itertools.zip_longest(sent, held)):
        if a == b:
            continue
        if a is None:
            return f"{b[0]}: trained here but not sent ({len(sent)} sent, {len(held)} held)"
        if b is None:
            return f"{a[0]}: sent but not trained here ({len(sent)} sent, {len(held)} held)"
        if a[0] != b[0]:
            return f"{a[0]}: sent as tensor {index}, where this worker trains {b[0]}"
        return f"{a[0]}: sent as {list(a[1])} {a[2]}, held here as {list(b[1])} {b[2]}"
    return None


def encode_header(spec: list[Entry], bucket_bytes: int) -> bytes:
    return json.dumps({"bucket_bytes": bucket_bytes, "spec": spec}).encode()


def decode_header(data: bytes) -> tuple[list[Entry], int]:
    """The entries and bucket size of a header (JSON: received data is never unpickled)."""
    header = json.loads(data)
    spec = [(name, tuple(shape), dtype) for name, shape, dtype in header["spec"]]
    return spec, int(header["bucket_bytes"])


def listen(host: str) -> socket.socket:
    """A socket bound to a free port of `host` (rank 0's store serves on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, 0), family=family)


@dataclass(eq=False)
class Push:
    """What rank 0 sent in one push: the header entries and their flat buckets (the last pushed
    weights), and the broadcasts still in flight."""

    spec: list[Entry]
    plan: list[Bucket]
    buckets: list[torch.Tensor]
    works: list = field(default_factory=list)

    @property
    def num_bytes(self) -> int:
        return sum(bucket.nbytes for bucket in self.buckets)

    def finish(self) -> None:
        """Wait until every receiver has taken its buckets; `WeightGroupBroken` if one could not."""
        works, self.works = self.works, []
        for work in works:
            wait(work, "learner rank 0 could not finish its last weight push")

    def detach(self) -> None:
        """Forget the broadcasts (their group was closed); the buckets stay the last push."""
        self.works = []

    def weights(self) -> dict[str, torch.Tensor]:
        """The pushed tensors by name on CPU, each in storage of its own."""
        out = {}
        for bucket, flat in zip(self.plan, self.buckets, strict=True):
            # Host sync on CUDA: after the packing, not the broadcasts.
            for index, view in bucket_views(self.spec, bucket, flat.cpu()):
                out[self.spec[index][0]] = view.clone()
        return out


def wait(work, what: str) -> None:
    """Wait for one collective; a failure (a member lost, a timeout) is `WeightGroupBroken`."""
    try:
        work.wait()
    except RuntimeError as exc:
        message = f"{what}: {first_line(exc)}"
        # The failed collective holds the group's connections: dropped here (not kept alive by
        # the traceback), they close when the group is closed, so members waiting on this one fail.
        del work
        raise WeightGroupBroken(message) from exc


def first_line(exc: BaseException) -> str:
    """The first line of an error (torch's distributed errors carry more)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class WeightGroup:
    """This process's membership of the weight group: rank 0 sends, the others receive."""

    def __init__(self, group, store: dist.Store, rank: int, size: int,
                 device: torch.device) -> None:  # fmt: skip
        self.group, self.store = group, store
        self.rank, self.size, self.device = rank, size, device

    @classmethod
    def join(cls, host: str, port: int, rank: int, size: int, device: torch.device, *,
             bind: str, timeout_s: float, op_timeout_s: float,
             listen_fd: int | None = None) -> WeightGroup:  # fmt: skip
        """Meet the other members at rank 0's store `host:port` (rank 0 serves it on
        `listen_fd`) within `timeout_s`; gloo traffic binds to `bind`. Collectives may then wait
        `op_timeout_s` for a member (one busy with the calls queued before its receive). A group
        that does not form stops the run (`RunStopped`, one line)."""
        try:
            store = dist.TCPStore(host, port, is_master=rank == 0, wait_for_workers=False,
                                  timeout=timedelta(seconds=timeout_s),
                                  master_listen_fd=listen_fd)  # fmt: skip
            if device.type == "cuda":
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timedelta(seconds=op_timeout_s)
                group = dist.ProcessGroupNCCL(store, rank, size, options)
            else:
                options = dist.ProcessGroupGloo._Options()
                options._timeout = timedelta(seconds=op_timeout_s)
                options._devices = [dist.ProcessGroupGloo.create_device(hostname=bind)]
                group = dist.ProcessGroupGloo(store, rank, size, options)
            member = cls(group, store, rank, size, device)
            # Every member meets in a first broadcast (NCCL connects here, lazily).
            member.broadcast(torch.tensor([size], device=device)).wait()
        except RuntimeError as exc:
            backend = "nccl" if device.type == "cuda" else "gloo"
            raise RunStopped(
                f"the collective weight group ({backend}, learner rank 0 and {size - 1} rollout "
                f"workers, store at {host}:{port}) did not form for its rank {rank} within "
                f"{timeout_s:g} s ({first_line(exc)}); a member was lost while it formed, or "
                "cannot reach the store: set cluster.weight_sync: object_store to do without "
                "the group, and resume with checkpoint.resume: auto"
            ) from exc
        return member

    def broadcast(self, tensor: torch.Tensor):
        options = dist.BroadcastOptions()
        options.rootRank = 0
        return self.group.broadcast([tensor], options)

    def send(self, named: list[tuple[str, torch.Tensor, torch.Tensor]],
             bucket_bytes: int = BUCKET_BYTES) -> Push:  # fmt: skip
        """Rank 0: pack `(name, weight, value)` (value cast to the weight's dtype: the EMA's fp32
        average goes out in the weight's precision) and start broadcasting; returns at once."""
        spec = spec_of([(name, weight) for name, weight, _ in named])
        plan = plan_buckets(spec, bucket_bytes)
        buckets = []
        for bucket in plan:
            flat = torch.empty(bucket.numel, dtype=to_dtype(bucket.dtype), device=self.device)
            for index, view in bucket_views(spec, bucket, flat):
                view.copy_(named[index][2].detach())
            buckets.append(flat)
        header = torch.frombuffer(bytearray(encode_header(spec, bucket_bytes)), dtype=torch.uint8)
        header = header.to(self.device)
        length = torch.tensor([header.numel()], dtype=torch.int64, device=self.device)
        works = [self.broadcast(t) for t in (length, header, *buckets)]
        return Push(spec, plan, buckets, works)

    def receive(self, params: dict[str, torch.Tensor], held: list[Entry]) -> int:
        """Rank > 0: copy one push into `params` (by name) and return its bytes. `held` is what
        this member trains: a push that differs is still taken whole, then refused with a
        ValueError naming the first differing parameter."""
        what = f"weight group rank {self.rank} lost its push part-way"
        length = torch.zeros(1, dtype=torch.int64, device=self.device)
        wait(self.broadcast(length), what)
        # Host sync: the header's length sizes the next receive.
        header = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        wait(self.broadcast(header), what)
        spec, bucket_bytes = decode_header(header.cpu().numpy().tobytes())
        difference = first_difference(spec, held)
        num_bytes = 0
        with torch.no_grad():
            for bucket in plan_buckets(spec, bucket_bytes):
                flat = torch.empty(bucket.numel, dtype=to_dtype(bucket.dtype), device=self.device)
                wait(self.broadcast(flat), what)
                num_bytes += flat.nbytes
                if difference is not None:
                    continue  # taken only so the collective completes for every member
                for index, view in bucket_views(spec, bucket, flat):
                    params[spec[index][0]].copy_(view)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # host sync: the weights are in
        if difference is not None:
            raise ValueError(
                f"weight sync: the bucket plans of learner rank 0 and weight group rank "
                f"{self.rank} differ at parameter {difference}"
            )
        return num_bytes

    def close(self) -> None:
        """Leave the group: its connections close, so the members still waiting on this one in
        a collective fail (gloo) instead of waiting out the timeout."""
        self.group.abort()
        self.group = self.store = None
