"""Log-likelihood of a continuation through the compressed KV cache (teacher forcing).

    loglikelihood(model, [(context_ids, continuation_ids), ...], policy="dms", capacity=96)
    -> [(sum of log p(continuation | context), is_greedy), ...]

This is lm-evaluation-harness's `loglikelihood(context, continuation)` interface, so multiple
choice and perplexity evaluations run under compression. Each request goes the way
`dms_jax.generate` would take it: the context is prefilled into the fixed-shape KV cache with the
policy's real eviction (in chunks; SnapKV's whole-prompt scoring and compression), the first
continuation token is scored from the context's last hidden state, and then the continuation is
fed one token per step (decode steps over the compressed cache), each step scoring the next
token. So the log-likelihood is what a model generating under that policy would assign.

The prefill, the steps and the cache are the engine's own (`dms_jax.generate`'s chunked and
SnapKV prefills and its jitted `prefill_step`, the plan of `dms_jax.plan.plan_inference`, `dms_jax.cache.init_cache`),
not copies; with policy "full" the result is the plain forward's log-softmax, with "dms" the hard
-mask evaluation forward's (`Decoder.eval_forward`).
"""
from __future__ import annotations

import importlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dms_jax import cache as kvcache
from dms_jax.config import resolve_dtype
from dms_jax.plan import DEFAULT_CHUNK, DEFAULT_MARGIN, allocated_length, plan_inference, resolve_policy
from dms_jax.policies import SnapKVPolicy

gen = importlib.import_module("dms_jax.generate")  # the module (dms_jax.generate is the function)


def _requests(requests, vocab_size):
    rows = []
    for i, req in enumerate(requests):
        try:
            context, continuation = req
        except (TypeError, ValueError):
            raise ValueError(f"request {i} must be a (context_ids, continuation_ids) "
                             "pair") from None
        context = np.asarray(context, np.int64).reshape(-1)
        continuation = np.asarray(continuation, np.int64).reshape(-1)
        if context.size == 0:
            raise ValueError(f"request {i} has an empty context: start it with the bos token "
                             "(as lm-evaluation-harness does)")
        if continuation.size == 0:
            raise ValueError(f"request {i} has an empty continuation: nothing to score")
        for name, ids in (("context", context), ("continuation", continuation)):
            if ids.min() < 0 or ids.max() >= vocab_size:
                raise ValueError(f"request {i}: {name} token ids must lie in [0, {vocab_size}); "
                                 f"found {int(ids.min())}..{int(ids.max())}")
        rows.append((context.astype(np.int32), continuation.astype(np.int32)))
    if not rows:
        raise ValueError("no requests")
    return rows


@jax.jit
def _log_softmax_at(logits, targets):
    """logits [B, V], targets int32 [B] -> (log p(target) [B], target is the argmax [B])."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


def token_logprobs(model, requests, *, policy="full", budget=None, target_cr=None,
                   capacity=None, window=None, margin=DEFAULT_MARGIN, chunk_size=DEFAULT_CHUNK,
                   batch_size=16, strict=True) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per continuation token: (log-probabilities f32 [n], greedy flags bool [n]) per request.

    Arguments as `loglikelihood`; window: the DMS window override (default: the model's);
    margin: the DMS capacity margin with target_cr (as `generate`); strict: raise
    `CacheOverflowError` if a head dropped a token for lack of slots (a dms cache without
    capacity or target_cr holds every token, so it never does).
    """
    cfg = model.config
    rows = _requests(requests, cfg.vocab_size)
    max_len = max(len(c) + len(x) for c, x in rows)
    pol = resolve_policy(cfg, policy)
    if pol.uses_decisions and capacity is None and target_cr is None:
        capacity = allocated_length(max_len)  # as the harness: a DMS cache that holds everything
    # the plan a generate call over these rows would make
    plan = plan_inference(cfg, policy=pol, window=window, capacity=capacity, budget=budget,
                          target_cr=target_cr, max_len=max_len, chunk_size=chunk_size, margin=margin)
    graphdef, params = nnx.split(model)
    out = []
    for s in range(0, len(rows), batch_size):
        out += _score_batch(model, graphdef, params, rows[s:s + batch_size], plan, strict)
    return out


def _score_batch(model, graphdef, params, rows, plan, strict):
    cfg = model.config
    batch = len(rows)
    cache = kvcache.init_cache(plan, batch)
    contexts = [c for c, _ in rows]
    start = np.zeros(batch, np.int32)
    last_hidden = jnp.zeros((batch, cfg.hidden_size), resolve_dtype(cfg.dtype))
    prefill = (gen._snapkv_prefill if isinstance(plan.policy, SnapKVPolicy)
               else gen._chunked_prefill)
    cache, last_hidden, _, _ = prefill(graphdef, params, cache, contexts, start, plan, last_hidden)
    # decode steps: the hidden state of token t scores token t + 1 of the continuation
    longest = max(len(x) for _, x in rows)
    logp = np.zeros((batch, longest), np.float32)
    greedy = np.zeros((batch, longest), bool)
    next_pos = np.asarray([len(c) for c in contexts], np.int32)
    hidden = last_hidden
    no_index = np.full(batch, -1, np.int32)
    for t in range(longest):
        target = np.asarray([x[t] if t < len(x) else 0 for _, x in rows], np.int32)
        lp, top = _log_softmax_at(model.unembed(hidden), target)
        logp[:, t], greedy[:, t] = np.asarray(lp), np.asarray(top)
        if t + 1 == longest:
            break
        feed = np.asarray([t + 1 < len(x) for _, x in rows])  # rows with a token t + 1 to score
        ids = np.where(feed, target, 0).astype(np.int32)[:, None]
        out, last_hidden, cache = gen.prefill_step(graphdef, params, cache, ids, feed[:, None],
                                                   (next_pos + t)[:, None], last_hidden, no_index,
                                                   plan=plan)
        hidden = out[:, 0]
    if strict:
        kvcache.assert_no_overflow(cache)
    return [(logp[b, :len(x)], greedy[b, :len(x)]) for b, (_, x) in enumerate(rows)]


def loglikelihood(model, requests, *, policy="full", budget=None, target_cr=None, capacity=None,
                  **kw) -> list[tuple[float, bool]]:
    """lm-evaluation-harness's loglikelihood over the cache path.

    requests: (context_ids, continuation_ids) pairs of token ids (the context non-empty: start
    it with bos). policy: "full" | "dms" | "streaming" | "h2o" | "tova" | "snapkv" (or a
    Policy); budget (baselines), capacity (slots per head), target_cr (dms sizing): as
    `dms_jax.generate`. Other keywords: `token_logprobs`.
    returns [(sum of the continuation's log-probabilities, whether greedy decoding would produce
    exactly the continuation)] per request.
    """
    return [(float(lp.sum()), bool(g.all())) for lp, g in token_logprobs(
        model, requests, policy=policy, budget=budget, target_cr=target_cr, capacity=capacity,
        **kw)]


def loglikelihood_text(model, tokenizer, requests: Sequence[tuple[str, str]], **kw):
    """`loglikelihood` on (context, continuation) strings: the context is encoded as the
    tokenizer does by default (with its bos), the continuation without special tokens; an empty
    context is the bos token alone."""
    pairs = []
    for context, continuation in requests:
        ctx = list(tokenizer(context)["input_ids"]) if context else []
        if not ctx:
            if tokenizer.bos_token_id is None:
                raise ValueError("an empty context needs a tokenizer with a bos token")
            ctx = [tokenizer.bos_token_id]
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        pairs.append((ctx, cont))
    return loglikelihood(model, pairs, **kw)
