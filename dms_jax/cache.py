"""The fixed-shape KV cache with DMS delayed eviction (docs/dms.md section 5).

Layout, per layer (`LayerCache`, a registered pytree): S slots per (batch row, KV head), each
holding one token's key, value, position (-1: free) and evict flag. Heads hold different tokens in
different slots; a freed slot is reused by the next token to be stored. Nothing is kept in order:
every mask is built from the stored positions and flags through the one rule of `ops/mask.py`.

One step (`attend_and_update`, pure and jittable; the model calls it once per layer, with its
plan's window, policy and sliding window), each part a function of its own:
  1. flags (`_chunk_flags`): the decision of the chunk's first real token sets the flag of the
     newest cached token (kept in `last_slot`); inside the chunk the decision of the next real
     token flags a token; the newest real token's flag stays pending (False);
  2. attention: the chunk's C queries attend to the cached slots and to the chunk's own tokens
     (causally) under the visibility rule, one softmax over both (no [S + C] copy of K/V): over
     the live slots only, block by block (`dms_jax.ops.live_attention`, the plan's "blockwise"),
     or over all S slots at once with the probabilities (`attend_blocks`, "dense"), from which a
     scoring policy's scores are updated (`accumulate_scores`);
  3. eviction (`place_tokens`, `store_tokens`): the policy keeps what the newest query may still
     see (DMS: the window t-w .. t and every older unflagged token); the chunk's kept tokens go
     into free slots.
  A decode step (C = 1) does 3 before 2, so the donated cache is updated in place (a read before
  an in-place write makes XLA copy the whole buffer); the result is the same.
So after a step a stream holds exactly min(seen, w+1) + (# unflagged tokens older than the
window), until the capacity S is reached. Memory for a chunk is S + C tokens, never the prompt.

Overflow (more than S tokens to keep): the newest out-of-window tokens are dropped (see
`dms_jax.policies`), counted per (row, head) in `overflow`. The cache stays consistent. For a
strict run call `assert_no_overflow(caches)` on the host after a jitted step or loop (it reads the
counters; nothing inside jit synchronises with the host).

Assumptions on the caller: within a row, real tokens arrive in order with consecutive positions
across calls; `new_valid` may hold any pattern (left or right padding, holes); outputs at padding
queries are finite and meaningless.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dms_jax.config import resolve_dtype
from dms_jax.ops.attention import grouped_attention
from dms_jax.ops.live_attention import (PREFILL_BLOCK, live_attention, live_extent, one_query,
                                        slot_source, tiled_attention)
from dms_jax.ops.mask import MASK_VALUE, hard_evict_bias, visibility_bias
from dms_jax.policies import DMS, Candidates, Policy, get_policy


@flax.struct.dataclass
class LayerCache:
    keys: jax.Array  # [B, Hkv, S, D] (RoPE applied)
    values: jax.Array  # [B, Hkv, S, D]
    pos: jax.Array  # int32 [B, Hkv, S], -1 = free slot
    flags: jax.Array  # bool [B, Hkv, S], evict flag d[j+1] of the slot's token j (False: pending)
    scores: jax.Array  # f32 [B, Hkv, S], a policy's per-slot score (unused by full / dms)
    last_slot: jax.Array  # int32 [B, Hkv], slot of the row's newest token (flag pending), -1 none
    last_pos: jax.Array  # int32 [B], position of the row's newest token, -1 none
    seen: jax.Array  # int32 [B], real tokens processed
    overflow: jax.Array  # int32 [B, Hkv], tokens dropped because the slots were full
    kv_reads: jax.Array  # f32 [B, Hkv], sum over real queries of the keys they saw
    peak_held: jax.Array  # int32 [B, Hkv], most tokens held after any step

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def held(self):
        """int32 [B, Hkv] tokens held now."""
        return (self.pos >= 0).sum(axis=-1, dtype=jnp.int32)

    @property
    def token_bytes(self) -> int:
        """Key + value bytes of one token."""
        return 2 * self.keys.shape[-1] * self.keys.dtype.itemsize

    @property
    def kv_nbytes(self) -> int:
        """Key + value bytes allocated."""
        return int(self.keys.nbytes + self.values.nbytes)


def init_layer_cache(batch, num_kv_heads, capacity, head_dim, dtype=jnp.float32) -> LayerCache:
    """An empty layer cache of `capacity` slots per (row, KV head). The capacity rules (the window
    fits, budgets, lengths) belong to the plan (`dms_jax.plan.plan_inference`)."""
    shape = (batch, num_kv_heads, capacity)
    return LayerCache(
        keys=jnp.zeros(shape + (head_dim,), dtype),
        values=jnp.zeros(shape + (head_dim,), dtype),
        pos=jnp.full(shape, -1, jnp.int32),
        flags=jnp.zeros(shape, bool),
        scores=jnp.zeros(shape, jnp.float32),
        last_slot=jnp.full((batch, num_kv_heads), -1, jnp.int32),
        last_pos=jnp.full((batch,), -1, jnp.int32),
        seen=jnp.zeros((batch,), jnp.int32),
        overflow=jnp.zeros((batch, num_kv_heads), jnp.int32),
        kv_reads=jnp.zeros((batch, num_kv_heads), jnp.float32),
        peak_held=jnp.zeros((batch, num_kv_heads), jnp.int32),
    )


@flax.struct.dataclass
class StackedCache:
    """The per-layer caches of a scanned model (`ModelConfig.scan_layers`, a plan with
    `stacked=True`) as one cache whose every array leads with the layer axis: `layers` is a
    `LayerCache` or `dms_jax.paged.PagedLayerCache` of [L, ...] arrays, so the model's layer
    body runs once under `lax.scan` and updates layer i in place (`Decoder.forward`).

    For readers it is a sequence of per-layer caches: `len(cache)`, `cache[i]` (layer i's own
    cache, sliced), iteration; `map_layers` maps a per-layer function over either form.
    """

    layers: Any  # LayerCache | PagedLayerCache, every array [L, ...]

    def __len__(self) -> int:
        return self.layers.seen.shape[0]

    def __getitem__(self, i: int):
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"a StackedCache is indexed by layer (an int), not {type(i).__name__}")
        return jax.tree.map(lambda a: a[i], self.layers)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def map_layers(fn, cache, *others):
    """fn (one layer's cache, and that layer of each of `others` -> one layer's cache) over every
    layer, keeping the form: tuples give a tuple, StackedCaches a StackedCache mapped under vmap
    (fn must be jax-traceable)."""
    if isinstance(cache, StackedCache):
        return StackedCache(jax.vmap(fn)(cache.layers, *(o.layers for o in others)))
    return tuple(fn(*layers) for layers in zip(cache, *others))


def init_cache(plan, batch: int, mesh=None):
    """The cache of an `InferencePlan` (`dms_jax.plan.plan_inference`) for `batch` rows: one
    LayerCache per layer (a tuple; the model indexes it by layer), `plan.capacity` slots each,
    or for a paged plan one `dms_jax.paged.PagedLayerCache` per layer; a stacked plan (a model
    with `scan_layers`) gets the same layers as one `StackedCache`. `mesh`: a paged pool split
    over it with the rows and KV heads (`dms_jax.paged.PoolShards`; the slot layout needs no
    mesh here). Place the result with `dms_jax.sharding.shard_cache`."""
    if plan.layout == "paged":
        from dms_jax.paged import PoolShards, init_paged_layer_cache

        shards = None if mesh is None else PoolShards.for_mesh(mesh, batch, plan.num_kv_heads)
        layer = init_paged_layer_cache(
            batch, plan.num_kv_heads, ring=plan.window + 1, page_size=plan.page_size,
            num_pages=plan.num_pages(batch), max_pages=plan.max_pages, head_dim=plan.head_dim,
            dtype=resolve_dtype(plan.dtype), shards=shards)
    else:
        layer = init_layer_cache(batch, plan.num_kv_heads, plan.capacity, plan.head_dim,
                                 resolve_dtype(plan.dtype))
    if plan.stacked:
        return StackedCache(jax.tree.map(
            lambda a: jnp.broadcast_to(a, (plan.num_layers,) + a.shape), layer))
    return (layer,) + tuple(jax.tree.map(jnp.copy, layer) for _ in range(plan.num_layers - 1))


# ----------------------------------------------------------------------------- the step


def _chunk_flags(decisions, new_valid):
    """The shift by one inside a chunk.

    decisions: bool [B, C, Hkv]; new_valid: bool [B, C]
    returns (flags [B, Hkv, C]: d of the next real token of the chunk, False if none;
             first [B, Hkv]: d of the chunk's first real token, False if the chunk has none)
    """
    batch, chunk = new_valid.shape
    index = jnp.where(new_valid, jnp.arange(chunk, dtype=jnp.int32), chunk)  # [B, C]
    after = jnp.concatenate([index[:, 1:], jnp.full((batch, 1), chunk, jnp.int32)], axis=1)
    next_real = jax.lax.cummin(after, axis=1, reverse=True)  # [B, C], C = none
    d_next = jnp.take_along_axis(decisions, jnp.minimum(next_real, chunk - 1)[..., None], axis=1)
    flags = d_next & (next_real < chunk)[..., None] & new_valid[..., None]  # [B, C, Hkv]
    first_real = index.min(axis=1)  # [B]
    d_first = jnp.take_along_axis(decisions, jnp.minimum(first_real, chunk - 1)[:, None, None],
                                  axis=1)[:, 0]  # [B, Hkv]
    return jnp.swapaxes(flags, 1, 2), d_first & (first_real < chunk)[:, None]


def _fit_capacity(keep, priority, capacity, max_excess):
    """Drop the lowest-priority kept candidates so at most `capacity` remain.

    keep: bool [B, Hkv, N]; priority: f32 [B, Hkv, N]. The excess is at most `max_excess` (the
    cache held <= capacity before the chunk's tokens arrived). returns (keep, dropped [B, Hkv]).
    """
    excess = jnp.maximum(keep.sum(axis=-1, dtype=jnp.int32) - capacity, 0)  # [B, Hkv]
    k = min(max_excess, keep.shape[-1])
    if k == 1:  # a decode step: one argmax instead of a top-k and a scatter (same choice)
        lowest = jnp.argmax(jnp.where(keep, -priority, -jnp.inf), axis=-1)  # [B, Hkv]
        drop = (jnp.arange(keep.shape[-1]) == lowest[..., None]) & (excess[..., None] > 0)
        return keep & ~drop, excess

    def drop_lowest(keep):  # the top-k and its scatter run only when some stream is over
        _, lowest = jax.lax.top_k(jnp.where(keep, -priority, -jnp.inf), k)  # [B, Hkv, k]
        drop_it = jnp.arange(k) < excess[..., None]  # [B, Hkv, k]

        def drop_mask(idx, drop):  # per stream: [k], [k] -> [N]
            return jnp.zeros(keep.shape[-1], bool).at[idx].max(drop)

        return keep & ~jax.vmap(jax.vmap(drop_mask))(lowest, drop_it)

    return jax.lax.cond(jnp.any(excess > 0), drop_lowest, lambda keep: keep, keep), excess


def _destinations(free, keep_new):
    """Per stream: the slot each kept new token goes to, in order, or S (not stored).

    free: bool [S] (slots not kept); keep_new: bool [C] -> int32 [C]
    """
    slots, chunk = free.shape[0], keep_new.shape[0]
    if chunk == 1:  # a decode step: the first free slot, no cumsum or scatter over the slots
        first_free = jnp.where(free.any(), jnp.argmax(free), slots).astype(jnp.int32)
        return jnp.where(keep_new, first_free, slots)
    free_rank = jnp.cumsum(free, dtype=jnp.int32) - 1
    nth_free = jnp.full((chunk,), slots, jnp.int32).at[jnp.where(free, free_rank, chunk)].set(
        jnp.arange(slots, dtype=jnp.int32), mode="drop")
    new_rank = jnp.cumsum(keep_new, dtype=jnp.int32) - 1
    return jnp.where(keep_new, nth_free[jnp.clip(new_rank, 0, chunk - 1)], slots)


def ordered_after(index, value, skip):
    """`index` [B, ...] made to depend on `value` [B, ...] (a float array) without changing it:
    an entry would become `skip` only where `value` has an entry below -inf, which no float
    (NaN included) is.

    XLA may run a store's in-place scatter into a donated buffer before an op still reading
    that buffer (the chunk's attention over the cache), so its copy insertion copies the buffer
    first, twice for a loop: every K / V buffer of the cache, twice per prefill chunk (a `full`
    cache of 4 x 4 x 5,120 x 64 floats, 2 layers: ~50 ms of a 4k prompt's ~290 ms chunks on
    one core; at 32k, 34 MiB per copy). Indices that depend on the reader's result order the
    scatter after it, and the buffer is written in place (tests/test_generate.py checks the
    compiled prefill for copies)."""
    never = jnp.any(value < -jnp.inf, axis=tuple(range(1, value.ndim)))  # [B], all False
    return jnp.where(never.reshape((-1,) + (1,) * (index.ndim - 1)), skip, index)


def _store(dest, old, new):
    """Per stream: old [S, ...] with new [C, ...] written at dest [C] (S: skipped)."""
    return old.at[dest].set(new, mode="drop")


_store_all = jax.vmap(jax.vmap(_store))  # over batch rows and KV heads


class KeyBlock(NamedTuple):
    """Keys a chunk's queries attend to, per (row, KV head): cache slots or the chunk itself."""

    keys: Any  # [B, Hkv, n, D]
    values: Any  # [B, Hkv, n, D]
    pos: Any  # int32 [B, Hkv, n]
    flags: Any  # bool [B, Hkv, n]
    valid: Any  # bool [B, Hkv, n]


def attend_blocks(q, q_pos, q_valid, blocks, *, window, use_flags, sliding_window, scale,
                  scoring=None):
    """The chunk's queries over the keys of all blocks under the visibility rule: one softmax
    (`dms_jax.ops.attention.grouped_attention`, no K / V concatenation).

    q: [B, C, H, D]; q_pos: int32 [B, C]; q_valid: bool [B, C]; blocks: KeyBlocks; scoring:
    bool [B, C], the queries whose attention is summed per key (None: not needed)
    returns (out [B, C, H, D], keys seen by real queries [B, Hkv] f32,
             attention received by each key from the scoring queries [B, Hkv, n_total] f32 or None)
    """
    pos, flags, valid = (jnp.concatenate([getattr(b, f) for b in blocks], axis=-1)
                         for f in ("pos", "flags", "valid"))  # [B, Hkv, N]
    bias = visibility_bias(
        q_pos[:, None, None, :, None],  # [B, 1, 1, C, 1]
        pos[:, :, None, None, :],  # [B, Hkv, 1, 1, N]
        hard_evict_bias(flags)[:, :, None, None, :] if use_flags else None,
        window,
        k_valid=valid[:, :, None, None, :],
        sliding_window=sliding_window,
    )  # [B, Hkv, 1, C, N]
    out, probs = grouped_attention(q, [(b.keys, b.values) for b in blocks], bias, scale)
    real = q_valid[:, None, :, None]  # [B, 1, C, 1]
    seen = ((bias[:, :, 0] > MASK_VALUE / 2) & real).sum(axis=(2, 3)).astype(jnp.float32)
    received = None if scoring is None else (
        probs * scoring[:, None, None, :, None]).sum(axis=(2, 3))
    return out, seen, received


def scoring_queries(policy: Policy, positions, new_valid, newest):
    """bool [B, C]: the queries whose attention the policy accumulates (`policy.attention_from`:
    every real query, or each row's newest), or None for a policy that needs no attention."""
    if not policy.needs_attention:
        return None
    if policy.attention_from == "all":
        return new_valid
    return new_valid & (positions == newest[:, None])


def accumulate_scores(policy: Policy, scores, received, scoring):
    """The policy's per-slot scores after the step's attention; rows without a scoring query
    keep theirs. scores, received: f32 [B, Hkv, n]; scoring: bool [B, C] (None: unchanged)."""
    if received is None:
        return scores
    return jnp.where(scoring.any(axis=1)[:, None, None], policy.accumulate(scores, received),
                     scores)


def place_tokens(policy: Policy, old: KeyBlock, new: KeyBlock, scores, query_pos, *, window,
                 sliding_window):
    """Which candidates ([slots | chunk]) stay, and where the kept new tokens go.

    The policy selects over the S slots followed by the C new tokens (`Candidates`), at most S
    are kept (the lowest priority dropped first, counted), and each kept new token gets a free
    slot, lowest first. scores: f32 [B, Hkv, S + C]; query_pos: int32 [B], the newest position.
    returns (keep_old bool [B, Hkv, S], dest int32 [B, Hkv, C] (S: not stored),
             dropped int32 [B, Hkv])
    """
    slots, chunk = old.pos.shape[-1], new.pos.shape[-1]
    cand = Candidates(*(jnp.concatenate([getattr(old, f), getattr(new, f)], axis=-1)
                        for f in ("pos", "flags", "valid")), scores, query_pos, window,
                      sliding_window, slots)
    sel = policy.select(cand)
    keep, dropped = _fit_capacity(sel.keep & cand.valid, sel.priority, slots, chunk)
    dest = jax.vmap(jax.vmap(_destinations))(~keep[..., :slots], keep[..., slots:])
    return keep[..., :slots], dest, dropped


def store_tokens(old: KeyBlock, new: KeyBlock, keep_old, dest, scores):
    """Free the slots not kept and write the kept new tokens at `dest` (K / V: C rows only).

    scores: f32 [B, Hkv, S + C], the slots' then the new tokens' scores.
    returns (keys, values, pos, flags, scores) of the S slots
    """
    slots = old.pos.shape[-1]
    return (_store_all(dest, old.keys, new.keys),
            _store_all(dest, old.values, new.values),
            _store_all(dest, jnp.where(keep_old, old.pos, -1), new.pos),
            _store_all(dest, keep_old & old.flags, new.flags),
            _store_all(dest, jnp.where(keep_old, scores[..., :slots], 0.0), scores[..., slots:]))


def attend_and_update(cache: LayerCache, q, k_new, v_new, decisions, positions, new_valid, *,
                      window: int, policy: Policy | str = DMS, sliding_window=None, scale=None,
                      attention: str = "dense", key_block: int | None = None, out_rows=None):
    """Attend a chunk of C new tokens over the cache and the chunk, then store the chunk.

    cache: LayerCache with S slots; q: [B, C, H, D] (RoPE applied); k_new, v_new: [B, C, Hkv, D]
    (RoPE applied to k); decisions: bool [B, C, Hkv] or [B, C, 1] (d = z > 0 of each new token,
    flagging its predecessor; None for policies without decisions); positions: int [B, C];
    new_valid: bool [B, C] (False: padding). window: w; sliding_window: Mistral's, or None;
    scale: softmax scale (default D ** -0.5); attention: "dense" (one softmax over every slot and
    the chunk; the attention probabilities a scoring policy needs), "blockwise" (only the live
    slots, `dms_jax.ops.live_attention`, in blocks of `key_block` slots (None: its default);
    a policy that needs attention scores gets the dense one) or "tiled" (the same, a prefill
    chunk stream by stream in query tiles: `tiled_attention`).
    The model passes its `InferencePlan`'s window, policy, sliding window and attention_impl.
    out_rows: int32 [B] or None: the one query per row whose output is needed (`outputs_at` of
    `dms_jax.model.Decoder.forward`; -1: none in this row), attended alone (`one_query`) while
    every token is stored and every real query's keys are counted as usual; for policies that
    need no attention scores.
    returns (out [B, C, H, D] in q.dtype ([B, 1, H, D] with out_rows), updated LayerCache)

    A decode step (C == 1) evicts first, writes the new token into its slot, then attends over
    the slots only: the donated buffers are updated in place (attending first would make XLA copy
    the whole cache). Without overflow both orders give the same result; under overflow a
    token dropped in a decode step is not seen by that step's query.
    A policy with `needs_attention` gets the attention its scoring queries (`scoring_queries`)
    gave each key, folded into the stored scores by `policy.accumulate`; rows without such a
    query keep theirs. New tokens start at `policy.new_score`. The baselines' step order and
    budget convention: `dms_jax.policies`.
    """
    policy = get_policy(policy)
    batch, chunk, _, head_dim = q.shape
    num_kv_heads, slots = k_new.shape[2], cache.capacity
    scale = head_dim ** -0.5 if scale is None else scale
    positions = positions.astype(jnp.int32)
    new_valid = new_valid.astype(bool)

    with jax.named_scope("flags"):  # the shift by one: the chunk's first decision flags the
        if decisions is None:  # newest cached token
            decisions = jnp.zeros((batch, chunk, 1), bool)
        decisions = jnp.broadcast_to(decisions.astype(bool), (batch, chunk, num_kv_heads))
        new_flags, d_first = _chunk_flags(decisions, new_valid)  # [B, Hkv, C], [B, Hkv]
        is_last = jnp.arange(slots) == cache.last_slot[..., None]  # [B, Hkv, S]
        old_flags = cache.flags | (is_last & d_first[..., None])
    old = KeyBlock(cache.keys, cache.values, cache.pos, old_flags, cache.pos >= 0)
    new_pos = jnp.broadcast_to(positions[:, None, :], (batch, num_kv_heads, chunk))
    new = KeyBlock(jnp.swapaxes(k_new, 1, 2).astype(cache.keys.dtype),  # [B, Hkv, C, D], as
                   jnp.swapaxes(v_new, 1, 2).astype(cache.values.dtype),  # later steps read it
                   new_pos, new_flags, jnp.broadcast_to(new_valid[:, None, :], new_pos.shape))
    newest = jnp.max(jnp.where(new_valid, positions, -1), axis=1)
    query_pos = jnp.maximum(cache.last_pos, newest)  # [B], the newest position after the step
    scoring = scoring_queries(policy, positions, new_valid, newest)
    rule = dict(window=window, use_flags=policy.uses_decisions,  # the visibility rule's
                sliding_window=sliding_window)  # settings, for every reader below
    attend = functools.partial(attend_blocks, q, positions, new_valid, scale=scale,
                               scoring=scoring, **rule)
    place = functools.partial(place_tokens, policy, old, new, query_pos=query_pos, window=window,
                              sliding_window=sliding_window)
    if attention != "dense" and scoring is None:  # the live slots only, no probabilities
        def attend(blocks):
            slots, tail = blocks[0], (blocks[1] if len(blocks) > 1 else None)
            keys = (slots.keys, slots.values, slots.pos, slots.flags)
            if attention == "tiled" and chunk > 1:  # a prefill chunk, stream by stream
                out, seen = tiled_attention(q, positions, new_valid, keys, tail, scale=scale,
                                            block=key_block, **rule)
            elif attention == "fused" and chunk > 1:  # a prefill chunk as one Pallas kernel
                from dms_jax.ops.fused_prefill import fused_chunk_attention  # Pallas: on demand
                out, seen = fused_chunk_attention(  # its own tiles: key_block is not used
                    q, positions, new_valid, keys, tail, live_extent(slots.pos), scale=scale,
                    interpret=jax.default_backend() == "cpu", **rule)
            else:
                out, seen = live_attention(q, positions, new_valid, keys, tail,
                                           live_extent(slots.pos), scale=scale, block=key_block,
                                           **rule)
            return out, seen, None

    cand_scores = jnp.concatenate(  # new tokens start at the policy's new_score
        [cache.scores, jnp.full(new_pos.shape, policy.new_score, jnp.float32)], -1)
    if chunk == 1:  # decode: evict, write in place, attend over the slots
        with jax.named_scope("evict"):
            keep_old, dest, dropped = place(cand_scores)
        with jax.named_scope("store"):
            keys, values, pos, flags, scores = store_tokens(old, new, keep_old, dest, cand_scores)
        with jax.named_scope("attend"):
            out, seen, received = attend([KeyBlock(keys, values, pos, flags, pos >= 0)])
            scores = accumulate_scores(policy, scores, received, scoring)
    elif out_rows is not None:  # chunk, one query's output per row: attend with it alone
        if scoring is not None:
            raise ValueError(f"out_rows: policy {policy.name!r} scores keys by every query's "
                             "attention; pass out_rows=None")
        with jax.named_scope("attend"):
            slot_keys = (old.keys, old.values, old.pos, old.flags)
            out, seen = one_query(
                q, positions, new_valid, out_rows,
                lambda q1, pos1, valid1: live_attention(
                    q1, pos1, valid1, slot_keys, tuple(new), live_extent(old.pos), **rule,
                    scale=scale, block=key_block)[0],
                [slot_source(slot_keys, rule=rule, block=key_block or PREFILL_BLOCK)],
                tuple(new), rule=rule, at_once=attention != "tiled")
        with jax.named_scope("evict"):
            keep_old, dest, dropped = place(cand_scores)
            dest = ordered_after(dest, out, slots)
        with jax.named_scope("store"):
            keys, values, pos, flags, scores = store_tokens(old, new, keep_old, dest, cand_scores)
    else:  # chunk: attend over [slots | chunk], then evict and store
        with jax.named_scope("attend"):
            out, seen, received = attend([old, new])
            cand_scores = accumulate_scores(policy, cand_scores, received, scoring)
        with jax.named_scope("evict"):
            keep_old, dest, dropped = place(cand_scores)
            dest = ordered_after(dest, out, slots)  # the store after the attention
        with jax.named_scope("store"):
            keys, values, pos, flags, scores = store_tokens(old, new, keep_old, dest, cand_scores)

    last_real = jnp.max(jnp.where(new_valid, jnp.arange(chunk), -1), axis=1)  # [B]
    last_dest = jnp.take_along_axis(dest, jnp.maximum(last_real, 0)[:, None, None], axis=2)[..., 0]
    last_slot = jnp.where((last_real >= 0)[:, None],
                          jnp.where(last_dest < slots, last_dest, -1), cache.last_slot)
    held = (pos >= 0).sum(axis=-1, dtype=jnp.int32)
    new_cache = LayerCache(
        keys=keys, values=values, pos=pos, flags=flags, scores=scores,
        last_slot=last_slot,
        last_pos=query_pos,
        seen=cache.seen + new_valid.sum(axis=1, dtype=jnp.int32),
        overflow=cache.overflow + (dropped if policy.counts_overflow else 0),
        kv_reads=cache.kv_reads + seen,
        peak_held=jnp.maximum(cache.peak_held, held),
    )
    return out, new_cache


def compact(cache: LayerCache, priority, scores, capacity: int) -> LayerCache:
    """The `capacity` highest-priority tokens of each (row, KV head) in a cache of that many slots.

    priority: f32 [B, Hkv, S] (-inf: dropped; empty slots must be -inf); equal priorities keep
    the earlier position first, and the kept tokens fill the slots in that order. scores: f32
    [B, Hkv, S], the kept tokens' new stored scores. Counters (seen, kv_reads, peak_held, ...)
    carry over, so the peak still counts what the larger cache held; dropped tokens are not
    overflow. SnapKV's prompt compression (`dms_jax.generate`) is the user; capacity <= S.
    """
    by_position = jnp.where(cache.pos >= 0, cache.pos, jnp.iinfo(jnp.int32).max)
    slot = jnp.lexsort((by_position, -priority), axis=-1)[..., :capacity]  # [B, Hkv, capacity]
    kept = jnp.take_along_axis(priority, slot, axis=-1) > -jnp.inf

    def gather(a):  # [B, Hkv, S, ...] -> [B, Hkv, capacity, ...]
        index = slot.reshape(slot.shape + (1,) * (a.ndim - 3))
        return jnp.take_along_axis(a, index, axis=2)

    pos = jnp.where(kept, gather(cache.pos), -1)
    is_last = (pos == cache.last_pos[:, None, None]) & (pos >= 0)
    return cache.replace(
        keys=gather(cache.keys), values=gather(cache.values), pos=pos,
        flags=kept & gather(cache.flags), scores=jnp.where(kept, gather(scores), 0.0),
        last_slot=jnp.where(is_last.any(-1), jnp.argmax(is_last, axis=-1), -1).astype(jnp.int32),
    )


# ----------------------------------------------------------------------------- stats


@flax.struct.dataclass
class CacheStats:
    held: Any  # int32 [L, B, Hkv] tokens held now
    seen: Any  # int32 [B] tokens seen per row
    compression_ratio: Any  # f32 scalar, 1 / mean(held / seen) over layers, rows (seen > 0), heads
    held_bytes: Any  # f32 scalar, key + value bytes of the held tokens
    peak_held_bytes: Any  # f32 scalar, sum over (layer, row, head) of its peak held bytes
    # key + value buffers allocated: a host int, static under jit (an array output would be int32,
    # which a cache over 2 GiB overflows)
    allocated_bytes: int = flax.struct.field(pytree_node=False)
    overflow: Any  # int32 [L, B, Hkv] tokens dropped because slots were full
    kv_reads: Any  # f32 [L, B, Hkv] sum over real queries of the keys each one saw


def compression_ratio(held, seen, axis=None):
    """CR = 1 / mean(held / seen) (docs/dms.md section 6): the one definition, used by the cache's
    stats, `GenerateStats` (per layer and per head) and the evaluation forward.

    held: [L, B, Hkv] tokens held (window included); seen: [B] tokens seen per row. The mean runs
    over `axis` of held (None: layers, rows and heads); rows that saw nothing do not count, and
    where nothing counts the ratio is 1. returns float32, held's shape without `axis`.
    """
    held = jnp.asarray(held, jnp.float32)
    seen = jnp.asarray(seen)
    ratio = held / jnp.maximum(seen, 1).astype(jnp.float32)[None, :, None]
    weight = jnp.broadcast_to((seen > 0)[None, :, None], held.shape).astype(jnp.float32)
    mean = (ratio * weight).sum(axis) / jnp.maximum(weight.sum(axis), 1.0)
    return jnp.where(mean > 0, 1.0 / jnp.where(mean > 0, mean, 1.0), 1.0)


def cache_stats(caches: Sequence[LayerCache]) -> CacheStats:
    """Stats of a per-layer cache sequence (jittable; byte counts in float32)."""
    held = jnp.stack([c.held for c in caches])  # [L, B, Hkv]
    seen = caches[0].seen
    token_bytes = [c.token_bytes for c in caches]
    return CacheStats(
        held=held,
        seen=seen,
        compression_ratio=compression_ratio(held, seen),
        held_bytes=sum(c.held.sum().astype(jnp.float32) * b for c, b in zip(caches, token_bytes)),
        peak_held_bytes=sum(c.peak_held.sum().astype(jnp.float32) * b
                            for c, b in zip(caches, token_bytes)),
        allocated_bytes=int(sum(c.kv_nbytes for c in caches)),
        overflow=jnp.stack([c.overflow for c in caches]),
        kv_reads=jnp.stack([c.kv_reads for c in caches]),
    )


class CacheOverflowError(RuntimeError):
    pass


def assert_no_overflow(caches: Sequence[LayerCache]):
    """Host-side strict check: raise if any (layer, row, head) dropped a token for capacity."""
    counts = np.stack([np.asarray(c.overflow) for c in caches])  # [L, B, Hkv]
    if counts.any():
        layer, row, head = np.argwhere(counts)[0]
        raise CacheOverflowError(
            f"KV cache overflow: {int(counts.sum())} tokens dropped for lack of slots "
            f"(first at layer {layer}, row {row}, KV head {head}; capacity "
            f"{caches[0].capacity}); raise the capacity (capacity=, or margin= / a lower "
            "target_cr in plan_inference / generate) "
            "or run without strict to accept the documented overflow rule"
        )
