"""Continuous batching on the paged cache: requests of different lengths arrive over time, share
one pool of pages, and leave when done, all through programs of fixed shapes.

    server = dms_jax.serve.Server(model, rows=8, max_len=4096)      # dms on a DMS model
    server.submit(prompt_ids, max_new_tokens=64)                     # any time, any length
    done = server.run()                                              # [Completion], as they end

The server holds `rows` batch rows and a paged cache (`dms_jax.paged`, `plan_inference(...,
layout="paged")`). Each `step()`:
  1. admits waiting requests, first come first served, into free rows while the pool's pages
     not yet reserved cover what the request is expected to hold (`InferencePlan.request_pages`:
     its retained tokens at the plan's CR and margin; every token for `full`); a request that
     does not fit now waits (never dropped); one that could never fit is refused at `submit`;
  2. prefills the admitted prompts together over the shared pool, in chunks of the plan's
     chunk_size: each chunk is a batch of just the rows whose prompts reach it
     (`paged.select_rows`), padded to a power of two with rows whose chunks are all padding,
     which leaves them untouched; a shorter prompt's row leaves the batch after its last chunk
     and the other rows are not computed; then samples the first tokens;
  3. runs one decode step for every active row (the jitted step has the fixed shape [rows]);
  4. retires the rows that hit a stop token or their `max_new_tokens`, returning their pages to
     the pool (`dms_jax.paged.release_rows`) and their `Completion`.
A row's tokens are the same as `generate` gives the request alone (rows never see each other).
Reservations are estimates for `dms`: a request whose heads keep more than expected borrows
pages; if the pool runs dry the newest retained tokens are dropped and counted (`overflow` on
the completion; `strict=True` raises instead), never silently.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dms_jax import cache as kvcache
from dms_jax import paged
from dms_jax.generate import (_forward_over_cache, _sample_hidden, prefill_last_only, prefill_step,
                              prompt_rows)
from dms_jax.plan import DEFAULT_CHUNK, DEFAULT_PAGE_SIZE, check_memory, plan_inference
from dms_jax.sampling import Sampling, check_sampling, sample_logits


@dataclasses.dataclass
class Completion:
    request_id: Any
    prompt_len: int
    tokens: list  # generated ids (a stop token included)
    submitted_step: int
    admitted_step: int
    finished_step: int
    overflow: int  # retained tokens dropped because the pool ran dry (0 unless over-committed)
    held: int  # tokens the row held at the end, summed over layers and KV heads
    seen: int  # tokens the row's cache took (prompt + generated - the last one)
    # keys the request's queries read, summed over layers and KV heads, by its prompt and by its
    # decode steps (as `generate`'s stats.kv_reads_prefill / kv_reads_decode for it alone; the
    # per-(layer, head) counters are float32, so past ~1.7e7 keys each they are rounded, by
    # ~1e-6 of the count)
    kv_reads_prefill: float
    kv_reads_decode: float


@dataclasses.dataclass
class _Request:
    request_id: Any
    prompt: np.ndarray
    max_new: int
    pages: int
    submitted_step: int


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"), donate_argnames=("cache",))
def _decode_step(graphdef, params, cache, cur, live, pos, key, *, plan, sampling: Sampling):
    """One token for every live row: (next token int32 [B] (-1 where not live), cache, the next
    key). The key is split here, as the host did before each step, so a step is one dispatch."""
    key, sub = jax.random.split(key)
    model, hidden, cache = _forward_over_cache(graphdef, params, cache, cur[:, None],
                                               live[:, None], pos[:, None], plan)
    nxt = sample_logits(model.unembed(hidden[:, 0]), sub, sampling)
    return jnp.where(live, nxt, -1), cache, key


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"), donate_argnames=("cache",))
def _prefill_rows(graphdef, params, cache, rows, ids, valid, positions, last_hidden, last_index,
                  *, plan):
    """One prefill chunk of the rows `rows` (distinct, int32 [k]) over the shared pool: the other
    rows are neither computed nor touched. returns (last_hidden [k, d], cache)."""
    part = kvcache.map_layers(lambda c: paged.select_rows(c, rows), cache)
    _, last_hidden, part = prefill_step.__wrapped__(graphdef, params, part, ids, valid, positions,
                                                    last_hidden, last_index, plan=plan,
                                                    last_only=prefill_last_only(plan))
    return last_hidden, kvcache.map_layers(lambda c, p: paged.merge_rows(c, p, rows), cache, part)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _release(cache, rows):
    return kvcache.map_layers(lambda c: paged.release_rows(c, rows), cache)


@jax.jit
def _row_counts(cache):
    """(overflow, held, seen) per row, summed over layers and KV heads: int32 [B] each."""
    return (sum(c.overflow.sum(-1) for c in cache), sum(c.held.sum(-1) for c in cache),
            cache[0].seen)


@jax.jit
def _layer_reads(cache):
    """Keys read per layer, row and KV head: f32 [L, B, Hkv] (`_row_reads` sums it)."""
    return jnp.stack([c.kv_reads for c in cache])


def _row_reads(cache) -> np.ndarray:
    """Keys read per row, summed over layers and KV heads on the host (float64 [B])."""
    return np.asarray(_layer_reads(cache)).astype(np.float64).sum(axis=(0, 2))


class ServeError(ValueError):
    """A request or setting the server refuses (before any compute)."""


class Server:
    """A continuous-batching server over a paged cache (see the module docstring).

    rows: batch rows served at once; max_len: tokens per request (prompt + max_new_tokens) at
    most; policy: "dms" (default for a DMS model) or "full"; target_cr / margin / page_size /
    pool_pages: the pool (`plan_inference(layout="paged")`; default pool: `rows` requests of
    max_len at target_cr); chunk_size: prefill chunk; stop_tokens, temperature, top_k, top_p,
    key: as `generate`; strict: raise `CacheOverflowError` when a dry pool dropped a token.
    After steps, `generated_tokens`, and `prefill_seconds` / `decode_seconds`: wall time spent
    prefilling admitted prompts (to their first tokens) and in decode steps.
    """

    def __init__(self, model, *, rows: int = 8, max_len: int, policy=None, target_cr=None,
                 margin=None, page_size: int = DEFAULT_PAGE_SIZE, pool_pages=None,
                 chunk_size: int = DEFAULT_CHUNK, stop_tokens=None, temperature=0.0, top_k=0,
                 top_p=1.0, key=None, strict: bool = False):
        if not (isinstance(rows, (int, np.integer)) and rows >= 1):
            raise ServeError(f"rows={rows!r} must be a positive integer (batch rows served at once)")
        cfg = model.config
        self.model, self.cfg = model, cfg
        self.plan = plan_inference(cfg, policy=policy, target_cr=target_cr, margin=margin,
                                   max_len=max_len, chunk_size=chunk_size, layout="paged",
                                   page_size=page_size, pool_pages=pool_pages)
        self.max_len, self.rows = int(max_len), int(rows)
        check_sampling(temperature, top_k, top_p)
        self.sampling = Sampling(float(temperature), int(top_k), float(top_p))
        if key is None and not self.sampling.greedy:
            raise ServeError("sampling with temperature > 0 needs key=jax.random.key(seed)")
        self.key = jax.random.key(0) if key is None else key
        stops = [] if stop_tokens is None else (
            [stop_tokens] if isinstance(stop_tokens, (int, np.integer)) else list(stop_tokens))
        self.stop_tokens = {int(t) for t in stops}
        self.strict = strict
        check_memory(self.plan, self.rows)
        self.cache = kvcache.init_cache(self.plan, self.rows)
        self.num_pages = self.plan.num_pages(self.rows)
        self.graphdef, self.params = nnx.split(model)
        self._decode_program = None  # `_decode_step` compiled at the first step
        self.waiting: collections.deque[_Request] = collections.deque()
        self.step_count, self._next_id = 0, 0
        # per row (host side): the request, its tokens, next position, reserved pages
        self.slot: list[_Request | None] = [None] * self.rows
        self.out: list[list[int]] = [[] for _ in range(self.rows)]
        self.admitted = np.zeros(self.rows, int)
        self.cur = np.full(self.rows, -1, np.int32)
        self.pos = np.zeros(self.rows, np.int32)
        self.prompt_reads = np.zeros(self.rows)  # keys read by each row's prompt
        self.generated_tokens = 0
        # wall seconds spent prefilling admitted prompts (to their first tokens) and in decode
        # steps, since construction (each part ends on a host read, so the work is done)
        self.prefill_seconds = self.decode_seconds = 0.0

    # ------------------------------------------------------------------------- requests

    @property
    def reserved_pages(self) -> int:
        return sum(r.pages for r in self.slot if r is not None)

    @property
    def idle(self) -> bool:
        return not self.waiting and all(r is None for r in self.slot)

    def submit(self, prompt: Sequence[int], max_new_tokens: int = 64, request_id=None):
        """Queue a request; returns its id. ServeError when it can never be served."""
        row = prompt_rows([prompt], self.cfg.vocab_size)[0]
        if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
            raise ServeError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        total = len(row) + int(max_new_tokens)
        if total > self.max_len:
            raise ServeError(f"request of {len(row)} prompt + {max_new_tokens} new tokens = "
                             f"{total} > max_len {self.max_len}: shorten it or build the server "
                             "with a larger max_len")
        pages = self.plan.request_pages(total)
        if pages > self.num_pages:
            raise ServeError(
                f"request of {total} tokens is expected to hold {pages} pages per layer but the "
                f"pool has {self.num_pages}: it could never be admitted; raise pool_pages (or "
                "rows, which sizes the default pool), target_cr, or shorten the request")
        request_id = self._next_id if request_id is None else request_id
        self._next_id += 1
        self.waiting.append(_Request(request_id, row, int(max_new_tokens), pages, self.step_count))
        return request_id

    # ------------------------------------------------------------------------- one step

    def step(self) -> list[Completion]:
        """Admit, prefill the admitted, decode one token for every active row, retire."""
        admitted = self._admit()
        finished: list[int] = []
        if admitted:
            tic = time.perf_counter()
            finished += self._prefill(admitted)
            self.prefill_seconds += time.perf_counter() - tic
        active = np.array([r is not None and b not in finished for b, r in enumerate(self.slot)])
        if active.any():
            tic = time.perf_counter()
            nxt = self._decode(active)
            self.decode_seconds += time.perf_counter() - tic
            for b in np.flatnonzero(active):
                self.pos[b] += 1
                self.cur[b] = nxt[b]
                if self._emit(b, int(nxt[b])):
                    finished.append(b)
        self.step_count += 1
        return self._retire(finished)

    def run(self, requests=None, *, progress: bool = False) -> list[Completion]:
        """Submit `requests` ((prompt, max_new_tokens) pairs) and step until every request is
        done; the completions in the order they finished."""
        for prompt, max_new in requests or ():
            self.submit(prompt, max_new)
        done: list[Completion] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self.waiting) + sum(r is not None for r in self.slot),
                       desc="serve", unit="req")
        while not self.idle:
            new = self.step()
            done += new
            if bar is not None:
                bar.update(len(new))
        if bar is not None:
            bar.close()
        return done

    # ------------------------------------------------------------------------- parts

    def _admit(self) -> list[int]:
        """Rows given to waiting requests (first come first served, while pages last)."""
        admitted = []
        free = self.num_pages - self.reserved_pages
        for b in range(self.rows):
            if not self.waiting:
                break
            if self.slot[b] is None and self.waiting[0].pages <= free:
                req = self.waiting.popleft()
                free -= req.pages
                self.slot[b], self.out[b] = req, []
                self.admitted[b] = self.step_count
                admitted.append(b)
        return admitted

    def _decode(self, active: np.ndarray) -> np.ndarray:
        """One decode step of the active rows; the next tokens on the host. The step is compiled
        once and then called as that executable: a call through `jax.jit` would hash the static
        model graph every token (~0.7 ms a step on the CPU, most of a small model's step).
        The executable takes exactly the shapes, dtypes and shardings it was compiled for (it
        raises on others, never recompiles): the server's are fixed (no mesh), unlike
        `generate`'s, which keeps jit's dispatch for inputs that arrive sharded otherwise."""
        args = (self.params, self.cache, self.cur, active, self.pos, self.key)
        if self._decode_program is None:
            self._decode_program = _decode_step.lower(
                self.graphdef, *args, plan=self.plan, sampling=self.sampling).compile()
        nxt, self.cache, self.key = self._decode_program(*args, sampling=self.sampling)
        return np.asarray(nxt)

    def _prefill(self, admitted: list[int]) -> list[int]:
        """The admitted prompts through `_prefill_rows` together, chunk by chunk (the plan's
        chunk_size over the shared pool), then the first tokens. Each chunk runs only the rows
        whose prompts reach it (padded to a power of two: `_prefill_batch`), so a short prompt
        admitted beside a long one leaves the batch when it ends instead of riding along as
        padding to the long one's end."""
        prompts = [self.slot[b].prompt for b in admitted]
        lens = np.asarray([len(p) for p in prompts])
        chunk = min(self.plan.chunk_size, max(16, 1 << (int(lens.max()) - 1).bit_length()))
        hidden = [None] * len(admitted)  # each prompt's last hidden state [d]
        for c in range(-(-int(lens.max()) // chunk)):
            lo = c * chunk
            going = np.flatnonzero(lens > lo)  # admitted prompts with tokens in this chunk
            rows = self._prefill_batch([admitted[i] for i in going])
            ids = np.zeros((len(rows), chunk), np.int32)
            valid = np.zeros(ids.shape, bool)  # the padding rows stay all-invalid
            index = np.full(len(rows), -1, np.int32)
            for j, i in enumerate(going):
                part = prompts[i][lo:lo + chunk]
                ids[j, :len(part)], valid[j, :len(part)] = part, True
                if lens[i] <= lo + chunk:  # its last token is in this chunk
                    index[j] = lens[i] - 1 - lo
            positions = np.broadcast_to(np.arange(lo, lo + chunk, dtype=np.int32), ids.shape)
            last_hidden = jnp.zeros((len(rows), self.cfg.hidden_size), self.params_dtype)
            last_hidden, self.cache = _prefill_rows(
                self.graphdef, self.params, self.cache, jnp.asarray(rows, jnp.int32), ids, valid,
                positions, last_hidden, jnp.asarray(index), plan=self.plan)
            for j, i in enumerate(going):
                if index[j] >= 0:
                    hidden[i] = last_hidden[j]
        # the first tokens, sampled for a batch padded as the first chunk's (one compiled shape)
        size = len(self._prefill_batch(admitted))
        stacked = jnp.stack(hidden + [jnp.zeros_like(hidden[0])] * (size - len(hidden)))
        self.key, sub = jax.random.split(self.key)
        first = np.asarray(_sample_hidden(self.graphdef, self.params, stacked, sub,
                                          sampling=self.sampling))[:len(prompts)]
        self.prompt_reads[admitted] = _row_reads(self.cache)[admitted]
        finished = []
        for b, tok in zip(admitted, first):
            self.pos[b] = len(self.slot[b].prompt)
            self.cur[b] = tok
            if self._emit(b, int(tok)):
                finished.append(b)
        return finished

    def _prefill_batch(self, admitted: list[int]) -> list[int]:
        """The admitted rows, padded to a power of two (at most `rows`: a few compiled shapes)
        with other rows, free ones first; a padding row's chunks are all invalid, which leaves
        its cache as it was (as for a short prompt's row in `generate`)."""
        size = min(self.rows, 1 << (len(admitted) - 1).bit_length())
        others = sorted((b for b in range(self.rows) if b not in admitted),
                        key=lambda b: self.slot[b] is not None)
        return list(admitted) + others[:size - len(admitted)]

    @property
    def params_dtype(self):
        return self.cache[0].ring_keys.dtype

    def _emit(self, b: int, token: int) -> bool:
        """Record a generated token; True when the row is done."""
        self.out[b].append(token)
        self.generated_tokens += 1
        return token in self.stop_tokens or len(self.out[b]) >= self.slot[b].max_new

    def _retire(self, finished: list[int]) -> list[Completion]:
        if not finished:
            return []
        overflow, held, seen = (np.asarray(a) for a in _row_counts(self.cache))
        reads = _row_reads(self.cache)
        if self.strict and overflow[finished].any():
            raise kvcache.CacheOverflowError(
                f"KV pool ran dry: {int(overflow[finished].sum())} retained tokens dropped "
                f"(pool of {self.num_pages} pages of {self.plan.page_size} per layer); raise "
                "pool_pages or margin, or run without strict to accept the overflow rule")
        done = []
        for b in finished:
            req = self.slot[b]
            done.append(Completion(req.request_id, len(req.prompt), list(self.out[b]),
                                   req.submitted_step, int(self.admitted[b]), self.step_count,
                                   int(overflow[b]), int(held[b]), int(seen[b]),
                                   float(self.prompt_reads[b]),
                                   float(reads[b] - self.prompt_reads[b])))
            self.slot[b] = None
            self.cur[b] = -1
        rows = np.zeros(self.rows, bool)
        rows[finished] = True
        self.cache = _release(self.cache, jnp.asarray(rows))
        return done
