"""The paged cache's readers (`dms_jax.paged`): a chunk's or a decode step's queries over a
stream's live pages, either gathered page block by page block (`page_attention`, and
`page_source` for the tiled prefill) or, in a decode step that would gather most of the pool,
every pool page read once in place (`pool_attention`). All of them take each page's visibility
from `block_bias`, the one rule (`dms_jax.ops.mask.visibility_bias`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from dms_jax.ops.live_attention import attend_block, block_at, block_bias, stream_block
from dms_jax.ops.mask import MASK_VALUE, visible

if TYPE_CHECKING:
    from dms_jax.paged import PagedLayerCache

# tokens per page-block iteration of the attention loop (pages are gathered k at a time)
DECODE_BLOCK_TOKENS = 512
PREFILL_BLOCK_TOKENS = 256
# A decode step reads the whole pool in place (`pool_attention`) rather than gathering the live
# pages (`page_attention`) once the gather would copy at least this share of the pool's pages.
# Measured on CPU (kv shape: a pool of 2,048 pages of 64 tokens, 14 rows x 4 KV heads, one
# layer): one thread, gather 4.6 / 9.9 / 19.2 ms at 22 / 44 / 79% of the pool in use against
# 6.5-7.5 ms in place (break-even ~30%); two threads, gather 3.6 / 7.0 ms at 44 / 88% against
# 4.7 ms (break-even ~60%). Only without grouped queries: with G query heads per KV head the
# per-page dots are [G, D] x [D, page], which XLA on CPU runs slower than the gather's long dots
# (a full pool of 520 pages, 4 rows x 2 KV heads, one thread: G = 2 6.3 ms in place against 3.6
# gathered, G = 4 8.9 against 4.5), so grouped queries always gather.
POOL_READ_SHARE = 0.4


def page_attention(carry, qg, q_pos, q_valid, cache: PagedLayerCache, *, sliding_window, scale,
                   block_tokens):
    """The queries over every stream's retained tokens, `k` pages per loop iteration, for as many
    iterations as the stream holding the most pages needs (no unallocated page is read beyond
    the last block). Retained tokens are visible to every later query (they left the window
    unflagged); only Mistral's sliding window still masks them, by their stored positions."""
    k, trips = _page_blocks(cache, block_tokens)

    def one_block(i, carry):
        k_blk, v_blk, k_pos, valid = _gather_pages(cache, cache.page_table, cache.retained, i, k)
        bias = block_bias(q_pos, k_pos, None, valid, window=0, use_flags=False,
                          sliding_window=sliding_window)  # the one rule; no flags: retained
        return attend_block(carry, qg, k_blk, v_blk, bias, q_valid, scale)

    return lax.fori_loop(0, jnp.max(trips), one_block, carry)


def _page_blocks(cache: PagedLayerCache, block_tokens: int):
    """(k: pages per block, blocks each stream's retained tokens fill [B, Hkv])."""
    page, width = cache.page_size, cache.page_table.shape[-1]
    k = max(1, min(block_tokens // page, width))
    pages_used = (cache.retained + page - 1) // page  # [B, Hkv]
    return k, (pages_used + k - 1) // k


def _gather_pages(cache: PagedLayerCache, table, retained, i, k):
    """Block i of streams' pages, gathered: (keys [b, h, k x page, D], values, positions
    [b, h, k x page], valid) for page tables `table` [b, h, width] holding `retained` [b, h]
    tokens. The last block overlaps the one before it; its pages already read are not valid."""
    page, width = cache.page_size, table.shape[-1]
    start, fresh = block_at(i, k, width)  # pages of an earlier iteration count once
    ids = lax.dynamic_slice_in_dim(table, start, k, axis=2)  # [b, h, k]
    safe = jnp.maximum(ids, 0)
    b, h = ids.shape[:2]
    keys = cache.pool_keys[safe].reshape(b, h, k * page, -1)
    values = cache.pool_values[safe].reshape(b, h, k * page, -1)
    k_pos = cache.pool_pos[safe].reshape(b, h, k * page)
    index = (start + jnp.arange(k))[:, None] * page + jnp.arange(page)  # [k, page]
    valid = ((index.reshape(-1) < retained[..., None])
             & jnp.repeat(fresh & (ids >= 0), page, axis=-1))
    return keys, values, k_pos, valid


def page_source(cache: PagedLayerCache, *, sliding_window, block_tokens):
    """A stream's retained tokens as a key source of `dms_jax.ops.live_attention.tiled_over`:
    its own pages, `k` per block (`page_attention`'s blocks and rule, one stream at a time)."""
    k, trips = _page_blocks(cache, block_tokens)

    def read(stream, i):
        table = stream_block(cache.page_table, stream, 0, cache.page_table.shape[2])
        retained = lax.dynamic_slice(cache.retained, stream, (1, 1))
        k_blk, v_blk, k_pos, valid = _gather_pages(cache, table, retained, i, k)
        return k_blk, v_blk, k_pos, None, valid

    rule = dict(window=0, use_flags=False, sliding_window=sliding_window)  # no flags: retained
    return (lambda stream: trips[stream[0], stream[1]]), read, rule


def reads_pool(cache: PagedLayerCache, block_tokens: int):
    """bool scalar: a decode step reads the pool in place (`pool_attention`) rather than
    gathering pages (`page_attention`): the gather would copy at least `POOL_READ_SHARE` of the
    pool's pages (every stream gathers as many blocks as the stream holding the most)."""
    k, trips = _page_blocks(cache, block_tokens)
    return jnp.max(trips) * k * trips.size >= POOL_READ_SHARE * cache.num_pages


def pool_attention(qg, q_pos, q_valid, cache: PagedLayerCache, *, sliding_window, scale):
    """The queries over every stream's retained tokens, reading the pool in place: each page is
    scored once by the queries of the stream that owns it (found by inverting the page tables),
    and the pages' partial softmaxes are combined per stream (segment max and sums). No page is
    copied, so a step reads the pool's bytes once, where `page_attention`'s gather writes and
    reads them again; free pages are read too (masked), so this pays when most pages are in use.
    Each page's visibility comes from `block_bias`, as `page_attention`'s blocks do (the one
    rule), and its keys seen are counted as `attend_block` counts them.

    qg: [B, Hkv, G, C, D]; q_pos: int32 [B, C]; q_valid: bool [B, C].
    returns the online softmax's carry after the pages (`empty_state`'s structure).
    """
    batch, heads, group, chunk, head_dim = qg.shape
    streams, pages = batch * heads, cache.num_pages
    with jax.named_scope("owners"):
        table = cache.page_table.reshape(streams, -1)  # [S, M]
        ids = jnp.where(table >= 0, table, pages)
        stream_id = jnp.broadcast_to(jnp.arange(streams, dtype=jnp.int32)[:, None], table.shape)
        owner = jnp.full((pages,), streams, jnp.int32).at[ids].set(stream_id, mode="drop")  # [P]
        own = jnp.minimum(owner, streams - 1)
        q_own = qg.reshape(streams, group, chunk, head_dim)[own]  # [P, G, C, D]
        pos_own = jnp.repeat(q_pos, heads, axis=0)[own]  # [P, C]
        real_own = jnp.repeat(q_valid, heads, axis=0)[own]  # [P, C]
    k_valid = ((owner < streams)[:, None] & (cache.pool_pos >= 0))[:, None]  # [P, 1, page]
    bias = block_bias(pos_own, cache.pool_pos[:, None], None, k_valid, window=0, use_flags=False,
                      sliding_window=sliding_window)[:, 0]  # [P, 1, C, page], page_attention's rule
    # each page's partial softmax from nothing (`online_softmax_step` from `empty_state`, written
    # without its size-1 axes: `attend_block` on [P, 1, ...] blocks compiles to dots ~6x slower
    # on CPU, 36 ms against 5.6 for the microbenchmark of POOL_READ_SHARE at 79% in use)
    scores = jnp.einsum("pgcd,ptd->pgct", q_own, cache.pool_keys,
                        preferred_element_type=jnp.float32) * scale + bias
    m_page = jnp.max(scores, axis=-1)  # [P, G, C]
    p = jnp.exp(scores - m_page[..., None])
    l_page = jnp.sum(p, axis=-1)
    acc_page = jnp.einsum("pgct,ptd->pgcd", p.astype(cache.pool_values.dtype), cache.pool_values,
                          preferred_element_type=jnp.float32)
    seen_page = (visible(bias[:, 0]) & real_own[..., None]).sum(
        axis=(1, 2), dtype=jnp.float32)  # [P], attend_block's count
    with jax.named_scope("combine"):
        # per stream: the max over its pages (MASK_VALUE when it has none, so that the ring's
        # block rescales it to nothing), then each page's share rescaled to it
        m = jnp.maximum(jax.ops.segment_max(m_page, owner, num_segments=streams), MASK_VALUE)
        share = jnp.exp(m_page - m[own])  # [P, G, C]
        l = jax.ops.segment_sum(l_page * share, owner, num_segments=streams)
        acc = jax.ops.segment_sum(acc_page * share[..., None], owner, num_segments=streams)
        seen = jax.ops.segment_sum(seen_page, owner, num_segments=streams)
    shape = (batch, heads, group, chunk)
    return ((m.reshape(shape), l.reshape(shape), acc.reshape(shape + (head_dim,))),
            seen.reshape(batch, heads))


# ----------------------------------------------------------------------------- the update
