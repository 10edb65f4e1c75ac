"""Building blocks: RMSNorm, rotary embeddings (incl. Llama 3 scaling), the gated MLP."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class RMSNorm(nnx.Module):
    """y = scale * x / sqrt(mean(x^2) + eps), normalised in float32 (as Hugging Face does)."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):  # [..., dim]
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(self.dtype) * normed.astype(self.dtype)).astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float64 numpy, computed once per config)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(medium, smoothed, scaled)
    raise ValueError(
        f"rope_type {rope_type!r} is not supported; supported rope types: {SUPPORTED_ROPE_TYPES}"
    )


def rope_tables(positions, inv_freq):
    """The rotary embedding's cos and sin for `positions`, built once per forward for every
    layer's queries and keys: (cos, sin), float32 [B, T, D // 2] each (half of D: `apply_rope`
    rotates the two halves of a head by the same angles).

    positions: int [B, T]; inv_freq: [D // 2].
    Each table passes through a product with the identity (exact: each entry times 1, plus
    zeros; at full f32 precision on every platform): XLA does not fuse a dot into the
    elementwise code that reads it, so the table is a buffer evaluated once. Without it XLA fused
    the cos / sin into every fusion that applies them and evaluated them per element there, i.e.
    per head, per layer and again for every layout a layer's keys are written in; on a CPU that
    was ~20% of a 512-token prefill chunk of a small model (kv shape of benchmarks/
    vs_transformers.py; tests/test_generate.py counts the cosines of a compiled chunk).
    A decode step (T = 1) skips the product: its tables are B x D / 2 values, cheaper to
    recompute in each reader than two more ops per generated token."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if positions.shape[-1] == 1:
        return cos, sin
    eye = jnp.eye(angles.shape[-1], dtype=jnp.float32)
    once = lambda t: jnp.matmul(t, eye, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
    return once(cos), once(sin)


def apply_rope(x, rope):
    """Rotary embedding, Hugging Face 'rotate_half' convention: the first half of each head
    x1 * cos - x2 * sin, the second x2 * cos + x1 * sin.

    x: [B, T, H, D]; rope: (cos, sin) from `rope_tables`  -> [B, T, H, D] (x.dtype)
    """
    cos, sin = rope
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    cos, sin = cos[:, :, None], sin[:, :, None]  # over the heads
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class MLP(nnx.Module):
    """down(silu(gate(x)) * up(x)); kernel_init: the model's weight init (model.weight_init)."""

    def __init__(self, d_model: int, hidden: int, *, bias: bool, dtype, param_dtype, kernel_init, rngs):
        kw = dict(use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=kernel_init)
        self.gate_proj = nnx.Linear(d_model, hidden, **kw)
        self.up_proj = nnx.Linear(d_model, hidden, **kw)
        self.down_proj = nnx.Linear(hidden, d_model, **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
