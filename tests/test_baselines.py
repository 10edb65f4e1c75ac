"""Training-free baselines (StreamingLLM, H2O, TOVA, SnapKV; docs/dms.md section 8) against
independent references.

* the cache (`attend_and_update`) on random q/k/v == each method's rules written out plainly on
  sets in float64 numpy, at chunk granularity (see `dms_jax.policies`): the held set after every
  prefill and decode step, and every query's output (hypothesis; data, lengths and budgets vary,
  shapes come from two budget buckets so few programs compile);
* one token per step == the originals as published (TOVA's cache_size = budget - 1 with its
  topk after attending, H2O's hh_size + recent_size, StreamingLLM's evict_for_space), and
  SnapKV's prompt compression == its observation-window / pooling / topk rule;
* the budget is never exceeded and always filled: held == min(seen, budget) after every step;
* through `generate` on a tiny model: layer 0's final held set == the reference on layer 0's
  q/k/v (which depend only on the tokens), for every policy; `streaming` with a budget that
  holds everything == `full` (tokens and logits); equal-budget helpers; bad input raises.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dms_jax
from dms_jax import ModelConfig
from dms_jax import cache as kvcache
from dms_jax.generate import _bucket, _snapkv_compress, prefill_step
from dms_jax.layers import apply_rope, rope_inv_freq, rope_tables
from dms_jax.plan import plan_inference
from dms_jax.policies import (FULL, budget_for_ratio, budget_from_stats, get_policy,
                              policy_params)
from tests.test_cache import held_sets, make_data, schedule, step_fn

# One shape bucket: B=2, H=4, Hkv=2, D=8, rows of up to 24 tokens, prefill chunks of 5.
B, T, H, HKV, D, C = 2, 24, 4, 2, 8, 5
BUDGETS = (6, 9)
OBS = 4  # SnapKV observation window in the cache-level tests
PROP_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- the rules, plainly


class Method:
    """One baseline's rules on a dict {position: score} per (row, KV head)."""

    newest_only = False  # scores come from the newest query only (TOVA)
    new_score = 0.0

    def __init__(self, budget, **params):
        self.budget, self.params = budget, params

    def victim(self, held, t):
        """The token to evict next from `held` when over budget; t (the newest) is never one."""
        raise NotImplementedError

    def update(self, held_row, received):
        """Fold one step's attention into the scores; received: {head: {position: sum}}."""

    def evict(self, held, t):
        while len(held) > self.budget:
            del held[self.victim(held, t)]


class Streaming(Method):
    def victim(self, held, t):  # the oldest token that is neither a sink nor the newest
        return min(p for p in held if p >= self.params.get("sinks", 4) and p != t)


class H2O(Method):
    def victim(self, held, t):  # the lightest hitter outside the recent window
        recent = self.params.get("recent") or self.budget - self.budget // 2
        return min((s, p) for p, s in held.items() if t - p >= recent and p != t)[1]

    def update(self, held_row, received):
        for h, row in received.items():
            for p, r in row.items():
                held_row[h][p] += r


class TOVA(Method):
    newest_only = True

    def victim(self, held, t):  # the lowest attention from the newest query
        return min((s, p) for p, s in held.items() if p != t)[1]

    def update(self, held_row, received):
        for h in held_row:  # the mean over the layer's KV heads (same for every head)
            for p in held_row[h]:
                held_row[h][p] = np.mean([received[g].get(p, 0.0) for g in received])


class SnapKVDecode(Method):
    new_score = -1.0  # no prefill score

    def victim(self, held, t):  # the lowest prefill score; without any, the oldest unscored
        scored = [(s, p) for p, s in held.items() if s >= 0 and p != t]
        return min(scored)[1] if scored else min(p for p in held if p != t)


def attention(q_vec, keys, values):
    """float64 softmax attention of one query -> (probabilities [n], output [D])."""
    s = keys.astype(np.float64) @ q_vec.astype(np.float64) / np.sqrt(q_vec.shape[-1])
    p = np.exp(s - s.max())
    p /= p.sum()
    return p, p @ values.astype(np.float64)


def attend_row(method, held_row, queries, t, q, k, v, out):
    """Queries (positions) of one row attend over the held keys at or before them; returns the
    attention each key received from the scoring queries, {KV head: {position: sum}}."""
    received = {h: {} for h in held_row}
    for i in queries:
        for hq in range(q.shape[1]):
            h = hq // (q.shape[1] // k.shape[1])
            keys = sorted(p for p in held_row[h] if p <= i)
            probs, out[i, hq] = attention(q[i, hq], k[keys, h], v[keys, h])
            if not method.newest_only or i == t:
                for p, pr in zip(keys, probs):
                    received[h][p] = received[h].get(p, 0.0) + pr
    return received


def reference_run(method, steps, q, k, v, *, held=None):
    """The method at chunk granularity: a step of width > 1 attends (cache + chunk, causally),
    scores, then evicts to the budget; a step of width 1 evicts (the new token kept), attends,
    scores. returns (held sets after every step, outputs [B, T, H, D], final state)."""
    batch, num_kv = q.shape[0], k.shape[2]
    held = held or [{h: {} for h in range(num_kv)} for _ in range(batch)]
    out = np.full(q.shape, np.nan)
    history = []
    for index, valid in steps:
        for b in range(batch):
            new = sorted(index[b][valid[b]].tolist())
            if not new:
                continue
            t = new[-1]
            for h in range(num_kv):
                held[b][h].update({p: method.new_score for p in new})
            if index.shape[1] == 1:
                for h in range(num_kv):
                    method.evict(held[b][h], t)
            received = attend_row(method, held[b], new, t, q[b], k[b], v[b], out[b])
            method.update(held[b], received)
            if index.shape[1] > 1:
                for h in range(num_kv):
                    method.evict(held[b][h], t)
        history.append({(b, h): sorted(held[b][h]) for b in range(batch) for h in range(num_kv)})
    return history, out, held


def snapkv_reference(q, k, v, n, *, budget, obs, kernel=5, pooling="avgpool"):
    """SnapKV's prompt compression as published, for one row of n prompt tokens.

    Per KV head: the last `obs` queries attend over the whole prompt (causally); the attention
    each older key receives is summed over them and the group's query heads, pooled over
    neighbouring positions (zero padding, kernel // 2 each side), and the top budget - obs older
    tokens are kept with the window. returns ({head: {position: score}} with the window at -1,
    outputs of the prompt queries [n, H, D])."""
    out = np.zeros((n,) + q.shape[1:])
    group = q.shape[1] // k.shape[1]
    start = max(n - obs, 0)
    held = {}
    for h in range(k.shape[1]):
        summed = np.zeros(start)
        for i in range(n):
            for hq in range(h * group, (h + 1) * group):
                probs, out[i, hq] = attention(q[i, hq], k[:i + 1, h], v[:i + 1, h])
                if i >= start:
                    summed += probs[:start]
        half = kernel // 2
        padded = np.pad(summed, half, constant_values=0.0 if pooling == "avgpool" else -np.inf)
        windows = np.stack([padded[o:o + start] for o in range(kernel)])
        pooled = windows.mean(0) if pooling == "avgpool" else windows.max(0)
        top = np.argsort(-pooled, kind="stable")[:max(budget - (n - start), 0)]  # ties: earlier
        held[h] = {int(p): float(pooled[p]) for p in top} | {p: -1.0 for p in range(start, n)}
    return held, out


# ----------------------------------------------------------------------------- cache level


POLICIES = {
    "streaming": (Streaming, dict(sinks=2)),
    "h2o": (H2O, {}),
    "h2o_recent": (H2O, dict(recent=3)),
    "tova": (TOVA, {}),
}


def policy_for(name):
    params = POLICIES[name][1]
    return get_policy(name.split("_")[0], **params)


def run_cache(cache, steps, q, k, v, policy):
    """The steps through attend_and_update; returns (held sets per step, outputs, cache)."""
    rows = np.arange(q.shape[0])[:, None]
    out_all = np.full(q.shape, np.nan, np.float32)
    history = []
    for index, valid in steps:
        out, cache = step_fn(cache, q[rows, index], k[rows, index], v[rows, index], None,
                             index.astype(np.int32), valid, window=0, policy=policy)
        out = np.asarray(out)
        out_all[rows.repeat(index.shape[1], 1)[valid], index[valid]] = out[valid]
        history.append(held_sets(cache))
    return history, out_all, cache


def check_budget_filled(steps, history, budget):
    """After every step each (row, head) holds min(tokens seen, budget) distinct tokens."""
    seen = np.zeros(B, int)
    for (index, valid), held in zip(steps, history):
        seen += valid.sum(1)
        for (b, h), positions in held.items():
            assert len(positions) == len(set(positions)) == min(seen[b], budget)


def draw_case(data):
    seed = data.draw(st.integers(0, 2 ** 31 - 1), label="seed")
    totals = np.array(data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B),
                                label="lengths"))
    prompts = np.array([data.draw(st.integers(1, n), label="prompt") for n in totals])
    budget = data.draw(st.sampled_from(BUDGETS), label="budget")
    rng = np.random.default_rng(seed)
    q, k, v, _ = make_data(rng, B, T, H, HKV, D, 0.0)
    return q, k, v, prompts, totals, budget, rng


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=25, **PROP_SETTINGS)
@given(data=st.data())
def test_property_policy_matches_reference_and_budget(name, data):
    q, k, v, prompts, totals, budget, rng = draw_case(data)
    steps = schedule(rng, prompts, totals, C)
    cache = kvcache.init_layer_cache(B, HKV, budget, D)
    history, out, cache = run_cache(cache, steps, q, k, v, policy_for(name))
    method = POLICIES[name][0](budget, **POLICIES[name][1])
    expected, ref_out, _ = reference_run(method, steps, q, k, v)
    assert history == expected
    check_budget_filled(steps, history, budget)
    for b, n in enumerate(totals):
        np.testing.assert_allclose(out[b, :n], ref_out[b, :n], atol=1e-5, rtol=0)
    if name == "tova":  # one choice per layer: every KV head holds the same tokens
        assert all(held[b, 0] == held[b, 1] for held in history for b in range(B))
    assert not np.asarray(cache.overflow).any()  # dropping is the policy's job, not overflow
    pos = np.asarray(cache.pos)
    bb, hh, ss = np.nonzero(pos >= 0)
    np.testing.assert_array_equal(np.asarray(cache.keys)[bb, hh, ss], k[bb, pos[bb, hh, ss], hh])


def original_token_by_token(name, q, k, v, n, budget):
    """The originals as published, one token per step, for one row. returns per step t the
    positions query t attended to (per KV head) and the outputs [n, H, D].

    TOVA: cache_size = budget - 1; after attending, keep the top cache_size keys by the newest
    query's attention averaged over all heads. H2O: hh_size = budget // 2, recent_size =
    budget - hh_size - 1; after attending, keep the last recent_size keys and the top hh_size of
    the rest by accumulated attention. StreamingLLM: before attending, evict to make space
    (keep the sinks and the most recent budget - 1 - sinks), then attend."""
    group = q.shape[1] // k.shape[1]
    kept = {h: [] for h in range(k.shape[1])}
    score = {h: {} for h in range(k.shape[1])}
    attended, out = [], np.zeros((n,) + q.shape[1:])
    for t in range(n):
        if name == "streaming" and len(kept[0]) + 1 > budget:
            for h in kept:
                kept[h] = kept[h][:2] + kept[h][2:][len(kept[h]) + 1 - budget:]
        keys = {h: kept[h] + [t] for h in kept}
        attended.append({h: sorted(keys[h]) for h in keys})
        probs = {}
        for hq in range(q.shape[1]):
            h = hq // group
            probs[hq], out[t, hq] = attention(q[t, hq], k[keys[h], h], v[keys[h], h])
        for h in kept:
            if name == "tova":
                mean = np.mean([probs[hq] for hq in range(q.shape[1])], axis=0)
                order = np.argsort(-mean)[:budget - 1]
                kept[h] = sorted(keys[h][i] for i in order)
            elif name == "h2o":
                received = sum(probs[hq] for hq in range(h * group, (h + 1) * group))
                for p, r in zip(keys[h], received):
                    score[h][p] = score[h].get(p, 0.0) + r
                hh, recent = budget // 2, budget - budget // 2 - 1
                if len(keys[h]) > hh + recent:
                    rest = keys[h][:len(keys[h]) - recent]
                    heavy = sorted(rest, key=lambda p: -score[h][p])[:hh]
                    keys[h] = sorted(heavy) + keys[h][len(keys[h]) - recent:]
                kept[h] = keys[h]
            else:
                kept[h] = keys[h]
    return attended, out


@pytest.mark.parametrize("name", ["streaming", "h2o", "tova"])
def test_one_token_per_step_equals_the_original(name):
    rng = np.random.default_rng(11)
    q, k, v, _ = make_data(rng, B, T, H, HKV, D, 0.0)
    totals = np.array([T, 17])
    steps = schedule(rng, totals, totals, 1)  # every step one token: the decode order
    budget = BUDGETS[0]
    policy = get_policy(name, **({"sinks": 2} if name == "streaming" else {}))
    history, out, _ = run_cache(kvcache.init_layer_cache(B, HKV, budget, D), steps,
                                q, k, v, policy)
    for b, n in enumerate(totals):
        attended, ref = original_token_by_token(name, q[b], k[b], v[b], n, budget)
        np.testing.assert_allclose(out[b, :n], ref, atol=1e-5, rtol=0)
        for t in range(n):  # the cache after step t holds what query t attended to
            assert [history[t][b, h] for h in range(HKV)] == [attended[t][h] for h in range(HKV)]


def run_snapkv_cache(q, k, v, prompts, totals, budget, policy, rng):
    """SnapKV through the cache as generate drives it: the prompt but its observation window in
    chunks (keep all), the window in one step (attention summed), compaction, then decode."""
    heads = np.maximum(prompts - policy.obs_window, 0)
    whole = kvcache.init_layer_cache(B, HKV, T, D)
    _, out_head, whole = run_cache(whole, schedule(rng, heads, heads, C), q, k, v, FULL)
    index = np.zeros((B, policy.obs_window), int)
    valid = np.zeros_like(index, bool)
    for b in range(B):
        n = prompts[b] - heads[b]
        index[b, :n], valid[b, :n] = heads[b] + np.arange(n), True
    _, out_tail, whole = run_cache(whole, [(index, valid)], q, k, v, policy.observe())
    assert np.asarray(whole.held).tolist() == [[n] * HKV for n in prompts]  # the whole prompt
    (cache,) = _snapkv_compress((whole,), policy=policy, capacity=budget)
    compacted = held_sets(cache)
    decode = [(index, valid) for index, valid in schedule(rng, prompts, totals, C)
              if index.shape[1] == 1]
    history, out, cache = run_cache(cache, decode, q, k, v, policy)
    out = np.where(np.isnan(out), np.where(np.isnan(out_tail), out_head, out_tail), out)
    return compacted, decode, history, out, cache


@settings(max_examples=25, **PROP_SETTINGS)
@given(data=st.data(), pooling=st.sampled_from(["avgpool", "maxpool"]))
def test_property_snapkv_matches_reference_and_budget(data, pooling):
    q, k, v, prompts, totals, budget, rng = draw_case(data)
    policy = get_policy("snapkv", obs_window=OBS, kernel_size=3, pooling=pooling)
    compacted, decode, history, out, cache = run_snapkv_cache(q, k, v, prompts, totals, budget,
                                                              policy, rng)
    state = []
    for b, n in enumerate(prompts):
        held, ref_out = snapkv_reference(q[b], k[b], v[b], n, budget=budget, obs=OBS, kernel=3,
                                         pooling=pooling)
        np.testing.assert_allclose(out[b, :n], ref_out, atol=1e-5, rtol=0)
        assert [compacted[b, h] for h in range(HKV)] == [sorted(held[h]) for h in range(HKV)]
        state.append(held)
    expected, ref_out, _ = reference_run(SnapKVDecode(budget), decode, q, k, v, held=state)
    assert history == expected
    for b in range(B):
        np.testing.assert_allclose(out[b, prompts[b]:totals[b]],
                                   ref_out[b, prompts[b]:totals[b]], atol=1e-5, rtol=0)
    for (index, valid), held in zip(decode, history):  # decode stays within the budget
        assert all(len(p) <= budget for p in held.values())
    peak = np.maximum(prompts, np.minimum(totals, budget))  # the whole prompt was held
    assert np.asarray(cache.peak_held).tolist() == [[n] * HKV for n in peak]


# ----------------------------------------------------------------------------- through generate


TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                   num_heads=H, num_kv_heads=HKV, head_dim=D)
PROMPTS = [np.random.default_rng(seed).integers(0, 64, n) for seed, n in ((1, 40), (2, 27))]
NEW, CHUNK, BUDGET = 8, 16, 12


@pytest.fixture(scope="module")
def tiny():
    return dms_jax.Decoder(TINY, rngs=nnx.Rngs(0))


def layer0_qkv(model, rows):
    """Layer 0's q/k/v (RoPE applied) per row, [B, T, H|Hkv, D]: they depend on the tokens only."""
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int32)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
    attn, cfg = model.layers[0].attn, model.config
    x = model.layers[0].input_norm(model.embed(jnp.asarray(ids)))
    pos = jnp.broadcast_to(jnp.arange(length), ids.shape)
    rope = rope_tables(pos, rope_inv_freq(cfg.head_dim, cfg.rope_theta, None))
    q = apply_rope(attn.q_proj(x).reshape(len(rows), length, H, D), rope)
    k = apply_rope(attn.k_proj(x).reshape(len(rows), length, HKV, D), rope)
    v = attn.v_proj(x).reshape(len(rows), length, HKV, D)
    return (np.asarray(a, np.float64) for a in (q, k, v))


def generate_schedule(prompt_lens, fed_lens, chunk, start=None):
    """generate's steps: right-padded prefill chunks, then one token per row per step."""
    start = np.zeros(len(prompt_lens), int) if start is None else start
    steps = []
    for c in range(-(-int(max(prompt_lens - start)) // chunk)):
        index = start[:, None] + c * chunk + np.arange(chunk)[None]
        steps.append((index, index < prompt_lens[:, None]))
    for t in range(int(max(fed_lens - prompt_lens))):
        index = (prompt_lens + t)[:, None]
        steps.append((index, index < fed_lens[:, None]))
    return steps


@pytest.mark.parametrize("name", ["streaming", "h2o", "tova", "snapkv"])
def test_generate_holds_what_the_reference_holds(tiny, name):
    policy = get_policy(name, **({"obs_window": 8} if name == "snapkv" else {}))
    out = dms_jax.generate(tiny, PROMPTS, max_new_tokens=NEW, policy=policy, budget=BUDGET,
                           chunk_size=CHUNK)
    rows = [np.concatenate([p, s[:-1]]) for p, s in zip(PROMPTS, out.sequences())]  # fed tokens
    q, k, v = layer0_qkv(tiny, rows)
    lens = np.array([len(p) for p in PROMPTS])
    fed = np.array([len(r) for r in rows])
    chunk = min(CHUNK, _bucket(int(lens.max())))
    if name == "snapkv":
        state = [snapkv_reference(q[b], k[b], v[b], n, budget=BUDGET, obs=8)[0]
                 for b, n in enumerate(lens)]
        steps = generate_schedule(lens, fed, chunk)[-int(max(fed - lens)):]
        expected, _, _ = reference_run(SnapKVDecode(BUDGET), steps, q, k, v, held=state)
    else:
        method = {"streaming": Streaming, "h2o": H2O, "tova": TOVA}[name](BUDGET)
        expected, _, _ = reference_run(method, generate_schedule(lens, fed, chunk), q, k, v)
    assert held_sets(out.state.cache[0]) == expected[-1]
    stats = out.stats
    assert stats.policy == name and stats.overflow == 0
    assert (stats.held_tokens == BUDGET).all()
    assert stats.compression_ratio == pytest.approx(1 / np.mean(BUDGET / fed), rel=1e-5)
    assert budget_from_stats(stats) == BUDGET
    token_bytes = 2 * D * 4
    peak = BUDGET if name != "snapkv" else lens[:, None]
    assert stats.peak_kv_bytes == np.sum(np.broadcast_to(peak, (B, HKV))) * token_bytes
    assert stats.allocated_kv_bytes == B * HKV * BUDGET * token_bytes


def test_streaming_with_room_for_everything_equals_full(tiny):
    budget = max(len(p) for p in PROMPTS) + NEW
    full = dms_jax.generate(tiny, PROMPTS, max_new_tokens=NEW, policy="full", chunk_size=CHUNK)
    stream = dms_jax.generate(tiny, PROMPTS, max_new_tokens=NEW, policy="streaming",
                              budget=budget, chunk_size=CHUNK)
    np.testing.assert_array_equal(stream.tokens, full.tokens)
    assert stream.stats.kv_reads_decode == full.stats.kv_reads_decode
    assert stream.stats.peak_kv_bytes == full.stats.peak_kv_bytes
    # the prompt's logits, chunk by chunk through the same jitted prefill step (same programs)
    graphdef, params = nnx.split(tiny)
    ids = np.zeros((B, 3 * CHUNK), np.int32)
    valid = np.zeros_like(ids, bool)
    for b, p in enumerate(PROMPTS):
        ids[b, :len(p)], valid[b, :len(p)] = p, True
    logits = {}
    for name in ("full", "streaming"):
        plan = plan_inference(TINY, policy=name, budget=budget, max_len=budget)
        cache = kvcache.init_cache(plan, B)
        hidden = jnp.zeros((B, TINY.hidden_size))
        chunks = []
        for c in range(3):
            cols = slice(c * CHUNK, (c + 1) * CHUNK)
            pos = np.broadcast_to(np.arange(CHUNK, dtype=np.int32) + c * CHUNK, (B, CHUNK))
            out, hidden, cache = prefill_step(graphdef, params, cache, ids[:, cols],
                                              valid[:, cols], pos, hidden,
                                              np.full(B, -1, np.int32),
                                              plan=plan)
            chunks.append(np.asarray(tiny.unembed(out))[valid[:, cols]])
        logits[name] = np.concatenate(chunks)
    np.testing.assert_array_equal(logits["streaming"], logits["full"])


def test_equal_budget_helpers():
    assert budget_for_ratio(1000, 8.0) == 125 and budget_for_ratio(10, 100.0) == 1

    class Stats:
        held_tokens = np.array([[[10, 20], [30, 41]]])  # [L, B, Hkv]

    assert budget_from_stats(Stats) == 25
    with pytest.raises(ValueError, match=">= 1"):
        budget_for_ratio(100, 0.5)


# ----------------------------------------------------------------------------- bad input


def test_policy_parameters_and_defaults():
    assert policy_params("streaming") == {"sinks": 4}
    assert policy_params("snapkv") == {"obs_window": 64, "kernel_size": 5, "pooling": "avgpool"}
    assert policy_params("h2o") == {"recent": None} and policy_params("tova") == {}
    assert get_policy("streaming", sinks=2) == get_policy("streaming", sinks=2)  # hashable, static
    assert get_policy("snapkv") is not get_policy("snapkv", obs_window=32)


@pytest.mark.parametrize("name, params, match", [
    ("streaming", {"window": 3}, r"no parameter window.*sinks=4"),
    ("tova", {"recent": 3}, r"no parameter recent.*none"),
    ("snapkv", {"kernel": 5}, r"obs_window=64, kernel_size=5, pooling='avgpool'"),
    ("streaming", {"sinks": -1}, r"sinks=-1 must be an integer >= 0"),
    ("h2o", {"recent": 0}, r"recent=0 must be an integer >= 1"),
    ("snapkv", {"kernel_size": 4}, r"must be odd"),
    ("snapkv", {"pooling": "mean"}, r"avgpool"),
    ("lru", {}, r"unknown policy 'lru'; available"),
])
def test_bad_policy_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        get_policy(name, **params)


def test_parameters_need_a_name():
    with pytest.raises(ValueError, match="apply to a policy name"):
        get_policy(get_policy("h2o"), recent=2)


@pytest.mark.parametrize("policy, budget, match", [
    (get_policy("streaming"), 4, r"4 sinks \+ the newest token = 5; use budget >= 5 or fewer"),
    (get_policy("h2o", recent=20), 12, r"recent window of 20 .* use budget >= 20"),
    (get_policy("snapkv"), 64, r"observation window of 64 .* use budget >= 65"),
    (get_policy("h2o"), None, r"evicts down to a budget: pass budget="),
    (get_policy("tova"), 0, r"budget=0"),
])
def test_budget_errors_before_compute(tiny, policy, budget, match):
    with pytest.raises(ValueError, match=match):
        dms_jax.generate(tiny, [list(range(60))], max_new_tokens=40, policy=policy,
                         budget=budget)


def test_budget_holding_every_token_needs_no_room_for_the_rule():
    from dms_jax.plan import resolve_capacity
    cap = resolve_capacity(10, get_policy("snapkv"), window=0, target_cr=8.0, margin=0.5,
                           capacity=None, budget=32)
    assert cap == 10  # 32 >= max_len: nothing is evicted, the window need not fit


def test_attention_policies_need_the_scoring_attention_path():
    kw = dict(budget=BUDGET, max_len=64)
    with pytest.raises(ValueError, match="attention_impl='blockwise' gives no scores"):
        plan_inference(TINY, policy="h2o", attention_impl="blockwise", **kw)
    with pytest.raises(ValueError, match="use attention_impl='dense'"):
        plan_inference(TINY, policy="tova", attention_impl="auto", **kw)
    plan_inference(TINY, policy="streaming", attention_impl="blockwise", **kw)  # needs no scores


def test_model_level_cache_errors_for_baselines():
    """A baseline's cache needs its budget; score-based policies need the dense cache path."""
    from dms_jax.assets import TINY_MODEL_DIR

    model = dms_jax.from_pretrained(TINY_MODEL_DIR)
    with pytest.raises(ValueError, match="budget"):
        plan_inference(model.config, policy="h2o", max_len=64)
    plan = plan_inference(model.config, policy="h2o", capacity=16, max_len=64)
    cache = kvcache.init_cache(plan, 1)
    assert cache[0].capacity == 16
    with pytest.raises(ValueError, match="attention_impl='dense'"):
        plan_inference(model.config, policy="h2o", capacity=16, max_len=64,
                       attention_impl="blockwise")
    with pytest.raises(ValueError, match="the plan decides"):  # the model follows its plan
        model.forward(jnp.ones((1, 4), jnp.int32), cache=cache, plan=plan,
                      attention_impl="blockwise")
