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

On a CPU a prefill chunk runs stream by stream instead (`tiled_over`, the plan's "tiled"): a
`lax.map` over (row, KV head), and per stream a map over query tiles of at most QUERY_ROWS
rows, each tile reading its stream's key blocks and then, in sub-tiles of at most CHUNK_ROWS
rows, only the chunk's key blocks up to each sub-tile's newest query position. The score tiles stay in a core's cache between the dots and the softmax,
a stream reads only its own live blocks, and the chunk's self-attention costs about half
(causal). One process, gqa shape (8 layers, 8 / 2 heads of 64), B 4, a 4,096-token `full`
prefill: 30.3-31.8 s batched, 23.5-24.4 s tiled. Accelerators keep the batched blocks, which
run the streams in parallel.

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
from dms_jax.ops.mask import hard_evict_bias, visibility_bias, visible

# Slots per key block: a decode step reads a whole block per loop iteration (fewer, longer
# dots: the loop's per-iteration cost matters there); a prefill chunk's [C, block] score tile
# stays cache-sized (one layer's attention over 1,024 tokens, B 4, 4 KV heads of 64, chunks of
# 512: 167 ms with blocks of 512, 118 ms with 256, 141 ms with 128).
DECODE_BLOCK = 1024
PREFILL_BLOCK = 256
# Rows (query heads of a group x queries) of one query tile of the tiled prefill
# (`tiled_attention`) over the keys before the chunk: a [rows, PREFILL_BLOCK] f32 score tile is
# 512 KiB, a core's L2 here, and the taller dots run faster (one stream's chunk of 512 at
# position 15,872, one thread: 38.5 -> 35.1 ms with 1 query head per KV head, 270 -> 253 ms
# with 4, against 256 rows; with the queries prescaled, a kv-shape 16k prompt at B 4 through
# `generate`: 22.2-23.9 -> 19.0-21.8 s). Over the chunk's own keys a tile is split into
# sub-tiles of at most CHUNK_ROWS rows, each reading only the chunk keys it can see: 512-row
# tiles there would score twice the causal triangle (a chunk at position 0, B 4, 4 KV heads:
# 16.6 -> 20.1 ms).
QUERY_ROWS = 512
CHUNK_ROWS = 256


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
    return _attend_scored(carry, qg, k_blk, v_blk, bias, seen_under(bias, q_valid), scale)


def seen_under(bias, q_valid):
    """Keys seen by the real queries under a block's bias: f32 [B, Hkv].
    bias: f32 [B, Hkv, 1, C, n]; q_valid: bool [B, C]."""
    return (visible(bias[:, :, 0]) & q_valid[:, None, :, None]).sum(axis=(2, 3),
                                                                   dtype=jnp.float32)


def seen_by_kind(real_t, row, n):
    """Keys seen by a tile's real queries in the two `tile_bias` classes without a per-query
    bias, (every key: class 0, one bias row: class 1), f32 scalars. real_t: bool [1, tile];
    row: `tile_bias`'s; n: keys in the block."""
    reals = real_t.sum(dtype=jnp.float32)
    return reals * n, reals * visible(row).sum(dtype=jnp.float32)


def _attend_scored(carry, qg, k_blk, v_blk, bias, seen, scale):
    """`attend_block` given its count of keys seen [B, Hkv]; bias None: every key visible;
    scale None: the queries come scaled (`_prescaled`)."""
    state, total = carry
    scores = jnp.einsum("bhgqd,bhkd->bhgqk", qg, k_blk, preferred_element_type=jnp.float32)
    if scale is not None:
        scores = scores * scale
    if bias is not None:
        scores = scores + bias
    return online_softmax_step(state, scores, v_blk), total + seen


def tile_bias(pos_t, block, rule):
    """How wide a key block's bias must be for a query tile (`attend_tile_block`): (kind, row)
    with kind int32 0 (every key visible to every query: no bias), 1 (one bias row for all the
    tile's queries: `row`) or 2 (a bias per query and key), row f32 [1, 1, 1, 1, n] the rule at
    the tile's lowest position.

    Under the rule the queries that see a key form one interval of positions, [key, key + span]
    (causality; the window of a flagged key; a sliding window), so a key at or before the
    tile's lowest query position has the same bias for every query of the tile when it has the
    same bias at the tile's lowest and highest positions (an invalid key is masked for all).
    pos_t: int32 [1, tile] (padding queries included: their positions count too);
    block, rule: `attend_tile_block`'s."""
    _, _, k_pos, k_flags, k_valid = block
    def bias_at(position):  # the rule for one query position: [1, 1, 1, 1, n]
        return block_bias(jnp.full((1, 1), position), k_pos, k_flags, k_valid, **rule)

    lo = jnp.min(pos_t)
    row = bias_at(lo)  # [1, 1, 1, 1, n]
    uniform = jnp.all((row == bias_at(jnp.max(pos_t)))
                      & ((k_pos <= lo) | ~k_valid)[:, :, None, None, :])
    return jnp.where(uniform, jnp.where(jnp.all(row == 0), 0, 1), 2), row


def attend_tile_block(carry, q_t, pos_t, real_t, block, rule, scale):
    """One stream's key block into a query tile's running softmax (`tiled_over`), its bias only
    as wide as it must be (`tile_bias`): none when every key is visible to every query (every
    cache block of a `full` prefill), one row when the keys' visibility is the same for every
    query (blocks older than the window under `dms`), else the [tile, n] bias of `block_bias`.
    The keys seen of a row are the real queries times its visible keys. Same softmax and count
    as `attend_block` over `block_bias` (adding a row of zeros is exact); skipping the tile-wide
    bias and its count saves two of the block's passes over its [tile, n] scores.

    q_t: [1, 1, G, tile, D]; pos_t: int32 [1, tile]; real_t: bool [1, tile];
    block: (keys [1, 1, n, D], values, pos int32 [1, 1, n], flags bool [1, 1, n] (or None
    without flags), valid bool [1, 1, n]); rule: `block_bias`'s keywords.
    """
    keys, values, k_pos, k_flags, k_valid = block
    kind, row = tile_bias(pos_t, block, rule)
    seen_all, seen_row = seen_by_kind(real_t, row, k_pos.shape[-1])

    def none(carry):
        return _attend_scored(carry, q_t, keys, values, None, jnp.full((1, 1), seen_all), scale)

    def one_row(carry):
        return _attend_scored(carry, q_t, keys, values, row, jnp.full((1, 1), seen_row), scale)

    def general(carry):
        bias = block_bias(pos_t, k_pos, k_flags, k_valid, **rule)
        return attend_block(carry, q_t, keys, values, bias, real_t, scale)

    return lax.switch(kind, [none, one_row, general], carry)


def finish(carry, q):
    """(out [B, C, H, D] in q.dtype, keys seen [B, Hkv]) from the final carry."""
    state, seen = carry
    return _heads_last(online_softmax_finish(state), q), seen


def _heads_last(out, q):
    """[B, Hkv, G, C, D] -> [B, C, H, D] in q.dtype (`group_queries` undone)."""
    batch, chunk, num_heads, head_dim = q.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, chunk, num_heads, head_dim).astype(q.dtype)


def query_tile(chunk, group, rows=None):
    """Queries per tile of the tiled prefill: the largest divisor of the chunk whose tile has at
    most `rows` rows (query heads of a group x queries; default QUERY_ROWS)."""
    most = max(1, min(chunk, (rows or QUERY_ROWS) // group))
    return max(t for t in range(1, most + 1) if chunk % t == 0)


def _prescaled(q, scale):
    """(queries, scale left to apply to the scores): float32 queries take the scale once per
    chunk instead of every score tile taking it (a pass over each [rows, n] tile saved; equal up
    to float rounding, exactly for a power-of-two scale such as head_dim 64's 1/8); other dtypes
    keep it on the f32 scores, where scaling the queries would round them to their dtype."""
    if q.dtype == jnp.float32:
        return q * scale, None
    return q, scale


def stream_block(a, stream, start, size):
    """[1, 1, size, ...] of a [B, Hkv, n, ...] array: one stream's `size` entries from `start`
    (a dynamic slice: only the block is read, never the stream's whole buffer)."""
    index = (stream[0], stream[1], start) + (0,) * (a.ndim - 3)
    return lax.dynamic_slice(a, index, (1, 1, size) + a.shape[3:])


def block_at(i, block, total):
    """Loop trip i's block of `block` entries out of `total` (block <= total): (start, fresh
    bool [block]). The last block is moved back to end at `total`, overlapping the one before;
    `fresh` marks the entries no earlier trip read, so every entry counts once."""
    start = jnp.minimum(i * block, total - block)
    return start, start + jnp.arange(block) >= i * block


def stream_ids(batch, num_kv_heads):
    """int32 [B x Hkv, 2]: every stream's (row, KV head), row-major."""
    ids = jnp.arange(batch * num_kv_heads, dtype=jnp.int32)
    return jnp.stack(jnp.divmod(ids, num_kv_heads), axis=1)


def map_streams(fn, batch, num_kv_heads):
    """`lax.map` of fn over every stream of a [B, Hkv] cache, row-major: fn(stream) with stream
    = int32 [2] (row, KV head); returns fn's outputs stacked on a leading B x Hkv axis."""
    return lax.map(fn, stream_ids(batch, num_kv_heads))


def fold_sources(stream, sources, trips, carry, step):
    """`carry` through every block of every key source of `stream`, source by source, block by
    block: carry = step(carry, read(stream, i), source_rule). sources: `tiled_over`'s;
    trips: each source's block count for this stream (its trips(stream), which the caller may
    hoist out of a loop; the int 1 runs the single block without a loop)."""
    for n, (_, read, source_rule) in zip(trips, sources):
        def source_block(i, carry, read=read, source_rule=source_rule):
            return step(carry, read(stream, i), source_rule)
        carry = (source_block(0, carry) if isinstance(n, int) and n == 1
                 else lax.fori_loop(0, n, source_block, carry))
    return carry


def _stream_tiles(stream, qg, q_pos, q_valid, sources, tail, *, rule, scale):
    """One stream's prefill chunk, `stream` = (row, KV head), query tile by query tile: each
    tile (at most QUERY_ROWS rows) reads every source's key blocks for this stream, then, in
    sub-tiles of at most CHUNK_ROWS rows, the chunk's key blocks each sub-tile can see
    (`_chunk_keys`). A tile with no real query (the chunks of a row whose prompt ended, a
    padding row) reads nothing: its outputs are 0 and it sees no key. Arguments are
    `tiled_over`'s, every stream's. Returns the output [1, 1, G, C, D] (f32; 0 for the queries
    of a tile without a real one) and the keys seen by real queries [1, 1]."""
    _, _, group, chunk, head_dim = qg.shape
    tile = query_tile(chunk, group)
    sub = query_tile(tile, group, CHUNK_ROWS)  # queries per sub-tile over the chunk's own keys
    row = lambda a: lax.dynamic_slice_in_dim(a, stream[0], 1, axis=0)  # noqa: E731
    q_s = lax.dynamic_slice(qg, (stream[0], stream[1], 0, 0, 0), (1, 1) + qg.shape[2:])
    q_s, scale = _prescaled(q_s, scale)
    pos_q, real_q = row(q_pos), row(q_valid)  # [1, C]
    trips = [trips_of(stream) for trips_of, _, _ in sources]

    def one_tile(t):
        lo = t * tile
        q_t = lax.dynamic_slice_in_dim(q_s, lo, tile, axis=3)  # [1, 1, G, tile, D]
        pos_t = lax.dynamic_slice_in_dim(pos_q, lo, tile, axis=1)  # [1, tile]
        real_t = lax.dynamic_slice_in_dim(real_q, lo, tile, axis=1)

        def attend_tile(_):
            state, seen = fold_sources(
                stream, sources, trips, empty_state(q_t),
                lambda carry, block, source_rule: attend_tile_block(
                    carry, q_t, pos_t, real_t, block, source_rule, scale))
            parts = []
            for s in range(0, tile, sub):  # the chunk's own keys, sub-tile by sub-tile
                part = (tuple(a[:, :, :, s:s + sub] for a in state), seen)
                part, seen = _chunk_keys(part, stream, q_t[:, :, :, s:s + sub],
                                         pos_t[:, s:s + sub], real_t[:, s:s + sub], tail,
                                         rule=rule, scale=scale)
                parts.append(part)
            state = tuple(jnp.concatenate(a, axis=3) for a in zip(*parts))
            return online_softmax_finish(state), seen

        def padding(_):  # no real query in the tile (a short row's or a padding row's chunk)
            return (jnp.zeros((1, 1, group, tile, head_dim), jnp.float32),
                    jnp.zeros((1, 1), jnp.float32))

        return lax.cond(jnp.any(real_t), attend_tile, padding, None)

    outs, seen = lax.map(one_tile, jnp.arange(chunk // tile))  # [T, 1, 1, G, tile, D], [T, 1, 1]
    out = jnp.moveaxis(outs, 0, 3).reshape(1, 1, group, chunk, head_dim)
    return out, seen.sum(axis=0)


def _chunk_keys(carry, stream, q_t, pos_t, real_t, tail, *, rule, scale):
    """A query (sub-)tile's softmax carry after the chunk's own keys of `stream`, in blocks of
    the tile's width up to the last block holding a key at or before the tile's newest query
    position (the blocks after it are masked for every query of the tile by the rule's
    causality, so skipping them changes nothing). Arguments are `_stream_tiles`'."""
    size, chunk = q_t.shape[3], tail[0].shape[2]
    t_pos, t_valid = tail[2], tail[4]
    mine = lambda a: stream_block(a, stream, 0, chunk)[0, 0]  # noqa: E731
    reach = 1 + jnp.max(jnp.where(mine(t_valid) & (mine(t_pos) <= jnp.max(pos_t)),
                                  jnp.arange(chunk), -1))

    def chunk_block(j, carry):
        take = lambda a: stream_block(a, stream, j * size, size)  # noqa: E731
        return attend_tile_block(carry, q_t, pos_t, real_t, tuple(map(take, tail)), rule, scale)

    return lax.fori_loop(0, (reach + size - 1) // size, chunk_block, carry)


def slot_source(slots, *, rule, block):
    """The live slots of a stream as a key source of `tiled_over`: blocks of `block` slots below
    the stream's own high-water mark (the last block overlaps the one before it, as in
    `live_attention`). slots: (keys [B, Hkv, S, D], values, pos [B, Hkv, S], flags)."""
    keys, values, pos, flags = slots
    capacity = keys.shape[2]
    block = min(block, capacity)

    def trips(stream):
        return (live_extent(stream_block(pos, stream, 0, capacity)) + block - 1) // block

    def read(stream, i):
        start, fresh = block_at(i, block, capacity)
        take = lambda a: stream_block(a, stream, start, block)  # noqa: E731
        k_pos = take(pos)
        return take(keys), take(values), k_pos, take(flags), (k_pos >= 0) & fresh

    return trips, read, rule


def tiled_attention(q, q_pos, q_valid, slots, tail, *, window, use_flags, sliding_window, scale,
                    block=None):
    """A prefill chunk's attention over the live slots, then the chunk, stream by stream and
    query tile by query tile (`tiled_over`). The same arguments, rule and result as
    `live_attention` (up to float rounding); the plan's "tiled" cache attention, chosen on CPU
    (`dms_jax.plan.resolve_attention`)."""
    rule = dict(window=window, use_flags=use_flags, sliding_window=sliding_window)
    source = slot_source(slots, rule=rule, block=block or PREFILL_BLOCK)
    return tiled_over(q, q_pos, q_valid, [source], tail, rule=rule, scale=scale)


def tiled_over(q, q_pos, q_valid, sources, tail, *, rule, scale):
    """A prefill chunk's attention, stream by stream (`lax.map` over rows x KV heads) and query
    tile by query tile (`query_tile`: at most QUERY_ROWS rows): every score tile is a few hundred
    KiB that stays in a CPU core's cache between its dot, its softmax and its second dot, each
    stream reads only its own keys, and each tile only the chunk keys it can see (about half the
    chunk's self-attention, causal). On accelerators the streams' sequential order would waste
    the device, which runs `live_attention`'s batched blocks instead.

    q: [B, C, H, D]; q_pos: int32 [B, C]; q_valid: bool [B, C]; sources: the keys before the
    chunk, each (trips(stream) -> int32 blocks (or the int 1), read(stream, i) -> (keys
    [1, 1, n, D], values, pos int32 [1, 1, n], flags bool [1, 1, n] or None, valid bool
    [1, 1, n]), rule: `block_bias`'s keywords for these keys) for stream = int32 (row, KV head)
    (`slot_source`; the paged cache's pages and ring), each block through `attend_tile_block`;
    tail: the chunk's own (keys [B, Hkv, C, D], values, pos [B, Hkv, C], flags, valid) under
    `rule` (block_bias's window, use_flags, sliding_window).
    returns (out [B, C, H, D] in q.dtype, keys seen by real queries [B, Hkv] f32)
    """
    batch, num_kv_heads = q.shape[0], tail[0].shape[1]
    qg = group_queries(q, num_kv_heads)

    def one_stream(stream):
        return _stream_tiles(stream, qg, q_pos, q_valid, sources, tail, rule=rule, scale=scale)

    with jax.named_scope("tiled"):
        # [B x Hkv, 1, 1, G, C, D], [B x Hkv, 1, 1]
        out, seen = map_streams(one_stream, batch, num_kv_heads)
    out = out.reshape(batch, num_kv_heads, *out.shape[3:])
    return _heads_last(out, q), seen.reshape(batch, num_kv_heads)


def select_queries(q, q_pos, q_valid, rows):
    """One query per row: the chunk index `rows[b]` of row b (-1: none; its query is padding).
    q: [B, C, H, D]; q_pos: int32 [B, C]; q_valid: bool [B, C]; rows: int32 [B].
    returns (q [B, 1, H, D], q_pos [B, 1], q_valid [B, 1])"""
    return (take_rows(q, rows), take_rows(q_pos, rows),
            take_rows(q_valid, rows) & (rows >= 0)[:, None])


def take_rows(a, rows):
    """a[b, rows[b]] kept as axis 1 of length 1 (rows -1 taken as 0): a [B, C, ...] ->
    [B, 1, ...]; rows int32 [B]."""
    index = jnp.maximum(rows, 0).reshape((-1, 1) + (1,) * (a.ndim - 2))
    return jnp.take_along_axis(a, index, axis=1)


def count_block(pos_q, real_q, block, rule):
    """The keys of one stream's block seen by its real queries (f32 scalar): `attend_tile_block`'s
    count without the attention (no dots, no softmax), by the same `tile_bias` classes, so a
    block that every query sees whole (a `full` prefill's cache blocks) or by one row of the rule
    (DMS blocks older than the window) costs a pass over its keys, not over queries x keys.
    pos_q: int32 [1, C]; real_q: bool [1, C]; block, rule: `attend_tile_block`'s."""
    _, _, k_pos, k_flags, k_valid = block
    kind, row = tile_bias(pos_q, block, rule)
    seen_all, seen_row = seen_by_kind(real_q, row, k_pos.shape[-1])

    def general():
        return seen_under(block_bias(pos_q, k_pos, k_flags, k_valid, **rule), real_q)[0, 0]

    return lax.switch(kind, [lambda: seen_all, lambda: seen_row, general])


def tiled_seen(q_pos, q_valid, sources, tail, *, rule, at_once=False):
    """The keys seen by the real queries of a prefill chunk [B, Hkv] f32, as `tiled_over` counts
    them, without attending: stream by stream, every source's blocks and the chunk's own keys
    through `count_block`. A forward that needs the outputs of a few queries only (the last
    layer of a prompt, whose other rows nothing reads) attends with those and takes the count of
    the whole chunk from here, so the keys-read statistics stay those of every query.
    Arguments are `tiled_over`'s. at_once: every stream in one loop (the same count, `vmap`ped
    over the streams: the block loop runs the longest stream's trips and `count_block` computes
    its classes as selects), for accelerators, where a loop trip costs kernel launches and the
    streams one after another (`lax.map`) would take B x Hkv times the trips
    (the last layer of a 32k prompt at B 8 with 8 KV heads: ~258,000 instead of ~4,000)."""
    batch, num_kv_heads, chunk = tail[2].shape

    def one_stream(stream):
        row = lambda a: lax.dynamic_slice_in_dim(a, stream[0], 1, axis=0)  # noqa: E731
        pos_q, real_q = row(q_pos), row(q_valid)  # [1, C]
        seen = fold_sources(stream, sources, [trips_of(stream) for trips_of, _, _ in sources],
                            jnp.float32(0), lambda seen, block, source_rule:
                            seen + count_block(pos_q, real_q, block, source_rule))
        own = tuple(None if a is None else stream_block(a, stream, 0, chunk) for a in tail)
        return seen + count_block(pos_q, real_q, own, rule)

    with jax.named_scope("keys_seen"):
        seen = (jax.vmap(one_stream)(stream_ids(batch, num_kv_heads)) if at_once
                else map_streams(one_stream, batch, num_kv_heads))
        return seen.reshape(batch, num_kv_heads)


def one_query(q, q_pos, q_valid, rows, attend, sources, tail, *, rule, at_once=False):
    """A chunk's attention output for one query per row and the keys seen by all its queries.

    The query of chunk index `rows[b]` of each row (`select_queries`) goes through
    `attend(q1, pos1, valid1) -> out [B, 1, H, D]` (skipped, zeros, when no row has its query
    in this chunk); the keys seen by every real query of the chunk come from `tiled_seen` over
    `sources` and `tail` (`tiled_over`'s arguments; at_once: `tiled_seen`'s, for an
    accelerator plan). returns (out [B, 1, H, D], seen [B, Hkv])
    """
    q1, pos1, valid1 = select_queries(q, q_pos, q_valid, rows)
    out = lax.cond(jnp.any(valid1), lambda: attend(q1, pos1, valid1),
                   lambda: jnp.zeros(q1.shape, q1.dtype))
    return out, tiled_seen(q_pos, q_valid, sources, tail, rule=rule, at_once=at_once)


def live_attention(q, q_pos, q_valid, slots, tail, extent, *, window, use_flags, sliding_window,
                   scale, block=None):
    """The chunk's queries over the live slots, then over the chunk itself (if given).

    q: [B, C, H, D]; q_pos: int32 [B, C]; q_valid: bool [B, C] (a padding query counts no keys
      seen; its output is unused);
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
        start, fresh = block_at(i, block, capacity)
        take = lambda a: lax.dynamic_slice_in_dim(a, start, block, axis=2)  # noqa: E731
        k_pos = take(pos)
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
