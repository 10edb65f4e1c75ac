"""The paged KV cache: a ring of the window per stream and one pool of pages per layer
(docs/paged_cache.md).

DMS decides a token's fate once: the decision of its successor flags it, and a token that leaves
the window `t - w .. t` unflagged is kept for good (docs/dms.md section 5). So per stream (batch
row, KV head) the cache is
  * a ring of the last `w + 1` positions (`R` slots, position p in slot p mod R), every token in
    it visible whatever its flag (the newest token's flag is pending until its successor comes);
  * an append-only list of retained tokens, stored in fixed-size pages of a pool shared by every
    stream of the layer, found through the stream's page table. Nothing retained is ever
    removed, so the list never fragments and needs no compaction.
`full` is the same layout with a window of 0 and no flags: every token passes through a ring of
one slot into the pages. The pool is sized for the batch's expected retained tokens (the plan's
`pool_pages`), not for the worst head, so heads that keep more borrow pages from heads that keep
less. Attention reads the ring and, in a loop with a dynamic trip count, only the pages some
stream holds (`dms_jax.ops.live_attention`'s online softmax), so a prefill chunk at position t
costs about t keys under `full` and about the held tokens under `dms`; a decode step whose pool
is mostly in use reads every page in place instead, combining per-page softmaxes per stream
(`pool_attention`; one query head per KV head only, see `POOL_READ_SHARE`).

One step (`attend_and_update`, pure and jittable; the model calls it for a plan whose layout is
"paged"):
  1. flags: the chunk's first decision flags the ring's newest token; inside the chunk the next
     real token's decision flags a token (`dms_jax.cache._chunk_flags`, the one rule);
  2. attention: a prefill chunk attends over the pages, the ring and itself (causally) before it
     is stored; a decode step stores its token first and attends over the pages and the ring (the
     donated buffers are then written in place);
  3. update (`_advance`): of the ring's tokens and the chunk's, those within the window of the
     newest position go to the ring, the older ones that are unflagged (all of them for `full`)
     are appended to the stream's pages, the flagged ones are gone.
Pages are served from a free stack in stream order (row-major over (row, KV head)), each stream
taking what its appended tokens need. When the pool runs dry, a stream keeps what its pages hold
and drops its newest tokens to be retained, counted in `overflow` exactly as the slot layout's
(`strict` raises); the cache stays consistent. `release_rows` returns finished rows' pages to the
stack (continuous batching, `dms_jax.serve`).

On a mesh (`PoolShards`) the pool is split with the streams: each device holding a block of
rows and KV heads holds its own pool of `P / S` pages and its own free stack, its page tables
name pages of that local pool, and the step runs per device under `jax.shard_map`, so no page
moves between devices and heads borrow pages only from the heads of the same device.

Assumptions on the caller are the slot layout's (`dms_jax.cache`): within a row, real tokens
arrive in order with consecutive positions across calls; `new_valid` may hold any pattern.
"""
from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from dms_jax.cache import _chunk_flags, ordered_after  # the shift by one; store order
from dms_jax.ops.live_attention import (attend_block, block_bias, empty_state, finish,
                                        group_queries, one_query, stream_block, tiled_over)
from dms_jax.paged_read import (DECODE_BLOCK_TOKENS, POOL_READ_SHARE,  # noqa: F401 (re-exported)
                                PREFILL_BLOCK_TOKENS, page_attention, page_source,
                                pool_attention, reads_pool)

@dataclasses.dataclass(frozen=True)
class PoolShards:
    """How a paged cache is split over a mesh: rows over the mesh axes `rows`, KV heads over
    `heads` (`dms_jax.sharding`'s cache rules), and the pool's page axis over both, so that each
    of the `count` devices holds the pages of its own streams."""

    mesh: Mesh
    rows: tuple[str, ...]
    heads: tuple[str, ...]

    @property
    def count(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.rows + self.heads)

    @classmethod
    def for_mesh(cls, mesh: Mesh, batch: int, num_kv_heads: int) -> "PoolShards":
        from dms_jax import sharding as shd

        spec = shd.logical_to_spec(("cache_batch", "cache_heads"), mesh, (batch, num_kv_heads))
        return cls(mesh, shd.spec_axes(spec[0]), shd.spec_axes(spec[1]))


def shard_specs(cache: "PagedLayerCache", stacked: bool = False) -> "PagedLayerCache":
    """The PartitionSpec of every array of a paged cache (a `PagedLayerCache` of specs): rows and
    KV heads as the slot layout's, the pool's pages, the free stack and its counts over every
    mesh axis of the streams (replicated without `cache.shards`). `stacked`: [L, ...] arrays,
    the layer axis replicated."""
    sh = cache.shards
    rows = (sh.rows or None) if sh else None
    heads = (sh.heads or None) if sh else None
    pages = ((sh.rows + sh.heads) or None) if sh else None
    lead = (None,) if stacked else ()
    stream, row, pool = PartitionSpec(*lead, rows, heads), PartitionSpec(*lead, rows), PartitionSpec(*lead, pages)
    by_field = dict(last_pos=row, seen=row, pool_keys=pool, pool_values=pool, pool_pos=pool,
                    free_pages=pool, num_free=pool)
    return cache.replace(**{f.name: by_field.get(f.name, stream) for f in dataclasses.fields(cache)
                            if f.name != "shards"})


def _on_shards(fn, cache: "PagedLayerCache", args, arg_specs, out_specs):
    """Run `fn(local_cache, *args) -> (out, local_cache)` per device: the local cache is an
    unsharded `PagedLayerCache` of the device's rows, heads and pool (its page ids are local)."""
    sh = cache.shards

    def local(c, *a):
        out, c = fn(c.replace(num_free=c.num_free[0], shards=None), *a)
        return out, c.replace(num_free=c.num_free[None], shards=sh)

    specs = shard_specs(cache)
    return jax.shard_map(local, mesh=sh.mesh, in_specs=(specs, *arg_specs),
                         out_specs=(out_specs, specs), check_vma=False)(cache, *args)




@flax.struct.dataclass
class PagedLayerCache:
    ring_keys: jax.Array  # [B, Hkv, R, D] (RoPE applied), position p in slot p mod R
    ring_values: jax.Array  # [B, Hkv, R, D]
    ring_pos: jax.Array  # int32 [B, Hkv, R], -1 = empty
    ring_flags: jax.Array  # bool [B, Hkv, R], evict flag of the slot's token (False: pending)
    pool_keys: jax.Array  # [P, page, D], shared by every stream of the layer
    pool_values: jax.Array  # [P, page, D]
    pool_pos: jax.Array  # int32 [P, page], position of each stored token (-1: none)
    page_table: jax.Array  # int32 [B, Hkv, M], the stream's pages in order (-1: none)
    retained: jax.Array  # int32 [B, Hkv], tokens in the stream's pages
    free_pages: jax.Array  # int32 [P], a stack: entries [0, num_free) are free page ids
    num_free: jax.Array  # int32 scalar
    last_pos: jax.Array  # int32 [B], position of the row's newest token, -1 none
    seen: jax.Array  # int32 [B], real tokens processed
    overflow: jax.Array  # int32 [B, Hkv], tokens dropped because the pool was dry
    kv_reads: jax.Array  # f32 [B, Hkv], sum over real queries of the keys they saw
    peak_held: jax.Array  # int32 [B, Hkv], most tokens held after any step
    # on a mesh: the split (pool [S * P_local, ...], free_pages S local stacks, num_free [S],
    # page ids local to their device's pool); None: one pool, num_free a scalar
    shards: PoolShards | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def ring_size(self) -> int:
        return self.ring_pos.shape[-1]

    @property
    def page_size(self) -> int:
        return self.pool_pos.shape[-1]

    # the sizes read the trailing axes, so they hold for a stacked [L, ...] cache (or its shapes)

    @property
    def num_pages(self) -> int:
        return self.pool_pos.shape[-2]

    @property
    def held(self):
        """int32 [B, Hkv] tokens held now: the ring's and the retained ones."""
        return (self.ring_pos >= 0).sum(axis=-1, dtype=jnp.int32) + self.retained

    @property
    def token_bytes(self) -> int:
        """Key + value bytes of one token."""
        return 2 * self.ring_keys.shape[-1] * self.ring_keys.dtype.itemsize

    @property
    def kv_nbytes(self) -> int:
        """Key + value bytes allocated: the rings and the whole pool."""
        return int(self.ring_keys.nbytes + self.ring_values.nbytes + self.pool_keys.nbytes
                   + self.pool_values.nbytes)

    @property
    def capacity(self) -> int:
        """Tokens allocated per stream on average (ring + the pool's share)."""
        streams = self.ring_pos.shape[-3] * self.ring_pos.shape[-2]
        return self.ring_size + (self.num_pages * self.page_size) // max(streams, 1)


def init_paged_layer_cache(batch, num_kv_heads, *, ring, page_size, num_pages, max_pages,
                           head_dim, dtype=jnp.float32, shards: PoolShards | None = None) -> PagedLayerCache:
    """An empty paged layer cache: rings of `ring` slots, a pool of `num_pages` pages of
    `page_size` tokens, page tables of `max_pages` entries per stream. The sizing rules belong
    to the plan (`dms_jax.plan.plan_inference(layout="paged")`). With `shards` the pool is S
    local pools of ceil(num_pages / S) pages (place it with `dms_jax.sharding.shard_cache`)."""
    streams = (batch, num_kv_heads)
    if shards is not None:
        count = shards.count
        local = -(-num_pages // count)
        stacks = jnp.tile(jnp.arange(local - 1, -1, -1, dtype=jnp.int32), count)
        cache = init_paged_layer_cache(batch, num_kv_heads, ring=ring, page_size=page_size,
                                       num_pages=local * count, max_pages=max_pages,
                                       head_dim=head_dim, dtype=dtype)
        return cache.replace(free_pages=stacks, num_free=jnp.full((count,), local, jnp.int32),
                             shards=shards)
    return PagedLayerCache(
        ring_keys=jnp.zeros(streams + (ring, head_dim), dtype),
        ring_values=jnp.zeros(streams + (ring, head_dim), dtype),
        ring_pos=jnp.full(streams + (ring,), -1, jnp.int32),
        ring_flags=jnp.zeros(streams + (ring,), bool),
        pool_keys=jnp.zeros((num_pages, page_size, head_dim), dtype),
        pool_values=jnp.zeros((num_pages, page_size, head_dim), dtype),
        pool_pos=jnp.full((num_pages, page_size), -1, jnp.int32),
        page_table=jnp.full(streams + (max_pages,), -1, jnp.int32),
        retained=jnp.zeros(streams, jnp.int32),
        free_pages=jnp.arange(num_pages - 1, -1, -1, dtype=jnp.int32),  # page 0 on top
        num_free=jnp.asarray(num_pages, jnp.int32),
        last_pos=jnp.full((batch,), -1, jnp.int32),
        seen=jnp.zeros((batch,), jnp.int32),
        overflow=jnp.zeros(streams, jnp.int32),
        kv_reads=jnp.zeros(streams, jnp.float32),
        peak_held=jnp.zeros(streams, jnp.int32),
    )


# ----------------------------------------------------------------------------- attention


def _take(a, index):
    """Per stream: a [B, Hkv, R(, D)] at index [B, Hkv, n] -> [B, Hkv, n(, D)]."""
    index = index.reshape(index.shape + (1,) * (a.ndim - 3))
    return jnp.take_along_axis(a, index, axis=2)


def _advance(cache: PagedLayerCache, ring_flags, new_keys, new_values, new_pos, new_flags,
             new_valid, query_pos, *, window, use_flags, after=None):
    """The ring and the pages after the chunk's tokens arrive (see the module docstring).

    Positions are consecutive per row, so a chunk of C tokens moves the newest position by at
    most C and only the ring's min(R, C) oldest slots can leave it (one in a decode step): only
    those are read, and the ring's keys and values are written only where a new token lands.
    ring_flags: bool [B, Hkv, R] (the chunk's first decision applied); new_*: the chunk's
    [B, Hkv, C(, D)]; query_pos: int32 [B], the newest position after the step; after: the
    chunk's attention output [B, C, H, D] when it attended first (the pool's writes then follow
    it: `dms_jax.cache.ordered_after`, so the donated pool is written in place, as the ring is
    after its leaving tokens are read).
    returns (ring_keys, ring_values, ring_pos, ring_flags, pool_keys, pool_values, pool_pos,
             page_table, retained, free_pages, num_free, dropped [B, Hkv])
    """
    ring, page = cache.ring_size, cache.page_size
    batch, heads = cache.retained.shape
    width, chunk = cache.page_table.shape[-1], new_pos.shape[-1]
    age = query_pos[:, None, None]  # [B, 1, 1]
    keep = (lambda flags: ~flags) if use_flags else (lambda flags: jnp.ones_like(flags))

    with jax.named_scope("ring"):
        # the ring's oldest min(R, C) slots, oldest first: (last_pos + 1 + j) mod R
        n_old = min(ring, chunk)
        start = cache.last_pos[:, None, None] + 1  # [B, 1, 1]
        old_slot = jnp.broadcast_to(jnp.mod(start + jnp.arange(n_old), ring),
                                    (batch, heads, n_old))
        old_pos = _take(cache.ring_pos, old_slot)
        old_flags = _take(ring_flags, old_slot)
        leave_old = (old_pos >= 0) & (age - old_pos > window)  # [B, Hkv, n_old]
        stay_new = new_valid & (age - new_pos <= window)  # [B, Hkv, C]
        # positions and flags: leavers emptied, staying new tokens at pos mod R
        gone = jnp.where(leave_old, old_slot, ring)  # R: nothing

        def set_at(a, at, x):  # per stream: a [R, ...], at [n], x [n, ...]
            return a.at[at].set(x, mode="drop")

        per_stream = jax.vmap(jax.vmap(set_at))
        new_slot = jnp.where(stay_new, jnp.mod(new_pos, ring), ring)
        leaving = (_take(cache.ring_keys, old_slot), _take(cache.ring_values, old_slot))
        new_slot = ordered_after(new_slot, leaving[0] + leaving[1], ring)  # ring read, then written
        if after is not None:
            new_slot = ordered_after(new_slot, after, ring)
        r_pos = per_stream(per_stream(cache.ring_pos, gone, jnp.full(gone.shape, -1, jnp.int32)),
                           new_slot, new_pos)
        r_flags = per_stream(ring_flags, new_slot, new_flags)
        r_keys = per_stream(cache.ring_keys, new_slot, new_keys)
        r_values = per_stream(cache.ring_values, new_slot, new_values)

    with jax.named_scope("retain"):  # older tokens that stay: appended to the pages in order
        ret_old = leave_old & keep(old_flags)  # [B, Hkv, n_old]
        ret_new = new_valid & ~stay_new & keep(new_flags)  # [B, Hkv, C]
        retain = jnp.concatenate([ret_old, ret_new], axis=2)  # position order
        rank = jnp.cumsum(retain, -1, dtype=jnp.int32) - 1
        want = cache.retained + retain.sum(-1, dtype=jnp.int32)  # [B, Hkv]

        # pages: each stream needs ceil(want / page) - ceil(retained / page) more, served in
        # stream order from the top of the free stack while it lasts
        have_pages = (cache.retained + page - 1) // page
        need = jnp.minimum((want + page - 1) // page, width) - have_pages  # [B, Hkv]
        flat_need = need.reshape(-1)
        before = jnp.cumsum(flat_need) - flat_need  # pages taken by earlier streams
        granted = jnp.clip(cache.num_free - before, 0, flat_need).reshape(batch, heads)
        max_new = min(width, -(-(n_old + chunk) // page) + 1)  # static bound on new pages
        j = jnp.arange(max_new)
        stack_at = cache.num_free - 1 - before.reshape(batch, heads)[..., None] - j  # [B, Hkv, n]
        new_ids = jnp.where(j < granted[..., None],
                            cache.free_pages[jnp.clip(stack_at, 0, cache.num_pages - 1)], -1)
        table_at = jnp.where(j < granted[..., None], have_pages[..., None] + j, width)
        table = jax.vmap(jax.vmap(set_at))(cache.page_table, table_at, new_ids)
        num_free = cache.num_free - granted.sum(dtype=jnp.int32)

        # tokens: the stream's (retained + rank)-th place, if its page was granted
        place = cache.retained[..., None] + rank  # [B, Hkv, n_old + C]
        page_of = jnp.take_along_axis(table, jnp.clip(place // page, 0, width - 1), axis=2)
        stored = retain & (place // page < width) & (page_of >= 0)
        dest = jnp.where(stored, page_of * page + place % page, cache.num_pages * page)
        if after is not None:
            dest = ordered_after(dest, after, cache.num_pages * page)
        d_old, d_new = dest[..., :n_old].reshape(-1), dest[..., n_old:].reshape(-1)
        head_dim = cache.pool_keys.shape[-1]
        flat = lambda a: a.reshape(-1, head_dim)  # noqa: E731

        def write(pool, old, new):  # the leaving ring tokens, then the chunk's
            out = flat(pool).at[d_old].set(flat(old), mode="drop")
            return out.at[d_new].set(flat(new), mode="drop").reshape(pool.shape)

        pool_keys = write(cache.pool_keys, leaving[0], new_keys)
        pool_values = write(cache.pool_values, leaving[1], new_values)
        pool_pos = (cache.pool_pos.reshape(-1).at[d_old].set(old_pos.reshape(-1), mode="drop")
                    .at[d_new].set(new_pos.reshape(-1), mode="drop").reshape(cache.pool_pos.shape))
        kept = stored.sum(-1, dtype=jnp.int32)
        dropped = retain.sum(-1, dtype=jnp.int32) - kept
    return (r_keys, r_values, r_pos, r_flags, pool_keys, pool_values, pool_pos, table,
            cache.retained + kept, cache.free_pages, num_free, dropped)


def attend_and_update(cache: PagedLayerCache, q, k_new, v_new, decisions, positions, new_valid,
                      *, window: int, policy, sliding_window=None, scale=None, key_block=None,
                      attention="blockwise", out_rows=None):
    """`dms_jax.cache.attend_and_update` on the paged layout (same arguments and result; the
    policy must be "full" or "dms", whose kept set is the window plus every unflagged token).
    A sharded cache (`cache.shards`) runs the step per device on its local pool.

    key_block: tokens per page-block iteration (default 512 for a decode step, 256 for a chunk).
    attention: a prefill chunk's, "blockwise" (every stream at once, block by block) or "tiled"
    (stream by stream in query tiles, the CPU's: `dms_jax.ops.live_attention.tiled_over`);
    decode steps are the same in both.
    returns (out [B, C, H, D] in q.dtype, updated PagedLayerCache)
    """
    kw = dict(window=window, policy=policy, sliding_window=sliding_window, scale=scale,
              key_block=key_block, attention=attention)
    if cache.shards is None:
        return _attend_and_update(cache, q, k_new, v_new, decisions, positions, new_valid,
                                  out_rows=out_rows, **kw)
    sh = cache.shards
    rows, heads = sh.rows or None, sh.heads or None
    per_head = PartitionSpec(rows, None, heads)  # [B, C, H or Hkv, ...]
    args, specs = [q, k_new, v_new, positions, new_valid], [per_head] * 3 + [PartitionSpec(rows)] * 2
    optional = {}  # the arguments that may be None, by name: (array, its spec)
    if decisions is not None:  # [B, C, Hkv or 1]
        optional["decisions"] = (decisions, per_head if decisions.shape[-1] == k_new.shape[2]
                                 else PartitionSpec(rows))
    if out_rows is not None:  # [B]
        optional["out_rows"] = (out_rows, PartitionSpec(rows))
    args += [a for a, _ in optional.values()]
    specs += [spec for _, spec in optional.values()]

    def local(c, q, k, v, pos, valid, *rest):
        given = dict(zip(optional, rest))
        return _attend_and_update(c, q, k, v, given.get("decisions"), pos, valid,
                                  out_rows=given.get("out_rows"), **kw)

    return _on_shards(local, cache, args, specs, per_head)


def _attend_and_update(cache: PagedLayerCache, q, k_new, v_new, decisions, positions, new_valid,
                       *, window: int, policy, sliding_window=None, scale=None, key_block=None,
                       attention="blockwise", out_rows=None):
    """`attend_and_update` on one (local) pool."""
    batch, chunk, _, head_dim = q.shape
    num_kv_heads = k_new.shape[2]
    if window + 1 != cache.ring_size:
        raise ValueError(f"the cache's ring holds {cache.ring_size} tokens but the plan's window "
                         f"is {window} (ring = window + 1): build it with init_cache(plan, batch)")
    scale = head_dim ** -0.5 if scale is None else scale
    use_flags = policy.uses_decisions
    positions = positions.astype(jnp.int32)
    new_valid = new_valid.astype(bool)
    with jax.named_scope("flags"):
        if decisions is None:
            decisions = jnp.zeros((batch, chunk, 1), bool)
        decisions = jnp.broadcast_to(decisions.astype(bool), (batch, chunk, num_kv_heads))
        new_flags, d_first = _chunk_flags(decisions, new_valid)  # [B, Hkv, C], [B, Hkv]
        is_last = cache.ring_pos == cache.last_pos[:, None, None]  # [B, Hkv, R]
        ring_flags = cache.ring_flags | (is_last & (cache.last_pos >= 0)[:, None, None]
                                         & d_first[..., None])
    new_keys = jnp.swapaxes(k_new, 1, 2).astype(cache.ring_keys.dtype)  # [B, Hkv, C, D]
    new_values = jnp.swapaxes(v_new, 1, 2).astype(cache.ring_values.dtype)
    new_pos = jnp.broadcast_to(positions[:, None, :], (batch, num_kv_heads, chunk))
    valid = jnp.broadcast_to(new_valid[:, None, :], new_pos.shape)
    newest = jnp.max(jnp.where(new_valid, positions, -1), axis=1)
    query_pos = jnp.maximum(cache.last_pos, newest)  # [B]
    rule = dict(window=window, use_flags=use_flags, sliding_window=sliding_window)
    block = key_block or (DECODE_BLOCK_TOKENS if chunk == 1 else PREFILL_BLOCK_TOKENS)

    chunk_keys = (new_keys, new_values, new_pos, new_flags, valid)

    def sources(c: PagedLayerCache, r_keys, r_values, r_pos, r_flags):
        """The pages and the ring as `tiled_over`'s key sources."""
        def ring_read(stream, i):
            mine = lambda a: stream_block(a, stream, 0, a.shape[2])  # noqa: E731
            ring_pos = mine(r_pos)
            return mine(r_keys), mine(r_values), ring_pos, mine(r_flags), ring_pos >= 0

        pages = page_source(c, sliding_window=sliding_window, block_tokens=block)
        return [pages, (lambda stream: 1, ring_read, rule)]

    def attend(c: PagedLayerCache, r_keys, r_values, r_pos, r_flags, tail, q=q,
               positions=positions, new_valid=new_valid, tiled=attention == "tiled"):
        if tail and tiled:  # pages, ring, chunk: stream by stream, in tiles
            return tiled_over(q, positions, new_valid, sources(c, r_keys, r_values, r_pos, r_flags),
                              chunk_keys, rule=rule, scale=scale)
        qg = group_queries(q, num_kv_heads)
        with jax.named_scope("pages"):
            gather = lambda: page_attention(  # noqa: E731
                empty_state(qg), qg, positions, new_valid, c, sliding_window=sliding_window,
                scale=scale, block_tokens=block)
            if tail or qg.shape[2] > 1:  # a chunk's [C, block] tiles, or grouped queries:
                carry = gather()  # the gathered pages' long dots (see POOL_READ_SHARE)
            else:  # a decode step: the pool in place once most of it would be gathered anyway
                carry = lax.cond(reads_pool(c, block), lambda: pool_attention(
                    qg, positions, new_valid, c, sliding_window=sliding_window, scale=scale),
                    gather)
        with jax.named_scope("ring"):
            carry = attend_block(carry, qg, r_keys, r_values,
                                 block_bias(positions, r_pos, r_flags, r_pos >= 0, **rule),
                                 new_valid, scale)
        if tail:
            with jax.named_scope("chunk"):
                carry = attend_block(carry, qg, new_keys, new_values,
                                     block_bias(positions, new_pos, new_flags, valid, **rule),
                                     new_valid, scale)
        return finish(carry, q)

    def update(after=None):
        with jax.named_scope("store"):
            return _advance(cache, ring_flags, new_keys, new_values, new_pos, new_flags, valid,
                            query_pos, window=window, use_flags=use_flags, after=after)

    if chunk == 1:  # decode: store first (in place), then attend over the ring and the pages
        parts = update()
        updated = _replace(cache, parts)
        with jax.named_scope("attend"):
            out, seen = attend(updated, *parts[:4], tail=False)
    else:  # a chunk: attend over the pages, the ring and itself, then store
        ring = (cache.ring_keys, cache.ring_values, cache.ring_pos, ring_flags)
        with jax.named_scope("attend"):
            if out_rows is None:
                out, seen = attend(cache, *ring, tail=True)
            else:  # one query's output per row (`dms_jax.cache.attend_and_update`'s out_rows)
                out, seen = one_query(
                    q, positions, new_valid, out_rows,
                    lambda q1, pos1, valid1: attend(cache, *ring, tail=True, q=q1,
                                                    positions=pos1, new_valid=valid1,
                                                    tiled=False)[0],
                    sources(cache, *ring), chunk_keys, rule=rule, at_once=attention != "tiled")
        parts = update(out)
        updated = _replace(cache, parts)
    held = updated.held
    return out, updated.replace(
        last_pos=query_pos,
        seen=cache.seen + new_valid.sum(axis=1, dtype=jnp.int32),
        overflow=cache.overflow + parts[-1],
        kv_reads=cache.kv_reads + seen,
        peak_held=jnp.maximum(cache.peak_held, held),
    )


def _replace(cache, parts):
    (r_keys, r_values, r_pos, r_flags, pool_keys, pool_values, pool_pos, table, retained,
     free_pages, num_free, _) = parts
    return cache.replace(ring_keys=r_keys, ring_values=r_values, ring_pos=r_pos,
                         ring_flags=r_flags, pool_keys=pool_keys, pool_values=pool_values,
                         pool_pos=pool_pos, page_table=table, retained=retained,
                         free_pages=free_pages, num_free=num_free)


# ----------------------------------------------------------------------------- rows


def release_rows(cache: PagedLayerCache, rows) -> PagedLayerCache:
    """Empty the rows `rows` (bool [B]) and push their pages back on the free stack (in row-major
    stream order), so that a new request can take the rows; other rows are untouched. A sharded
    cache returns each row's pages to its device's stack."""
    rows = jnp.asarray(rows, bool)
    if cache.shards is not None:
        return _on_shards(lambda c, r: (jnp.zeros(()), release_rows(c, r)), cache, [rows],
                          [PartitionSpec(cache.shards.rows or None)], PartitionSpec())[1]
    stream_rows = jnp.broadcast_to(rows[:, None], cache.retained.shape)
    freed = (cache.page_table >= 0) & stream_rows[..., None]  # [B, Hkv, M]
    ids = cache.page_table.reshape(-1)
    flat_freed = freed.reshape(-1)
    at = jnp.where(flat_freed, cache.num_free + jnp.cumsum(flat_freed, dtype=jnp.int32) - 1,
                   cache.num_pages)
    free_pages = cache.free_pages.at[at].set(ids, mode="drop")
    pool_pos = cache.pool_pos.reshape(-1, cache.page_size).at[
        jnp.where(flat_freed, ids, cache.num_pages)].set(-1, mode="drop").reshape(cache.pool_pos.shape)
    r3 = stream_rows[..., None]
    return cache.replace(
        ring_pos=jnp.where(r3, -1, cache.ring_pos),
        ring_flags=jnp.where(r3, False, cache.ring_flags),
        page_table=jnp.where(freed, -1, cache.page_table),
        retained=jnp.where(stream_rows, 0, cache.retained),
        pool_pos=pool_pos,
        free_pages=free_pages,
        num_free=cache.num_free + flat_freed.sum(dtype=jnp.int32),
        last_pos=jnp.where(rows, -1, cache.last_pos),
        seen=jnp.where(rows, 0, cache.seen),
        overflow=jnp.where(stream_rows, 0, cache.overflow),
        kv_reads=jnp.where(stream_rows, 0.0, cache.kv_reads),
        peak_held=jnp.where(stream_rows, 0, cache.peak_held),
    )


_ROW_FIELDS = ("ring_keys", "ring_values", "ring_pos", "ring_flags", "page_table", "retained",
               "last_pos", "seen", "overflow", "kv_reads", "peak_held")


def _one_pool(cache: PagedLayerCache, what: str) -> None:
    if cache.shards is not None:
        raise ValueError(f"{what} moves rows between the devices' pools: a cache split over a mesh "
                         "(PagedLayerCache.shards) has one pool per device; serve from one device")


def select_rows(cache: PagedLayerCache, rows) -> PagedLayerCache:
    """The cache of the rows `rows` (int32 [k]) over the same pool: a step on it allocates from
    and writes to the shared pool, and `merge_rows` puts the rows back (a server prefills the
    rows it admits without computing the others)."""
    _one_pool(cache, "select_rows")
    return cache.replace(**{f: getattr(cache, f)[rows] for f in _ROW_FIELDS})


def merge_rows(cache: PagedLayerCache, part: PagedLayerCache, rows) -> PagedLayerCache:
    """`cache` with the rows `rows` and the whole pool taken from `part` (`select_rows`'s)."""
    _one_pool(cache, "merge_rows")
    merged = {f: getattr(cache, f).at[rows].set(getattr(part, f)) for f in _ROW_FIELDS}
    return part.replace(**merged)


def pages_in_use(cache: PagedLayerCache):
    """int32 scalar: pages held by the streams (pool pages minus the free ones, on every device)."""
    return cache.num_pages - jnp.sum(cache.num_free)
