"""Cache attention that reads only the live slots: an online softmax over key blocks.

A cache's slots are filled lowest first and freed slots are reused lowest first
(`dms_jax.cache`), so every held token lies below the stream's high-water mark. `live_extent`
is that mark over the batch (1 + the highest occupied slot of any row and head), and
`live_attention` runs a loop with a dynamic trip count over the blocks of `block` slots below it,
then over the chunk's own tokens (a prefill chunk; none in a decode step, which stores its token
first), with a running max, sum and output (FlashAttention's online softmax,
`dms_jax.ops.attention.online_softmax_step`). So a prefill chunk at position t reads about t
keys under `full` (T^2 / 2 for a prompt of T, not T x the allocated length) and about the held
tokens under `dms`. A decode step reads the live blocks when they are at most half of the
buffer, else every slot in place: XLA on CPU copies a sliced block before its dot, so reading
blocks costs about twice their bytes, and a buffer mostly live is cheaper read whole.

Same result as the dense chunk attention (`dms_jax.cache.attend_blocks`) up to float rounding:
the same visibility rule (`dms_jax.ops.mask.visibility_bias`) per block, the same count of keys
seen. It gives no attention probabilities, so the policies that rank keys by attention use the
dense one (the plan decides: `dms_jax.plan.resolve_attention`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dms_jax.ops.attention import online_softmax_finish, online_softmax_step
from dms_jax.ops.mask import MASK_VALUE, hard_evict_bias, visibility_bias

# Slots per key block: a decode step reads a whole block per loop iteration (fewer, longer
# dots: the loop's per-iteration cost matters there); a prefill chunk's [C, block] score tile
# stays cache-sized (one layer's attention over 1,024 tokens, B 4, 4 KV heads of 64, chunks of
# 512: 167 ms with blocks of 512, 118 ms with 256, 141 ms with 128).
DECODE_BLOCK = 1024
PREFILL_BLOCK = 256


def live_extent(pos):
    """int32 scalar: 1 + the highest occupied slot of any stream (0 if none). pos: [B, Hkv, S]."""
    slots = jnp.arange(1, pos.shape[-1] + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(pos >= 0, slots, 0))


def block_bias(q_pos, k_pos, k_flags, k_valid, *, window, use_flags, sliding_window):
    """The visibility bias of the chunk's queries over one key block: f32 [B, Hkv, 1, C, n].
    q_pos [B, C]; k_pos, k_flags, k_valid [B, Hkv, n]."""
    return visibility_bias(
        q_pos[:, None, None, :, None],
        k_pos[:, :, None, None, :],
        hard_evict_bias(k_flags)[:, :, None, None, :] if use_flags else None,
        window,
        k_valid=k_valid[:, :, None, None, :],
        sliding_window=sliding_window,
    )


def group_queries(q, num_kv_heads):
    """[B, C, H, D] -> [B, Hkv, G, C, D] (query head h reads KV head h // G)."""
    batch, chunk, num_heads, head_dim = q.shape
    group = num_heads // num_kv_heads
    return q.reshape(batch, chunk, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)


def empty_state(qg):
    """The online softmax's (max, sum, output) and the keys-seen count before any block.
    qg: [B, Hkv, G, C, D]."""
    batch, num_kv_heads, group, chunk, head_dim = qg.shape
    return ((jnp.full((batch, num_kv_heads, group, chunk), -jnp.inf, jnp.float32),
             jnp.zeros((batch, num_kv_heads, group, chunk), jnp.float32),
             jnp.zeros((batch, num_kv_heads, group, chunk, head_dim), jnp.float32)),
            jnp.zeros((batch, num_kv_heads), jnp.float32))


def attend_block(carry, qg, k_blk, v_blk, bias, q_valid, scale):
    """One key block into the running softmax and the count of keys seen by real queries.
    qg: [B, Hkv, G, C, D]; k_blk, v_blk: [B, Hkv, n, D]; bias: f32 [B, Hkv, 1, C, n]."""
    state, seen = carry
    scores = jnp.einsum("bhgqd,bhkd->bhgqk", qg, k_blk,
                        preferred_element_type=jnp.float32) * scale + bias
    state = online_softmax_step(state, scores, v_blk)
    real = q_valid[:, None, :, None]  # [B, 1, C, 1]
    return state, seen + ((bias[:, :, 0] > MASK_VALUE / 2) & real).sum(axis=(2, 3),
                                                                       dtype=jnp.float32)


def finish(carry, q):
    """(out [B, C, H, D] in q.dtype, keys seen [B, Hkv]) from the final carry."""
    state, seen = carry
    batch, chunk, num_heads, head_dim = q.shape
    out = online_softmax_finish(state)  # [B, Hkv, G, C, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, chunk, num_heads, head_dim)
    return out.astype(q.dtype), seen


def live_attention(q, q_pos, q_valid, slots, tail, extent, *, window, use_flags, sliding_window,
                   scale, block=None):
    """The chunk's queries over the live slots, then over the chunk itself (if given).

    q: [B, C, H, D]; q_pos: int32 [B, C]; q_valid: bool [B, C] (padding queries: output 0);
    slots: (keys [B, Hkv, S, D], values [B, Hkv, S, D], pos int32 [B, Hkv, S] (-1: free),
      flags bool [B, Hkv, S]); tail: the chunk's own (keys [B, Hkv, C, D], values, pos [B, Hkv, C],
      flags, valid) or None; extent: int32 scalar, slots >= extent are free in every stream
      (`live_extent`); block: slots per loop iteration (default by C: DECODE_BLOCK for one query,
      else PREFILL_BLOCK; at most S).
    returns (out [B, C, H, D] in q.dtype, keys seen by real queries [B, Hkv] f32)
    """
    chunk = q.shape[1]
    keys, values, pos, flags = slots
    num_kv_heads, capacity = keys.shape[1], keys.shape[2]
    if block is None:
        block = DECODE_BLOCK if chunk == 1 else PREFILL_BLOCK
    block = min(block, capacity)
    qg = group_queries(q, num_kv_heads)
    rule = dict(window=window, use_flags=use_flags, sliding_window=sliding_window)

    def attend(carry, k_blk, v_blk, bias):
        return attend_block(carry, qg, k_blk, v_blk, bias, q_valid, scale)

    def slot_block(i, carry):  # slots [start, start + block); those below i * block done already
        start = jnp.minimum(i * block, capacity - block)
        take = lambda a: lax.dynamic_slice_in_dim(a, start, block, axis=2)  # noqa: E731
        k_pos = take(pos)
        fresh = start + jnp.arange(block) >= i * block
        bias = block_bias(q_pos, k_pos, take(flags), (k_pos >= 0) & fresh, **rule)
        return attend(carry, take(keys), take(values), bias)

    def live_blocks(carry):
        return lax.fori_loop(0, (extent + block - 1) // block, slot_block, carry)

    def every_slot(carry):  # one block of all S slots, read in place
        return attend(carry, keys, values, block_bias(q_pos, pos, flags, pos >= 0, **rule))

    carry = empty_state(qg)
    with jax.named_scope("slots"):
        if block >= capacity:  # one block holds every slot
            carry = every_slot(carry)
        elif chunk > 1:  # a prefill chunk: block by block (scores of C x block at a time)
            carry = live_blocks(carry)
        else:  # a decode step: XLA copies a sliced block before its dot (~2x the bytes of
            # reading it in place), so the blocks pay only below half the slots
            carry = lax.cond(2 * extent <= capacity, live_blocks, every_slot, carry)
    if tail is not None:
        with jax.named_scope("chunk"):
            t_keys, t_values, t_pos, t_flags, t_valid = tail
            carry = attend(carry, t_keys, t_values,
                           block_bias(q_pos, t_pos, t_flags, t_valid, **rule))
    return finish(carry, q)
