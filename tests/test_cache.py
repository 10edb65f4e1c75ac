"""The fixed-shape DMS KV cache (docs/dms.md sections 4-6) against independent references.

* outputs of chunked prefill + decode over the cache == `dense_attention` over the whole sequence
  with the hard bias, and == a float64 numpy implementation of the rule written out plainly;
* the held set after every step == a plain set simulation of section 5 (with the documented
  overflow rule), and the invariants of section 5 hold (hypothesis, data-varying, fixed shapes);
* stats (held, CR, bytes, overflow) == direct counts; strict mode raises on overflow.
Shapes come from a few buckets so each jitted program compiles once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dms_jax import DMSConfig, ModelConfig
from dms_jax import cache as kvcache
from dms_jax.plan import PlanError, capacity_for, plan_inference
from dms_jax.ops import gating
from dms_jax.ops.attention import dense_attention

step_fn = jax.jit(kvcache.attend_and_update, donate_argnums=0,
                  static_argnames=("window", "policy", "sliding_window", "scale", "attention",
                                   "key_block"))
# the cache attentions: every slot at once, and the live slots in blocks of 5 (a block size that
# divides no capacity here, so the last block overlaps the one before it), every stream at once
# or stream by stream in query tiles
ATTENTIONS = {"dense": dict(attention="dense"),
              "blockwise": dict(attention="blockwise", key_block=5),
              "tiled": dict(attention="tiled", key_block=5)}
stats_fn = jax.jit(kvcache.cache_stats)


# ----------------------------------------------------------------------------- data and driver


def make_data(rng, batch, seq, heads, kv_heads, dim, p_flag):
    """Random q/k/v and decisions with a per-row flagged fraction in p_flag."""
    q = rng.standard_normal((batch, seq, heads, dim)).astype(np.float32)
    k = rng.standard_normal((batch, seq, kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((batch, seq, kv_heads, dim)).astype(np.float32)
    p = np.broadcast_to(np.asarray(p_flag, np.float64).reshape(-1, 1, 1), (batch, 1, 1))
    d = rng.random((batch, seq, kv_heads)) < p
    return q, k, v, d


def schedule(rng, prompt_lens, total_lens, chunk):
    """Steps of (index [B, C'], valid [B, C']): chunked prefill (C' = chunk; each row's tokens
    placed as a prefix, a suffix or a random subset of the chunk), then one token per step."""
    batch = len(prompt_lens)
    done = np.zeros(batch, int)
    steps = []
    while (done < prompt_lens).any():
        index, valid = np.zeros((batch, chunk), int), np.zeros((batch, chunk), bool)
        for b in range(batch):
            n = min(prompt_lens[b] - done[b], chunk)
            layout = rng.integers(3)
            where = (np.arange(n) if layout == 0 else np.arange(chunk - n, chunk) if layout == 1
                     else np.sort(rng.choice(chunk, n, replace=False)))
            index[b, where], valid[b, where] = done[b] + np.arange(n), True
            done[b] += n
        steps.append((index, valid))
    while (done < total_lens).any():
        valid = (done < total_lens)[:, None]
        steps.append((np.where(valid, done[:, None], 0), valid))
        done += valid[:, 0]
    return steps


def run_cache(cache, steps, q, k, v, d, *, window, policy="dms", sliding_window=None,
              on_step=None, attention="dense"):
    """Feed the steps through attend_and_update; returns outputs per token [B, T, H, D], cache."""
    out_all = np.full(q.shape, np.nan, np.float32)
    rows = np.arange(q.shape[0])[:, None]
    for index, valid in steps:
        out, cache = step_fn(
            cache, q[rows, index], k[rows, index], v[rows, index], d[rows, index],
            index.astype(np.int32), valid, window=window, policy=policy,
            sliding_window=sliding_window, **ATTENTIONS[attention],
        )
        out = np.asarray(out)
        out_all[rows.repeat(index.shape[1], 1)[valid], index[valid]] = out[valid]
        if on_step is not None:
            on_step(index, valid, cache)
    return out_all, cache


def dense_reference(q, k, v, d, length, *, window, sliding_window=None, evict=True):
    """dense_attention over one row's whole sequence with the hard bias."""
    q, k, v, d = (jnp.asarray(x[None, :length]) for x in (q, k, v, d))
    pos = jnp.arange(length, dtype=jnp.int32)[None]
    bias = jnp.swapaxes(gating.hard_evict_bias_from_decisions(d), 1, 2) if evict else None
    return np.asarray(dense_attention(q, k, v, q_pos=pos, k_pos=pos, evict_bias=bias,
                                      window=window, sliding_window=sliding_window))[0]


def numpy_reference(q, k, v, d, length, *, window):
    """The rule written out in float64: key j visible to query i iff j <= i and
    (i - j <= w or the decision of token j + 1 is 0)."""
    _, heads, dim = q.shape
    group = heads // k.shape[1]
    out = np.zeros((length, heads, dim))
    for i in range(length):
        for h in range(heads):
            kv = h // group
            keys = [j for j in range(i + 1) if i - j <= window or not d[j + 1, kv]]
            s = k[keys, kv].astype(np.float64) @ q[i, h].astype(np.float64) / np.sqrt(dim)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[keys, kv].astype(np.float64)
    return out


def simulate_held(steps, d, *, window, capacity, num_kv_heads):
    """Section 5 as plain sets, per step: {(row, head): {position: flag}}, and overflow counts.

    Per step: each new token's decision flags its predecessor; then, relative to the newest
    position t, flagged tokens with t - j > w leave; if more than `capacity` remain, the newest
    tokens outside the window are dropped (the documented overflow rule)."""
    held = {(b, h): {} for b in range(d.shape[0]) for h in range(num_kv_heads)}
    overflow = np.zeros((d.shape[0], num_kv_heads), int)
    history = []
    for index, valid in steps:
        for b in range(d.shape[0]):
            new = index[b][valid[b]]
            if not len(new):
                continue
            t = new.max()
            for h in range(num_kv_heads):
                s = held[b, h]
                for p in new:
                    if p - 1 in s:
                        s[p - 1] = bool(d[b, p, h])
                    s[p] = False
                for p in [p for p, f in s.items() if f and t - p > window]:
                    del s[p]
                while len(s) > capacity:
                    del s[max(p for p in s if t - p > window)]
                    overflow[b, h] += 1
        history.append({key: dict(s) for key, s in held.items()})
    return history, overflow


def held_sets(cache):
    pos = np.asarray(cache.pos)
    return {(b, h): sorted(pos[b, h][pos[b, h] >= 0].tolist())
            for b in range(pos.shape[0]) for h in range(pos.shape[1])}


# ----------------------------------------------------------------------------- consistency


CASES = {
    # name: (window, chunk, prompt_lens, total_lens, heads, kv_heads, dim, p_flag)
    "wraps_window": (8, 7, [40, 13, 30], [61, 45, 30], 4, 2, 16, [0.5, 0.7, 0.9]),
    "chunk_beyond_window": (3, 13, [29, 40, 7], [45, 41, 26], 4, 2, 16, [0.6, 0.8, 0.9]),
    "window_zero": (0, 5, [12, 3, 9], [20, 17, 9], 2, 2, 8, [0.5, 0.5, 0.9]),
}


@pytest.mark.parametrize("attention", sorted(ATTENTIONS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_prefill_and_decode_equal_dense_attention(name, attention):
    window, chunk, prompts, totals, heads, kv_heads, dim, p_flag = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name))
    q, k, v, d = make_data(rng, len(totals), max(totals), heads, kv_heads, dim, p_flag)
    max_len = max(totals)
    capacity = capacity_for(max_len, window, target_cr=2.0, margin=0.5)
    assert window + 1 <= capacity < max_len
    cache = kvcache.init_layer_cache(len(totals), kv_heads, capacity, dim)
    steps = schedule(rng, np.array(prompts), np.array(totals), chunk)
    out, cache = run_cache(cache, steps, q, k, v, d, window=window, attention=attention)
    assert int(np.asarray(cache.overflow).sum()) == 0
    for b, length in enumerate(totals):
        ref = dense_reference(q[b], k[b], v[b], d[b], length, window=window)
        np.testing.assert_allclose(out[b, :length], ref, atol=1e-5, rtol=0)
    if name == "wraps_window":  # and once against the rule written out in numpy, float64
        for b, length in enumerate(totals):
            ref = numpy_reference(q[b], k[b], v[b], d[b], length, window=window)
            np.testing.assert_allclose(out[b, :length], ref, atol=1e-5, rtol=0)
    # really compressed: fewer tokens held than seen, exactly the count of docs/dms.md section 5
    held = np.asarray(cache.held)
    for b, length in enumerate(totals):
        old = np.arange(max(length - window - 1, 0))
        for h in range(kv_heads):
            assert held[b, h] == min(length, window + 1) + int((~d[b, old + 1, h]).sum())
    assert (held < np.array(totals)[:, None]).all()


@pytest.mark.parametrize("attention", sorted(ATTENTIONS))
def test_full_policy_and_sliding_window_equal_dense_attention(attention):
    window, chunk, prompts, totals, sliding = 4, 6, [17, 9], [30, 22], 11
    rng = np.random.default_rng(7)
    q, k, v, d = make_data(rng, 2, 30, 4, 2, 16, 0.7)
    steps = schedule(rng, np.array(prompts), np.array(totals), chunk)
    full = kvcache.init_layer_cache(2, 2, 30, 16)
    out_full, full = run_cache(full, steps, q, k, v, d, window=window, policy="full",
                               attention=attention)
    dms = kvcache.init_layer_cache(2, 2, 30, 16)
    out_dms, dms = run_cache(dms, steps, q, k, v, d, window=window, sliding_window=sliding,
                             attention=attention)
    for b, length in enumerate(totals):
        ref = dense_reference(q[b], k[b], v[b], d[b], length, window=window, evict=False)
        np.testing.assert_allclose(out_full[b, :length], ref, atol=1e-5, rtol=0)
        ref = dense_reference(q[b], k[b], v[b], d[b], length, window=window,
                              sliding_window=sliding)
        np.testing.assert_allclose(out_dms[b, :length], ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(full.held), np.array(totals)[:, None].repeat(2, 1))
    # keys beyond the sliding window are never seen again, so they are freed too
    assert (np.asarray(dms.held) <= sliding).all()


def test_capacity_errors_and_bounds():
    cfg = ModelConfig(vocab_size=11, hidden_size=8, intermediate_size=16, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=4, dtype="bfloat16",
                      dms=DMSConfig(window=8))
    with pytest.raises(PlanError, match="window: it needs at least window \\+ 1 = 9"):
        plan_inference(cfg, capacity=8, max_len=100)
    assert plan_inference(cfg, capacity=5, max_len=5).capacity == 5  # holds the whole row: fine
    assert capacity_for(100, 8, target_cr=1.0) == 100
    assert capacity_for(1000, 10, target_cr=8.0, margin=0.0) == 11 + 124
    assert capacity_for(5, 8, target_cr=8.0) == 5
    with pytest.raises(ValueError):
        capacity_for(100, 8, target_cr=0.5)
    # the cache of a plan: allocated for 1024 tokens (1024 is its own length bucket)
    caches = kvcache.init_cache(plan_inference(cfg, max_len=1024, target_cr=8.0, margin=0.0), 2)
    assert len(caches) == 3 and caches[0].keys.shape == (2, 2, 9 + 127, 4)
    assert caches[0].keys.dtype == jnp.bfloat16
    assert kvcache.init_cache(plan_inference(cfg, policy="full", max_len=1024), 2)[0].capacity \
        == 1024


# ----------------------------------------------------------------------------- properties

# One bucket: B=2, H=4, Hkv=2, D=8, w=3, prefill chunks of 5, rows of up to 24 tokens.
B, T, H, HKV, D, W, C = 2, 24, 4, 2, 8, 3, 5
PROP_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def draw_run(data, p_flag):
    seed = data.draw(st.integers(0, 2 ** 31 - 1), label="seed")
    totals = np.array(data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B),
                                label="lengths"))
    prompts = np.array([data.draw(st.integers(1, n), label="prompt") for n in totals])
    rng = np.random.default_rng(seed)
    q, k, v, d = make_data(rng, B, T, H, HKV, D, p_flag)
    return q, k, v, d, schedule(rng, prompts, totals, C), totals


def check_invariants(steps, d, cache_history, *, capacity, overflow_free):
    """docs/dms.md section 5 after every step, from the positions actually stored."""
    seen = np.zeros(B, int)
    prev = None
    for (index, valid), held in zip(steps, cache_history):
        seen += valid.sum(1)
        for (b, h), positions in held.items():
            assert len(positions) <= capacity
            assert len(set(positions)) == len(positions)
            t = seen[b] - 1
            window = set(range(max(t - W, 0), t + 1)) if seen[b] else set()
            assert window <= set(positions), "a window token is missing"
            for j in positions:
                assert not (t - j > W and d[b, j + 1, h]), "a flagged token outlived the window"
            if overflow_free and prev is not None:
                for j in prev[b, h]:
                    if not (j + 1 <= t and d[b, j + 1, h]):
                        assert j in positions, "an unflagged token disappeared"
        prev = held


def run_and_check_held(data, p_flag, capacity, overflow_free):
    """A drawn run through the cache: the invariants and the plain set simulation of
    docs/dms.md section 5 (with the overflow rule) hold after every step. Returns what the tests check next."""
    q, k, v, d, steps, totals = draw_run(data, p_flag)
    attention = data.draw(st.sampled_from(sorted(ATTENTIONS)), label="attention")
    history = []
    cache = kvcache.init_layer_cache(B, HKV, capacity, D)
    out, cache = run_cache(cache, steps, q, k, v, d, window=W, attention=attention,
                           on_step=lambda i, m, c: history.append(held_sets(c)))
    check_invariants(steps, d, history, capacity=capacity, overflow_free=overflow_free)
    expected, overflow = simulate_held(steps, d, window=W, capacity=capacity, num_kv_heads=HKV)
    assert [{key: sorted(s) for key, s in e.items()} for e in expected] == history
    return q, k, v, d, totals, out, cache, overflow


@settings(max_examples=200, **PROP_SETTINGS)
@given(data=st.data(), p_flag=st.floats(0.5, 0.9))
def test_property_no_overflow_matches_spec(data, p_flag):
    q, k, v, d, totals, out, cache, overflow = run_and_check_held(data, p_flag, T, True)
    assert not overflow.any() and not np.asarray(cache.overflow).any()

    # held count after prefill + decode, exactly (docs/dms.md section 5)
    held = np.zeros((B, HKV), int)
    for b, n in enumerate(totals):
        older = np.arange(max(n - W - 1, 0))  # positions j < t - w, t = n - 1
        held[b] = min(n, W + 1) + (~d[b, older + 1]).sum(axis=0)
    stats = stats_fn([cache])
    np.testing.assert_array_equal(np.asarray(stats.held)[0], held)
    np.testing.assert_array_equal(np.asarray(stats.seen), totals)
    ratio = 1.0 / np.mean(held / totals[:, None])
    assert float(stats.compression_ratio) == pytest.approx(ratio, rel=1e-6)
    assert float(stats.held_bytes) == held.sum() * 2 * D * 4
    assert stats.allocated_bytes == 2 * B * HKV * T * D * 4
    # every real query saw exactly the keys the rule allows
    reads = np.zeros((B, HKV))
    for b, n in enumerate(totals):
        for i in range(n):
            for h in range(HKV):
                reads[b, h] += sum(1 for j in range(i + 1) if i - j <= W or not d[b, j + 1, h])
    np.testing.assert_array_equal(np.asarray(stats.kv_reads)[0], reads)
    # stored keys and values are the ones of the stored positions
    pos = np.asarray(cache.pos)
    bb, hh, ss = np.nonzero(pos >= 0)
    np.testing.assert_array_equal(np.asarray(cache.keys)[bb, hh, ss], k[bb, pos[bb, hh, ss], hh])
    np.testing.assert_array_equal(np.asarray(cache.values)[bb, hh, ss], v[bb, pos[bb, hh, ss], hh])
    # outputs: the rule in float64 numpy, on one row
    b = data.draw(st.integers(0, B - 1), label="row")
    ref = numpy_reference(q[b], k[b], v[b], d[b], totals[b], window=W)
    np.testing.assert_allclose(out[b, :totals[b]], ref, atol=1e-5, rtol=0)


SMALL = 7  # slots: the window (4) plus 3 retained tokens


@settings(max_examples=150, **PROP_SETTINGS)
@given(data=st.data(), p_flag=st.floats(0.0, 0.9))
def test_property_overflow_rule_matches_simulation(data, p_flag):
    q, k, v, d, totals, out, cache, overflow = run_and_check_held(data, p_flag, SMALL, False)
    np.testing.assert_array_equal(np.asarray(cache.overflow), overflow)
    pos = np.asarray(cache.pos)
    bb, hh, ss = np.nonzero(pos >= 0)
    np.testing.assert_array_equal(np.asarray(cache.keys)[bb, hh, ss], k[bb, pos[bb, hh, ss], hh])
    assert np.isfinite(out[~np.isnan(out)]).all()


# ----------------------------------------------------------------------------- overflow


def test_overflow_is_counted_and_strict_raises():
    rng = np.random.default_rng(3)
    q, k, v, d = make_data(rng, B, T, H, HKV, D, 0.0)  # nothing flagged: every token retained
    steps = schedule(rng, np.array([12, 5]), np.array([T, 18]), C)
    cache = kvcache.init_layer_cache(B, HKV, SMALL, D)
    out, cache = run_cache(cache, steps, q, k, v, d, window=W)
    np.testing.assert_array_equal(np.asarray(cache.overflow),
                                  np.array([[T - SMALL] * HKV, [18 - SMALL] * HKV]))
    # the oldest tokens (attention sinks) and the window are what remains
    assert held_sets(cache)[0, 0] == [0, 1, 2] + list(range(T - W - 1, T))
    stats = stats_fn([cache, cache])
    assert int(np.asarray(stats.overflow).sum()) == 2 * 2 * (T - SMALL + 18 - SMALL)
    with pytest.raises(kvcache.CacheOverflowError, match="overflow"):
        kvcache.assert_no_overflow([cache])
    kvcache.assert_no_overflow([kvcache.init_layer_cache(B, HKV, SMALL, D)])


def test_step_is_jittable_with_donation_and_per_layer_decisions():
    """A [B, C, 1] decision (DMSConfig.per='layer') broadcasts to every KV head."""
    rng = np.random.default_rng(4)
    q, k, v, d = make_data(rng, 1, 12, 4, 2, 8, 0.8)
    d[..., 1] = d[..., 0]
    steps = schedule(rng, np.array([12]), np.array([12]), 12)
    index, valid = steps[0]
    cache = kvcache.init_layer_cache(1, 2, 12, 8)
    out, cache2 = step_fn(cache, q, k, v, d[..., :1], index.astype(np.int32), valid, window=2)
    assert cache.keys.is_deleted()  # donated
    ref = dense_reference(q[0], k[0], v[0], d[0], 12, window=2)
    np.testing.assert_allclose(np.asarray(out)[0], ref, atol=1e-5, rtol=0)
    assert held_sets(cache2)[0, 0] == held_sets(cache2)[0, 1]


# ----------------------------------------------------------------------------- the step's parts


def _block(pos, flags, keys=None, values=None):
    """A KeyBlock of one (row, KV head) stream: pos int [n] (-1 free), flags bool [n]."""
    pos = np.asarray(pos, np.int32)[None, None]
    n = pos.shape[-1]
    keys = np.arange(n * 2, dtype=np.float32).reshape(1, 1, n, 2) if keys is None else keys
    values = -keys if values is None else values
    return kvcache.KeyBlock(keys, values, pos, np.asarray(flags, bool)[None, None], pos >= 0)


def test_place_tokens_keeps_what_the_rule_keeps_and_fills_free_slots_lowest_first():
    from dms_jax.policies import DMS

    # slots hold positions 0, 1, 2 (flags 1, 0, 1) and one free slot; new tokens 3, 4; w = 1:
    # the newest query (4) keeps 3, 4 (window) and 1 (unflagged); 0 and 2 leave
    old = _block([0, 1, 2, -1], [True, False, True, False])
    new = _block([3, 4], [True, False])
    keep_old, dest, dropped = kvcache.place_tokens(
        DMS, old, new, np.zeros((1, 1, 6), np.float32), np.array([4], np.int32), window=1,
        sliding_window=None)
    np.testing.assert_array_equal(keep_old[0, 0], [False, True, False, False])
    np.testing.assert_array_equal(dest[0, 0], [0, 2])  # the freed slots 0 and 2, in order
    assert int(dropped[0, 0]) == 0
    # three slots, nothing flagged: the window (2, 3) and then the oldest (0) stay; the newest
    # retained token (1) is dropped for capacity and counted (the overflow rule)
    old = _block([0, 1, -1], [False, False, False])
    new = _block([2, 3], [False, False])
    keep_old, dest, dropped = kvcache.place_tokens(
        DMS, old, new, np.zeros((1, 1, 5), np.float32), np.array([3], np.int32), window=1,
        sliding_window=None)
    np.testing.assert_array_equal(keep_old[0, 0], [True, False, False])
    np.testing.assert_array_equal(dest[0, 0], [1, 2])
    assert int(dropped[0, 0]) == 1
    # a sliding window of 2: position 1 is beyond it for query 3, whatever its flag
    keep_old, _, _ = kvcache.place_tokens(
        DMS, old, new, np.zeros((1, 1, 5), np.float32), np.array([3], np.int32), window=1,
        sliding_window=2)
    np.testing.assert_array_equal(keep_old[0, 0], [False, False, False])


def test_store_tokens_frees_what_is_not_kept_and_writes_new_tokens_at_their_slots():
    old = _block([0, 1, 2, -1], [True, False, True, False])
    new = _block([3, 4], [True, False], keys=np.full((1, 1, 2, 2), 9.0, np.float32))
    scores = np.arange(6, dtype=np.float32)[None, None]
    keys, values, pos, flags, kept_scores = kvcache.store_tokens(
        old, new, np.array([[[False, True, False, False]]]), np.array([[[0, 2]]]), scores)
    np.testing.assert_array_equal(pos[0, 0], [3, 1, 4, -1])
    np.testing.assert_array_equal(flags[0, 0], [True, False, False, False])
    np.testing.assert_array_equal(keys[0, 0, :, 0], [9.0, 2.0, 9.0, 6.0])  # slot 3: stale, free
    np.testing.assert_array_equal(values[0, 0, 1], -old.keys[0, 0, 1])
    np.testing.assert_array_equal(kept_scores[0, 0], [4.0, 1.0, 5.0, 0.0])
    # a destination S (not stored) writes nothing
    _, _, pos, _, _ = kvcache.store_tokens(
        old, new, np.ones((1, 1, 4), bool), np.array([[[4, 4]]]), scores)
    np.testing.assert_array_equal(pos[0, 0], [0, 1, 2, -1])


def test_accumulate_scores_only_for_rows_with_a_scoring_query():
    from dms_jax.policies import get_policy

    scores = np.ones((2, 1, 3), np.float32)
    received = np.full((2, 1, 3), 0.5, np.float32)
    scoring = np.array([[True, False], [False, False]])  # row 1: no scoring query this step
    h2o = kvcache.accumulate_scores(get_policy("h2o"), scores, received, scoring)
    np.testing.assert_array_equal(h2o, [[[1.5] * 3], [[1.0] * 3]])
    assert kvcache.accumulate_scores(get_policy("dms"), scores, None, None) is scores
    positions = np.array([[5, 6], [7, 0]], np.int32)
    valid = np.array([[True, True], [True, False]])
    newest = np.array([6, 7], np.int32)
    np.testing.assert_array_equal(
        kvcache.scoring_queries(get_policy("tova"), positions, valid, newest),
        [[False, True], [True, False]])
    np.testing.assert_array_equal(
        kvcache.scoring_queries(get_policy("h2o"), positions, valid, newest), valid)
    assert kvcache.scoring_queries(get_policy("dms"), positions, valid, newest) is None


def test_attend_blocks_equals_dense_attention_over_the_concatenated_keys():
    rng = np.random.default_rng(11)
    batch, chunk, heads, kv_heads, dim, slots = 2, 3, 4, 2, 8, 5
    q = rng.standard_normal((batch, chunk, heads, dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_heads, slots + chunk, dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, slots + chunk, dim)).astype(np.float32)
    slot_pos = np.array([[0, 1, 2, 3, -1]] * kv_heads, np.int32)[None].repeat(batch, 0)
    flags = rng.random((batch, kv_heads, slots + chunk)) < 0.5
    q_pos = np.array([[4, 5, 6], [4, 5, 0]], np.int32)
    q_valid = np.array([[True, True, True], [True, True, False]])
    new_pos = np.broadcast_to(q_pos[:, None], (batch, kv_heads, chunk))
    blocks = [kvcache.KeyBlock(k[:, :, :slots], v[:, :, :slots], slot_pos, flags[..., :slots],
                               slot_pos >= 0),
              kvcache.KeyBlock(k[:, :, slots:], v[:, :, slots:], new_pos, flags[..., slots:],
                               np.broadcast_to(q_valid[:, None], new_pos.shape))]
    out, seen, received = kvcache.attend_blocks(
        q, q_pos, q_valid, blocks, window=1, use_flags=True, sliding_window=None,
        scale=dim ** -0.5, scoring=q_valid)
    k_pos = np.concatenate([slot_pos, new_pos], -1)
    k_valid = np.concatenate([b.valid for b in blocks], -1)
    want, probs = dense_attention(q, np.swapaxes(k, 1, 2), np.swapaxes(v, 1, 2), q_pos=q_pos,
                                  k_pos=k_pos, evict_bias=np.where(flags, -1e30, 0.0),
                                  window=1, k_valid=k_valid, return_probs=True)
    np.testing.assert_allclose(out, want, atol=1e-6)
    np.testing.assert_allclose(received, (np.asarray(probs) * q_valid[:, None, None, :, None])
                               .sum(axis=(2, 3)), atol=1e-6)
    visible = np.asarray(probs)[:, :, 0] > 0  # [B, Hkv, C, N]
    np.testing.assert_array_equal(seen, (visible & q_valid[:, None, :, None]).sum(axis=(2, 3)))


# kind of tile_bias, query positions, key positions, (flagged, invalid) key indices, rule
TILE_BIAS_CASES = {
    "older keys, all visible": (0, range(20, 28), range(16), ((), ()), dict(window=3)),
    "older keys, two free slots": (1, range(20, 28), range(16), ((), (3, 9)), dict(window=3)),
    "flagged keys outside the window": (1, range(20, 28), range(16), ((1, 5, 12), (3,)),
                                        dict(window=3)),
    "a flagged key leaves mid-tile": (2, range(17, 25), range(16), ((15,), ()), dict(window=3)),
    "keys after the lowest query": (2, range(20, 28), range(14, 30), ((), ()), dict(window=3)),
    "a padding query at -1": (2, [-1] + list(range(21, 28)), range(16), ((), ()),
                              dict(window=3)),
    "a sliding window cutting the tile": (2, range(20, 28), range(16), ((), ()),
                                          dict(window=3, sliding_window=10)),
    "a sliding window above the tile": (0, range(20, 28), range(16), ((), ()),
                                        dict(window=3, sliding_window=30)),
}


@pytest.mark.parametrize("case", list(TILE_BIAS_CASES))
def test_tile_block_takes_the_narrowest_bias_and_matches_the_full_one(case):
    """`attend_tile_block` (no bias / one row / the [tile, n] bias, by `tile_bias`) == the
    running softmax and keys seen of `attend_block` over `block_bias`, and each case takes the
    path it should (a silently lost fast path would only show as time)."""
    from dms_jax.ops import live_attention as la

    kind, q_pos, k_pos, (flagged, free), rule = TILE_BIAS_CASES[case]
    rule = dict(use_flags=True, sliding_window=None) | rule
    rng = np.random.default_rng(3)
    group, tile, n, dim = 2, 8, 16, 4
    q_t = jnp.asarray(rng.standard_normal((1, 1, group, tile, dim)), jnp.float32)
    keys, values = (jnp.asarray(rng.standard_normal((1, 1, n, dim)), jnp.float32)
                    for _ in range(2))
    pos_t = jnp.asarray(np.array(q_pos, np.int32)[None])
    real_t = pos_t >= 0
    k_pos = jnp.asarray(np.array(k_pos, np.int32)[None, None])
    k_flags = jnp.asarray(np.isin(np.arange(n), flagged)[None, None])
    k_valid = jnp.asarray(~np.isin(np.arange(n), free)[None, None])
    block = (keys, values, k_pos, k_flags, k_valid)
    carry = la.empty_state(q_t)
    # a running state from an earlier block, so that the rescaling is exercised too
    carry = la.attend_block(carry, q_t, keys * 0.5, values, jnp.zeros((1, 1, 1, tile, n)),
                            real_t, 0.5)
    got = la.attend_tile_block(carry, q_t, pos_t, real_t, block, rule, 0.5)
    bias = la.block_bias(pos_t, k_pos, k_flags, k_valid, **rule)
    want = la.attend_block(carry, q_t, keys, values, bias, real_t, 0.5)
    assert int(la.tile_bias(pos_t, block, rule)[0]) == kind
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("query_rows,chunk_rows", [(8, 4), (8, 2), (4, 4)])
def test_tiled_prefill_in_sub_tiles_equals_live_attention(monkeypatch, query_rows, chunk_rows):
    """Query tiles taller over the cache's keys than over the chunk's own (QUERY_ROWS >
    CHUNK_ROWS: each tile split in sub-tiles for the chunk, each reading the chunk keys it can
    see) give `live_attention`'s outputs and keys seen: flagged keys, a window, partly live
    slots, padding queries; float32 queries prescaled, bfloat16 ones not."""
    from dms_jax.ops import live_attention as la

    monkeypatch.setattr(la, "QUERY_ROWS", query_rows)
    monkeypatch.setattr(la, "CHUNK_ROWS", chunk_rows)
    rng = np.random.default_rng(11)
    batch, chunk, heads, kv_heads, dim, slots = 2, 8, 4, 2, 4, 13
    keys, values = (rng.standard_normal((batch, kv_heads, slots, dim)) for _ in range(2))
    pos = np.tile(np.arange(slots, dtype=np.int32), (batch, kv_heads, 1))
    pos[1, :, 9:] = -1  # row 1 holds 9 tokens
    flags = rng.random(pos.shape) < 0.5
    q = rng.standard_normal((batch, chunk, heads, dim))
    q_pos = np.tile(np.arange(slots, slots + chunk, dtype=np.int32), (batch, 1))
    q_valid = np.arange(chunk)[None] < np.array([chunk, 5])[:, None]
    tail = (rng.standard_normal((batch, kv_heads, chunk, dim)),
            rng.standard_normal((batch, kv_heads, chunk, dim)),
            np.broadcast_to(q_pos[:, None], (batch, kv_heads, chunk)),
            rng.random((batch, kv_heads, chunk)) < 0.5,
            np.broadcast_to(q_valid[:, None], (batch, kv_heads, chunk)))
    rule = dict(window=3, use_flags=True, sliding_window=None, scale=0.5, block=4)
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        slot_args = (cast(keys), cast(values), jnp.asarray(pos), jnp.asarray(flags))
        tail_args = (cast(tail[0]), cast(tail[1])) + tuple(map(jnp.asarray, tail[2:]))
        got, got_seen = la.tiled_attention(cast(q), q_pos, q_valid, slot_args, tail_args, **rule)
        want, want_seen = la.live_attention(cast(q), q_pos, q_valid, slot_args, tail_args,
                                            la.live_extent(jnp.asarray(pos)), **rule)
        np.testing.assert_allclose(np.asarray(got, np.float32)[q_valid],
                                   np.asarray(want, np.float32)[q_valid], rtol=tol, atol=tol)
        np.testing.assert_array_equal(got_seen, want_seen)


def test_tiled_prefill_skips_query_tiles_without_a_real_query():
    """A query tile with no real query (a row whose prompt ended before the chunk, a padding
    row) attends nothing: its outputs are 0 and it sees no key; the other tiles and rows are
    what they are alone."""
    from dms_jax.ops import live_attention as la

    rng = np.random.default_rng(5)
    batch, chunk, heads, kv_heads, dim, slots = 3, 8, 4, 2, 4, 12
    q = jnp.asarray(rng.standard_normal((batch, chunk, heads, dim)), jnp.float32)
    keys, values = (jnp.asarray(rng.standard_normal((batch, kv_heads, slots, dim)), jnp.float32)
                    for _ in range(2))
    pos = jnp.asarray(np.tile(np.arange(slots, dtype=np.int32), (batch, kv_heads, 1)))
    flags = jnp.zeros(pos.shape, bool)
    tail = tuple(jnp.asarray(rng.standard_normal((batch, kv_heads, chunk, dim)), jnp.float32)
                 for _ in range(2))
    q_pos = jnp.asarray(np.tile(np.arange(slots, slots + chunk, dtype=np.int32), (batch, 1)))
    # row 0: every query real; row 1: none (a prompt that ended); row 2: the first half only
    q_valid = jnp.asarray(np.arange(chunk)[None] < np.array([chunk, 0, chunk // 2])[:, None])
    t_pos = jnp.broadcast_to(q_pos[:, None], (batch, kv_heads, chunk))
    t_valid = jnp.broadcast_to(q_valid[:, None], (batch, kv_heads, chunk))
    rule = dict(window=2, use_flags=True, sliding_window=None, scale=0.5, block=5)
    old = la.QUERY_ROWS
    la.QUERY_ROWS = 2 * heads // kv_heads  # tiles of 2 queries: row 2's second half is padding
    try:
        out, seen = la.tiled_attention(q, q_pos, q_valid, (keys, values, pos, flags),
                                       tail + (t_pos, flags[..., :chunk], t_valid), **rule)
        whole, _ = la.tiled_attention(q, q_pos, jnp.ones_like(q_valid),
                                      (keys, values, pos, flags),
                                      tail + (t_pos, flags[..., :chunk], t_valid), **rule)
    finally:
        la.QUERY_ROWS = old
    real = np.asarray(q_valid)
    np.testing.assert_array_equal(np.asarray(out)[~real], 0.0)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(whole)[real], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(seen)[1], 0.0)
    assert (np.asarray(seen)[[0, 2]] > 0).all()


def test_stats_count_caches_over_2_gib():
    """The allocated bytes stay an exact host int through the jitted stats: a 5 GiB cache (32k
    tokens, batch 8, 8 layers of 8 KV heads in bfloat16) once failed to compile them (an int32
    output). Here keys and values of 4 GiB each, abstract (nothing allocated)."""
    layer = jax.eval_shape(lambda: kvcache.init_layer_cache(1, 2, 1 << 23, 64))
    lowered = jax.jit(kvcache.cache_stats).lower([layer])  # nothing runs: the program only
    assert lowered.out_info.allocated_bytes == 2 * 2 * (1 << 23) * 64 * 4 == 1 << 33
