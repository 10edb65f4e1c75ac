"""benchmarks/serve.py and benchmarks/capacity.py at a seconds scale, in this process on the tiny
shape of benchmarks/vs_transformers.py.

Checks what their tables rest on (never timings): the served stream completes every request
without overflow on the same pool for both systems, and DMS admits more rows on it; the capacity
bisection finds the largest batch whose cache fits, and a run at that batch allocates exactly
the accounted bytes, within the budget, without overflow.
"""
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return load("vs_transformers").build_hf_model("tiny", str(tmp_path_factory.mktemp("tiny")))


def test_serve_benchmark_completes_the_stream_on_one_pool(model_dir):
    import dms_jax
    from dms_jax.plan import plan_inference

    serve = load("serve")
    job = dict(model_dir=model_dir, context=128, requests=3, new_tokens=2, full_rows=2,
               max_rows=8, window=8, page_size=8, chunk=32)
    dms = serve.run_system(dict(job, system="dms4"))
    assert dms["requests"] == 3 and dms["tokens"] == 6
    full = plan_inference(dms_jax.from_pretrained(model_dir).config, policy="full",
                          layout="paged", max_len=128 + 2, page_size=8)
    assert dms["pool_pages"] == 2 * full.request_pages(128 + 2)  # the pool of two full rows
    assert dms["rows"] > 2  # DMS admits more requests at once on it
    assert dms["cr"] > 1.5
    # the keys read, which the work count rests on: under `full` a query at position p reads
    # p + 1 keys in each layer and KV head, as a prompt token and as a decode step
    cfg = dms_jax.from_pretrained(model_dir).config
    full_run = serve.run_system(dict(job, system="full"))
    lengths = [len(p) for p, _ in serve.requests_for(cfg.vocab_size, 3, 128, 2)]
    causal = sum(n * (n + 1) // 2 + sum(n + j + 1 for j in range(2 - 1)) for n in lengths)
    assert full_run["kv_reads"] == causal * cfg.num_layers * cfg.num_kv_heads
    assert full_run["gflop"] > dms["gflop"] > 0  # fewer keys read, the same tokens
    # the work count, written out for `full`: per prompt of n tokens, every layer's q / k / v
    # projections for every token, the other layers' o_proj and MLP, the last token's o_proj,
    # MLP and unembedding, attention over (L - 1) of the L layers' causal keys; per decode step
    # (one here) every layer and the unembedding, attention over position + 1 keys
    d, f, D, L = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_layers
    H, K, V = cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size
    proj, rest, out = 2 * d * (H + 2 * K) * D, 2 * H * D * d + 6 * d * f, 2 * d * V
    per_key = 4 * D * (H // K) * K  # each KV head's G query heads, every KV head
    prefill = sum(n * (L * proj + (L - 1) * rest) + rest + out
                  + per_key * (L - 1) * n * (n + 1) // 2 for n in lengths)
    decode = sum(L * (proj + rest) + out + per_key * L * (n + 1) for n in lengths)
    assert full_run["prefill_gflop"] == pytest.approx(prefill / 1e9, rel=1e-12)
    assert full_run["decode_gflop"] == pytest.approx(decode / 1e9, rel=1e-12)


def test_capacity_bisection_and_a_confirming_run(model_dir):
    import dms_jax

    capacity = load("capacity")
    cfg = dms_jax.from_pretrained(model_dir).config
    budget = 2 ** 20
    for system in capacity.SYSTEMS:
        plan = capacity.plan_for(cfg, system, 512, window=16, page_size=16)
        batch = capacity.largest_batch(plan, budget)
        assert plan.cache_bytes(batch) <= budget < plan.cache_bytes(batch + 1)
    plan = capacity.plan_for(cfg, "full-paged", 512, window=16, page_size=16)
    full = capacity.largest_batch(plan, budget)
    dms = capacity.largest_batch(capacity.plan_for(cfg, "dms8-paged", 512, window=16,
                                                   page_size=16), budget)
    assert dms > 3 * full
    ran = capacity.confirm(model_dir, "full-paged", 128, 2, budget, window=16, page_size=16,
                           new_tokens=2)
    small = capacity.plan_for(cfg, "full-paged", 128, window=16, page_size=16)
    assert ran["fits"] and ran["overflow"] == 0 and ran["cache_bytes"] == small.cache_bytes(2)
    # a smaller margin sizes a smaller pool per request, so more rows fit
    tight = capacity.largest_batch(capacity.plan_for(cfg, "dms8-paged", 512, window=16,
                                                     page_size=16, margin=0.0), budget)
    assert tight > dms
