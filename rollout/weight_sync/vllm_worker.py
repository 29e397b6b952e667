"""The receiving end of weight sync inside the engine: methods vLLM mixes into its worker."""
from __future__ import annotations

import vllm

from switchkd.rollout.engines import vllm_version  # noqa: F401  (the version guard)
from switchkd.rollout.weight_sync.collective import CollectiveReceiver, new_group
from switchkd.rollout.weight_sync.interface import SyncTicket, WeightSyncError
from switchkd.rollout.weight_sync.shm import ShmReceiver


def reload_in_place(worker, weights) -> None:
    """The worker's ``reload_weights`` in place from ``weights`` ((HF name, tensor) pairs), then a
    re-pack of a tied output layer: the loader skips ``lm_head.weight`` when it is tied to the
    embedding, so the CPU kernel's packed copy of it (``dispatch_cpu_unquantized_gemm``) would
    keep serving the old weights."""
    worker.reload_weights(weights_iterator=iter(weights))
    model = worker.model_runner.get_model()
    lm_head = getattr(model, "lm_head", None)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and lm_head is not None and hasattr(lm_head, "quant_method"):
        lm_head.quant_method.process_weights_after_loading(lm_head)


class WeightSyncExtension:
    """Weight-sync methods vLLM mixes into its worker (``worker_extension_cls``), reached through
    ``LLM.collective_rpc`` on every worker of the engine. Weights go through the worker's own
    ``reload_weights`` (in place, HF checkpoint names), from the transport's ``WeightReceiver``."""

    def switchkd_init_weight_group(self, host: str, port: int, world: int, backend: str, timeout_s: float) -> int:
        """collective: join the sync group as rank 1 + this worker's rank; returns that rank."""
        rank = 1 + self.rank
        self.switchkd_receiver = CollectiveReceiver(new_group(backend, host, port, rank, world, timeout_s),
                                                    self.device, timeout_s)
        return rank

    def switchkd_update_weights(self, ticket: dict, current_version: int) -> int:
        """Receive the version a ``SyncTicket`` dict announces (shm: its directory, checked against
        its manifest first; collective: one broadcast) and load it; refused unless newer."""
        ticket = SyncTicket(int(ticket["version"]), ticket["transport"], ticket.get("path"))
        receiver = ShmReceiver() if ticket.transport == "shm" else getattr(self, "switchkd_receiver", None)
        if receiver is None:
            raise WeightSyncError("collective weight sync: the engine has not joined a sync group")
        version, weights = receiver.receive(ticket, current_version)
        reload_in_place(self, weights)
        return version


# One class per process, even across a reload of this module: vLLM adds it to its worker class's
# bases the first time and would refuse a second, look-alike class (each method "conflicts").
WeightSyncExtension = vllm.__dict__.setdefault("_switchkd_weight_sync_extension", WeightSyncExtension)
WORKER_EXTENSION_FQCN = f"{__name__}.WeightSyncExtension"  # vLLM resolves "<module>.<type>"
