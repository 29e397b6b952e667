"""SWITCH sampling in a vLLM OpenAI-compatible server: the server loads this module through
``--logits-processors`` (``teacher_launcher.LOGITS_PROCESSOR_FQCN``)."""
from __future__ import annotations

from switchkd.rollout.engines.switch_sampling import SwitchSamplingLogitsProcessor


class ServerSamplingLogitsProcessor(SwitchSamplingLogitsProcessor):
    """SWITCH sampling for a vLLM server: the same processor, without installing the
    fast log-prob patches. Those replace the worker's log-prob layout and need the
    matching front end in the same process; the OpenAI server's front end is stock
    (it serialises ``{token_id: Logprob}`` dicts), so the server stays stock too."""

    def __init__(self, vllm_config, device, is_pin_memory) -> None:  # noqa: D107
        self.states = {}
