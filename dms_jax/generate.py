"""Batched generation over the fixed-shape KV cache (docs/dms.md sections 5, 6 and 9).

    out = dms_jax.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32)          # DMS model
    out.tokens, out.lengths, out.stats                                               # numpy, numpy
    more = dms_jax.generate(model, [[6, 7], [8]], state=out.state, max_new_tokens=8) # next turn

`generate` is orchestration over named steps:
  1. `_call_inputs`: the prompts as int32 rows, per-row limits, stop ids and sampling, checked;
  2. the plan (`dms_jax.plan.plan_inference`, or the state's for a continuation), its memory
     checked (`check_memory`) before the cache is allocated (`dms_jax.cache.init_cache`);
  3. `_prefill`: the prompts through the jitted `prefill_step` in chunks (SnapKV: its own
     `_snapkv_prefill`), then the first token sampled from each row's last hidden state;
  4. `_decode`: segments of the jitted `decode_loop`, streamed to `on_tokens`;
  5. `_output`: tokens, stats and the state a continuation needs.

The work is two jitted programs, both taking the cache donated and the plan as their static
argument:
  * `prefill_step`: one chunk of C prompt tokens per row attends over the cache and the chunk and
    is stored by the policy (sparse prefill: DMS evicts inside the prompt by the same rule), so a
    long prompt needs memory for C tokens plus the cache, never for its full length;
  * `decode_loop`: samples one token per row per iteration inside `lax.while_loop` until every
    row has hit a stop token or its own length.
Rows of different lengths are right-padded inside the chunks; padding is never stored nor
counted, so a row gives the same tokens in a batch as alone.

The token sampled last is not yet in the cache (nothing has attended to it); `GenerationState`
keeps it as `pending`, and a continuation prefills it before the new turn's tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dms_jax import cache as kvcache
from dms_jax import sharding as shd
from dms_jax.config import resolve_dtype
from dms_jax.model import Decoder, validate_input_ids
from dms_jax.ops.live_attention import take_rows
from dms_jax.plan import (DEFAULT_CHUNK, InferencePlan, check_memory, check_settings,
                          plan_inference)
from dms_jax.policies import FULL, SnapKVPolicy, get_policy
from dms_jax.sampling import Sampling, check_sampling, sample_logits
from dms_jax.stats import GenerateStats, make_generate_stats

# ----------------------------------------------------------------------------- jitted steps


def _forward_over_cache(graphdef, params, cache, ids, valid, positions, plan: InferencePlan,
                        outputs_at=None):
    """The model over one chunk (or one decode token) of each row, as the plan says."""
    model = nnx.merge(graphdef, params)
    out = model.forward(ids, attention_mask=valid, positions=positions, return_logits=False,
                        cache=cache, plan=plan, outputs_at=outputs_at)
    return model, out.hidden, out.cache


def prefill_last_only(plan: InferencePlan) -> bool:
    """Whether a prompt's chunks need only each row's last hidden state from the last layer
    (`prefill_step`'s last_only): every policy but those that score keys by attention."""
    return not plan.policy.needs_attention


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "last_only"),
                   donate_argnames=("cache", "last_hidden"))
def prefill_step(graphdef, params, cache, ids, valid, positions, last_hidden, last_index, *,
                 plan: InferencePlan, last_only: bool = False):
    """One prefill chunk. ids, positions: int32 [B, C]; valid: bool [B, C];
    last_hidden: [B, d] carried across chunks; last_index: int32 [B], the chunk index of the
    row's last prompt token when it lies in this chunk, else -1.
    last_only: the last layer attends and runs its MLP for each row's `last_index` token only
    (`Decoder.forward`'s outputs_at; generation reads nothing else): the same cache, stats and
    last_hidden, hidden [B, 1, d].

    returns (hidden [B, C, d] after the final norm ([B, 1, d] with last_only), last_hidden
             [B, d], updated cache)
    """
    _, hidden, cache = _forward_over_cache(graphdef, params, cache, ids, valid, positions, plan,
                                           last_index if last_only else None)
    picked = take_rows(hidden, jnp.zeros_like(last_index) if last_only else last_index)[:, 0]
    last_hidden = jnp.where((last_index >= 0)[:, None], picked.astype(last_hidden.dtype),
                            last_hidden)
    return hidden, last_hidden, cache


class DecodeCarry(NamedTuple):
    """The decode loop's state (a pytree), carried across `decode_loop` calls."""

    i: Any  # int32 scalar, index of the next token to write
    tokens: Any  # int32 [B, max_new], -1 where nothing was generated
    lengths: Any  # int32 [B] tokens generated per row
    done: Any  # bool [B]
    cur: Any  # int32 [B] newest token, not yet in the cache
    key: Any  # PRNG key


def _is_stop(tok, stop_ids):
    return (tok[:, None] == stop_ids[None, :]).any(axis=1)


@functools.partial(jax.jit, static_argnames="max_new")
def start_decode(first, row_max, stop_ids, key, *, max_new: int) -> DecodeCarry:
    """The carry after the first token (sampled from the prefill). first, row_max: int32 [B];
    max_new: the token buffer's width (a bucket, so nearby lengths share the program)."""
    batch = first.shape[0]
    tokens = jnp.full((batch, max_new), -1, jnp.int32).at[:, 0].set(
        jnp.where(row_max > 0, first, -1))
    return DecodeCarry(jnp.int32(1), tokens, (row_max > 0).astype(jnp.int32),
                       (row_max <= 1) | _is_stop(first, stop_ids), first, key)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "segment"),
                   donate_argnames=("cache", "carry"))
def decode_loop(graphdef, params, cache, carry: DecodeCarry, next_pos, row_max, stop_ids, *,
                plan: InferencePlan, sampling: Sampling, segment: int):
    """Generate up to `segment` more tokens per row inside one `lax.while_loop`.

    next_pos: int32 [B] position of the first generated token; row_max: int32 [B] tokens to
    generate per row; stop_ids: int32 [K] stop tokens (-1 = unused slot).
    returns (carry, cache); the loop stops early once every row is done.
    """
    max_new = carry.tokens.shape[1]
    end = jnp.minimum(carry.i + segment, max_new)

    def cond(state):
        c, _ = state
        return (c.i < end) & ~c.done.all()

    def body(state):
        c, cache = state
        key, sub = jax.random.split(c.key)
        live = ~c.done
        pos = next_pos + c.i - 1
        model, hidden, cache = _forward_over_cache(graphdef, params, cache, c.cur[:, None],
                                                   live[:, None], pos[:, None], plan)
        with jax.named_scope("sample"):
            nxt = jnp.where(live, sample_logits(model.unembed(hidden[:, 0]), sub, sampling), -1)
        tokens = jax.lax.dynamic_update_slice(c.tokens, nxt[:, None], (0, c.i))
        lengths = c.lengths + live
        done = c.done | _is_stop(nxt, stop_ids) | (lengths >= row_max)
        return DecodeCarry(c.i + 1, tokens, lengths, done, jnp.where(live, nxt, c.cur),
                           key), cache

    carry, cache = jax.lax.while_loop(cond, body, (carry, cache))
    return carry, cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _sample_hidden(graphdef, params, hidden, key, *, sampling: Sampling):
    model = nnx.merge(graphdef, params)
    return sample_logits(model.unembed(hidden), key, sampling)


_stats = jax.jit(kvcache.cache_stats)


# ----------------------------------------------------------------------------- public API


@dataclasses.dataclass
class GenerationState:
    """What a continuation needs: the cache and, per row, the token not yet in it."""

    cache: tuple
    pending: np.ndarray  # int32 [B], last token sampled (not in the cache), -1: none
    next_pos: np.ndarray  # int32 [B], position of the next token to enter the cache
    max_len: int  # tokens per row asked for (the cache is allocated for plan.max_len >= it)
    plan: InferencePlan
    kv_reads: float  # KV reads of the cache so far (its counters are cumulative)


@dataclasses.dataclass
class GenerateOutput:
    tokens: np.ndarray  # int32 [B, max_new_tokens], -1 after each row's end
    lengths: np.ndarray  # int32 [B] tokens generated per row (a stop token counts)
    stats: GenerateStats
    state: GenerationState

    def sequences(self) -> list[list[int]]:
        """The generated tokens of each row, without the -1 padding."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def generate(model: Decoder, prompts, *, max_new_tokens=64, policy=None, window=None,
             target_cr=None, margin=None, capacity=None, budget=None, max_len=None,
             chunk_size=None, temperature=0.0, top_k=0, top_p=1.0, key=None,
             stop_tokens=None, strict=False, state: GenerationState | None = None,
             progress=None, on_tokens=None, decode_segment=None, mesh=None, layout="slots",
             page_size=None, pool_pages=None, attention_impl=None) -> GenerateOutput:
    """Prefill the prompts into a fixed-shape KV cache and generate.

    prompts: a list of token-id sequences (lengths may differ; integers only), one sequence, or
      an int array [B, T]; with `state`, the next turn's tokens for each row of the previous call.
    max_new_tokens: int or one int per row (0: prefill only).
    policy, window, target_cr, margin, capacity, budget, chunk_size: the plan's settings
      (`dms_jax.plan.plan_inference`: policy "dms" by default for a DMS model, else "full", or a
      baseline "streaming", "h2o", "tova", "snapkv" with its `budget`, or a Policy; the cache
      holds `capacity` slots per head, or `budget`, or for dms what `max_len` tokens need at
      `target_cr` with `margin`; default 0.5, 0.1 for a paged pool). layout, page_size,
      pool_pages: the cache layout, "slots" or "paged" (full and dms: a ring of the window per
      stream and one pool of pages per layer, `dms_jax.paged`; see `plan_inference`).
      attention_impl: the plan's cache attention (default: the platform's; "fused": the
      experimental Pallas prefill kernel, `plan_inference`).
      SnapKV prefills the whole prompt before compressing it to the budget
      (`_snapkv_prefill`; its peak KV bytes say so). max_len: tokens per row the cache must take
      over all turns (default: longest prompt + max_new_tokens); a cache that would
      not fit in memory is refused before it is allocated. chunk_size: prefill chunk C (memory ~
      cache + C tokens; default 512, or the state's).
    temperature / top_k / top_p: see `Sampling`; key: PRNG key (needed unless greedy).
    stop_tokens: ids that end a row. strict: raise `CacheOverflowError` if any head overflowed.
    progress: a callable(done_tokens, total_tokens), called once the prefill program is compiled
      (done 0) and after each prefill chunk has run.
    on_tokens: a callable(new_tokens int32 [B, n]) called as tokens arrive (-1: row ended), for
      streaming; decode_segment: tokens per jitted decode call (default: all in one call), so
      `on_tokens` is called every `decode_segment` tokens.
    mesh: a `jax.sharding.Mesh` with axes (data, fsdp, tensor) (`dms_jax.sharding.make_mesh`):
      the parameters are placed by the rules table and the cache's rows over data x fsdp, its KV
      heads over tensor (an axis that does not divide a dimension leaves it replicated).
    """
    cfg = model.config
    rows, row_max, stop_ids, sampling, key = _call_inputs(
        cfg, prompts, max_new_tokens, stop_tokens, temperature, top_k, top_p, key,
        decode_segment, continuing=state is not None)
    if state is None:
        max_len = max(len(r) for r in rows) + int(row_max.max()) if max_len is None else max_len
        start = np.zeros(len(rows), np.int32)
        _check_lengths(rows, start, row_max, max_len)
        plan = plan_inference(cfg, policy=policy, window=window, capacity=capacity,
                              budget=budget, target_cr=target_cr, max_len=max_len,
                              chunk_size=DEFAULT_CHUNK if chunk_size is None else chunk_size,
                              margin=margin, layout=layout, pool_pages=pool_pages,
                              attention_impl=attention_impl,
                              **({} if page_size is None else {"page_size": page_size}))
        check_memory(plan, len(rows), mesh=mesh)
        cache = kvcache.init_cache(plan, len(rows), mesh=mesh)
        if mesh is not None:
            cache = shd.shard_cache(cache, mesh)
        kv_before = 0.0
    else:
        plan, rows, max_len = _continuation(state, rows, row_max, policy, chunk_size)
        start, kv_before = state.next_pos, state.kv_reads
        cache, state.cache = state.cache, None  # donated: a second continuation gets a clear error
    graphdef, params = nnx.split(model)
    if mesh is not None:  # the programs follow their inputs' shardings (computation follows data)
        params = shd.shard_model_state(params, mesh)

    prefilled = _prefill(graphdef, params, cache, rows, start, plan, sampling, key,
                         hidden_size=cfg.hidden_size, first_call=state is None,
                         progress=progress)
    decoded = _decode(graphdef, params, prefilled.cache, prefilled.first, row_max, stop_ids,
                      prefilled.key, prefilled.next_pos, plan, sampling, decode_segment,
                      on_tokens)
    return _output(cfg, plan, prefilled, decoded, max_len, kv_before, strict)


def _call_inputs(cfg, prompts, max_new_tokens, stop_tokens, temperature, top_k, top_p, key,
                 decode_segment, continuing):
    """The call's inputs, checked: (rows, row_max int32 [B], stop ids, Sampling, key)."""
    check_sampling(temperature, top_k, top_p)
    sampling = Sampling(float(temperature), int(top_k), float(top_p))  # traced as float32
    if key is None:
        if not sampling.greedy:
            raise ValueError("sampling with temperature > 0 needs key=jax.random.key(seed)")
        key = jax.random.key(0)
    if decode_segment is not None and not (isinstance(decode_segment, (int, np.integer))
                                           and decode_segment >= 1):
        raise ValueError(f"decode_segment={decode_segment!r} must be a positive integer or None")
    rows = prompt_rows(prompts, cfg.vocab_size, allow_empty=continuing)
    row_max = np.asarray(max_new_tokens)
    if row_max.size and not np.issubdtype(row_max.dtype, np.integer):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer (or one per "
                         "prompt)")
    if row_max.ndim and row_max.shape != (len(rows),):
        raise ValueError(f"max_new_tokens has {row_max.size} values for {len(rows)} prompts: "
                         "give one int, or one per prompt")
    row_max = np.broadcast_to(row_max.astype(np.int32), (len(rows),)).copy()
    if (row_max < 0).any():
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be >= 0")
    return rows, row_max, _check_stop(stop_tokens, cfg.vocab_size), sampling, key


def prompt_rows(prompts, vocab_size, allow_empty=False) -> list[np.ndarray]:
    """Prompts as int32 rows, checked: integer ids in [0, vocab_size) (a float id is refused,
    never truncated), at least one token per row unless `allow_empty`."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if arr.ndim == 1:
            arr = arr[None]
        validate_input_ids(arr, vocab_size)
        rows = list(arr)
    else:
        if len(prompts) == 0:
            raise ValueError("no prompts: pass a list of token-id sequences")
        if np.ndim(prompts[0]) == 0:  # one sequence of ids
            prompts = [prompts]
        rows = []
        for i, p in enumerate(prompts):
            arr = np.asarray(p).reshape(-1)
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                bad = [x for x in arr.tolist() if not isinstance(x, int) or isinstance(x, bool)]
                raise ValueError(
                    f"prompt {i}: token ids must be integers, got {arr.dtype} values such as "
                    f"{bad[:3]}; convert them explicitly (a float id is never truncated here)")
            if arr.size:
                validate_input_ids(arr[None], vocab_size)
            rows.append(arr)
    for i, r in enumerate(rows):
        if r.size == 0 and not allow_empty:
            raise ValueError(f"prompt {i} is empty: every row needs at least one token")
    return [r.astype(np.int32) for r in rows]


def _check_stop(stop_tokens, vocab_size) -> np.ndarray:
    stop = [] if stop_tokens is None else (
        [stop_tokens] if isinstance(stop_tokens, (int, np.integer)) else list(stop_tokens))
    for t in stop:
        if not 0 <= int(t) < vocab_size:
            raise ValueError(f"stop token {t} outside [0, {vocab_size})")
    # a fixed size so the decode program compiles once for up to 8 stop tokens
    size = max(8, len(stop))
    return np.asarray(list(stop) + [-1] * (size - len(stop)), np.int32)


def _continuation(state: GenerationState, rows, row_max, policy, chunk_size):
    """(plan, rows with each pending token first, max_len) of a continuation, checked (the state
    stays usable when a check fails)."""
    if state.cache is None:
        raise ValueError("this GenerationState was already continued (its cache was donated to "
                         "that call); continue from that call's output.state")
    if policy is not None and get_policy(policy) != state.plan.policy:
        raise ValueError("a continuation keeps the policy of its state; leave policy unset")
    if len(rows) != len(state.pending):
        raise ValueError(f"the state has {len(state.pending)} rows, the new turn {len(rows)}")
    plan = state.plan
    if chunk_size is not None:
        check_settings(chunk_size=chunk_size)
        plan = plan.derive(plan.policy, chunk_size=chunk_size)
    rows = [r if p < 0 else np.concatenate([[p], r]).astype(np.int32)
            for r, p in zip(rows, state.pending)]
    for i, r in enumerate(rows):
        if r.size == 0:
            raise ValueError(f"row {i} has no new tokens and nothing pending to continue from")
    _check_lengths(rows, state.next_pos, row_max, state.max_len)
    return plan, rows, state.max_len


def _check_lengths(rows, start, row_max, max_len):
    total = start + np.asarray([len(r) for r in rows], np.int32) + row_max
    if (total > max_len).any():
        i = int(np.argmax(total - max_len))
        raise ValueError(
            f"row {i} needs {int(total[i])} tokens (history {int(start[i])} + prompt "
            f"{len(rows[i])} + max_new_tokens {int(row_max[i])}) > max_len {max_len}; "
            "raise max_len (set it on the first call when you plan to continue)")


# ----------------------------------------------------------------------------- prefill


class Prefilled(NamedTuple):
    cache: tuple
    first: Any  # int32 [B], the token sampled after each row's prompt
    key: Any  # the PRNG key for decoding
    lens: np.ndarray  # int32 [B] tokens prefilled per row
    next_pos: np.ndarray  # int32 [B] position of each row's first generated token
    kv_after: float  # the cache's cumulative KV reads after the prefill
    prefill_s: float
    compile_s: float


def _prefill(graphdef, params, cache, rows, start, plan: InferencePlan, sampling, key, *,
             hidden_size, first_call, progress) -> Prefilled:
    """The rows into the cache (right-padded chunks; SnapKV's first call: `_snapkv_prefill`),
    then the first token sampled from each row's last hidden state."""
    batch = len(rows)
    last_hidden = jnp.zeros((batch, hidden_size), resolve_dtype(plan.dtype))
    t0 = time.perf_counter()
    key, sub = jax.random.split(key)
    sample_first = _precompile(_sample_hidden, graphdef, params, last_hidden, sub,
                               sampling=sampling)
    compile_s = time.perf_counter() - t0
    run = (_snapkv_prefill if first_call and isinstance(plan.policy, SnapKVPolicy)
           else _chunked_prefill)
    cache, last_hidden, prefill_compile_s, prefill_s = run(
        graphdef, params, cache, rows, start, plan, last_hidden, progress)
    t0 = time.perf_counter()
    stats_of = _precompile(_stats, cache)
    compile_s += prefill_compile_s + time.perf_counter() - t0
    t0 = time.perf_counter()
    first = sample_first(graphdef, params, last_hidden, sub)
    kv_after = float(stats_of(cache).kv_reads.sum())
    first.block_until_ready()
    prefill_s += time.perf_counter() - t0
    lens = np.asarray([len(r) for r in rows], np.int32)
    return Prefilled(cache, first, key, lens, (start + lens).astype(np.int32), kv_after,
                     prefill_s, compile_s)


def _chunked_prefill(graphdef, params, cache, rows, start, plan: InferencePlan, last_hidden,
                     progress=None):
    """Prompt tokens through the jitted `prefill_step` in right-padded chunks of C per row.

    rows: int32 token arrays (one may be empty); start: int32 [B], position of each row's first
    token; last_hidden: [B, d], kept for a row without tokens. With `progress`, each chunk is
    waited for before it is reported (the bar moves with the work, not with the dispatch).
    returns (cache, last_hidden at each row's last token, compile seconds, run seconds)
    """
    batch = len(rows)
    lens = np.asarray([len(r) for r in rows], np.int32)
    longest = int(lens.max())
    if longest == 0:
        return cache, last_hidden, 0.0, 0.0
    # few programs: the chunk width is chunk_size or a power of two (>= 16) below it
    chunk = int(min(plan.chunk_size, _bucket(longest)))
    n_chunks = -(-longest // chunk)
    ids = np.zeros((batch, n_chunks * chunk), np.int32)
    valid = np.zeros_like(ids, bool)
    for b, r in enumerate(rows):
        ids[b, :len(r)], valid[b, :len(r)] = r, True
    positions = (start[:, None] + np.arange(n_chunks * chunk)[None]).astype(np.int32)
    last_idx = lens - 1

    last_index = np.where(last_idx < chunk, last_idx, -1).astype(np.int32)
    t0 = time.perf_counter()
    cols = slice(0, chunk)
    run_step = _precompile(prefill_step, graphdef, params, cache, ids[:, cols], valid[:, cols],
                           positions[:, cols], last_hidden, last_index, plan=plan,
                           last_only=prefill_last_only(plan))
    compile_s = time.perf_counter() - t0
    if progress is not None:
        progress(0, longest)

    t0 = time.perf_counter()
    for c in range(n_chunks):
        cols = slice(c * chunk, (c + 1) * chunk)
        last_index = np.where((last_idx >= c * chunk) & (last_idx < (c + 1) * chunk),
                              last_idx - c * chunk, -1).astype(np.int32)
        _, last_hidden, cache = run_step(graphdef, params, cache, ids[:, cols], valid[:, cols],
                                         positions[:, cols], last_hidden, last_index)
        if progress is not None:
            jax.block_until_ready(last_hidden)
            progress(min((c + 1) * chunk, longest), longest)
    jax.block_until_ready(last_hidden)
    return cache, last_hidden, compile_s, time.perf_counter() - t0


def _snapkv_prefill(graphdef, params, cache, rows, start, plan: InferencePlan, last_hidden,
                    progress=None):
    """SnapKV's prefill (dms_jax.policies.SnapKVPolicy): the whole prompt, then compressed once.

    1. every row's prompt but its last `obs_window` tokens, in chunks, into a cache that holds
       the whole prompt (capacity max(longest prompt, budget): SnapKV's peak memory);
    2. the last `obs_window` tokens (each row's observation window) with `policy.observe()`,
       which sums, per key, the attention of those queries;
    3. compaction to `cache`'s capacity (the budget): the window plus the top pooled scores.
    cache: the budget-sized cache (only its shape is used). Arguments and result as
    `_chunked_prefill`; the result has the shape of `cache`.
    """
    policy, budget = plan.policy, plan.capacity
    lens = np.asarray([len(r) for r in rows], np.int32)
    heads = [r[:max(len(r) - policy.obs_window, 0)] for r in rows]
    tails = [r[len(h):] for r, h in zip(rows, heads)]
    whole_plan = plan.derive(FULL, capacity=max(int(lens.max()), budget))
    whole = kvcache.init_cache(whole_plan, len(rows))
    whole, last_hidden, compile_s, run_s = _chunked_prefill(
        graphdef, params, whole, heads, start, whole_plan, last_hidden)
    head_lens = np.asarray([len(h) for h in heads], np.int32)
    observe_plan = whole_plan.derive(policy.observe(), chunk_size=policy.obs_window)
    whole, last_hidden, compile2_s, run2_s = _chunked_prefill(
        graphdef, params, whole, tails, start + head_lens, observe_plan, last_hidden)
    t0 = time.perf_counter()
    compress = _precompile(_snapkv_compress, whole, policy=policy, capacity=budget)
    compile_s += compile2_s + time.perf_counter() - t0
    t0 = time.perf_counter()
    compressed = jax.block_until_ready(compress(whole))
    if progress is not None:
        progress(int(lens.max()), int(lens.max()))
    return compressed, last_hidden, compile_s, run_s + run2_s + time.perf_counter() - t0


@functools.partial(jax.jit, static_argnames=("policy", "capacity"))
def _snapkv_compress(cache, *, policy: SnapKVPolicy, capacity: int):
    """Each layer's prefilled prompt compacted to `capacity` slots by SnapKV's pooled scores."""
    return kvcache.map_layers(
        lambda c: kvcache.compact(c, *policy.prompt_priority(c.pos, c.scores, c.last_pos), capacity),
        cache)


# ----------------------------------------------------------------------------- decode


class Decoded(NamedTuple):
    cache: tuple
    tokens: np.ndarray  # int32 [B, max_new]
    lengths: np.ndarray  # int32 [B]
    decode_s: float
    compile_s: float


def _decode(graphdef, params, cache, first, row_max, stop_ids, key, next_pos,
            plan: InferencePlan, sampling, decode_segment, on_tokens: Callable | None) -> Decoded:
    """Segments of `decode_segment` tokens (one jitted while_loop each) until every row is
    done; `on_tokens` gets each segment's new tokens."""
    batch, max_new = len(row_max), int(row_max.max())
    if max_new == 0:
        return Decoded(cache, np.zeros((batch, 0), np.int32), np.zeros(batch, np.int32), 0.0,
                       0.0)
    segment = _bucket(max_new) if decode_segment is None else int(decode_segment)
    carry = start_decode(first, row_max, stop_ids, key, max_new=_bucket(max_new))
    t0 = time.perf_counter()
    decode = _precompile(decode_loop, graphdef, params, cache, carry, next_pos, row_max,
                         stop_ids, plan=plan, sampling=sampling, segment=segment)
    compile_s = time.perf_counter() - t0
    decode_s, shown = 0.0, 0
    while True:
        if on_tokens is not None:
            got = np.asarray(carry.tokens[:, shown:int(carry.i)])
            if got.size:
                on_tokens(got)
            shown = int(carry.i)
        if bool(carry.done.all()):  # every row stops at its own length
            break
        t0 = time.perf_counter()
        carry, cache = decode(graphdef, params, cache, carry, next_pos, row_max, stop_ids)
        carry.i.block_until_ready()
        decode_s += time.perf_counter() - t0
    return Decoded(cache, np.asarray(carry.tokens)[:, :max_new], np.asarray(carry.lengths),
                   decode_s, compile_s)


# ----------------------------------------------------------------------------- output


def _output(cfg, plan: InferencePlan, prefilled: Prefilled, decoded: Decoded, max_len,
            kv_before, strict) -> GenerateOutput:
    """Tokens, stats and the continuation state; under `strict` a CacheOverflowError that
    carries this output."""
    cache, tokens, lengths = decoded.cache, decoded.tokens, decoded.lengths
    batch = len(lengths)
    stats_dev = _stats(cache)
    # each generated token but the last entered the cache (the last is pending)
    fed = np.maximum(lengths - 1, 0)
    last = tokens[np.arange(batch), np.maximum(lengths - 1, 0)] if tokens.shape[1] else lengths
    state = GenerationState(
        cache=cache, pending=np.where(lengths > 0, last, -1).astype(np.int32),
        next_pos=(prefilled.next_pos + fed).astype(np.int32), max_len=max_len, plan=plan,
        kv_reads=float(stats_dev.kv_reads.sum()))
    stats = make_generate_stats(
        stats_dev, plan.policy.name, cache, cfg, prefill_tokens=int(prefilled.lens.sum()),
        decode_tokens=int(fed.sum()), kv_before=kv_before, kv_after_prefill=prefilled.kv_after,
        prefill_s=prefilled.prefill_s, decode_s=decoded.decode_s,
        compile_s=prefilled.compile_s + decoded.compile_s)
    output = GenerateOutput(tokens, lengths, stats, state)
    if strict:
        try:
            kvcache.assert_no_overflow(cache)
        except kvcache.CacheOverflowError as err:
            err.output = output  # the tokens and the cache are not lost
            raise
    return output


def _precompile(jitted, *args, **static):
    """Compile `jitted` for these arguments now (so the caller can time compilation apart) and
    return it with its static arguments bound. Calls go through jit's own dispatch, which finds
    this compiled program in its cache and, on a mesh, compiles another only if an input arrives
    with a different sharding."""
    jitted.lower(*args, **static).compile()
    return functools.partial(jitted, **static)


def _bucket(n: int) -> int:
    """The next power of two >= max(n, 16): shapes from a few buckets compile a few programs."""
    return max(16, 1 << (int(n) - 1).bit_length())
