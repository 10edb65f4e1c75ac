"""The paged cache (`dms_jax.paged`) against the slot layout and its own invariants.

The teacher-forced prefill + decode == hard evaluation test runs on both layouts in
tests/test_generate.py; here: greedy generation on pages == on slots (dms and full, tokens, held
counts, CR), a row in a batch == the row alone, a continuation == one run, the pool's
bookkeeping (no page in two streams, every page either free or in one table, page counts follow
the retained counts), the overflow rule when the pool runs dry, released rows' pages reused, the
memory the plan sizes, and bad input refused before compute.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dms_jax
from dms_jax import DMSConfig, ModelConfig
from dms_jax import cache as kvcache
from dms_jax import paged
from dms_jax.generate import generate, prefill_step
from dms_jax.ops.attention import online_softmax_finish
from dms_jax.ops.live_attention import empty_state
from dms_jax.plan import PlanError, plan_inference
from tests.test_generate import WINDOW, randomised_dms_model


@pytest.fixture(scope="module")
def llama_dms(hf_model_dirs):
    return randomised_dms_model(hf_model_dirs["llama"])


def check_pool(cache: paged.PagedLayerCache):
    """Every page is free or in exactly one stream's table; a stream's pages are its first
    ceil(retained / page) entries; stored positions are those of retained tokens."""
    table = np.asarray(cache.page_table)
    retained = np.asarray(cache.retained)
    page, pages = cache.page_size, cache.num_pages
    used = table[table >= 0]
    free = np.asarray(cache.free_pages)[:int(cache.num_free)]
    assert len(set(used.tolist())) == len(used), "a page is in two streams"
    assert not set(used.tolist()) & set(free.tolist()), "a page is both free and used"
    assert len(used) + len(free) == pages
    want_pages = -(-retained // page)
    np.testing.assert_array_equal((table >= 0).sum(-1), want_pages)
    for b, h in np.ndindex(retained.shape):
        n = want_pages[b, h]
        assert (table[b, h, :n] >= 0).all() and (table[b, h, n:] < 0).all()
        pos = np.asarray(cache.pool_pos)[table[b, h, :n]].reshape(-1)[:retained[b, h]]
        assert (pos >= 0).all() and len(set(pos.tolist())) == len(pos)


def run(model, prompts, **kw):
    return generate(model, prompts, chunk_size=kw.pop("chunk_size", 8), **kw)


@pytest.mark.parametrize("policy", ["dms", "full"])
def test_paged_generation_equals_slots(llama_dms, policy):
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 97, n).tolist() for n in (29, 7, 18)]
    kw = dict(max_new_tokens=[10, 14, 6], max_len=64, policy=policy)
    slots = run(llama_dms, prompts, capacity=64, **kw)
    pages = run(llama_dms, prompts, layout="paged", page_size=4, target_cr=1.0, **kw)
    assert pages.sequences() == slots.sequences()
    np.testing.assert_array_equal(pages.stats.held_tokens, slots.stats.held_tokens)
    np.testing.assert_array_equal(pages.stats.seen_tokens, slots.stats.seen_tokens)
    np.testing.assert_array_equal(pages.stats.kv_reads_decode, slots.stats.kv_reads_decode)
    assert pages.stats.compression_ratio == pytest.approx(slots.stats.compression_ratio)
    assert pages.stats.overflow == 0
    for c in pages.state.cache:
        check_pool(c)
    if policy == "dms":
        assert pages.stats.compression_ratio > 1.5  # the eviction is really exercised


def test_paged_row_in_a_batch_equals_the_row_alone_and_continuation(llama_dms):
    rng = np.random.default_rng(12)
    prompts = [rng.integers(0, 97, n).tolist() for n in (3, 26, 11)]
    kw = dict(chunk_size=8, max_len=48, layout="paged", page_size=4, target_cr=1.0)
    batch = generate(llama_dms, prompts, max_new_tokens=[9, 4, 7], **kw)
    for b, p in enumerate(prompts):
        alone = generate(llama_dms, [p], max_new_tokens=[9, 4, 7][b], **kw)
        assert alone.sequences()[0] == batch.sequences()[b]
        np.testing.assert_array_equal(alone.stats.held_tokens[:, 0], batch.stats.held_tokens[:, b])
    turn2 = [rng.integers(0, 97, n).tolist() for n in (6, 3, 5)]
    second = generate(llama_dms, turn2, state=batch.state, max_new_tokens=5, chunk_size=4)
    whole = [p + g + t for p, g, t in zip(prompts, batch.sequences(), turn2)]
    once = generate(llama_dms, whole, max_new_tokens=5, **kw)
    assert second.sequences() == once.sequences()
    np.testing.assert_array_equal(second.stats.held_tokens, once.stats.held_tokens)


def test_a_dry_pool_drops_the_newest_retained_tokens_counted_and_strict_raises(llama_dms):
    prompt = [np.arange(60).tolist(), np.arange(30, 90).tolist()]
    kw = dict(max_new_tokens=2, layout="paged", page_size=4, policy="full", max_len=64)
    out = generate(llama_dms, prompt, pool_pages=16, **kw)  # one row needs 15 pages of 4
    assert out.stats.overflow > 0
    for c in out.state.cache:
        check_pool(c)
        assert int(c.num_free) == 0
    # stream order: the first row's streams were served first, so they overflowed less
    overflow = out.stats.held_tokens.sum() + out.stats.overflow
    assert overflow == 2 * 61 * llama_dms.config.num_layers * llama_dms.config.num_kv_heads
    with pytest.raises(kvcache.CacheOverflowError, match="overflow"):
        generate(llama_dms, prompt, pool_pages=16, strict=True, **kw)


def test_released_rows_give_their_pages_back_and_the_rows_start_afresh(llama_dms):
    cfg = llama_dms.config
    graphdef, params = nnx.split(llama_dms)
    plan = plan_inference(cfg, policy="full", max_len=32, layout="paged", page_size=4)

    def forward(cache, ids, pos):  # the jitted prefill step over all of ids
        batch = ids.shape[0]
        hidden, _, cache = prefill_step(graphdef, params, cache, ids, np.ones(ids.shape, bool),
                                        pos, jnp.zeros((batch, cfg.hidden_size)),
                                        np.full(batch, -1, np.int32), plan=plan)
        return np.asarray(llama_dms.unembed(hidden)), cache

    rng = np.random.default_rng(13)
    ids = rng.integers(0, 97, (2, 16)).astype(np.int32)
    _, cache = forward(kvcache.init_cache(plan, 2), ids, np.tile(np.arange(16, dtype=np.int32), (2, 1)))
    before = int(cache[0].num_free)
    released = tuple(paged.release_rows(c, np.array([True, False])) for c in cache)
    for c in released:
        check_pool(c)
        assert int(c.num_free) == before + -(-15 // 4) * cfg.num_kv_heads  # 15 retained each
        assert int(c.seen[0]) == 0 and int(c.seen[1]) == 16
    # the released row, fed a new sequence, equals that sequence in a fresh cache
    new = rng.integers(0, 97, (2, 16)).astype(np.int32)
    new_pos = np.stack([np.arange(16), np.arange(16, 32)]).astype(np.int32)
    again, _ = forward(released, new, new_pos)
    fresh, _ = forward(kvcache.init_cache(plan, 2), new[:1].repeat(2, 0), new_pos[:1].repeat(2, 0))
    np.testing.assert_allclose(again[0], fresh[0], atol=1e-5)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10 ** 6), page=st.sampled_from([1, 3, 8]), chunk=st.sampled_from([3, 16]))
def test_pool_bookkeeping_holds_for_any_page_and_chunk_size(llama_dms, seed, page, chunk):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 97, n).tolist() for n in rng.integers(1, 30, 2)]
    slots = generate(llama_dms, prompts, max_new_tokens=3, chunk_size=chunk, capacity=40,
                     max_len=40)
    pages = generate(llama_dms, prompts, max_new_tokens=3, chunk_size=chunk, max_len=40,
                     layout="paged", page_size=page, target_cr=1.0)
    np.testing.assert_array_equal(pages.stats.held_tokens, slots.stats.held_tokens)
    assert pages.sequences() == slots.sequences()
    for c in pages.state.cache:
        check_pool(c)


@pytest.mark.parametrize("sliding_window", [None, 9])
def test_tiled_prefill_equals_blockwise_on_the_pages(llama_dms, sliding_window):
    """A prefill chunk's two attentions over the pages, the ring and the chunk ("tiled": stream
    by stream in query tiles, the chunk causally; "blockwise": every stream at once) give the
    same outputs, keys seen and cache, on a real pool with a released row, rows at different
    positions, padding queries in the middle of a chunk, and grouped queries."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 97, n).tolist() for n in (37, 12, 25)]
    out = generate(llama_dms, prompts, max_new_tokens=4, chunk_size=8, max_len=96,
                   layout="paged", page_size=4, target_cr=2.0)
    cache = paged.release_rows(out.state.cache[0], np.array([False, True, False]))
    cfg, chunk = llama_dms.config, 24
    q = jnp.asarray(rng.standard_normal((3, chunk, cfg.num_heads, cfg.head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((3, chunk, cfg.num_kv_heads, cfg.head_dim)),
                        jnp.float32) for _ in range(2))
    valid = rng.random((3, chunk)) < 0.8
    valid[1] = False  # the released row: all padding
    positions = np.asarray(cache.last_pos)[:, None] + 1 + np.cumsum(valid, axis=1) - valid
    decisions = jnp.asarray(rng.random((3, chunk, cfg.num_kv_heads)) < 0.5)
    kw = dict(window=out.state.plan.window, policy=out.state.plan.policy,
              sliding_window=sliding_window, scale=0.3)
    results = {impl: jax.jit(functools.partial(paged.attend_and_update, attention=impl, **kw))(
        cache, q, k, v, decisions, jnp.asarray(positions, jnp.int32), jnp.asarray(valid))
        for impl in ("blockwise", "tiled")}
    (out_b, cache_b), (out_t, cache_t) = results["blockwise"], results["tiled"]
    np.testing.assert_allclose(np.where(valid[..., None, None], out_t, 0),
                               np.where(valid[..., None, None], out_b, 0), atol=2e-6)
    assert float(cache_t.kv_reads.sum()) > float(cache.kv_reads.sum())
    for a, b in zip(jax.tree.leaves(cache_t), jax.tree.leaves(cache_b)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sliding_window", [None, 9])
def test_reading_the_pool_in_place_equals_gathering_the_pages(llama_dms, sliding_window):
    """A decode step's two readers of the pages (`pool_attention`: every pool page in place,
    combined per stream; `page_attention`: the live pages gathered) give the same softmax and
    the same keys seen, on a real pool with free pages between used ones (a released row),
    streams of different lengths, grouped queries and a padding query."""
    rng = np.random.default_rng(14)
    prompts = [rng.integers(0, 97, n).tolist() for n in (37, 12, 25)]
    out = generate(llama_dms, prompts, max_new_tokens=4, chunk_size=8, max_len=48,
                   layout="paged", page_size=4, target_cr=1.0)
    cache = paged.release_rows(out.state.cache[0], np.array([True, False, False]))
    cfg = llama_dms.config
    assert 0 < int(cache.num_free) < cache.num_pages  # free pages among the used ones
    qg = jnp.asarray(rng.standard_normal((3, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads,
                                          1, cfg.head_dim)), jnp.float32)
    q_pos = jnp.asarray([[60], [50], [29]], jnp.int32)  # row 2: its next position
    q_valid = jnp.asarray([[True], [False], [True]])
    kw = dict(sliding_window=sliding_window, scale=0.3)
    pool, pool_seen = paged.pool_attention(qg, q_pos, q_valid, cache, **kw)
    gath, gath_seen = paged.page_attention(empty_state(qg), qg, q_pos, q_valid, cache,
                                           block_tokens=8, **kw)
    real = np.asarray(q_valid)[:, None, None, :]
    np.testing.assert_allclose(np.where(real[..., None], online_softmax_finish(pool), 0),
                               np.where(real[..., None], online_softmax_finish(gath), 0),
                               atol=1e-6)
    np.testing.assert_array_equal(pool_seen, gath_seen)
    assert np.asarray(pool_seen)[2].sum() > 0 and np.asarray(pool_seen)[:2].max() == 0


@pytest.mark.parametrize("policy", ["dms", "full"])
def test_decode_reading_the_pool_in_place_equals_the_slot_layout(policy):
    """Without grouped queries a decode step over a mostly used pool reads it in place
    (`pool_attention`, the tests above use grouped queries, which always gather): greedy
    generation, held counts and decode reads still equal the slot layout's."""
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=2, head_dim=16,
                      dms=DMSConfig(mode="adapter", window=WINDOW, offset=-4.0))
    model = dms_jax.Decoder(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(15)
    for layer in model.layers:  # random decisions: most tokens flagged
        k = layer.attn.dms_proj.kernel
        k[...] = jnp.asarray(0.3 * rng.standard_normal(k.shape), k.dtype)
    prompts = [rng.integers(0, 97, n).tolist() for n in (27, 9, 20)]
    kw = dict(max_new_tokens=[8, 12, 5], max_len=48, policy=policy)
    slots = run(model, prompts, capacity=48, **kw)
    pages = run(model, prompts, layout="paged", page_size=4, target_cr=1.0, **kw)
    assert all(bool(paged.reads_pool(c, paged.DECODE_BLOCK_TOKENS)) for c in pages.state.cache)
    assert pages.sequences() == slots.sequences()
    np.testing.assert_array_equal(pages.stats.held_tokens, slots.stats.held_tokens)
    np.testing.assert_array_equal(pages.stats.kv_reads_decode, slots.stats.kv_reads_decode)
    for c in pages.state.cache:
        check_pool(c)
    if policy == "dms":
        assert pages.stats.compression_ratio > 1.5


def test_the_plan_sizes_the_pool_for_the_expected_retained_tokens(llama_dms):
    cfg = llama_dms.config
    full = plan_inference(cfg, policy="full", max_len=16384, layout="paged")
    dms = plan_inference(cfg, policy="dms", max_len=16384, layout="paged", target_cr=8.0)
    slots = plan_inference(cfg, policy="dms", max_len=16384, target_cr=8.0)
    assert full.num_pages(4) == 4 * cfg.num_kv_heads * 16384 // 64
    # dms: (16384 - w - 1) / 8 x 1.1 retained + half a partly filled page, per stream
    assert dms.num_pages(4) == np.ceil(4 * cfg.num_kv_heads * ((16384 - WINDOW - 1) / 8 * 1.1 / 64 + 0.5))
    # the target: the whole pool at 8x <= 1/7 of full's K / V (the slots need 1.5x margin)
    assert dms.kv_bytes(4) <= full.kv_bytes(4) / 7 < slots.kv_bytes(4)
    assert dms.cache_bytes(4) < slots.cache_bytes(4) / 1.3
    for plan in (dms, full, slots):
        cache = kvcache.init_cache(plan, 2)
        assert kvcache.cache_stats(cache).allocated_bytes == plan.kv_bytes(2)
        assert sum(x.nbytes for x in jax.tree.leaves(cache)) == plan.cache_bytes(2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(policy="h2o", budget=8), "fixed slots"),
    (dict(capacity=16), "slot layout"),
    (dict(page_size=0), "page_size"),
    (dict(policy="full", pool_pages=3, page_size=4, max_len=40), "cannot hold one full row"),
    (dict(layout="pages"), "layout"),
])
def test_bad_paged_settings_are_refused_before_compute(llama_dms, kwargs, match):
    kw = dict(layout="paged", max_new_tokens=2)
    kw.update(kwargs)
    with pytest.raises(PlanError, match=match):
        generate(llama_dms, [[1, 2, 3]], **kw)


def check_sharded_pool(cache: paged.PagedLayerCache):
    """`check_pool` on every device's block: its rows and KV heads over its own pool."""
    sh = cache.shards
    n_rows = int(np.prod([sh.mesh.shape[a] for a in sh.rows]))
    n_heads = int(np.prod([sh.mesh.shape[a] for a in sh.heads]))
    batch, heads = cache.retained.shape
    rb, hb, pb = batch // n_rows, heads // n_heads, cache.num_pages // sh.count
    for r, h in np.ndindex(n_rows, n_heads):
        s = r * n_heads + h
        rows, hs, pool = slice(r * rb, (r + 1) * rb), slice(h * hb, (h + 1) * hb), slice(s * pb, (s + 1) * pb)
        check_pool(cache.replace(
            ring_pos=cache.ring_pos[rows, hs], page_table=cache.page_table[rows, hs],
            retained=cache.retained[rows, hs], pool_pos=cache.pool_pos[pool],
            free_pages=cache.free_pages[pool], num_free=cache.num_free[s], shards=None))


@pytest.mark.parametrize("policy", ["dms", "full"])
def test_a_pool_split_over_a_mesh_gives_the_one_device_run(llama_dms, policy):
    """Rows over data x fsdp, KV heads over tensor, each device its own pool: the same tokens,
    stats and held counts as one device, each device's pool consistent, then a continuation."""
    from dms_jax.sharding import make_mesh

    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 97, n).tolist() for n in (29, 7, 18, 23)]
    kw = dict(max_new_tokens=[10, 14, 6, 9], max_len=64, policy=policy, layout="paged", page_size=4,
              target_cr=1.0)
    one = run(llama_dms, prompts, **kw)
    mesh = make_mesh((2, 2, 2))
    split = run(llama_dms, prompts, mesh=mesh, **kw)
    assert split.sequences() == one.sequences()
    for name in ("held_tokens", "seen_tokens", "kv_reads_decode"):
        np.testing.assert_array_equal(getattr(split.stats, name), getattr(one.stats, name))
    assert split.stats.overflow == 0
    for c in split.state.cache:
        assert c.shards.count == 8 and c.num_free.shape == (8,)
        assert c.pool_keys.sharding.spec[0] == ("data", "fsdp", "tensor")
        check_sharded_pool(c)
    more = [[5, 6], [7], [8, 9, 10], [11]]
    np.testing.assert_array_equal(
        np.asarray(dms_jax.generate(llama_dms, more, max_new_tokens=3, state=split.state).tokens),
        np.asarray(dms_jax.generate(llama_dms, more, max_new_tokens=3, state=one.state).tokens))


def test_a_split_pool_releases_rows_per_device_and_refuses_row_moves(llama_dms):
    from dms_jax.sharding import make_mesh, shard_cache

    cfg = llama_dms.config
    plan = plan_inference(cfg, policy="full", max_len=32, layout="paged", page_size=4)
    mesh = make_mesh((4, 1, 2))
    cache = shard_cache(kvcache.init_cache(plan, 4, mesh=mesh), mesh)
    graphdef, params = nnx.split(llama_dms)
    ids = (np.arange(64, dtype=np.int32).reshape(4, 16) * 7) % 97
    _, _, cache = prefill_step(graphdef, params, cache, ids, np.ones(ids.shape, bool),
                               np.tile(np.arange(16, dtype=np.int32), (4, 1)),
                               jnp.zeros((4, cfg.hidden_size)), np.full(4, -1, np.int32), plan=plan)
    before = np.asarray(cache[0].num_free)
    released = paged.release_rows(cache[0], np.array([True, False, False, True]))
    gained = (np.asarray(released.num_free) - before).reshape(4, -1).sum(-1)  # per row block
    per_row = -(-15 // 4) * cfg.num_kv_heads
    np.testing.assert_array_equal(gained, [per_row, 0, 0, per_row])
    check_sharded_pool(released)
    with pytest.raises(ValueError, match="one pool per device"):
        paged.select_rows(cache[0], jnp.array([0]))


def test_sliding_window_models_keep_the_slot_layout(hf_model_dirs):
    model = dms_jax.from_pretrained(hf_model_dirs["mistral"])
    assert model.config.sliding_window is not None
    with pytest.raises(PlanError, match="sliding-window"):
        plan_inference(model.config, max_len=64, layout="paged")


def test_served_requests_equal_generate_alone_and_pages_come_back(llama_dms):
    from dms_jax.serve import Server

    rng = np.random.default_rng(14)
    requests = [(rng.integers(0, 97, n).tolist(), m) for n, m in
                ((12, 5), (3, 9), (25, 2), (7, 7), (18, 4), (5, 1))]
    # a pool for about two requests at a time: the rest wait, none is dropped
    server = Server(llama_dms, rows=3, max_len=32, page_size=4, target_cr=1.0,
                    pool_pages=2 * 8 * llama_dms.config.num_kv_heads, chunk_size=8)
    done = server.run(requests)
    assert sorted(c.request_id for c in done) == list(range(len(requests)))
    assert max(c.admitted_step for c in done) > 0  # some requests waited for pages
    for c in done:
        prompt, max_new = requests[c.request_id]
        alone = generate(llama_dms, [prompt], max_new_tokens=max_new, chunk_size=8, max_len=32,
                         capacity=32)
        assert c.tokens == alone.sequences()[0]
        assert c.overflow == 0 and c.seen == len(prompt) + max_new - 1
        assert c.held == int(alone.stats.held_tokens.sum())
        assert (c.kv_reads_prefill, c.kv_reads_decode) == (alone.stats.kv_reads_prefill,
                                                           alone.stats.kv_reads_decode)
    assert server.idle and server.reserved_pages == 0
    for c in server.cache:
        check_pool(c)
        assert int(c.num_free) == server.num_pages  # every page back


def test_admitted_prompts_are_prefilled_together_padding_rows_untouched(llama_dms):
    """Prompts admitted in one step go through one batched prefill, chunk by chunk, padded to a
    power of two with rows whose chunks are all padding (free rows, or a row mid-decode); a
    prompt leaves the batch after its last chunk; every request still gets the tokens
    `generate` gives it alone."""
    from dms_jax.serve import Server

    rng = np.random.default_rng(15)
    # four start together; three of them end at once while the fourth decodes on, so the next
    # three are prefilled with that row as padding
    requests = [(rng.integers(0, 97, n).tolist(), m) for n, m in
                ((25, 3), (4, 3), (13, 3), (9, 20), (21, 3), (2, 6), (17, 2))]
    plan = plan_inference(llama_dms.config, target_cr=1.0, max_len=32, chunk_size=8,
                          layout="paged", page_size=4)
    server = Server(llama_dms, rows=4, max_len=32, page_size=4, target_cr=1.0,
                    pool_pages=4 * plan.request_pages(32), chunk_size=8)
    batches = []
    pick = server._prefill_batch

    def record(going):
        rows = pick(going)
        batches.append((list(going), rows, [server.slot[b] is not None for b in rows]))
        return rows

    server._prefill_batch = record
    done = server.run(requests)
    assert sorted(c.request_id for c in done) == list(range(len(requests)))
    assert server.prefill_seconds > 0 and server.decode_seconds > 0  # where the time went
    # per chunk of 8 the prompts that reach it (then the first tokens' batch, as the first
    # chunk's): 25, 4, 13, 9 tokens, then 21, 2, 17 beside the row still decoding
    assert [len(g) for g, _, _ in batches] == [4, 3, 1, 1, 4, 3, 2, 2, 3]
    assert [len(r) for _, r, _ in batches] == [4, 4, 1, 1, 4, 4, 2, 2, 4]
    decoding = batches[0][1][3]  # the 9-token request's row: 20 new tokens
    assert batches[5][1][3] == decoding and batches[5][2] == [True] * 4  # mid-decode pad
    for c in done:
        prompt, max_new = requests[c.request_id]
        alone = generate(llama_dms, [prompt], max_new_tokens=max_new, chunk_size=8, max_len=32,
                         capacity=32)
        assert c.tokens == alone.sequences()[0]
        assert c.overflow == 0 and c.held == int(alone.stats.held_tokens.sum())
        assert (c.kv_reads_prefill, c.kv_reads_decode) == (alone.stats.kv_reads_prefill,
                                                           alone.stats.kv_reads_decode)
    for c in server.cache:
        check_pool(c)
        assert int(c.num_free) == server.num_pages


def test_sampled_serving_follows_its_key_through_the_compiled_step(llama_dms):
    """The decode step is compiled once and called as that executable; its key is split on the
    device, step after step: the same key serves the same tokens, another key others."""
    import jax

    from dms_jax.serve import Server

    rng = np.random.default_rng(16)
    requests = [(rng.integers(0, 97, n).tolist(), 12) for n in (9, 5, 14)]

    def serve(seed):
        server = Server(llama_dms, rows=3, max_len=32, page_size=4, target_cr=1.0,
                        chunk_size=8, temperature=1.0, key=jax.random.key(seed))
        done = server.run(requests)
        assert isinstance(server._decode_program, jax.stages.Compiled)
        return {c.request_id: c.tokens for c in done}

    first = serve(0)
    assert serve(0) == first
    assert serve(1) != first
    assert all(len(t) == 12 and all(0 <= x < 97 for x in t) for t in first.values())


def test_a_request_the_pool_can_never_hold_is_refused(llama_dms):
    from dms_jax.serve import Server, ServeError

    server = Server(llama_dms, rows=2, max_len=64, page_size=4, policy="full", pool_pages=20)
    with pytest.raises(ServeError, match="could never be admitted"):
        server.submit(list(range(50)), max_new_tokens=4)
    with pytest.raises(ServeError, match="max_len"):
        server.submit(list(range(60)), max_new_tokens=10)
    assert server.idle
