"""Dense attention under the DMS visibility rule (evaluation, short sequences, cache reads).

Grouped-query attention without repeating K/V: queries are viewed as [B, Hkv, G, T, D].
The training path for long sequences is `dms_jax.ops.blockwise` (same rule, online softmax).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dms_jax.ops.mask import MASK_VALUE, visibility_bias


def _per_head(x, num_kv_heads):
    """Per-key array [B, Tk] or [B, Hkv|1, Tk] -> [B, Hkv|1, 1, 1, Tk] for broadcasting."""
    if x is None:
        return None
    if x.ndim == 2:
        x = x[:, None, :]
    return x[:, :, None, None, :]


def grouped_attention(q, blocks, bias, scale):
    """Softmax attention of grouped queries over one or more key blocks: one softmax across all
    blocks, each block's values applied to its part (no concatenation of K / V). The one copy of
    the attention math: `dense_attention` (one block) and the cache step (slots, then the chunk).

    q: [B, Tq, H, D]; blocks: a sequence of (keys, values), each [B, Hkv, Tk_i, D];
    bias: float32, broadcastable to [B, Hkv, G, Tq, N] with N = sum Tk_i (the visibility rule's
    additive bias, `dms_jax.ops.mask.visibility_bias`); scale: the score scale (D ** -0.5).
    returns (out [B, Tq, H, D] in q.dtype, probs float32 [B, Hkv, G, Tq, N])
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = blocks[0][0].shape[1]
    qg = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.concatenate(
        [jnp.einsum("bqhgd,bhkd->bhgqk", qg, keys, preferred_element_type=jnp.float32)
         for keys, _ in blocks], axis=-1) * scale
    probs = jax.nn.softmax(scores + bias, axis=-1)  # [B, Hkv, G, Tq, N]
    out, start = None, 0
    for keys, values in blocks:
        part = probs[..., start:start + keys.shape[2]].astype(values.dtype)
        term = jnp.einsum("bhgqk,bhkd->bqhgd", part, values)
        out = term if out is None else out + term
        start += keys.shape[2]
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype), probs


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
    num_kv_heads, head_dim = k.shape[2], q.shape[3]
    scale = head_dim ** -0.5 if scale is None else scale
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
    out, probs = grouped_attention(q, [(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))], bias,
                                   scale)
    if return_probs:
        return out, probs
    return out


def _grouped_product(p, values):
    """[B, Hkv, G, Tq, Tk] weights x [B, Hkv, Tk, D] values -> f32 [B, Hkv, G, Tq, D]."""
    return jnp.einsum("bhgqk,bhkd->bhgqd", p, values, preferred_element_type=jnp.float32)


def online_softmax_step(state, scores, values, product=_grouped_product):
    """One key block of an online softmax (FlashAttention): the running max, sum and unnormalised
    output after the block. The one copy of the blockwise update: the cache's live attention
    (`dms_jax.ops.live_attention`), the training forward (`dms_jax.ops.blockwise`) and the fused
    prefill kernel (`dms_jax.ops.fused_prefill`).

    state: (m [..., Tq], l [..., Tq], acc [..., Tq, D]) f32, starting at (-inf, 0, 0);
    scores: f32 [..., Tq, Tk], the block's scaled scores plus the visibility bias;
    values: [B, Hkv, Tk, D] (scores' leading axes are [B, Hkv, G]), or what `product` takes:
    product(weights in values' dtype, values) -> f32 [..., Tq, D] (default: grouped queries).
    """
    m, l, acc = state
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(scores - m_new[..., None])
    pv = product(p.astype(values.dtype), values)
    return m_new, l * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv


def online_softmax_finish(state):
    """The normalised output f32 [..., Tq, D] of an online softmax state; 0 for a query that saw
    no key (only masked entries: its max stayed below MASK_VALUE / 2)."""
    m, l, acc = state
    empty = m < MASK_VALUE / 2
    return jnp.where(empty[..., None], 0.0, acc / jnp.where(empty, 1.0, l)[..., None])
