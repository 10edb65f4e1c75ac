"""Batched generation over the fixed-shape KV cache (dms-spec.md sections 4-6).

    out = dms_jax.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32)          # DMS model
    out.tokens, out.lengths, out.stats                                               # numpy, numpy
    more = dms_jax.generate(model, [[6, 7], [8]], state=out.state, max_new_tokens=8) # next turn

The work is two jitted programs, both taking the cache donated:
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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dms_jax import cache as kvcache
from dms_jax.cache import resolve_capacity  # noqa: F401  (public here too: infer.py)
from dms_jax import sharding as shd
from dms_jax.config import resolve_dtype
from dms_jax.sampling import Sampling, sample_logits
from dms_jax.stats import GenerateStats, make_generate_stats
from dms_jax.model import Decoder, validate_input_ids
from dms_jax.policies import FULL, Policy, SnapKVPolicy, get_policy

DEFAULT_CHUNK = 512
DEFAULT_TARGET_CR = 8.0


# ----------------------------------------------------------------------------- jitted steps


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static about a step (hashable: part of the jit cache key)."""

    policy: Policy
    window: int | None = None  # DMS window override, None: the model's
    attention_impl: str = "dense"
    # a neuron-mode DMS model: every policy runs the retrofitted network (decision neuron zeroed,
    # the model's eval mode); policies without decisions ignore the flags
    neuron: bool = False

    def __post_init__(self):
        if self.policy.needs_attention and self.attention_impl != "dense":
            raise ValueError(
                f"policy {self.policy.name!r} ranks tokens by the attention they receive, which "
                f"only the dense chunked cache attention computes; attention_impl="
                f"{self.attention_impl!r} gives no scores: use attention_impl='dense'")

    @property
    def mode(self) -> str:
        return "eval" if self.policy.uses_decisions or self.neuron else "plain"


def _forward(graphdef, params, cache, ids, valid, positions, step: StepConfig):
    model = nnx.merge(graphdef, params)
    out = model.forward(ids, attention_mask=valid, positions=positions, mode=step.mode,
                        return_logits=False, attention_impl=step.attention_impl,
                        cache=cache, policy=step.policy, window=step.window)
    return model, out.hidden, tuple(out.cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "step"),
                   donate_argnames=("cache", "last_hidden"))
def prefill_step(graphdef, params, cache, ids, valid, positions, last_hidden, last_index, *,
                 step: StepConfig):
    """One prefill chunk. ids, positions: int32 [B, C]; valid: bool [B, C];
    last_hidden: [B, d] carried across chunks; last_index: int32 [B], the chunk index of the
    row's last prompt token when it lies in this chunk, else -1.

    returns (hidden [B, C, d] after the final norm, last_hidden [B, d], updated cache)
    """
    _, hidden, cache = _forward(graphdef, params, cache, ids, valid, positions, step)
    picked = jnp.take_along_axis(hidden, jnp.maximum(last_index, 0)[:, None, None], axis=1)[:, 0]
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


def start_decode(first, row_max, stop_ids, key, max_new: int) -> DecodeCarry:
    """The carry after the first token (sampled from the prefill). first, row_max: int32 [B]."""
    batch = first.shape[0]
    tokens = jnp.full((batch, max_new), -1, jnp.int32).at[:, 0].set(
        jnp.where(row_max > 0, first, -1))
    return DecodeCarry(jnp.int32(1), tokens, (row_max > 0).astype(jnp.int32),
                       (row_max <= 1) | _is_stop(first, stop_ids), first, key)


@functools.partial(jax.jit, static_argnames=("graphdef", "step", "segment"),
                   donate_argnames=("cache", "carry"))
def decode_loop(graphdef, params, cache, carry: DecodeCarry, next_pos, row_max, stop_ids, *,
                step: StepConfig, sampling: Sampling, segment: int):
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
        model, hidden, cache = _forward(graphdef, params, cache, c.cur[:, None], live[:, None],
                                        pos[:, None], step)
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
    max_len: int  # tokens per row the cache was sized for
    step: StepConfig
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


def _as_rows(prompts, vocab_size, allow_empty=False) -> list[np.ndarray]:
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if arr.ndim == 1:
            arr = arr[None]
        validate_input_ids(arr, vocab_size)
        rows = list(arr)
    else:
        if len(prompts) == 0:
            raise ValueError("no prompts: pass a list of token-id sequences")
        if isinstance(prompts[0], (int, np.integer)):
            prompts = [prompts]
        rows = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
        for r in rows:
            if r.size:
                validate_input_ids(r[None], vocab_size)
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


def default_target_cr(cfg) -> float:
    """The CR a cache is sized for by default: the model's recorded `dms.target_cr`, else 8."""
    recorded = cfg.dms.target_cr if cfg.dms is not None else None
    return float(recorded) if recorded else DEFAULT_TARGET_CR


def generate(model: Decoder, prompts, *, max_new_tokens=64, policy=None, window=None,
             target_cr=None, margin=0.5, capacity=None, budget=None, max_len=None,
             chunk_size=DEFAULT_CHUNK, temperature=0.0, top_k=0, top_p=1.0, key=None,
             stop_tokens=None, strict=False, state: GenerationState | None = None,
             progress=None, on_tokens=None, decode_segment=None, mesh=None) -> GenerateOutput:
    """Prefill the prompts into a fixed-shape KV cache and generate.

    prompts: a list of token-id sequences (lengths may differ), one sequence, or an int array
      [B, T]; with `state`, the next turn's tokens for each row of the previous call.
    max_new_tokens: int or one int per row (0: prefill only).
    policy: "dms" (default for a DMS model), "full" (default otherwise), a baseline name
      ("streaming", "h2o", "tova", "snapkv"), or a Policy (`get_policy(name, **params)`).
    window: DMS window override (default: the model's). Capacity per head: `capacity` slots, or
      `budget` held tokens (required by the baselines; see `dms_jax.policies` for the
      convention and `budget_from_stats` to match a DMS run), or derived from `max_len` and
      `target_cr` with `margin` (dms), or max_len (full). SnapKV prefills the whole prompt
      before compressing it to the budget (`_snapkv_prefill`; its peak KV bytes say so).
      max_len: tokens per row the cache must take over all turns (default: longest prompt +
      max_new_tokens).
    chunk_size: prefill chunk C (memory ~ cache + C tokens). temperature / top_k / top_p: see
      `Sampling`; key: PRNG key (needed unless greedy). stop_tokens: ids that end a row.
    strict: raise `CacheOverflowError` if any head overflowed its capacity.
    progress: a callable(done_tokens, total_tokens) called after each prefill chunk.
    on_tokens: a callable(new_tokens int32 [B, n]) called as tokens arrive (-1: row ended), for
      streaming; decode_segment: tokens per jitted decode call (default: all in one call), so
      `on_tokens` is called every `decode_segment` tokens.
    mesh: a `jax.sharding.Mesh` with axes (data, fsdp, tensor) (`dms_jax.sharding.make_mesh`):
      the parameters are placed by the rules table and the cache's rows over data x fsdp, its KV
      heads over tensor (an axis that does not divide a dimension leaves it replicated).
    """
    cfg = model.config
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    if key is None:
        if not sampling.greedy:
            raise ValueError("sampling with temperature > 0 needs key=jax.random.key(seed)")
        key = jax.random.key(0)
    if not (isinstance(chunk_size, (int, np.integer)) and chunk_size >= 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")
    if decode_segment is not None and not (isinstance(decode_segment, (int, np.integer))
                                           and decode_segment >= 1):
        raise ValueError(f"decode_segment={decode_segment!r} must be a positive integer or None")
    if state is not None and state.cache is None:
        raise ValueError("this GenerationState was already continued (its cache was donated to "
                         "that call); continue from that call's output.state")
    rows = _as_rows(prompts, cfg.vocab_size, allow_empty=state is not None)
    batch = len(rows)
    row_max = np.asarray(max_new_tokens, np.int32)
    if row_max.ndim and row_max.shape != (batch,):
        raise ValueError(f"max_new_tokens has {row_max.size} values for {batch} prompts: give "
                         "one int, or one per prompt")
    row_max = np.broadcast_to(row_max, (batch,)).copy()
    if (row_max < 0).any():
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be >= 0")
    stop_ids = _check_stop(stop_tokens, cfg.vocab_size)

    graphdef, params = nnx.split(model)
    if mesh is not None:  # the programs follow their inputs' shardings (computation follows data)
        params = shd.shard_model_state(params, mesh)
    if state is None:
        pol = get_policy(policy if policy is not None else ("dms" if cfg.dms else "full"))
        if pol.uses_decisions and cfg.dms is None:
            raise ValueError(f"policy {pol.name!r} needs a DMS model "
                             "(from_pretrained(path, dms=DMSConfig(...))); use policy='full'")
        eff_window = (window if window is not None else cfg.dms.window) if cfg.dms else 0
        if not (isinstance(eff_window, (int, np.integer)) and eff_window >= 0):
            raise ValueError(f"window={window!r} must be an integer >= 0")
        target_cr = default_target_cr(cfg) if target_cr is None else target_cr
        if not target_cr >= 1.0:
            raise ValueError(f"target_cr={target_cr} must be >= 1 (8.0 keeps ~1/8 of the tokens)")
        longest = max(len(r) for r in rows) + int(row_max.max())
        max_len = longest if max_len is None else int(max_len)
        # the cache is sized for a bucketed length, so nearby lengths share compiled programs
        alloc_len = _bucket_len(max_len)
        cap = resolve_capacity(cfg, alloc_len, pol, window=eff_window, target_cr=target_cr,
                               margin=margin, capacity=capacity, budget=budget)
        step = StepConfig(pol, int(eff_window) if pol.uses_decisions else None,
                          attention_impl="dense",
                          neuron=cfg.dms is not None and cfg.dms.mode == "neuron")
        cache = kvcache.init_cache(cfg.num_layers, batch, cfg.num_kv_heads, cap, cfg.head_dim,
                                   window=eff_window if pol.uses_decisions else 0,
                                   dtype=resolve_dtype(cfg.dtype),
                                   max_len=alloc_len)
        if mesh is not None:
            cache = shd.shard_cache(cache, mesh)
        pending = np.full(batch, -1, np.int32)
        start = np.zeros(batch, np.int32)
        kv_before = 0.0
    else:
        if policy is not None and get_policy(policy) != state.step.policy:
            raise ValueError("a continuation keeps the policy of its state; leave policy unset")
        if batch != len(state.pending):
            raise ValueError(f"the state has {len(state.pending)} rows, the new turn {batch}")
        step, cache, max_len = state.step, state.cache, state.max_len
        pending, start, kv_before = state.pending, state.next_pos, state.kv_reads
        state.cache = None  # donated below: a second continuation from it gets a clear error
        rows = [r if p < 0 else np.concatenate([[p], r]).astype(np.int32)
                for r, p in zip(rows, pending)]
        for i, r in enumerate(rows):
            if r.size == 0:
                raise ValueError(f"row {i} has no new tokens and nothing pending to continue from")

    lens = np.asarray([len(r) for r in rows], np.int32)
    total = start + lens + row_max
    if (total > max_len).any():
        i = int(np.argmax(total - max_len))
        raise ValueError(
            f"row {i} needs {int(total[i])} tokens (history {int(start[i])} + prompt "
            f"{int(lens[i])} + max_new_tokens {int(row_max[i])}) > max_len {max_len}; "
            "raise max_len (set it on the first call when you plan to continue)")

    # ---- prefill: right-padded chunks of C tokens (SnapKV's first call: see _snapkv_prefill)
    last_hidden = jnp.zeros((batch, cfg.hidden_size), resolve_dtype(cfg.dtype))
    t0 = time.perf_counter()
    key, sub = jax.random.split(key)
    sample_first = _precompile(_sample_hidden, graphdef, params, last_hidden, sub,
                               sampling=sampling)
    compile_s = time.perf_counter() - t0
    run_prefill = (_snapkv_prefill if state is None and isinstance(step.policy, SnapKVPolicy)
                   else _chunked_prefill)
    cache, last_hidden, prefill_compile_s, prefill_s = run_prefill(
        graphdef, params, cache, rows, start, step, chunk_size, last_hidden, progress)
    t0 = time.perf_counter()
    stats_of = _precompile(_stats, cache)
    compile_s += prefill_compile_s + time.perf_counter() - t0
    t0 = time.perf_counter()
    first = sample_first(graphdef, params, last_hidden, sub)
    kv_after_prefill = float(stats_of(cache).kv_reads.sum())
    first.block_until_ready()
    prefill_s += time.perf_counter() - t0

    # ---- decode, in segments of `decode_segment` tokens (one jitted while_loop each)
    max_new = int(row_max.max())
    next_pos = (start + lens).astype(np.int32)
    decode_s = 0.0
    if max_new > 0:
        segment = _bucket(max_new) if decode_segment is None else int(decode_segment)
        carry = jax.jit(start_decode, static_argnames="max_new")(
            first, row_max, stop_ids, key, max_new=_bucket(max_new))  # a power-of-two buffer
        t0 = time.perf_counter()
        decode = _precompile(decode_loop, graphdef, params, cache, carry, next_pos, row_max,
                             stop_ids, step=step, sampling=sampling, segment=segment)
        compile_s += time.perf_counter() - t0
        shown = 0
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
        tokens, lengths = np.asarray(carry.tokens)[:, :max_new], np.asarray(carry.lengths)
    else:
        tokens = np.zeros((batch, 0), np.int32)
        lengths = np.zeros(batch, np.int32)

    stats_dev = stats_of(cache)
    # each generated token but the last entered the cache (the last is pending)
    fed = np.maximum(lengths - 1, 0)
    last = tokens[np.arange(batch), np.maximum(lengths - 1, 0)] if max_new else lengths
    new_pending = np.where(lengths > 0, last, -1).astype(np.int32)
    new_state = GenerationState(cache=cache, pending=new_pending,
                                next_pos=(next_pos + fed).astype(np.int32), max_len=max_len,
                                step=step, kv_reads=float(stats_dev.kv_reads.sum()))
    stats = make_generate_stats(stats_dev, step.policy.name, cache, cfg,
                                prefill_tokens=int(lens.sum()), decode_tokens=int(fed.sum()),
                                kv_before=kv_before, kv_after_prefill=kv_after_prefill,
                                prefill_s=prefill_s, decode_s=decode_s, compile_s=compile_s)
    output = GenerateOutput(tokens, lengths, stats, new_state)
    if strict:
        try:
            kvcache.assert_no_overflow(cache)
        except kvcache.CacheOverflowError as err:
            err.output = output  # the tokens and the cache are not lost
            raise
    return output


def _chunked_prefill(graphdef, params, cache, rows, start, step: StepConfig, chunk_size,
                     last_hidden, progress=None):
    """Prompt tokens through the jitted `prefill_step` in right-padded chunks of C per row.

    rows: int32 token arrays (one may be empty); start: int32 [B], position of each row's first
    token; last_hidden: [B, d], kept for a row without tokens.
    returns (cache, last_hidden at each row's last token, compile seconds, run seconds)
    """
    batch = len(rows)
    lens = np.asarray([len(r) for r in rows], np.int32)
    if lens.max() == 0:
        return cache, last_hidden, 0.0, 0.0
    # few programs: the chunk width is chunk_size or a power of two (>= 16) below it
    chunk = int(min(chunk_size, _bucket(int(lens.max()))))
    n_chunks = -(-int(lens.max()) // chunk)
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
                           positions[:, cols], last_hidden, last_index, step=step)
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for c in range(n_chunks):
        cols = slice(c * chunk, (c + 1) * chunk)
        last_index = np.where((last_idx >= c * chunk) & (last_idx < (c + 1) * chunk),
                              last_idx - c * chunk, -1).astype(np.int32)
        _, last_hidden, cache = run_step(graphdef, params, cache, ids[:, cols], valid[:, cols],
                                         positions[:, cols], last_hidden, last_index)
        if progress is not None:
            progress(min((c + 1) * chunk, int(lens.max())), int(lens.max()))
    jax.block_until_ready(last_hidden)
    return cache, last_hidden, compile_s, time.perf_counter() - t0


# ----------------------------------------------------------------------------- SnapKV prefill


def _snapkv_prefill(graphdef, params, cache, rows, start, step: StepConfig, chunk_size,
                    last_hidden, progress=None):
    """SnapKV's prefill (dms_jax.policies.SnapKVPolicy): the whole prompt, then compressed once.

    1. every row's prompt but its last `obs_window` tokens, in chunks, into a cache that holds
       the whole prompt (capacity max(longest prompt, budget): SnapKV's peak memory);
    2. the last `obs_window` tokens (each row's observation window) with `policy.observe()`,
       which sums, per key, the attention of those queries;
    3. compaction to `cache`'s capacity (the budget): the window plus the top pooled scores.
    cache: the budget-sized cache (only its shape is used). Arguments and result as
    `_chunked_prefill`; the result has the shape of `cache`.
    """
    policy, budget = step.policy, cache[0].capacity
    lens = np.asarray([len(r) for r in rows], np.int32)
    heads = [r[:max(len(r) - policy.obs_window, 0)] for r in rows]
    tails = [r[len(h):] for r, h in zip(rows, heads)]
    layer = cache[0]
    whole = kvcache.init_cache(len(cache), len(rows), layer.keys.shape[1],
                               max(int(lens.max()), budget), layer.keys.shape[3], window=0,
                               dtype=layer.keys.dtype)
    whole, last_hidden, compile_s, run_s = _chunked_prefill(
        graphdef, params, whole, heads, start, StepConfig(FULL), chunk_size, last_hidden)
    head_lens = np.asarray([len(h) for h in heads], np.int32)
    whole, last_hidden, compile2_s, run2_s = _chunked_prefill(
        graphdef, params, whole, tails, start + head_lens, StepConfig(policy.observe()),
        policy.obs_window, last_hidden)
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
    return tuple(kvcache.compact(c, *policy.prompt_priority(c.pos, c.scores, c.last_pos),
                                 capacity) for c in cache)


def _precompile(jitted, *args, **static):
    """Compile `jitted` for these arguments now (so the caller can time compilation apart) and
    return it with its static arguments bound. Calls go through jit's own dispatch, which finds
    this compiled program in its cache and, on a mesh, compiles another only if an input arrives
    with a different sharding."""
    jitted.lower(*args, **static).compile()
    return functools.partial(jitted, **static)


def _bucket_len(n: int) -> int:
    """Lengths in buckets of a quarter octave (at most 25% over n; 64 at least)."""
    if n <= 64:
        return 64
    step = 1 << (int(n).bit_length() - 3)
    return -(-int(n) // step) * step


def _bucket(n: int) -> int:
    """The next power of two >= max(n, 16): shapes from a few buckets compile a few programs."""
    return max(16, 1 << (int(n) - 1).bit_length())
