"""dms_jax.generate against independent references.

* teacher-forced chunked prefill + one-token steps through the engine's jitted `prefill_step`
  == the full-sequence hard-mask evaluation forward (DMS decisions randomised so most tokens are
  flagged), mixed lengths, chunks that do not divide the prompts, windows wrapped many times;
* greedy `generate` == argmax of the evaluation forward over what it generated (the decode loop);
* `full` == the plain forward and == transformers' greedy `generate`;
* a row in a mixed batch == the row alone; a continuation == one run over the whole history;
* stats == direct counts; sampling filters; stop tokens and per-row lengths; bad input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import dms_jax
from dms_jax import DMSConfig
from dms_jax import cache as kvcache
from dms_jax.generate import Sampling, generate, prefill_step, sample_logits
from dms_jax.model import compression_ratio_from_decisions
from dms_jax.plan import plan_inference
from tests import hf_models
from tests.compiled import reference_forward

WINDOW = 3


def randomised_dms_model(model_dir, *, window=WINDOW, seed=0):
    """Adapter-mode DMS model whose decision weights are random: most tokens get flagged."""
    model = dms_jax.from_pretrained(model_dir, dms=DMSConfig(mode="adapter", window=window,
                                                             offset=-4.0))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        k = layer.attn.dms_proj.kernel
        k[...] = jnp.asarray(0.01 * rng.standard_normal(k.shape), k.dtype)
    return model


@pytest.fixture(scope="module")
def llama_dms(hf_model_dirs):
    return randomised_dms_model(hf_model_dirs["llama"])


def eval_logits_alone(model, row):
    """Full-sequence hard-mask evaluation of one row -> (logits [T, V], decisions [L, T, Hkv])."""
    logits, decisions = reference_forward(model, jnp.asarray(row)[None], attention_impl="dense")
    return np.asarray(logits[0]), np.asarray(decisions[:, 0])


def teacher_forced(model, rows, prompt_lens, chunk, policy="dms", layout="slots"):
    """Prompts in right-padded chunks of `chunk`, then the rest of each row one token per step,
    all through `prefill_step` over one cache (slots holding every token, or pages of 4 tokens
    in a pool for every token). returns logits per row [T_b, V]."""
    cfg = model.config
    graphdef, params = nnx.split(model)
    batch, max_len = len(rows), max(len(r) for r in rows)
    sizing = (dict(capacity=max_len) if layout == "slots"
              else dict(layout="paged", page_size=4, target_cr=1.0))
    plan = plan_inference(cfg, policy=policy, max_len=max_len, **sizing)
    cache = kvcache.init_cache(plan, batch)
    logits = [np.full((len(r), cfg.vocab_size), np.nan, np.float32) for r in rows]
    done = np.zeros(batch, int)
    last_hidden = jnp.zeros((batch, cfg.hidden_size))

    def run(width, take):
        nonlocal cache, last_hidden
        ids = np.zeros((batch, width), np.int32)
        valid = np.zeros((batch, width), bool)
        for b, r in enumerate(rows):
            n = take(b)
            ids[b, :n], valid[b, :n] = r[done[b]:done[b] + n], True
        pos = (done[:, None] + np.arange(width)).astype(np.int32)
        hidden, last_hidden, cache = prefill_step(
            graphdef, params, cache, ids, valid, pos, last_hidden,
            np.full(batch, -1, np.int32), plan=plan)
        lg = np.asarray(model.unembed(hidden))
        for b in range(batch):
            n = int(valid[b].sum())
            logits[b][done[b]:done[b] + n] = lg[b, :n]
            done[b] += n

    while (done < prompt_lens).any():
        run(chunk, lambda b: min(chunk, prompt_lens[b] - done[b]))
    while (done < [len(r) for r in rows]).any():
        run(1, lambda b: int(done[b] < len(rows[b])))
    return logits, cache


@pytest.mark.parametrize("layout", ["slots", "paged"])
def test_teacher_forced_prefill_and_decode_equal_hard_eval(llama_dms, layout):
    rng = np.random.default_rng(1)
    lengths, prompt_lens = [37, 21, 30], np.array([23, 9, 30])
    rows = [rng.integers(0, 97, n) for n in lengths]
    got, cache = teacher_forced(llama_dms, rows, prompt_lens, chunk=7, layout=layout)
    flagged = []
    for b, r in enumerate(rows):
        want, decisions = eval_logits_alone(llama_dms, r)
        np.testing.assert_allclose(got[b], want, atol=1e-4, rtol=0)
        flagged.append(decisions[:, 1:].mean())
    assert 0.5 <= np.mean(flagged) <= 0.9, flagged  # the rule is really exercised
    # held tokens == the section-5 count from the same decisions, row by row
    for b, r in enumerate(rows):
        _, decisions = eval_logits_alone(llama_dms, r)
        flags = np.zeros_like(decisions, bool)
        flags[:, :-1] = decisions[:, 1:] > 0.5
        n = len(r)
        in_window = (n - 1 - np.arange(n)) <= WINDOW
        want_held = (in_window[None, :, None] | ~flags).sum(axis=1)  # [L, Hkv]
        held = np.stack([np.asarray(c.held[b]) for c in cache])
        np.testing.assert_array_equal(held, want_held)


def test_sliding_window_model_teacher_forced(hf_model_dirs):
    model = randomised_dms_model(hf_model_dirs["mistral"], window=2, seed=3)
    rng = np.random.default_rng(2)
    rows = [rng.integers(0, 97, n) for n in (19, 12)]
    got, _ = teacher_forced(model, rows, np.array([11, 5]), chunk=4)
    for b, r in enumerate(rows):
        np.testing.assert_allclose(got[b], eval_logits_alone(model, r)[0], atol=1e-4, rtol=0)


def test_greedy_generate_follows_hard_eval_and_counts_cr(llama_dms):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 97, n).tolist() for n in (17, 6, 25)]
    out = generate(llama_dms, prompts, max_new_tokens=12, chunk_size=8, capacity=64, max_len=64)
    assert out.stats.overflow == 0
    ratios = []
    for b, p in enumerate(prompts):
        gen = out.sequences()[b]
        assert len(gen) == 12
        seq = np.asarray(p + gen)
        logits, _ = eval_logits_alone(llama_dms, seq)
        np.testing.assert_array_equal(logits[len(p) - 1:-1].argmax(-1), gen)
        fed = seq[:-1]  # the last token is pending, not in the cache
        _, decisions = reference_forward(llama_dms, jnp.asarray(fed)[None])
        ratios.append(float(compression_ratio_from_decisions(decisions, None, WINDOW,
                                                               sliding_window=None)))
        assert out.stats.seen_tokens[b] == len(fed)
    # per-row CR from the decisions == the stats' per-row held / seen (direct count)
    held = out.stats.held_tokens  # [L, B, Hkv]
    per_row = 1 / (held / out.stats.seen_tokens[None, :, None]).mean(axis=(0, 2))
    np.testing.assert_allclose(per_row, ratios, rtol=1e-6)
    cfg = llama_dms.config
    token_bytes = 2 * cfg.head_dim * 4
    assert out.stats.held_kv_bytes == held.sum() * token_bytes
    assert out.stats.allocated_kv_bytes == cfg.num_layers * 3 * cfg.num_kv_heads * 64 * token_bytes
    assert out.stats.compression_ratio > 1.5
    assert out.stats.kv_reads_decode > 0 and out.stats.kv_reads_prefill > 0


def test_full_policy_equals_plain_forward_and_transformers(hf_model_dirs):
    model = dms_jax.from_pretrained(hf_model_dirs["qwen3"])
    prompt = np.random.default_rng(4).integers(0, 97, 13)
    out = generate(model, [prompt.tolist()], max_new_tokens=10, chunk_size=5)
    assert out.stats.policy == "full" and out.stats.compression_ratio == 1.0
    gen = out.sequences()[0]
    seq = np.concatenate([prompt, gen])
    plain = np.asarray(model(jnp.asarray(seq)[None])[0])
    np.testing.assert_array_equal(plain[len(prompt) - 1:-1].argmax(-1), gen)
    ref = hf_models.load_torch(hf_model_dirs["qwen3"])
    with torch.no_grad():
        want = ref.generate(torch.tensor(prompt)[None], max_new_tokens=10, do_sample=False,
                            pad_token_id=0)[0, len(prompt):].tolist()
    assert gen == want


def test_mixed_batch_rows_equal_rows_alone(llama_dms):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 97, n).tolist() for n in (3, 26, 11)]
    kw = dict(max_new_tokens=[9, 4, 7], chunk_size=8, capacity=40, max_len=40)
    batch = generate(llama_dms, prompts, **kw)
    np.testing.assert_array_equal(batch.lengths, [9, 4, 7])
    for b, p in enumerate(prompts):
        alone = generate(llama_dms, [p], chunk_size=8, capacity=40, max_len=40,
                         max_new_tokens=kw["max_new_tokens"][b])
        assert alone.sequences()[0] == batch.sequences()[b]
        np.testing.assert_array_equal(alone.stats.held_tokens[:, 0],
                                      batch.stats.held_tokens[:, b])


def test_continuation_equals_one_run_over_the_history(llama_dms):
    rng = np.random.default_rng(6)
    turn1 = [rng.integers(0, 97, n).tolist() for n in (10, 15)]
    turn2 = [rng.integers(0, 97, n).tolist() for n in (6, 3)]
    first = generate(llama_dms, turn1, max_new_tokens=5, chunk_size=4, capacity=60, max_len=60)
    second = generate(llama_dms, turn2, state=first.state, max_new_tokens=6, chunk_size=4)
    whole = [t1 + g + t2 for t1, g, t2 in zip(turn1, first.sequences(), turn2)]
    once = generate(llama_dms, whole, max_new_tokens=6, chunk_size=4, capacity=60, max_len=60)
    assert second.sequences() == once.sequences()
    np.testing.assert_array_equal(second.stats.held_tokens, once.stats.held_tokens)
    np.testing.assert_array_equal(second.stats.seen_tokens, [len(w) + 5 for w in whole])
    with pytest.raises(ValueError, match="max_len"):
        generate(llama_dms, turn2, state=second.state, max_new_tokens=40)


def test_stop_tokens_per_row_lengths_and_streaming(llama_dms):
    prompts = [[5, 6, 7, 8], [9, 10]]
    free = generate(llama_dms, prompts, max_new_tokens=8)
    stop = free.sequences()[0][2]  # the third token of row 0 becomes a stop token
    chunks = []
    out = generate(llama_dms, prompts, max_new_tokens=8, stop_tokens=[stop], decode_segment=3,
                   on_tokens=chunks.append)
    row0 = out.sequences()[0]
    assert row0 == free.sequences()[0][:row0.index(stop) + 1]
    streamed = np.concatenate(chunks, axis=1)
    np.testing.assert_array_equal(streamed, out.tokens[:, :streamed.shape[1]])
    assert (out.tokens[0, len(row0):] == -1).all()


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    key = jax.random.key(0)
    greedy = sample_logits(logits, key, Sampling())
    assert (greedy == 0).all()
    assert (sample_logits(logits, key, Sampling(1.0, top_k=1)) == 0).all()
    assert (sample_logits(logits, key, Sampling(1.0, top_p=0.4)) == 0).all()
    two = np.asarray(sample_logits(logits, key, Sampling(1.0, top_p=0.7)))
    assert set(two.tolist()) == {0, 1}
    np.testing.assert_allclose((two == 0).mean(), 0.5 / 0.8, atol=0.03)
    three = np.asarray(sample_logits(logits, key, Sampling(1.0, top_k=3)))
    assert set(three.tolist()) == {0, 1, 2}
    free = np.asarray(sample_logits(logits, key, Sampling(1.0)))
    np.testing.assert_allclose(np.bincount(free, minlength=4) / len(free),
                               [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_sampled_generation_is_reproducible(llama_dms):
    kw = dict(max_new_tokens=6, temperature=0.8, top_k=20, top_p=0.9)
    a = generate(llama_dms, [[1, 2, 3]], key=jax.random.key(7), **kw)
    b = generate(llama_dms, [[1, 2, 3]], key=jax.random.key(7), **kw)
    assert a.sequences() == b.sequences()


def test_overflow_is_reported_and_strict_raises(llama_dms):
    prompt = [np.arange(40).tolist()]
    out = generate(llama_dms, prompt, max_new_tokens=2, capacity=WINDOW + 2)
    assert out.stats.overflow > 0
    with pytest.raises(kvcache.CacheOverflowError, match="overflow"):
        generate(llama_dms, prompt, max_new_tokens=2, capacity=WINDOW + 2, strict=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[[]]), "empty"),
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=[[1, 2, 300]]), r"\[0, 97\)"),
    (dict(prompts=[[1, 2, 3]], max_len=3, max_new_tokens=2), "max_len"),
    (dict(prompts=[[1, 2, 3]], capacity=WINDOW), "window"),
    (dict(prompts=[[1, 2, 3]], policy="nope"), "unknown policy"),
    (dict(prompts=[[1, 2, 3]], window=-1), "window"),
    (dict(prompts=[[1, 2, 3]], target_cr=0.5), "target_cr"),
    (dict(prompts=[[1, 2, 3]], temperature=1.0), "key"),
    (dict(prompts=[[1, 2, 3]], top_p=0.0), "top_p"),
    (dict(prompts=[[1, 2, 3]], stop_tokens=[500]), "stop token"),
    (dict(prompts=[[1, 2, 3]], chunk_size=0), "chunk_size"),
    (dict(prompts=[[1, 2, 3]], max_new_tokens=-1), "max_new_tokens"),
    (dict(prompts=[[1.5, 2.0]]), r"token ids must be integers, got float64 .*\[1\.5, 2\.0\]"),
    (dict(prompts=[[1, 2], [3.0]]), r"prompt 1: token ids must be integers"),
    (dict(prompts=np.array([[1.5, 2.0]])), "input_ids must be integers"),
    (dict(prompts=[[1, 2, 3]], max_new_tokens=2.5), "max_new_tokens=2.5 must be an integer"),
    (dict(prompts=[[1, 2, 3]], target_cr=float("inf")), "target_cr=inf must be a finite number"),
    (dict(prompts=[[1, 2, 3]], margin=float("nan")), "margin=nan must be a finite number"),
    (dict(prompts=[[1, 2, 3]], window=10 ** 12), r"window=1000000000000 must be >= 0 and at most"),
    (dict(prompts=[[1, 2, 3]], max_len=10 ** 9), "the KV cache needs"),
])
def test_bad_input_raises_before_compute(llama_dms, kwargs, match):
    prompts = kwargs.pop("prompts")
    with pytest.raises(ValueError, match=match):
        generate(llama_dms, prompts, **kwargs)


def test_eval_forward_and_the_cache_report_one_cr_with_a_sliding_window(hf_model_dirs):
    """Mistral (sliding window 7), DMS window 2: keys beyond the sliding window are held by no
    cache, and the evaluation forward no longer counts them either (docs/dms.md section 6)."""
    model = randomised_dms_model(hf_model_dirs["mistral"], window=2, seed=3)
    assert model.config.sliding_window == 7
    row = np.random.default_rng(12).integers(0, 97, 40)
    _, eval_cr = model.eval_forward(jnp.asarray(row)[None], attention_mask=np.ones((1, 40)))
    out = generate(model, [row.tolist()], max_new_tokens=0, chunk_size=8, capacity=40,
                   max_len=40)
    assert out.stats.overflow == 0 and out.stats.seen_tokens.tolist() == [40]
    assert (out.stats.held_tokens <= 7).all()  # nothing beyond the sliding window is held
    assert float(eval_cr) == pytest.approx(out.stats.compression_ratio, rel=1e-6)
    assert out.stats.compression_ratio >= 40 / 7
    # the held count by hand: the last query (39) sees 33..39 at most, the window 37..39 always
    _, decisions = eval_logits_alone(model, row)
    flags = np.zeros_like(decisions, bool)
    flags[:, :-1] = decisions[:, 1:] > 0.5
    j = np.arange(40)
    held = ((39 - j < 7)[None, :, None] & ((39 - j <= 2)[None, :, None] | ~flags)).sum(axis=1)
    assert float(eval_cr) == pytest.approx(1 / np.mean(held / 40), rel=1e-6)


def test_prefill_progress_moves_chunk_by_chunk(llama_dms):
    calls = []
    generate(llama_dms, [np.arange(40).tolist()], max_new_tokens=1, chunk_size=8, capacity=64,
             max_len=64, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 40)] + [(n, 40) for n in (8, 16, 24, 32, 40)]


def test_a_mesh_too_big_for_the_cpu_says_how_to_simulate_devices():
    from dms_jax import sharding as shd

    with pytest.raises(shd.MeshError,
                       match="XLA_FLAGS=--xla_force_host_platform_device_count=16"):
        shd.make_mesh((16, 1, 1))


def test_dms_policy_needs_a_dms_model(hf_model_dirs):
    plain = dms_jax.from_pretrained(hf_model_dirs["llama"])
    with pytest.raises(ValueError, match="needs a DMS model"):
        generate(plain, [[1, 2]], policy="dms")


def test_sharded_generation_on_a_mesh_equals_one_device(llama_dms):
    """Parameters by the rules table, cache rows over (data, fsdp), KV heads over tensor: the
    same tokens and cache figures as on one device (8 simulated CPU devices, conftest.py)."""
    from dms_jax import sharding as shd

    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, 97, n).tolist() for n in (19, 7, 30, 12)]
    mesh = shd.make_mesh((2, 2, 2))
    for kw in (dict(policy="dms", capacity=48, max_len=48), dict(policy="h2o", budget=12)):
        one = generate(llama_dms, prompts, max_new_tokens=6, chunk_size=8, **kw)
        many = generate(llama_dms, prompts, max_new_tokens=6, chunk_size=8, mesh=mesh, **kw)
        assert many.sequences() == one.sequences()
        np.testing.assert_array_equal(many.stats.held_tokens, one.stats.held_tokens)
        spec = many.state.cache[0].keys.sharding.spec
        assert spec[0] == ("data", "fsdp") and spec[1] == "tensor"


def test_nearby_shapes_and_sampling_values_reuse_compiled_programs(llama_dms):
    from dms_jax.generate import decode_loop

    rng = np.random.default_rng(9)
    kw = dict(temperature=0.7, top_p=0.9, key=jax.random.key(0))
    generate(llama_dms, [rng.integers(0, 97, 40).tolist()], max_new_tokens=10, **kw)
    programs = (prefill_step._cache_size(), decode_loop._cache_size())
    for n, new, temp in ((41, 11, 0.71), (43, 12, 0.9)):  # lengths, token counts, temperatures
        generate(llama_dms, [rng.integers(0, 97, n).tolist()], max_new_tokens=new,
                 **{**kw, "temperature": temp})
    assert (prefill_step._cache_size(), decode_loop._cache_size()) == programs


def test_neuron_mode_policies_run_the_retrofitted_network(hf_model_dirs):
    """`full` on a neuron-mode DMS model == DMS with nothing evicted (window >= length): both
    zero the decision neuron; the plain (teacher) network would not."""
    model = dms_jax.from_pretrained(hf_model_dirs["llama"], dms=DMSConfig(mode="neuron", window=4))
    prompt = np.random.default_rng(10).integers(0, 97, 20).tolist()
    full = generate(model, [prompt], max_new_tokens=6, policy="full")
    kept = generate(model, [prompt], max_new_tokens=6, policy="dms", window=100)
    assert kept.stats.compression_ratio == 1.0
    assert full.sequences() == kept.sequences()


def test_state_use_empty_turns_and_strict_keep_the_output(llama_dms):
    first = generate(llama_dms, [[1, 2, 3], [4, 5]], max_new_tokens=3, max_len=32)
    more = generate(llama_dms, [[], [6]], state=first.state, max_new_tokens=2)  # row 0: go on
    whole = [[1, 2, 3] + first.sequences()[0], [4, 5] + first.sequences()[1] + [6]]
    once = generate(llama_dms, whole, max_new_tokens=2, max_len=32)
    assert more.sequences() == once.sequences()
    with pytest.raises(ValueError, match="already continued"):
        generate(llama_dms, [[7], [8]], state=first.state)
    with pytest.raises(ValueError, match="decode_segment"):
        generate(llama_dms, [[1]], decode_segment=0)
    with pytest.raises(ValueError, match="3 values for 2 prompts"):
        generate(llama_dms, [[1], [2]], max_new_tokens=[1, 2, 3])
    with pytest.raises(kvcache.CacheOverflowError) as err:
        generate(llama_dms, [np.arange(40).tolist()], max_new_tokens=2, capacity=WINDOW + 2,
                 strict=True)
    assert len(err.value.output.sequences()[0]) == 2  # the tokens are not lost


@pytest.mark.parametrize("last_only", [False, True])
@pytest.mark.parametrize("layout, attention", [("slots", "tiled"), ("slots", "blockwise"),
                                               ("paged", "tiled")])
def test_prefill_step_writes_the_donated_cache_in_place(llama_dms, layout, attention, last_only):
    """A prefill chunk's compiled program copies none of the cache's key / value buffers: the
    chunk attends over the donated cache and then stores into it in place (its store depends on
    the attention, `dms_jax.cache.ordered_after`; without that XLA copied every K / V buffer
    twice per chunk, ~20% of a 4k prefill on one core)."""
    cfg = llama_dms.config
    sizing = (dict(capacity=64) if layout == "slots"
              else dict(layout="paged", page_size=4, target_cr=1.0))
    plan = plan_inference(cfg, policy="dms", max_len=64, attention_impl=attention, **sizing)
    batch, chunk = 2, 8
    cache = kvcache.init_cache(plan, batch)
    graphdef, params = nnx.split(llama_dms)
    text = prefill_step.lower(
        graphdef, params, cache, jnp.zeros((batch, chunk), jnp.int32),
        jnp.ones((batch, chunk), bool), jnp.zeros((batch, chunk), jnp.int32),
        jnp.zeros((batch, cfg.hidden_size)), jnp.full((batch,), -1, jnp.int32),
        plan=plan, last_only=last_only).compile().as_text()
    big = [leaf for leaf in jax.tree.leaves(cache[0]) if leaf.ndim >= 3 and leaf.shape[-1] ==
           cfg.head_dim]  # keys and values (slots), ring and pool (pages)
    assert len(big) >= 2
    shapes = {"f32[" + ",".join(map(str, leaf.shape)) + "]" for leaf in big}
    copies = [line.strip() for line in text.splitlines()
              if " copy(" in line and any(line.split("=", 1)[1].strip().startswith(s)
                                          for s in shapes)]
    assert not copies, copies[:4]
    # RoPE's tables are evaluated once per chunk (`layers.rope_tables`), not again inside every
    # fusion that applies them to a layer's queries or keys
    assert sum(" cosine(" in line for line in text.splitlines()) == 1
    assert sum(" sine(" in line for line in text.splitlines()) == 1


def prefill_chunks(model, rows, plan, chunk, *, last_only):
    """Every row's prompt through `prefill_step` in chunks of `chunk`, each chunk telling the
    step where the row's last token lies (as `generate` does). returns (last_hidden, cache)."""
    graphdef, params = nnx.split(model)
    batch, longest = len(rows), max(len(r) for r in rows)
    cache = kvcache.init_cache(plan, batch)
    last_hidden = jnp.zeros((batch, model.config.hidden_size))
    last = np.asarray([len(r) - 1 for r in rows])
    for lo in range(0, longest, chunk):
        ids = np.zeros((batch, chunk), np.int32)
        valid = np.zeros((batch, chunk), bool)
        for b, r in enumerate(rows):
            part = r[lo:lo + chunk]
            ids[b, :len(part)], valid[b, :len(part)] = part, True
        pos = np.broadcast_to(lo + np.arange(chunk, dtype=np.int32), (batch, chunk))
        index = np.where((last >= lo) & (last < lo + chunk), last - lo, -1).astype(np.int32)
        hidden, last_hidden, cache = prefill_step(graphdef, params, cache, ids, valid, pos,
                                                  last_hidden, index, plan=plan,
                                                  last_only=last_only)
        assert hidden.shape[1] == (1 if last_only else chunk)
    return np.asarray(last_hidden), cache


@pytest.mark.parametrize("layout, attention, policy", [
    ("slots", "tiled", "dms"), ("paged", "tiled", "full"), ("slots", "blockwise", "full"),
    ("slots", "blockwise", "dms"), ("paged", "blockwise", "dms"), ("slots", "fused", "dms")])
def test_last_only_prefill_keeps_the_cache_stats_and_last_hidden(llama_dms, hf_model_dirs,
                                                                  policy, layout, attention):
    """`prefill_step(last_only=True)` (the last layer attends and runs its MLP for each row's
    last prompt token only) leaves the same cache, the same keys-read count of every query and
    the same last hidden state as the step computing every token's output; rows whose prompts
    end in different chunks, one empty row; the unrolled layers and the scanned ones. The
    blockwise (accelerator) plans count the keys of every stream at once (`tiled_seen`'s
    at_once), the tiled ones stream by stream."""
    rng = np.random.default_rng(11)
    rows = [rng.integers(0, 97, n) for n in (29, 7, 0, 18)]
    if policy == "dms":
        scanned = dms_jax.from_pretrained(hf_model_dirs["llama"], dms=DMSConfig(
            mode="adapter", window=WINDOW, offset=-4.0), scan_layers=True)
        kernel = scanned.layers.attn.dms_proj.kernel  # [L, d, Hkv]: the same random decisions
        kernel[...] = jnp.stack([layer.attn.dms_proj.kernel[...] for layer in llama_dms.layers])
    # the scanned layers (the last one run after the scan) with the dms policy on each layout
    for model in (llama_dms, scanned) if policy == "dms" else (llama_dms,):
        sizing = (dict(capacity=32) if layout == "slots"
                  else dict(layout="paged", page_size=4, target_cr=1.0))
        plan = plan_inference(model.config, policy=policy, max_len=32, attention_impl=attention,
                              **sizing)
        want_hidden, want = prefill_chunks(model, rows, plan, 8, last_only=False)
        got_hidden, got = prefill_chunks(model, rows, plan, 8, last_only=True)
        real = [b for b, r in enumerate(rows) if len(r)]
        np.testing.assert_allclose(got_hidden[real], want_hidden[real], atol=2e-5, rtol=1e-5)
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        reads = np.asarray(kvcache.cache_stats(list(got)).kv_reads)
        assert reads.sum() > 0


@pytest.mark.parametrize("policy", ["dms", "full"])
def test_a_fused_plan_generates_what_the_blockwise_one_does(llama_dms, policy):
    """attention_impl="fused" (the experimental Pallas prefill kernel, here in Pallas'
    interpreter) through `generate`: the same greedy tokens, held tokens and keys read as the
    blockwise plan's; prompts of different lengths ending in different chunks. The paged layout
    refuses it."""
    rng = np.random.default_rng(17)
    prompts = [rng.integers(0, 97, n).tolist() for n in (21, 6, 14)]
    kw = dict(max_new_tokens=5, policy=policy, chunk_size=8, max_len=32)
    want = generate(llama_dms, prompts, attention_impl="blockwise", **kw)
    got = generate(llama_dms, prompts, attention_impl="fused", **kw)
    assert got.sequences() == want.sequences()
    np.testing.assert_array_equal(got.stats.held_tokens, want.stats.held_tokens)
    assert got.stats.kv_reads_prefill == want.stats.kv_reads_prefill > 0
    from dms_jax.plan import PlanError

    with pytest.raises(PlanError, match="slot layout only"):
        generate(llama_dms, prompts, attention_impl="fused", layout="paged", **kw)
