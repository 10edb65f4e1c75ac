"""Memory-efficient DMS training attention: online softmax over blocks, recomputed in the backward.

Same result as `dms_jax.ops.attention.dense_attention` (same visibility rule, built per block by
`dms_jax.ops.mask.visibility_bias`), but memory grows like T * block instead of T^2:

* forward: for each query block, a loop over key blocks keeps a running max `m`, a running sum
  `l` and an unnormalised output (FlashAttention); it saves only `out` and the per-row
  logsumexp `lse = m + log(l)`;
* backward (`jax.custom_vjp`, FlashAttention-2 style): for each key block, a loop over query
  blocks recomputes the probabilities `p = exp(s + bias - lse)` and accumulates dK, dV and the
  gradient of the per-key eviction bias (obtained as the VJP of `visibility_bias` itself, so the
  rule has one definition), while dQ is accumulated in a float32 buffer of the size of q.
  Block pairs are laid out key-major there ([B, Hkv, bk, G, bq]) and dQ is accumulated
  transposed, so that no [bq, bk] block is ever transposed in memory (2x faster on CPU).

Grouped-query attention without repeating K/V: queries are viewed as [B, Hkv, G, T, D].
Block skipping: a (query block, key block) pair in which no query can see any key is skipped.
Which pairs are needed is derived from the positions (not the array indices), so it is exact
for any positions; each block loop runs over the range from the first to the last needed block.
Computing a fully masked block is harmless (its probabilities underflow to exactly 0).

A query that sees no key at all (e.g. a left-padding query when every earlier slot is padding)
gets output 0 and contributes no gradient (dense_attention gives such rows a uniform average).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from dms_jax.ops.attention import online_softmax_finish, online_softmax_step
from dms_jax.ops.mask import MASK_VALUE, visibility_bias

# Sentinel for "no valid position in this block" (positions are assumed |pos| < 2**30).
_FAR = 2 ** 30


class _Static(NamedTuple):
    """Hashable static configuration of the custom_vjp."""

    window: int
    sliding_window: Optional[int]
    scale: float
    block_q: int
    block_k: int
    q_len: int  # real (unpadded) number of queries


# ----------------------------------------------------------------------------------------------
# Per-block pieces shared by the forward and the backward.


def _block_bias(q_pos, k_pos, evict_bias, k_valid, st: _Static, q_seg=None, k_seg=None):
    """The DMS bias of one block pair.

    q_pos [B, bq]; k_pos [B, Hx, bk]; evict_bias [B, Hkv, bk] f32 or None; k_valid [B, Hx, bk]
    bool or None (Hx is 1 or Hkv); q_seg [B, bq], k_seg [B, 1, bk] document ids or None.
    returns f32 [B, Hkv|1, 1, bq, bk]
    """
    return visibility_bias(
        q_pos[:, None, None, :, None],
        k_pos[:, :, None, None, :],
        None if evict_bias is None else evict_bias[:, :, None, None, :],
        st.window,
        k_valid=None if k_valid is None else k_valid[:, :, None, None, :],
        sliding_window=st.sliding_window,
        q_seg=None if q_seg is None else q_seg[:, None, None, :, None],
        k_seg=None if k_seg is None else k_seg[:, :, None, None, :],
    )


def _block_bias_t(q_pos, k_pos, evict_bias, k_valid, st: _Static, q_seg=None, k_seg=None):
    """`_block_bias` laid out key-major: returns f32 [B, Hkv|1, bk, 1, bq]."""
    return visibility_bias(
        q_pos[:, None, None, None, :],
        k_pos[:, :, :, None, None],
        None if evict_bias is None else evict_bias[:, :, :, None, None],
        st.window,
        k_valid=None if k_valid is None else k_valid[:, :, :, None, None],
        sliding_window=st.sliding_window,
        q_seg=None if q_seg is None else q_seg[:, None, None, None, :],
        k_seg=None if k_seg is None else k_seg[:, :, :, None, None],
    )


def _scores(q_blk, k_blk, st: _Static):
    """q_blk [B, Hkv, G, bq, D], k_blk [B, Hkv, bk, D] -> scaled scores f32 [B, Hkv, G, bq, bk]."""
    s = jnp.einsum("bhgqd,bhkd->bhgqk", q_blk, k_blk, preferred_element_type=jnp.float32)
    return s * st.scale


def _slice(x, index, size, axis):
    return lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


def _slice_or_none(x, index, size, axis):
    return None if x is None else _slice(x, index, size, axis)


def _needed_blocks(q_pos, k_pos, k_valid, st: _Static):
    """need[qi, kj]: can some query of block qi see some key of block kj (in any batch row)?

    Conservative (may say yes for a fully masked pair, never no for a pair with a visible entry).
    q_pos [B, Tq]; k_pos, k_valid [B, Hx, Tk].  returns bool [nq, nk]
    """
    batch, q_total = q_pos.shape
    k_total = k_pos.shape[-1]
    nq, nk = q_total // st.block_q, k_total // st.block_k
    q_real = (jnp.arange(q_total) < st.q_len).reshape(nq, st.block_q)  # padding rows excluded
    qp = q_pos.reshape(batch, nq, st.block_q)
    q_max = jnp.max(jnp.where(q_real, qp, -_FAR), axis=-1)  # [B, nq]
    q_min = jnp.min(jnp.where(q_real, qp, _FAR), axis=-1)
    kp = k_pos.reshape(batch, -1, nk, st.block_k)
    ok = jnp.ones(kp.shape, bool) if k_valid is None else k_valid.reshape(kp.shape)
    k_min = jnp.min(jnp.where(ok, kp, _FAR), axis=(1, 3))  # [B, nk]
    k_max = jnp.max(jnp.where(ok, kp, -_FAR), axis=(1, 3))
    need = k_min[:, None, :] <= q_max[:, :, None]  # some key not in the future of some query
    if st.sliding_window is not None:
        need &= k_max[:, None, :] > q_min[:, :, None] - st.sliding_window
    return jnp.any(need, axis=0)


def _ranges(need):
    """First and one-past-last True index along the last axis (0, 0 where none). need [n, m]."""
    m = need.shape[-1]
    first = jnp.argmax(need, axis=-1)
    last = m - jnp.argmax(need[:, ::-1], axis=-1)
    some = jnp.any(need, axis=-1)
    return jnp.where(some, first, 0).astype(jnp.int32), jnp.where(some, last, 0).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# The custom-vjp core on padded, head-grouped arrays.
#   q [B, Hkv, G, Tq, D]; k, v [B, Hkv, Tk, D]; evict_bias [B, Hkv, Tk] f32 or None;
#   q_pos [B, Tq] int32; k_pos [B, Hx, Tk] int32; k_valid [B, Hx, Tk] bool or None;
#   Tq, Tk multiples of block_q, block_k.


def _forward(q, k, v, evict_bias, q_pos, k_pos, k_valid, q_seg, k_seg, st: _Static):
    """returns out [B, Hkv, G, Tq, D] (q.dtype), lse [B, Hkv, G, Tq] f32 (+inf: sees no key)."""
    batch, num_kv, group, q_total, head_dim = q.shape
    bq, bk = st.block_q, st.block_k
    nq = q_total // bq
    k_lo, k_hi = _ranges(_needed_blocks(q_pos, k_pos, k_valid, st))  # [nq] each

    def one_query_block(_, qi):
        q_blk = _slice(q, qi, bq, 3)  # [B, Hkv, G, bq, D]
        qp = _slice(q_pos, qi, bq, 1)  # [B, bq]
        qs = _slice_or_none(q_seg, qi, bq, 1)

        def one_key_block(kj, carry):
            m, l, acc = carry  # [B, Hkv, G, bq], same, [B, Hkv, G, bq, D]
            k_blk, v_blk = _slice(k, kj, bk, 2), _slice(v, kj, bk, 2)  # [B, Hkv, bk, D]
            bias = _block_bias(qp, _slice(k_pos, kj, bk, 2), _slice_or_none(evict_bias, kj, bk, 2),
                               _slice_or_none(k_valid, kj, bk, 2), st, qs,
                               _slice_or_none(k_seg, kj, bk, 2))
            s = _scores(q_blk, k_blk, st) + bias  # [B, Hkv, G, bq, bk]
            return online_softmax_step((m, l, acc), s, v_blk)

        init = (jnp.full((batch, num_kv, group, bq), -jnp.inf, jnp.float32),
                jnp.zeros((batch, num_kv, group, bq), jnp.float32),
                jnp.zeros((batch, num_kv, group, bq, head_dim), jnp.float32))
        m, l, acc = lax.fori_loop(k_lo[qi], k_hi[qi], one_key_block, init)
        empty = m < MASK_VALUE / 2  # saw no key (or only masked entries)
        out = online_softmax_finish((m, l, acc))
        lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
        return None, (out.astype(q.dtype), lse)

    _, (out, lse) = lax.scan(one_query_block, None, jnp.arange(nq))
    # [nq, B, Hkv, G, bq, ...] -> [B, Hkv, G, Tq, ...]
    out = jnp.moveaxis(out, 0, 3).reshape(batch, num_kv, group, q_total, head_dim)
    lse = jnp.moveaxis(lse, 0, 3).reshape(batch, num_kv, group, q_total)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _flash(q, k, v, evict_bias, q_pos, k_pos, k_valid, q_seg, k_seg, st: _Static):
    return _forward(q, k, v, evict_bias, q_pos, k_pos, k_valid, q_seg, k_seg, st)[0]


def _flash_fwd(q, k, v, evict_bias, q_pos, k_pos, k_valid, q_seg, k_seg, st):
    out, lse = _forward(q, k, v, evict_bias, q_pos, k_pos, k_valid, q_seg, k_seg, st)
    return out, (q, k, v, evict_bias, q_pos, k_pos, k_valid, q_seg, k_seg, out, lse)


def _flash_bwd(st: _Static, residuals, d_out):
    q, k, v, evict_bias, q_pos, k_pos, k_valid, q_seg, k_seg, out, lse = residuals
    num_kv, k_total, head_dim = k.shape[1], k.shape[2], k.shape[3]
    bq, bk = st.block_q, st.block_k
    nk = k_total // bk
    # delta_i = sum_d dO_i * O_i = sum_j P_ij dP_ij  (FlashAttention-2)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B,Hkv,G,Tq]
    need = _needed_blocks(q_pos, k_pos, k_valid, st)
    q_lo, q_hi = _ranges(need.T)  # per key block: range of query blocks  [nk] each

    def one_key_block(d_q, kj):
        k_blk, v_blk = _slice(k, kj, bk, 2), _slice(v, kj, bk, 2)  # [B, Hkv, bk, D]
        kp, kv = _slice(k_pos, kj, bk, 2), _slice_or_none(k_valid, kj, bk, 2)
        eb = _slice_or_none(evict_bias, kj, bk, 2)  # [B, Hkv, bk] or None
        ks = _slice_or_none(k_seg, kj, bk, 2)

        def one_query_block(qi, carry):
            # Everything per block pair is laid out key-major, [B, Hkv, bk, G, bq], so that the
            # dK / dV products contract the trailing (G, bq) axes without transposing.
            d_q, d_k, d_v, d_eb = carry
            q_blk, do_blk = _slice(q, qi, bq, 3), _slice(d_out, qi, bq, 3)  # [B, Hkv, G, bq, D]
            lse_blk, delta_blk = _slice(lse, qi, bq, 3), _slice(delta, qi, bq, 3)  # [B,Hkv,G,bq]
            qp, qs = _slice(q_pos, qi, bq, 1), _slice_or_none(q_seg, qi, bq, 1)
            if eb is None:
                bias = _block_bias_t(qp, kp, None, kv, st, qs, ks)
            else:
                bias, bias_vjp = jax.vjp(lambda e: _block_bias_t(qp, kp, e, kv, st, qs, ks), eb)
            s_t = jnp.einsum("bhkd,bhgqd->bhkgq", k_blk, q_blk,
                             preferred_element_type=jnp.float32) * st.scale
            p_t = jnp.exp(s_t + bias - lse_blk[:, :, None])  # [B, Hkv, bk, G, bq]
            d_v = d_v + jnp.einsum("bhkgq,bhgqd->bhkd", p_t.astype(do_blk.dtype), do_blk,
                                   preferred_element_type=jnp.float32)
            d_p = jnp.einsum("bhkd,bhgqd->bhkgq", v_blk, do_blk, preferred_element_type=jnp.float32)
            d_s = p_t * (d_p - delta_blk[:, :, None])  # d loss / d (scores + bias)
            # dQ transposed, [B, Hkv, D, G, bq]: d_s is the right-hand operand as laid out
            dq_blk = jnp.einsum("bhkd,bhkgq->bhdgq", k_blk, d_s.astype(k.dtype),
                                preferred_element_type=jnp.float32) * st.scale
            d_q = lax.dynamic_update_slice_in_dim(d_q, _slice(d_q, qi, bq, 4) + dq_blk, qi * bq, 4)
            d_k = d_k + jnp.einsum("bhkgq,bhgqd->bhkd", d_s.astype(q.dtype), q_blk,
                                   preferred_element_type=jnp.float32) * st.scale
            if eb is not None:
                d_eb = d_eb + bias_vjp(jnp.sum(d_s, axis=3, keepdims=True))[0]
            return d_q, d_k, d_v, d_eb

        zeros_kv = jnp.zeros(k_blk.shape, jnp.float32)
        d_eb0 = None if eb is None else jnp.zeros(eb.shape, jnp.float32)
        d_q, d_k, d_v, d_eb = lax.fori_loop(q_lo[kj], q_hi[kj], one_query_block,
                                            (d_q, zeros_kv, zeros_kv, d_eb0))
        return d_q, (d_k, d_v, d_eb)

    batch, _, group, q_total, _ = q.shape
    d_q0 = jnp.zeros((batch, num_kv, head_dim, group, q_total), jnp.float32)  # dQ transposed
    d_q, (d_k, d_v, d_eb) = lax.scan(one_key_block, d_q0, jnp.arange(nk))
    d_q = jnp.moveaxis(d_q, 2, 4)  # [B, Hkv, G, Tq, D]
    # [nk, B, Hkv, bk, ...] -> [B, Hkv, Tk, ...]
    d_k = jnp.moveaxis(d_k, 0, 2).reshape(k.shape)
    d_v = jnp.moveaxis(d_v, 0, 2).reshape(v.shape)
    if d_eb is not None:
        d_eb = jnp.moveaxis(d_eb, 0, 2).reshape(evict_bias.shape).astype(evict_bias.dtype)
    return (d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_eb, None, None, None,
            None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# Public API.


def _per_key(x, name, batch, num_kv, length):
    """[B, T] or [B, Hkv, T] -> [B, 1|Hkv, T]."""
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3 or x.shape[0] != batch or x.shape[1] not in (1, num_kv) or x.shape[2] != length:
        raise ValueError(f"{name} has shape {x.shape}; expected [B={batch}, T={length}] or "
                         f"[B, Hkv={num_kv}, T]")
    return x


def _pad_axis(x, pad, axis, mode="constant", value=0):
    if pad == 0 or x is None:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    if mode == "edge":
        return jnp.pad(x, widths, mode="edge")
    return jnp.pad(x, widths, constant_values=value)


def blockwise_attention(q, k, v, *, q_pos, k_pos, evict_bias=None, window=0, k_valid=None,
                        sliding_window=None, scale=None, block_q=512, block_k=512,
                        segment_ids=None):
    """Softmax attention under the DMS visibility rule, memory O(T * block).

    q: [B, T, H, D]; k, v: [B, T, Hkv, D]; q_pos: int [B, T]; k_pos: int [B, T] (or [B, Hkv, T]).
    evict_bias: float32 [B, Hkv, T] per-key bias, already shifted by one (gating.soft_evict_bias
      or gating.hard_evict_bias_from_decisions, transposed from [B, T, Hkv]), or None.
    k_valid: bool [B, T] (or [B, Hkv, T]) or None.
    segment_ids: int [B, T] packed-document ids (self-attention: Tq == Tk), or None.
    window, sliding_window, block_q, block_k: static python ints.
    Differentiable w.r.t. q, k, v and evict_bias (float32 accumulation; bf16 inputs are fine).
    returns out [B, T, H, D] in q.dtype. A query that sees no key gets 0.
    """
    batch, q_len, num_heads, head_dim = q.shape
    k_len, num_kv = k.shape[1], k.shape[2]
    if k.shape != (batch, k_len, num_kv, head_dim) or v.shape != k.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must both be "
                         f"[B={batch}, T, Hkv, D={head_dim}]")
    if num_heads % num_kv:
        raise ValueError(f"num query heads {num_heads} is not a multiple of num KV heads {num_kv}")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q={block_q}, block_k={block_k}: block sizes must be >= 1")
    if q_pos.shape != (batch, q_len):
        raise ValueError(f"q_pos has shape {q_pos.shape}; expected [B={batch}, T={q_len}]")
    group = num_heads // num_kv
    scale = head_dim ** -0.5 if scale is None else float(scale)
    block_q, block_k = min(block_q, q_len), min(block_k, k_len)
    q_pad, k_pad = -q_len % block_q, -k_len % block_k

    k_pos = _per_key(jnp.asarray(k_pos), "k_pos", batch, num_kv, k_len).astype(jnp.int32)
    if k_valid is not None:
        k_valid = _per_key(jnp.asarray(k_valid), "k_valid", batch, num_kv, k_len).astype(bool)
    elif k_pad:
        k_valid = jnp.ones((batch, 1, k_len), bool)
    if evict_bias is not None:
        if evict_bias.shape != (batch, num_kv, k_len):
            raise ValueError(f"evict_bias has shape {evict_bias.shape}; expected "
                             f"[B={batch}, Hkv={num_kv}, T={k_len}] "
                             f"(transpose gating's [B, T, Hkv])")
        evict_bias = _pad_axis(evict_bias.astype(jnp.float32), k_pad, 2)

    # [B, T, H, D] -> [B, Hkv, G, T, D];  [B, T, Hkv, D] -> [B, Hkv, T, D]
    qg = jnp.transpose(q.reshape(batch, q_len, num_kv, group, head_dim), (0, 2, 3, 1, 4))
    qg = _pad_axis(qg, q_pad, 3)
    kt = _pad_axis(jnp.swapaxes(k, 1, 2), k_pad, 2)
    vt = _pad_axis(jnp.swapaxes(v, 1, 2), k_pad, 2)
    q_pos = _pad_axis(jnp.asarray(q_pos).astype(jnp.int32), q_pad, 1, mode="edge")
    k_pos = _pad_axis(k_pos, k_pad, 2, mode="edge")
    k_valid = _pad_axis(k_valid, k_pad, 2, value=False)

    q_seg = k_seg = None
    if segment_ids is not None:
        if segment_ids.shape != (batch, q_len) or k_len != q_len:
            raise ValueError(f"segment_ids has shape {segment_ids.shape}; expected [B={batch}, "
                             f"T={q_len}] for self-attention")
        q_seg = _pad_axis(jnp.asarray(segment_ids).astype(jnp.int32), q_pad, 1, mode="edge")
        k_seg = _pad_axis(q_seg[:, None, :q_len], k_pad, 2, mode="edge")
    st = _Static(int(window), None if sliding_window is None else int(sliding_window), scale,
                 block_q, block_k, q_len)
    out = _flash(qg, kt, vt, evict_bias, q_pos, k_pos, k_valid, q_seg, k_seg, st)
    # out: [B, Hkv, G, Tq_pad, D]
    out = out[:, :, :, :q_len]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, q_len, num_heads, head_dim)


def causal_blockwise_attention(q, k, v, *, q_pos, k_pos, k_valid=None, sliding_window=None,
                               scale=None, block_q=512, block_k=512):
    """Plain causal attention (no eviction) through the same blockwise kernel: the baseline."""
    return blockwise_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, evict_bias=None, window=0,
                               k_valid=k_valid, sliding_window=sliding_window, scale=scale,
                               block_q=block_q, block_k=block_k)
