"""Dense attention under the DMS visibility rule (evaluation, short sequences, cache reads).

Grouped-query attention without repeating K/V: queries are viewed as [B, Hkv, G, T, D].
The training path for long sequences is `dms_jax.ops.blockwise` (same rule, online softmax).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dms_jax.ops.mask import visibility_bias


def _per_head(x, num_kv_heads):
    """Per-key array [B, Tk] or [B, Hkv|1, Tk] -> [B, Hkv|1, 1, 1, Tk] for broadcasting."""
    if x is None:
        return None
    if x.ndim == 2:
        x = x[:, None, :]
    return x[:, :, None, None, :]


def dense_attention(q, k, v, *, q_pos, k_pos, evict_bias=None, window=0, k_valid=None,
                    sliding_window=None, scale=None, return_probs=False, segment_ids=None):
    """Softmax attention with the DMS bias, materialising the [Tq, Tk] scores.

    q: [B, Tq, H, D]; k, v: [B, Tk, Hkv, D]
    q_pos: int [B, Tq]; k_pos: int [B, Tk] or [B, Hkv, Tk]
    evict_bias: float [B, Hkv, Tk] (per key, already shifted) or None
    k_valid: bool [B, Tk] or [B, Hkv, Tk] or None
    segment_ids: int [B, T] packed-document ids of queries and keys (self-attention), or None
    returns out [B, Tq, H, D] (q.dtype); with return_probs also probs [B, Hkv, G, Tq, Tk] f32
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    qg = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    bias = visibility_bias(
        q_pos[:, None, None, :, None],
        _per_head(k_pos, num_kv_heads),
        _per_head(evict_bias, num_kv_heads),
        window,
        k_valid=_per_head(k_valid, num_kv_heads),
        sliding_window=sliding_window,
        q_seg=None if segment_ids is None else segment_ids[:, None, None, :, None],
        k_seg=None if segment_ids is None else segment_ids[:, None, None, None, :],
    )
    probs = jax.nn.softmax(scores + bias, axis=-1)  # [B, Hkv, G, Tq, Tk]
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v)
    out = out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
    if return_probs:
        return out, probs
    return out
