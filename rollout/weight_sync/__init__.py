"""Weight sync from trainer rank 0 to the student engine: one interface (``WeightSender`` /
``WeightReceiver``), two transports.

The trainer side *sends* a version of the full student weights; the engine side *receives*
it inside its vLLM worker(s) (``vllm_worker.WeightSyncExtension``) and loads it in place.
What travels between the two through the driver is a small ``SyncTicket``:

* ``shm`` (``shm.py``): rank 0 writes ``v<version>/model.safetensors`` plus a manifest
  with its CRC-32 to a tmpfs directory, atomically (temp dir, fsync, rename); the ticket
  carries the path. The receiver checks manifest, size and checksum BEFORE touching the
  model, so a corrupt or partial file is refused and the engine keeps its previous weights.
  Needs the trainer's rank 0 and the engine on one node.
* ``collective`` (``collective.py``): rank 0 and the engine worker(s) share one process
  group of their own (gloo on CPU, nccl on GPU, independent of the trainer's group); a JSON
  header (version, names, dtypes, shapes) then flat per-dtype buckets are broadcast. Every
  wait has a timeout, so a dead peer is an error, not a hang.

Either way the receiver refuses a version not newer than the one it serves (after draining
the transfer, so the two sides stay in step), and the engine resets its prefix cache after
a load: cached KV blocks of the old weights must not be reused.
"""
from switchkd.rollout.weight_sync.collective import CollectiveReceiver, CollectiveSender
from switchkd.rollout.weight_sync.interface import (
    TRANSPORTS,
    SyncTicket,
    WeightReceiver,
    WeightSender,
    WeightSyncError,
    check_newer,
)
from switchkd.rollout.weight_sync.shm import ShmReceiver, ShmSender

__all__ = ["TRANSPORTS", "CollectiveReceiver", "CollectiveSender", "ShmReceiver", "ShmSender", "SyncTicket",
           "WeightReceiver", "WeightSender", "WeightSyncError", "check_newer"]
