"""``collective`` weight-sync transport: trainer rank 0 broadcasts to the engine worker(s).

The group is private to the sync (its own TCPStore and ProcessGroup object, not the default
torch.distributed group, which the trainer's workers already use): rank 0 is the trainer's
rank 0, ranks 1..N the engine's vLLM workers. Backend gloo on CPU, nccl on GPU.

Wire format of one sync, all broadcasts from rank 0:
  1. int64 [1]: byte length of the header;
  2. uint8 [n]: JSON header {"version", "bucket_bytes", "tensors": [[name, dtype, shape], ...]};
  3. one flat tensor per bucket: consecutive same-dtype tensors up to ``bucket_bytes``
     (both sides derive the buckets from the header, so nothing else travels).
"""
from __future__ import annotations

import json
from datetime import timedelta

import torch
import torch.distributed as dist

from switchkd.rollout.local_ray import tcp_store
from switchkd.rollout.weight_sync.interface import (
    SyncTicket,
    WeightReceiver,
    WeightSender,
    WeightSyncError,
    check_newer,
)

BUCKET_BYTES = 256 << 20
MAX_HEADER_BYTES = 64 << 20


def new_group(backend: str, host: str, port: int, rank: int, world: int, timeout_s: float):
    """Join the sync group at ``host:port`` (rank 0 hosts its store); waits at most ``timeout_s``."""
    timeout = timedelta(seconds=timeout_s)
    try:
        store = tcp_store(host, port, world, rank == 0, timeout_s)
        if backend == "gloo":
            return dist.ProcessGroupGloo(store, rank, world, timeout)
        if backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            return dist.ProcessGroupNCCL(store, rank, world, options)
    except (RuntimeError, OSError) as e:  # the store or a peer did not show up in time, or the port is taken
        raise WeightSyncError(f"weight-sync group {host}:{port} (rank {rank} of {world}, {backend}): {e}") from None
    raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")


def _broadcast(group, tensor: torch.Tensor, timeout_s: float) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    try:
        group.broadcast([tensor], opts).wait(timedelta(seconds=timeout_s))
    except RuntimeError as e:
        raise WeightSyncError(f"weight-sync broadcast failed or timed out after {timeout_s:.0f} s: {e}") from None


def plan_buckets(specs: list[tuple[torch.dtype, int]], bucket_bytes: int) -> list[list[int]]:
    """Indices of (dtype, numel) specs grouped into consecutive same-dtype buckets of at most
    ``bucket_bytes`` (a tensor larger than that travels alone)."""
    buckets: list[list[int]] = []
    size, dtype = 0, None
    for i, (dt, numel) in enumerate(specs):
        nbytes = numel * dt.itemsize
        if not buckets or dt != dtype or size + nbytes > bucket_bytes:
            buckets.append([])
            size, dtype = 0, dt
        buckets[-1].append(i)
        size += nbytes
    return buckets


def send_weights(group, state: dict[str, torch.Tensor], version: int, device: torch.device, timeout_s: float,
                 bucket_bytes: int = BUCKET_BYTES) -> None:
    """Rank 0: broadcast ``state`` stamped with ``version``."""
    items = list(state.items())
    header = json.dumps({"version": version, "bucket_bytes": bucket_bytes, "tensors": [
        [name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in items]}).encode()
    _broadcast(group, torch.tensor([len(header)], dtype=torch.int64, device=device), timeout_s)
    _broadcast(group, torch.frombuffer(bytearray(header), dtype=torch.uint8).to(device), timeout_s)
    for bucket in plan_buckets([(t.dtype, t.numel()) for _, t in items], bucket_bytes):
        flat = torch.cat([items[i][1].detach().reshape(-1) for i in bucket]).to(device)
        _broadcast(group, flat, timeout_s)


def receive_weights(group, device: torch.device, timeout_s: float) -> tuple[int, list[tuple[str, torch.Tensor]]]:
    """Ranks 1..N: the version and (name, tensor) pairs rank 0 broadcast."""
    length = torch.zeros(1, dtype=torch.int64, device=device)
    _broadcast(group, length, timeout_s)
    n = int(length.item())
    if not 0 < n <= MAX_HEADER_BYTES:
        raise WeightSyncError(f"weight-sync header of {n} bytes (limit {MAX_HEADER_BYTES}): sender out of step")
    raw = torch.empty(n, dtype=torch.uint8, device=device)
    _broadcast(group, raw, timeout_s)
    try:
        header = json.loads(bytes(raw.cpu().numpy()))
        specs = [(str(name), _dtype(dt), [int(d) for d in shape]) for name, dt, shape in header["tensors"]]
        version, bucket_bytes = int(header["version"]), int(header["bucket_bytes"])
    except (ValueError, KeyError, TypeError) as e:
        raise WeightSyncError(f"weight-sync header is malformed ({e})") from None
    out: list[tuple[str, torch.Tensor]] = []
    numels = [torch.Size(shape).numel() for _, _, shape in specs]
    for bucket in plan_buckets([(dt, numels[i]) for i, (_, dt, _) in enumerate(specs)], bucket_bytes):
        flat = torch.empty(sum(numels[i] for i in bucket), dtype=specs[bucket[0]][1], device=device)
        _broadcast(group, flat, timeout_s)
        offset = 0
        for i in bucket:
            name, _, shape = specs[i]
            out.append((name, flat[offset:offset + numels[i]].view(shape)))
            offset += numels[i]
    return version, out


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class CollectiveSender(WeightSender):
    """Rank 0 of a sync ``group`` (from ``new_group``): broadcasts each version from ``device``."""

    def __init__(self, group, device: torch.device, timeout_s: float) -> None:
        self.group, self.device, self.timeout_s = group, device, timeout_s

    def send(self, state: dict[str, torch.Tensor], version: int) -> SyncTicket:
        send_weights(self.group, state, version, self.device, self.timeout_s)
        return SyncTicket(version, "collective")


class CollectiveReceiver(WeightReceiver):
    """A rank 1..N of a sync ``group``: receives each broadcast version on ``device``, then refuses
    it unless newer (after draining it, so that both sides stay in step)."""

    def __init__(self, group, device: torch.device, timeout_s: float) -> None:
        self.group, self.device, self.timeout_s = group, device, timeout_s

    def receive(self, ticket: SyncTicket, current_version: int) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        version, weights = receive_weights(self.group, self.device, self.timeout_s)
        check_newer(version, current_version)
        return version, weights
