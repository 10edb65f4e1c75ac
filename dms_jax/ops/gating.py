"""DMS eviction decisions: decision logits, Gumbel-sigmoid gating, the shift by one.

docs/dms.md sections 1-3. Pure functions on arrays; shapes in comments.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dms_jax.ops.mask import hard_evict_bias


def neuron_decision_logits(q, num_kv_heads, scale, offset):
    """Neuron mode: z = scale * q[..., D-1] - offset, from the first query head of each group.

    q: [B, T, H, D] queries after any q-norm, before RoPE.  returns z: [B, T, Hkv] float32
    """
    group = q.shape[2] // num_kv_heads
    raw = q[:, :, ::group, -1].astype(jnp.float32)  # heads 0, G, 2G, ...
    return scale * raw - offset


def zero_decision_neuron(x, num_kv_heads):
    """Set component D-1 of the first query head of each group to 0. x: [B, T, H, D]."""
    num_heads, head_dim = x.shape[2], x.shape[3]
    group = num_heads // num_kv_heads
    keep = jnp.ones((num_heads, head_dim), x.dtype)
    keep = keep.at[::group, head_dim - 1].set(0)
    return x * keep


def adapter_decision_logits(x_normed, weight, scale, offset):
    """Adapter mode: z = scale * (x_normed @ weight.T) - offset.

    x_normed: [B, T, d_model] (RMSNorm_alpha of the residual stream entering the layer)
    weight:   [Hkv, d_model]  returns z: [B, T, Hkv] float32
    """
    raw = jnp.einsum("btd,hd->bth", x_normed.astype(jnp.float32), weight.astype(jnp.float32))
    return scale * raw - offset


def logistic_noise(key, shape):
    """log(u) - log(1 - u), u ~ U(0, 1): the difference of two Gumbel samples."""
    u = jax.random.uniform(key, shape, jnp.float32, minval=1e-6, maxval=1.0 - 1e-6)
    return jnp.log(u) - jnp.log1p(-u)


def gumbel_sigmoid(z, key, tau):
    """Training gate. z: [B, T, Hkv].

    returns (zt, alpha, hard): zt = (z + noise) / tau, alpha = sigmoid(zt), and the
    straight-through hard decision hard = [alpha > 0.5] - sg(alpha) + alpha.
    """
    zt = (z + logistic_noise(key, z.shape)) / tau
    alpha = jax.nn.sigmoid(zt)
    hard = (alpha > 0.5).astype(alpha.dtype) - jax.lax.stop_gradient(alpha) + alpha
    return zt, alpha, hard


def hard_decisions(z):
    """Evaluation and inference: no noise, d = [z > 0]. z: [B, T, Hkv] -> bool."""
    return z > 0


def shift_to_keys(x, fill, axis=1):
    """The shift by one: e[j] = x[j + 1] along the token axis; the last token gets `fill`.

    x: [B, T, ...] (axis=1) or any layout with the token axis given.
    """
    x = jnp.moveaxis(x, axis, 0)
    shifted = jnp.concatenate([x[1:], jnp.full_like(x[:1], fill)], axis=0)
    return jnp.moveaxis(shifted, 0, axis)


def soft_evict_bias(zt):
    """Per-key soft bias log(1 - alpha[j+1]) = log_sigmoid(-zt[j+1]). zt: [B, T, Hkv]."""
    return shift_to_keys(jax.nn.log_sigmoid(-zt), 0.0)


def hard_evict_bias_from_decisions(d):
    """Per-key hard bias from decisions d[j+1] (bool [B, T, Hkv])."""
    return hard_evict_bias(shift_to_keys(d, False))
