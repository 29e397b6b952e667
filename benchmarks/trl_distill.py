"""TRL's DistillationTrainer, timed step by step: the second TRL peer in the end-to-end comparison (benchmarks/e2e.py).

`trl.DistillationTrainer` is TRL 1.16.0's stable on-policy distillation trainer (GKDTrainer,
benchmarks/trl_gkd.py, lives in trl.experimental). Like trl_gkd.py it imports nothing from
switchkd and reads the prompts as token ids from the JSON file e2e.py writes.

    python benchmarks/trl_distill.py --generation vllm --teacher DIR --student DIR --prompts ids.json \\
        --steps 12 --warmup 2 --batch-size 8 --max-new-tokens 64 --json out.json

Generation (--generation):

* vllm: TRL's use_vllm=True, vllm_mode="colocate": a vLLM engine inside the trainer's process,
  the student's weights loaded into it (TRL's sync_weights) before each update's generation.
  Needs an interpreter where both TRL and vLLM import. .venv-trl has no vLLM, so e2e.py runs this
  script with switchkd's interpreter (the CPU vLLM build, the same torch, transformers,
  accelerate and datasets pins as .venv-trl) with .venv-trl's trl package put on its path.
  The engine runs in the dtype TRL gives it: none, so vLLM's "auto", which makes a float32
  checkpoint bfloat16 (recorded as config.vllm_dtype). TRL's colocated sync calls the vLLM
  model's load_weights for each parameter. That works where the CPU vLLM keeps each linear
  layer's weight parameter (bfloat16 on a CPU without bf16 instructions); where it packs the
  weights into a oneDNN or SGL kernel and drops the parameter (float32 anywhere, bfloat16 on a
  CPU with AVX512-BF16 or AMX), load_weights fails ("'Parameter' object has no attribute
  'weight_loader'"). There the benchmark syncs the same tensors with vLLM's in-place
  ``reload_weights`` (the worker's, given TRL's parameter iterator), which re-packs the kernels
  (recorded as config.vllm_sync: "trl" or "reload_weights").
* hf: HF `generate` with a KV cache, as trl_gkd.py, at the training precision; runs in .venv-trl.

TRL's server mode (vllm_mode="server") cannot run on a CPU-only machine: the trainer always
joins the NCCL weight-transfer group, and TRL's client refuses any device but CUDA
(trl/generation/vllm_client.py, VLLMClient.init_communicator).

Settings: those of trl_gkd.py (trl_common.training_args: the whole batch as one micro-batch, the
same updates, constant LR, training precision following the pair's dtype, TRL's default gradient
checkpointing), beta=0 (forward KL(teacher || student)), temperature 1, max_completion_length =
max_new_tokens. DistillationTrainer is always on-policy (the student generates every completion)
and scores the teacher over the full vocabulary (its chunked divergence projects both lm_heads
over every token of the vocabulary).

Timing: as trl_gkd.py, the wall time between the ends of consecutive optimizer steps. Inside each
step: generation_s (vLLM or HF generate only), sync_s (TRL loading the student's weights into the
engine; vLLM only; apart from training), and training_s (everything else: teacher forward,
student forward/backward, loss, optimizer), of which teacher_forward_s is the teacher's backbone
forward. The teacher's vocabulary projection runs fused with the student's inside TRL's chunked
divergence, so it stays in training_s and not in teacher_forward_s. Generated tokens are counted
up to and including EOS, as switchkd counts response tokens.
"""
from __future__ import annotations

import tempfile
import time

import trl_common


def reload_sync(vllm_generation, worker):
    """TRL's colocated sync with vLLM's in-place reload in place of load_weights, for an engine
    whose linear layers are packed (see the module docstring)."""
    from switchkd.rollout.weight_sync.vllm_worker import reload_in_place

    def sync():
        reload_in_place(worker, vllm_generation._iter_named_params())
        vllm_generation.llm.reset_prefix_cache()
    return sync


def run(args) -> dict:
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    prompts, tokenizer, student, teacher = trl_common.load_pair(args)
    record = {**trl_common.new_record(), "sync_s": [], "teacher_forward_s": []}

    class TimedDistillation(DistillationTrainer):
        def _tokenize_prompts(self, prompts):
            # The "prompt" column holds token ids already (e2e.py's prompt_ids.json): hand them over as they are.
            return [list(p) for p in prompts], None, {}

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
            record["sync_s"].append(0.0)  # the timed sync_weights below adds to it
            start = time.perf_counter()
            completion_ids = super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
            record["gen_s"].append(time.perf_counter() - start - record["sync_s"][-1])
            record["gen_tokens"].append(sum(len(c) for c in completion_ids))
            return completion_ids

        def _get_last_hidden_state(self, unwrapped_model, *a, **k):
            if unwrapped_model is not self.accelerator.unwrap_model(self.teacher_model):
                return super()._get_last_hidden_state(unwrapped_model, *a, **k)
            start = time.perf_counter()
            hidden = super()._get_last_hidden_state(unwrapped_model, *a, **k)
            record["teacher_forward_s"].append(time.perf_counter() - start)
            return hidden

    with tempfile.TemporaryDirectory() as tmp:
        config = DistillationConfig(**trl_common.training_args(args, tmp), max_completion_length=args.max_new_tokens,
                                    use_vllm=args.generation == "vllm", vllm_mode="colocate")
        trainer = TimedDistillation(model=student, teacher_model=teacher, args=config,
                                    train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                                    callbacks=[trl_common.step_clock(record)])
        settings = {"generation": args.generation, "gradient_checkpointing": config.gradient_checkpointing}
        if args.generation == "vllm":
            settings.update(vllm_mode="colocate",
                            vllm_dtype=str(trainer.vllm_generation.llm.llm_engine.model_config.dtype).removeprefix("torch."))
            vllm_generation = trainer.vllm_generation
            worker = vllm_generation.llm.llm_engine.model_executor.driver_worker
            packed = any(p.numel() == 0 for p in worker.model_runner.model.parameters())
            sync = reload_sync(vllm_generation, worker) if packed else vllm_generation.sync_weights
            settings["vllm_sync"] = "reload_weights" if packed else "trl"

            def timed_sync():
                start = time.perf_counter()
                sync()
                record["sync_s"][-1] += time.perf_counter() - start

            trainer.vllm_generation.sync_weights = timed_sync
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
    return trl_common.summarize(record, args, total, "trl_distill", settings,
                                apart=("sync_s",), within=("teacher_forward_s",))


def main() -> None:
    parser = trl_common.parser(__doc__.splitlines()[0])
    parser.add_argument("--generation", choices=("vllm", "hf"), default="vllm",
                        help="vllm: TRL's colocated vLLM engine (needs vLLM importable); hf: HF generate")
    args = parser.parse_args()
    trl_common.check_args(parser, args)
    trl_common.write_result(args, run(args))


if __name__ == "__main__":
    main()
