"""SWITCH rollouts: SWITCH math, batch schema, the HF reference and the vLLM generators."""
