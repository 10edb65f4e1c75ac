"""Experimental: a prefill chunk's attention over the cache as one fused kernel (Pallas).

`live_attention` on an accelerator runs its online softmax as XLA ops, one key block per loop
trip, so every block's score tile ([B, Hkv, G, C, block] in float32) goes to and from the
device's memory several times; on one H200 a 32k `full` prompt at batch 8 then prefilled in 15 s
where transformers' fused (flash) attention took 1.2 s (README, "On a GPU"). Here each program
of the grid (row, KV head, tile of `block_q` query rows) keeps its query tile, running max, sum
and output on chip and walks the stream's live slots, then the chunk's own keys, in blocks of
`block_k`, with the visibility rule (`dms_jax.ops.mask.visibility_bias`) computed per block from
the keys' positions and flags, and the same online softmax update
(`dms_jax.ops.attention.online_softmax_step`). It also counts the keys each real query sees, so
it returns what `live_attention` returns for a chunk: (out [B, C, H, D], seen [B, Hkv]).

Status: exact against `live_attention` in Pallas' interpreter (`interpret=True`, the tests, on
a CPU), and it lowers to Triton for CUDA (a test lowers it on the CPU: Pallas' Triton backend is
asked for explicitly, since Mosaic GPU, the default of recent jax, would copy each stream's
whole K / V block into shared memory); NOT yet compiled to GPU code or timed, so no plan
selects it by default: a plan takes it when asked (`attention_impl="fused"`, slot layout), on a
CPU through the interpreter. Loaded tiles are powers of two (Triton's rule): `block_q` and
`block_k` must be, a tile takes the largest power of two that divides the query rows or the
chunk, and a cache smaller than `block_k` is read in the largest power-of-two blocks it holds.
`benchmarks/fused_prefill.py --device gpu` is the one-command check for a session with a GPU:
it compiles the kernel for a Llama-3.2-1B-sized layer and times it against `live_attention` on
the same cache; `benchmarks/vs_transformers.py --device gpu --attention fused` runs it through
`generate`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from dms_jax.ops.attention import online_softmax_finish, online_softmax_step
from dms_jax.ops.live_attention import _heads_last, block_at, group_queries
from dms_jax.ops.mask import hard_evict_bias, visibility_bias, visible


def _product(p, values):
    """[Tq, Tk] weights x [Tk, D] values -> f32 [Tq, D] (one tile's)."""
    return jnp.dot(p, values, preferred_element_type=jnp.float32)


def _floor_pow2(n):
    """The largest power of two <= n (n >= 1)."""
    return 1 << (int(n).bit_length() - 1)


def _tile(n, most):
    """The largest power of two <= most that divides n."""
    return min(most, n & -n)


def _kernel(extent_ref, q_ref, q_pos_ref, count_ref, k_ref, v_ref, k_pos_ref, k_flags_ref,
            t_k_ref, t_v_ref, t_pos_ref, t_flags_ref, t_valid_ref, o_ref, seen_ref, *,
            rule, scale, block_k):
    """One (row, KV head, query tile): refs hold that stream's blocks (leading axes squeezed).
    q [bq, D]; q_pos, count [bq] (count: 1 for a real query's first group row); slots k, v
    [S, D], k_pos [S] (-1: free), k_flags [S] (int8); the chunk's t_k, t_v [C, D], t_pos,
    t_flags, t_valid [C]; extent [1]: slots >= extent are free in every stream."""
    q = q_ref[...]
    q_pos = q_pos_ref[...][:, None]  # [bq, 1]
    counted = count_ref[...][:, None] != 0
    capacity, head_dim = k_ref.shape

    def attend(carry, k, v, k_pos, k_flags, k_valid):
        state, seen = carry
        bias = visibility_bias(q_pos, k_pos[None, :],
                               hard_evict_bias(k_flags != 0)[None, :] if rule["use_flags"]
                               else None, rule["window"], k_valid=k_valid[None, :],
                               sliding_window=rule["sliding_window"])  # [bq, bk]
        scores = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale + bias
        seen = seen + jnp.sum((visible(bias) & counted).astype(jnp.float32))
        return online_softmax_step(state, scores, v, _product), seen

    bk = min(block_k, _floor_pow2(capacity))  # the last block overlaps the one before

    def slot_block(i, carry):  # slots [start, start + bk); those below i * bk done already
        start, fresh = block_at(i, bk, capacity)
        k_pos = k_pos_ref[pl.ds(start, bk)]
        return attend(carry, k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :], k_pos,
                      k_flags_ref[pl.ds(start, bk)], (k_pos >= 0) & fresh)

    rows = q.shape[0]
    carry = ((jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
              jnp.zeros((rows, head_dim), jnp.float32)), jnp.float32(0))
    carry = lax.fori_loop(0, (extent_ref[0] + bk - 1) // bk, slot_block, carry)
    chunk = t_k_ref.shape[0]
    tk = _tile(chunk, block_k)

    def chunk_block(j, carry):
        part = pl.ds(j * tk, tk)
        return attend(carry, t_k_ref[part, :], t_v_ref[part, :], t_pos_ref[part],
                      t_flags_ref[part], t_valid_ref[part] != 0)

    state, seen = lax.fori_loop(0, chunk // tk, chunk_block, carry)
    o_ref[...] = online_softmax_finish(state).astype(o_ref.dtype)
    seen_ref[...] = jnp.full(seen_ref.shape, seen, jnp.float32)


@functools.partial(jax.jit, static_argnames=("window", "use_flags", "sliding_window", "scale",
                                             "block_q", "block_k", "interpret"))
def fused_chunk_attention(q, q_pos, q_valid, slots, tail, extent, *, window, use_flags,
                          sliding_window, scale, block_q=64, block_k=64, interpret=False):
    """`live_attention` of a prefill chunk (`tail` given) as one Pallas kernel: the same
    arguments and result (up to float rounding).

    q: [B, C, H, D]; q_pos: int32 [B, C]; q_valid: bool [B, C]; slots: (keys [B, Hkv, S, D],
    values, pos int32 [B, Hkv, S] (-1: free), flags bool [B, Hkv, S]); tail: the chunk's (keys
    [B, Hkv, C, D], values, pos [B, Hkv, C], flags, valid); extent: int32 scalar (`live_extent`).
    block_q, block_k: the most query rows and keys per tile, powers of two; a tile takes the
    largest power of two at most that which divides G x C (queries) or C (the chunk's keys).
    interpret: run in Pallas' interpreter (any backend; the tests); otherwise Pallas' Triton
    backend (GPUs, whose dots want tiles of at least 16).
    returns (out [B, C, H, D] in q.dtype, keys seen by real queries [B, Hkv] f32)
    """
    keys, values, pos, flags = slots
    t_keys, t_values, t_pos, t_flags, t_valid = tail
    batch, chunk, num_heads, head_dim = q.shape
    num_kv_heads, capacity = keys.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    rows = group * chunk
    if _floor_pow2(block_q) != block_q or _floor_pow2(block_k) != block_k:
        raise ValueError(f"block_q={block_q} and block_k={block_k} must be powers of two "
                         "(Triton's tiles)")
    block_q = _tile(rows, block_q)
    tiles = rows // block_q
    qg = group_queries(q, num_kv_heads).reshape(batch, num_kv_heads, rows, head_dim)
    q_pos_rows = jnp.tile(q_pos.astype(jnp.int32), (1, group))  # row g * C + c: query c
    count = jnp.zeros((batch, rows), jnp.int32).at[:, :chunk].set(q_valid.astype(jnp.int32))
    as_int8 = lambda a: a.astype(jnp.int8)  # noqa: E731

    def stream(*tail_shape):  # a whole stream's block of a [B, Hkv, ...] array
        return pl.BlockSpec((None, None) + tail_shape, lambda b, h, i: (b, h) + (0,) * len(tail_shape))

    def rows_of(*tail_shape):  # this program's query tile of a [B, (Hkv,) rows, ...] array
        lead = (None, None) if len(tail_shape) == 2 else (None,)
        return pl.BlockSpec(lead + tail_shape,
                            (lambda b, h, i: (b, h, i, 0)) if len(tail_shape) == 2
                            else (lambda b, h, i: (b, i)))

    kernel = functools.partial(
        _kernel, rule=dict(window=window, use_flags=use_flags, sliding_window=sliding_window),
        scale=scale, block_k=block_k)
    with jax.named_scope("fused_prefill"):
        out, seen = pl.pallas_call(
            kernel,
            grid=(batch, num_kv_heads, tiles),
            in_specs=[pl.BlockSpec((1,), lambda b, h, i: (0,)),
                      rows_of(block_q, head_dim), rows_of(block_q), rows_of(block_q),
                      stream(capacity, head_dim), stream(capacity, head_dim), stream(capacity),
                      stream(capacity), stream(chunk, head_dim), stream(chunk, head_dim),
                      stream(chunk), stream(chunk), stream(chunk)],
            out_specs=[rows_of(block_q, head_dim),
                       pl.BlockSpec((None, None, None, 1), lambda b, h, i: (b, h, i, 0))],
            out_shape=[jax.ShapeDtypeStruct((batch, num_kv_heads, rows, head_dim), q.dtype),
                       jax.ShapeDtypeStruct((batch, num_kv_heads, tiles, 1), jnp.float32)],
            interpret=interpret,
            compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=4,
                                                                            num_stages=2),
        )(jnp.reshape(extent, (1,)).astype(jnp.int32), qg, q_pos_rows, count, keys, values,
          pos, as_int8(flags), t_keys, t_values, t_pos, as_int8(t_flags), as_int8(t_valid))
    out = out.reshape(batch, num_kv_heads, group, chunk, head_dim)
    return _heads_last(out, q), seen.sum(axis=(2, 3))
