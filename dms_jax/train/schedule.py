"""The compression-ratio schedule of docs/dms.md section 7.

CR(step) = CR0 + (CR1 - CR0) * min(step / S, 1);  target fraction evicted = 1 - 1 / CR(step).
Works on Python numbers and on traced jnp scalars (the train step computes it in-graph).
"""
from __future__ import annotations

import jax.numpy as jnp

# reference recipe (Qwen3-8B, adapter mode): CR 1 -> 16 over 510 steps (8x near step 238)
DEFAULT_CR_START = 1.0
DEFAULT_CR_END = 16.0
DEFAULT_CR_STEPS = 510


def validate_schedule(cr_start: float, cr_end: float, cr_steps: int) -> None:
    for name, value in (("cr_start", cr_start), ("cr_end", cr_end)):
        if not value >= 1.0:
            raise ValueError(
                f"train.{name}={value}: a compression ratio must be >= 1 (1 keeps every token, "
                f"8 keeps one in eight); the reference schedule is {DEFAULT_CR_START} -> {DEFAULT_CR_END}"
            )
    if int(cr_steps) < 0:
        raise ValueError(f"train.cr_steps={cr_steps} must be >= 0 (steps over which CR rises)")


def compression_ratio(step, cr_start: float, cr_end: float, cr_steps: int):
    """CR(step); cr_steps == 0 jumps straight to cr_end."""
    if cr_steps <= 0:
        return jnp.asarray(cr_end, jnp.float32) + 0 * jnp.asarray(step, jnp.float32)
    progress = jnp.minimum(jnp.asarray(step, jnp.float32) / float(cr_steps), 1.0)
    return cr_start + (cr_end - cr_start) * progress


def target_fraction(step, cr_start: float, cr_end: float, cr_steps: int):
    """1 - 1 / CR(step): the fraction of tokens the compression loss asks to evict."""
    return 1.0 - 1.0 / compression_ratio(step, cr_start, cr_end, cr_steps)
