"""One data-parallel rank: the student under a DeepSpeed engine, optionally the teacher beside it.

Every public method is collective: all ranks call it with the same arguments (the coordinator
in switchkd.trainer.group does that), because ZeRO gathers, reductions and checkpoint barriers
need every rank. Rows of a step are dealt round-robin to ranks, then cut into exactly
grad_accum_steps micro-batches per rank; a rank with no rows left runs a zero-loss dummy pass so
that ZeRO-3's parameter gathers stay in lockstep.
"""
from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist

from switchkd.rollout.local_ray import free_port, tcp_store
from switchkd.trainer import checkpoint
from switchkd.trainer.batch import collate, collate_reference, first_trained_position, shifted_logits
from switchkd.trainer.ds_config import build_ds_config, lr_factor
from switchkd.trainer.export import write_hf_dir
from switchkd.trainer.losses import owner_weights, per_token_divergence, sft_loss

DS_TAG = "deepspeed"
# Per-step sums reduced over ranks: weighted loss, student-token divergence, student tokens,
# teacher-token divergence, teacher tokens, reference-token NLL (SFT term), reference tokens.
_SUMS = ("loss", "div_student", "tokens_student", "div_teacher", "tokens_teacher", "sft_nll", "tokens_ref")


def use_installed_extensions() -> None:
    """Point DeepSpeed's JIT ops (the CPU shm collective) at the cache `make install` fills in the
    venv, whoever starts the worker (CLI, benchmark, test): the op is reused, never rebuilt into
    ~/.cache, where a build killed half-way leaves a lock that every later build waits on forever."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


class TrainWorker:
    def __init__(self, cfg, rank: int, world_size: int, device: str, total_steps: int | None, pad_id: int,
                 in_actor: bool = False):
        """Cheap on purpose: addresses are asked for before anything heavy (``start``) runs."""
        self.cfg, self.tc = cfg, cfg.trainer
        self.rank, self.world = rank, world_size
        self.device_kind, self.total_steps, self.pad_id = device, total_steps, pad_id
        self.in_actor = in_actor
        self.sync_sender = None  # rank 0, collective: the CollectiveSender of the weight-sync group

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port on it (rank 0's is the process-group rendezvous)."""
        import ray

        # a non-loopback TCPStore master listens on every interface (local_ray.tcp_store): probe them all
        return ray.util.get_node_ip_address(), free_port("")

    def start(self, master_addr: str, master_port: int, local_rank: int) -> None:
        """Join the process group, load the student (and teacher), build the DeepSpeed engine."""
        use_installed_extensions()
        import deepspeed
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.utils.logging.disable_progress_bar()  # per-shard bars, on every rank and save
        # DeepSpeed 0.19 still calls collectives torch deprecates: one warning per call under ZeRO-3.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        rank, world_size, device = self.rank, self.world, self.device_kind
        if self.in_actor and device == "cpu" and self.tc.cpus_per_worker >= 1:
            torch.set_num_threads(int(self.tc.cpus_per_worker))  # an actor uses its share, not every core
        # A GPU actor sees only its own device (Ray sets CUDA_VISIBLE_DEVICES), so it is cuda:0 there.
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port), LOCAL_RANK=str(0 if device == "cuda" else local_rank))
        if device == "cuda":
            torch.cuda.set_device(0)
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        _init_process_group("nccl" if device == "cuda" else "gloo", rank, world_size, master_addr, master_port,
                            self.tc.dist_timeout_s)
        torch.manual_seed(self.tc.seed + rank)

        student = AutoModelForCausalLM.from_pretrained(
            self.cfg.model.student, dtype=torch.float32, use_safetensors=True,
            trust_remote_code=self.cfg.model.trust_remote_code)
        self.ds_config = build_ds_config(self.tc, device)
        factor = lr_factor(self.tc, self.total_steps)
        scheduler = None if "scheduler" in self.ds_config else (
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
        self.engine, *_ = deepspeed.initialize(model=student, model_parameters=student.parameters(),
                                               config=self.ds_config, lr_scheduler=scheduler,
                                               dist_init_required=False)
        self.teacher = None
        if self.tc.teacher_source == "model":
            from switchkd.rollout.models.hf_reference import load_hf_model

            self.teacher = load_hf_model(self.cfg.model.teacher, self.cfg.model.dtype,
                                         self.cfg.model.trust_remote_code).to(self.device)

    def train_step(self, table: pa.Table, total_tokens: int, ref_tokens: int = 0) -> dict:
        """One optimizer step on ``table`` (checked rows): the distillation loss is a mean over the
        step's ``total_tokens`` response tokens, the SFT term (trainer.sft_ratio > 0) a mean over its
        ``ref_tokens`` reference tokens, and the loss (1 - r) * distill + r * sft."""
        self.engine.train()
        lr = float(self.engine.get_lr()[0])
        mine = list(range(self.rank, table.num_rows, self.world))
        m = self.tc.micro_batch_size
        sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=self.device)  # nccl reduces device tensors
        grad_norm = None
        for j in range(self.tc.grad_accum_steps):
            rows = mine[j * m:(j + 1) * m]
            loss = self._micro_loss(table.take(rows), total_tokens, ref_tokens, sums) if rows else self._dummy_loss()
            self.engine.backward(loss, scale_wrt_gas=False)
            if j == self.tc.grad_accum_steps - 1 and self._plain_optimizer():
                # Without a ZeRO or mixed-precision optimizer DeepSpeed clips but drops the norm; the
                # gradients are already averaged over ranks here (at the accumulation boundary).
                grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in self.engine.module.parameters() if p.grad is not None])
            self.engine.step()
        dist.all_reduce(sums)
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        out = dict(zip(_SUMS, sums.tolist()))
        out.update(lr=lr, grad_norm=None if grad_norm is None else float(grad_norm))
        return out

    def _plain_optimizer(self) -> bool:
        """ZeRO-0 in fp32: DeepSpeed steps torch's optimizer on the module's own gradients."""
        e = self.engine
        return e.zero_optimization_stage() == 0 and not (e.bfloat16_enabled() or e.fp16_enabled())

    def _micro_loss(self, rows: pa.Table, total_tokens: int, ref_tokens: int, sums: torch.Tensor) -> torch.Tensor:
        b = collate(rows, self.pad_id).to(self.device)
        r = self.tc.sft_ratio
        ref = collate_reference(rows, self.pad_id) if r > 0 else None
        input_ids, attention = b.input_ids, b.attention_mask
        ref_mask = None
        if ref is not None:
            # One forward for both terms (ZeRO-3 gathers stay one per micro-batch on every rank):
            # reference sequences are stacked under the rollout ones, right-padded to one length.
            ref_ids, ref_attention, ref_mask = (t.to(self.device) for t in ref)
            width = max(input_ids.shape[1], ref_ids.shape[1])
            input_ids = torch.cat([_pad(input_ids, width, self.pad_id), _pad(ref_ids, width, self.pad_id)])
            attention = torch.cat([_pad(attention, width, 0), _pad(ref_attention, width, 0)])
        # Logits only from the first trained position on: no output layer over the prompts' common part.
        first = first_trained_position(b.loss_mask, ref_mask)
        all_logits = shifted_logits(self.engine, input_ids, attention, first)
        n, length = b.input_ids.shape
        logits = all_logits[:n, :length - 1 - first]
        t = b.from_position(first)
        keep, owner = t.loss_mask, t.owner
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = shifted_logits(self.teacher, b.input_ids, b.attention_mask, first)
            teacher = {"teacher_logits": t_logits[keep]}
        else:
            teacher = {"teacher_topk_ids": t.topk_ids[keep], "teacher_topk_logprobs": t.topk_logprobs[keep]}
        div = per_token_divergence(self.tc.loss, logits[keep], **teacher, **self.tc.loss_params())
        weights = owner_weights(owner, keep, self.tc.student_token_weight, self.tc.teacher_token_weight)[keep]
        # DeepSpeed averages gradients over ranks; multiplying by world makes the result the
        # per-token mean over the whole step, whatever the split over ranks and micro-batches.
        loss = (div * weights.to(div.dtype)).sum() * (self.world / total_tokens)
        nll_sum = torch.zeros((), dtype=loss.dtype, device=self.device)
        n_ref = 0
        if ref is not None:
            ref_logits = all_logits[n:, :ref_ids.shape[1] - 1 - first]
            n_ref = int(ref_mask.sum())
            # sft_loss is the mean NLL over the mask; times its token count gives the sum, which
            # is normalised like the distillation term: by the step's reference tokens, times world.
            nll_sum = sft_loss(ref_logits, ref_ids[:, first + 1:], ref_mask[:, first:]) * n_ref
        if r > 0:
            loss = (1 - r) * loss + r * nll_sum * (self.world / max(ref_tokens, 1))
        with torch.no_grad():
            is_teacher = owner[keep] == 1
            d = div.detach().double()
            sums += torch.stack([loss.detach().double() / self.world, d[~is_teacher].sum(),
                                 (~is_teacher).sum().double(), d[is_teacher].sum(), is_teacher.sum().double(),
                                 nll_sum.detach().double(), torch.tensor(float(n_ref), dtype=torch.float64,
                                                                         device=self.device)])
        return loss

    def _dummy_loss(self) -> torch.Tensor:
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        return self.engine(input_ids=ids).logits.sum() * 0.0

    def save(self, tmp_dir: str, tokenizer_dir: str) -> None:
        """DeepSpeed state and RNG of every rank into ``tmp_dir``; rank 0 adds hf/ (full weights)."""
        self.engine.save_checkpoint(tmp_dir, tag=DS_TAG, save_latest=False)
        checkpoint.save_rng(Path(tmp_dir) / "rng" / f"rank_{self.rank}.json")
        self.export(str(Path(tmp_dir) / "hf"), tokenizer_dir)

    def load(self, ckpt_dir: str) -> None:
        path, _ = self.engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
        if path is None:
            raise RuntimeError(f"{ckpt_dir}: DeepSpeed found no engine state under {DS_TAG}/")
        checkpoint.load_rng(Path(ckpt_dir) / "rng" / f"rank_{self.rank}.json")

    def full_state_dict(self) -> dict | None:
        """Full student weights on CPU at rank 0 (None elsewhere); ZeRO-3 shards gathered one tensor at a time."""
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        module = self.engine.module
        out = {}
        for name, param in module.named_parameters():
            with GatheredParameters([param], modifier_rank=None, enabled=self.tc.zero_stage == 3):
                if self.rank == 0:
                    out[name] = param.detach().to("cpu", copy=True)
        persistent = set(module.state_dict().keys())
        out.update({n: b.detach().to("cpu", copy=True) for n, b in module.named_buffers() if n in persistent})
        return out if self.rank == 0 else None

    def sync_address(self) -> tuple[str, int]:
        """Where rank 0 hosts the weight-sync group: this node's address and a free port."""
        return (self.rendezvous_address() if self.in_actor else ("127.0.0.1", free_port()))

    def node_id(self) -> str | None:
        import ray

        return ray.get_runtime_context().get_node_id() if self.in_actor else None

    def init_weight_group(self, host: str, port: int, world: int, backend: str, timeout_s: float) -> None:
        """Rank 0 hosts the collective weight-sync group (rank 0 of ``world``); other ranks do nothing."""
        from switchkd.rollout.weight_sync import CollectiveSender
        from switchkd.rollout.weight_sync.collective import new_group

        if self.rank == 0:
            device = self.device if backend == "nccl" else torch.device("cpu")
            self.sync_sender = CollectiveSender(new_group(backend, host, port, 0, world, timeout_s), device, timeout_s)

    def push_weights(self, transport: str, version: int, root: str | None) -> dict | None:
        """Collective: gather the full student; rank 0 sends it as ``version`` in the model dtype
        (shm: a version directory under ``root``) and returns the engine's SyncTicket as a dict."""
        from switchkd.rollout.weight_sync import ShmSender, WeightSyncError

        state = self.full_state_dict()
        if self.rank != 0:
            return None
        dtype = getattr(torch, self.cfg.model.dtype)
        state = {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}
        sender = ShmSender(root) if transport == "shm" else self.sync_sender
        if sender is None:
            raise WeightSyncError("collective weight sync: trainer rank 0 has not joined a sync group")
        return sender.send(state, version).to_dict()

    def export(self, out_dir: str, tokenizer_dir: str) -> None:
        state = self.full_state_dict()
        if self.rank == 0:
            write_hf_dir(self.engine.module, state, tokenizer_dir, Path(out_dir))

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Student logits in eval mode (for checks against exported or synced weights); rank 0 returns."""
        self.engine.eval()
        with torch.no_grad():
            out = self.engine(input_ids=input_ids.to(self.device)).logits.float().cpu()
        return out if self.rank == 0 else None


def _pad(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """Right-pad the last dimension of ``t`` to ``width`` with ``value``."""
    return torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=value)


def _init_process_group(backend: str, rank: int, world: int, addr: str, port: int, timeout_s: float) -> None:
    """Join the trainer group; an in-process single worker reuses one group for the process's life
    (DeepSpeed caches its groups, so a destroyed and re-created group would break a second trainer)."""
    if dist.is_initialized():
        if world == 1 and dist.get_world_size() == 1 and dist.get_backend() == backend:
            return
        raise RuntimeError("torch.distributed is already initialized with another group in this process")
    store = tcp_store(addr, port, world, rank == 0, timeout_s)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
