"""Typed config sections owned by the rollout side, and the field helpers every section uses.

Sections are frozen dataclasses. Per-field rules live in field metadata (``choice``,
``bounded``) and are enforced by the loader in switchkd.cluster.config, which knows the
key path and so can name it in the error. Cross-field rules live in ``__post_init__``
and raise ValueError("<key>: <problem>").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from switchkd.rollout.switch import RULES, SCHEDULES


def choice(default, allowed: tuple):
    """A field whose value must be one of ``allowed``."""
    return field(default=default, metadata={"choices": tuple(allowed)})


def bounded(default, lo=None, hi=None, lo_open: bool = False):
    """A numeric field with lo <= value <= hi (lo < value when lo_open)."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open})


@dataclass(frozen=True)
class ModelConfig:
    teacher: str = "models/tiny/teacher"      # HF model dir (safetensors)
    student: str = "models/tiny/student"      # HF model dir; the teacher's vocabulary (checked at start)
    dtype: str = choice("float32", ("float32", "bfloat16", "float16"))  # engines, HF models, synced weights
    trust_remote_code: bool = False           # passed to transformers and vLLM


SPLITS = ("train", "validation", "test", "all")


@dataclass(frozen=True)
class DataConfig:
    """Prompts and reference responses (switchkd.rollout.data.prompts reads them)."""
    prompts: str = "configs/prompts/tiny.jsonl"   # JSONL, Parquet, or an HF `datasets` directory
    max_prompts: Optional[int] = bounded(None, lo=1)   # of the chosen split
    max_prompt_tokens: int = bounded(512, lo=1)        # longer prompts are skipped and counted
    max_response_tokens: int = bounded(512, lo=1)      # longer references (EOS included): row skipped and counted
    # auto = the tokenizer's chat template when it has one; YAML reads on/off (and yes/no) as booleans: accepted
    chat_template: Union[str, bool] = choice("auto", ("auto", "on", "off", True, False))
    split: str = choice("train", SPLITS)               # which part of the data a command reads
    split_seed: int = 0                                # rows are assigned by a hash of (seed, prompt text)
    validation_fraction: float = bounded(0.1, lo=0.0, hi=1.0)   # share of rows in the validation split
    test_fraction: float = bounded(0.1, lo=0.0, hi=1.0)         # share of rows in the test split (eval)

    def __post_init__(self):
        if isinstance(self.chat_template, bool):
            object.__setattr__(self, "chat_template", "on" if self.chat_template else "off")
        if self.validation_fraction + self.test_fraction > 1:
            raise ValueError(f"data.validation_fraction={self.validation_fraction} + data.test_fraction="
                             f"{self.test_fraction}: must add up to at most 1")


@dataclass(frozen=True)
class SwitchConfig:
    tau0: float = bounded(0.4, lo=0.0)             # JSD lives in [0, ln 2]; tau0 >= ln 2 = never intervene
    decay: float = bounded(0.005, lo=0.0)          # lambda: per-token decay rate
    schedule: str = choice("exp", SCHEDULES)       # tau_t: tau0 e^(-decay t), tau0 max(0, 1 - decay t), tau0
    logprobs: str = choice("exact", ("exact", "topk"))  # decision on full distributions or top-k + tail
    topk: int = bounded(20, lo=1)                  # k per side when logprobs=topk
    # who owns each token: jsd = SWITCH (d > tau), student = on-policy/GKD, teacher = SeqKD,
    # skd = the student proposes, the teacher replaces proposals outside its top skd_topk
    rule: str = choice("jsd", RULES)
    skd_topk: int = bounded(25, lo=1)              # rule=skd: the teacher's top-k that accepts a proposal


@dataclass(frozen=True)
class ServerConfig:
    url: Optional[str] = None      # OpenAI-compatible vLLM server URL; "local" = switchkd starts one; None = in-process
    api_key: Optional[str] = None  # or $SWITCHKD_TEACHER_API_KEY; generated for a "local" server
    timeout_s: float = bounded(60.0, lo=0.0, lo_open=True)   # one HTTP request
    max_retries: int = bounded(5, lo=0)   # retries with exponential backoff, then a one-line error


@dataclass(frozen=True)
class EngineConfig:
    """One vLLM engine (teacher or student): resources and memory."""
    device: str = choice("cpu", ("cpu", "cuda"))
    num_cpus: float = bounded(1.0, lo=0.0)         # Ray resources of the engine's actor
    num_gpus: float = bounded(0.0, lo=0.0)         # Ray resources; cuda needs at least tensor_parallel_size
    tensor_parallel_size: int = bounded(1, lo=1)   # cuda only
    threads: str = "auto"                          # VLLM_CPU_OMP_THREADS_BIND, e.g. "0" or "0-3"
    kv_cache_space_gb: float = bounded(1.0, lo=0.0, lo_open=True)   # CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float = bounded(0.4, lo=0.0, hi=1.0, lo_open=True)   # cuda: share of GPU memory
    block_size: int = choice(32, (16, 32, 64, 128))   # KV block; 32 makes the prefix cache hit at short lengths
    enforce_eager: bool = True                     # no graph capture / compilation: fast start-up
    max_model_len: int = bounded(2048, lo=16)      # must hold data.max_prompt_tokens + rollout.max_new_tokens
    server: ServerConfig = field(default_factory=ServerConfig)


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = choice("hf", ("hf", "vllm"))    # hf = the transformers reference generator
    mode: str = choice("lockstep", ("lockstep", "block", "stepwise"))   # vllm only: docs/rollout.md
    # lockstep's teacher engine: in a child process, stepping at the same time as the student
    # (process), or in the student's process, one step after the other (inline)
    lockstep_teacher: str = choice("process", ("process", "inline"))
    temperature: float = bounded(1.0, lo=0.0)      # 0 = greedy
    max_new_tokens: int = bounded(128, lo=1)       # response length limit
    seed: int = 0                                  # run seed; per-prompt seeds derive from it and the prompt index
    batch_size: int = bounded(32, lo=1)            # prompts advanced together
    teacher_topk: int = bounded(64, lo=1)          # teacher log-probs kept per token for the trainer
    draft_tokens: int = bounded(8, lo=1)           # initial k of block-speculative SWITCH
    max_draft_tokens: int = bounded(64, lo=1)      # maximum k of block-speculative SWITCH
    use_ray: bool = False                          # host engines in Ray actors (in-process otherwise)
    # what the teacher engine sends per token (block/stepwise modes and reference scoring; a Ray
    # actor or a teacher server's rows endpoint): its full-vocabulary log-probs, or its final hidden
    # states (d_model values), turned into the same log-probs by its output layer on the receiving
    # side; auto = hidden from a teacher server that offers them (faster there), log-probs otherwise
    # (docs/rollout.md)
    teacher_rows: str = choice("auto", ("auto", "logprobs", "hidden"))
    # generate = sampled rollouts (owners by rollout.switch.rule); reference = the data's reference
    # response scored by both models, no sampling (KD on ground truth, SFT)
    source: str = choice("generate", ("generate", "reference"))
    switch: SwitchConfig = field(default_factory=SwitchConfig)
    teacher: EngineConfig = field(default_factory=EngineConfig)
    student: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self):
        if self.draft_tokens > self.max_draft_tokens:
            raise ValueError(f"rollout.draft_tokens={self.draft_tokens}: must be <= rollout.max_draft_tokens={self.max_draft_tokens}")
        if self.student.server.url is not None:
            raise ValueError("rollout.student.server.url: only the teacher can run behind a server")
        if self.teacher.server.url is not None and self.engine != "vllm":
            raise ValueError("rollout.teacher.server.url: a teacher server needs rollout.engine=vllm")
        for role, engine in (("teacher", self.teacher), ("student", self.student)):
            key = f"rollout.{role}"
            if engine.device == "cuda" and engine.num_gpus < engine.tensor_parallel_size:
                raise ValueError(f"{key}.num_gpus={engine.num_gpus:g}: a cuda engine with tensor_parallel_size="
                                 f"{engine.tensor_parallel_size} needs at least that many GPUs")
            if engine.device == "cpu" and engine.num_gpus > 0:
                raise ValueError(f"{key}.num_gpus={engine.num_gpus:g}: the engine runs on the CPU ({key}.device=cpu)")
            if engine.device == "cpu" and engine.tensor_parallel_size > 1:
                raise ValueError(f"{key}.tensor_parallel_size={engine.tensor_parallel_size}: tensor parallelism "
                                 f"needs {key}.device=cuda")
        if self.teacher_rows == "hidden":
            if self.engine != "vllm":
                raise ValueError("rollout.teacher_rows=hidden: needs a vLLM teacher engine (rollout.engine=vllm), "
                                 "in a Ray actor or behind a server with switchkd's rows endpoint")
            if self.mode == "lockstep" and self.source == "generate":
                raise ValueError("rollout.teacher_rows=hidden: lockstep keeps the teacher's rows on its host, in "
                                 "shared memory; use rollout.mode=block (or stepwise) to send hidden states")
        if self.engine == "vllm" and self.mode == "lockstep" and self.source == "generate":
            if self.teacher.server.url is not None:
                raise ValueError("rollout.mode=lockstep runs both engines side by side: use rollout.mode=block "
                                 "with rollout.teacher.server.url")
            if self.teacher.device != self.student.device or self.teacher.tensor_parallel_size > 1 \
                    or self.student.tensor_parallel_size > 1:
                raise ValueError("rollout.mode=lockstep runs both engines side by side on one device: it needs "
                                 "rollout.teacher.device == rollout.student.device and tensor_parallel_size 1 "
                                 "(use rollout.mode=block otherwise)")
