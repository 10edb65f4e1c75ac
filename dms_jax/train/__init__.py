"""Retrofit (DMS distillation) and language-model training: losses, schedule, data, checkpoints."""
from dms_jax.train.loop import NonFiniteLossError, TrainResult, train

__all__ = ["NonFiniteLossError", "TrainResult", "train"]
