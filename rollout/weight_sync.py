"""Weight sync from trainer rank 0 to the student engine: one interface, two transports.

The trainer side *sends* a version of the full student weights; the engine side *receives*
it inside its vLLM worker(s) (``engines.weight_sync_worker.WeightSyncExtension``) and loads it in place.
What travels between the two through the driver is a small ``SyncTicket``:

* ``shm`` (weight_sync_shm): rank 0 writes ``v<version>/model.safetensors`` plus a manifest
  with its CRC-32 to a tmpfs directory, atomically (temp dir, fsync, rename); the ticket
  carries the path. The receiver checks manifest, size and checksum BEFORE touching the
  model, so a corrupt or partial file is refused and the engine keeps its previous weights.
  Needs the trainer's rank 0 and the engine on one node.
* ``collective`` (weight_sync_collective): rank 0 and the engine worker(s) share one process
  group of their own (gloo on CPU, nccl on GPU, independent of the trainer's group); a JSON
  header (version, names, dtypes, shapes) then flat per-dtype buckets are broadcast. Every
  wait has a timeout, so a dead peer is an error, not a hang.

Either way the receiver refuses a version not newer than the one it serves (after draining
the transfer, so the two sides stay in step), and the engine resets its prefix cache after
a load: cached KV blocks of the old weights must not be reused.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

TRANSPORTS = ("shm", "collective")


class WeightSyncError(RuntimeError):
    """A weight version was refused or could not be transferred; the engine keeps its weights."""


@dataclass(frozen=True)
class SyncTicket:
    """What the engine needs to receive ``version`` (plain values: crosses Ray as a dict)."""
    version: int
    transport: str
    path: str | None = None       # shm: the version directory

    def to_dict(self) -> dict:
        return asdict(self)


def check_newer(version: int, current: int) -> None:
    """WeightSyncError unless ``version`` is newer than the ``current`` one the engine serves."""
    if version <= current:
        raise WeightSyncError(f"weight version {version} refused: the engine already serves version {current}")
