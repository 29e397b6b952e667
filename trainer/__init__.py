"""switchkd.trainer: distillation losses, DeepSpeed engine wrapper, checkpoints and export."""
