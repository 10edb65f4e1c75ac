"""The inference plan (dms_jax.plan, docs/dms.md section 9): each rule decided once, tested
through `plan_inference`; the cache built from the plan alone (its bytes estimated exactly); the
model refusing a cache without its plan; the memory check. Model configs only: nothing compiles
here but one tiny cache."""
import ast
import math
import os

import jax
import numpy as np
import pytest

import dms_jax
from dms_jax import DMSConfig, ModelConfig
from dms_jax import cache as kvcache
from dms_jax.plan import (CacheTooLargeError, InferencePlan, PlanError, capacity_for,
                          check_memory, plan_inference)
from dms_jax.policies import get_policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=8)
PLAIN = ModelConfig(**SHAPE)
ADAPTER = ModelConfig(**SHAPE, dms=DMSConfig(mode="adapter", window=8))
NEURON = ModelConfig(**SHAPE, dms=DMSConfig(mode="neuron", window=8, target_cr=2.0))
MISTRAL = ModelConfig(**SHAPE, sliding_window=12, dms=DMSConfig(window=4))


def test_default_policy_is_dms_for_a_dms_model_else_full():
    assert plan_inference(ADAPTER, max_len=100).policy == get_policy("dms")
    assert plan_inference(PLAIN, max_len=100).policy == get_policy("full")


def test_a_policy_with_decisions_needs_a_dms_model():
    with pytest.raises(PlanError, match="needs a DMS model") as err:
        plan_inference(PLAIN, policy="dms", max_len=100)
    assert err.value.flag_message.startswith("--policy dms needs a DMS model")


def test_effective_window():
    assert plan_inference(ADAPTER, max_len=100).window == 8  # the model's
    assert plan_inference(ADAPTER, window=3, max_len=100).window == 3  # given
    assert plan_inference(ADAPTER, policy="full", window=3, max_len=100).window == 0  # no flags
    assert plan_inference(ADAPTER, policy="h2o", budget=16, max_len=100).window == 0
    for bad in (-1, 10 ** 12, 2.5, True):
        with pytest.raises(PlanError, match="window=") as err:
            plan_inference(ADAPTER, window=bad, max_len=100)
        assert "must be >= 0 and at most 2147483647" in str(err.value)


def test_mode_and_neuron_handling():
    assert plan_inference(ADAPTER, max_len=100).mode == "eval"
    assert plan_inference(ADAPTER, policy="full", max_len=100).mode == "plain"
    assert plan_inference(PLAIN, max_len=100).mode == "plain"
    # a neuron-mode model runs its retrofitted network (neuron zeroed) under every policy
    for policy, kw in (("full", {}), ("streaming", {"budget": 16}), ("dms", {})):
        plan = plan_inference(NEURON, policy=policy, max_len=100, **kw)
        assert plan.neuron and plan.mode == "eval"
    assert not plan_inference(ADAPTER, max_len=100).neuron


def test_scoring_policies_need_the_dense_cache_attention():
    with pytest.raises(PlanError, match="ranks tokens by the attention"):
        plan_inference(ADAPTER, policy="snapkv", budget=80, max_len=100, attention_impl="auto")
    assert plan_inference(ADAPTER, policy="tova", budget=16, max_len=100).attention_impl == "dense"
    with pytest.raises(PlanError, match="attention_impl='flash'"):
        plan_inference(ADAPTER, max_len=100, attention_impl="flash")


def test_policies_without_scores_read_only_the_live_slots_by_default():
    for policy, kw in (("full", {}), ("dms", {}), ("streaming", {"budget": 16})):
        # this suite runs on CPU: stream by stream in query tiles; an accelerator: blockwise
        assert plan_inference(ADAPTER, policy=policy, max_len=100, **kw).attention_impl == \
            "tiled"
        assert plan_inference(ADAPTER, policy=policy, max_len=100, attention_impl="auto",
                              **kw).attention_impl == "tiled"
        for platform in ("tpu", "gpu"):
            assert plan_inference(ADAPTER, policy=policy, max_len=100, platform=platform,
                                  **kw).attention_impl == "blockwise"
        assert plan_inference(ADAPTER, policy=policy, max_len=100, attention_impl="blockwise",
                              **kw).attention_impl == "blockwise"
        assert plan_inference(ADAPTER, policy=policy, max_len=100, attention_impl="dense",
                              **kw).attention_impl == "dense"
    for policy in ("h2o", "tova", "snapkv"):
        assert plan_inference(ADAPTER, policy=policy, budget=80, max_len=100).attention_impl == \
            "dense"


def test_allocated_length_buckets():
    # quarter octaves: at most 25% above the asked length, 64 at least
    for asked, alloc in ((1, 64), (64, 64), (65, 80), (100, 112), (1000, 1024), (1025, 1280),
                         (5000, 5120)):
        assert plan_inference(PLAIN, max_len=asked).max_len == alloc
    assert plan_inference(PLAIN, max_len=2 ** 31 - 1).max_len == 2 ** 31 - 1
    for bad, match in ((None, "max_len .* is required"), (0, "max_len=0"), (2 ** 31, "max_len="),
                       (10.0, "max_len=10.0")):
        with pytest.raises(PlanError, match=match):
            plan_inference(PLAIN, max_len=bad)


def test_capacity_rules():
    # dms: sized for the allocated length at the model's recorded CR, else 8, with the margin
    assert plan_inference(NEURON, max_len=1000).capacity == capacity_for(1024, 8, 2.0, 0.5)
    assert plan_inference(ADAPTER, max_len=1000).capacity == capacity_for(1024, 8, 8.0, 0.5)
    assert capacity_for(1024, 8, 8.0, 0.5) == math.ceil((1024 - 9) / 8 * 1.5) + 9
    assert plan_inference(ADAPTER, max_len=1000, target_cr=4.0, margin=0.0).capacity == \
        math.ceil((1024 - 9) / 4) + 9
    # full and given capacities: the allocated length at most
    assert plan_inference(PLAIN, max_len=1000).capacity == 1024
    assert plan_inference(ADAPTER, capacity=5000, max_len=1000).capacity == 1024
    assert plan_inference(ADAPTER, capacity=300, max_len=1000).capacity == 300
    # capacity >= window + 1 for dms, unless it holds every token of the rows
    with pytest.raises(PlanError, match="window \\+ 1 = 9") as err:
        plan_inference(ADAPTER, capacity=8, max_len=100)
    assert err.value.flag_message.startswith("--capacity 8 cannot hold the DMS window")
    with pytest.raises(PlanError, match="budget=4 cannot hold the DMS window"):
        plan_inference(ADAPTER, budget=4, max_len=100)
    assert plan_inference(ADAPTER, capacity=6, max_len=6).capacity == 6
    assert plan_inference(ADAPTER, policy="full", capacity=4, max_len=100).capacity == 4
    # the baselines need a budget that holds their rule
    with pytest.raises(PlanError, match="evicts down to a budget") as err:
        plan_inference(ADAPTER, policy="h2o", max_len=100)
    assert (err.value.field, err.value.value) == ("budget", None)
    with pytest.raises(ValueError, match="4 sinks"):
        plan_inference(ADAPTER, policy="streaming", budget=3, max_len=100)
    with pytest.raises(PlanError, match="not both"):
        plan_inference(ADAPTER, capacity=16, budget=16, max_len=100)
    for field in ("capacity", "budget"):
        with pytest.raises(PlanError, match=f"{field}=0 must be a positive integer"):
            plan_inference(ADAPTER, max_len=100, **{field: 0})


@pytest.mark.parametrize("kw, match", [
    (dict(target_cr=math.inf), "target_cr=inf must be a finite number >= 1"),
    (dict(target_cr=math.nan), "target_cr=nan must be a finite number >= 1"),
    (dict(target_cr=0.5), "target_cr=0.5"),
    (dict(margin=math.nan), "margin=nan must be a finite number >= 0"),
    (dict(margin=-0.1), "margin=-0.1"),
    (dict(chunk_size=0), "chunk_size=0 must be a positive integer"),
])
def test_settings_refused_with_clear_errors(kw, match):
    with pytest.raises(PlanError, match=match):
        plan_inference(ADAPTER, max_len=100, **kw)


def test_plan_is_frozen_hashable_and_equal_for_equal_settings():
    a = plan_inference(ADAPTER, max_len=100)
    assert a == plan_inference(ADAPTER, max_len=101)  # the same bucket, the same plan
    assert hash(a) == hash(plan_inference(ADAPTER, max_len=101))
    assert a != plan_inference(ADAPTER, max_len=100, window=3)
    with pytest.raises(AttributeError):
        a.window = 3
    assert a.sliding_window is None and plan_inference(MISTRAL, max_len=100).sliding_window == 12


def test_cache_comes_from_the_plan_alone_and_its_bytes_are_estimated_exactly():
    for cfg, kw in ((ADAPTER, {}), (ADAPTER.replace(dtype="bfloat16"), {"policy": "full"}),
                    (ADAPTER, {"policy": "h2o", "budget": 20})):
        plan = plan_inference(cfg, max_len=100, **kw)
        cache = kvcache.init_cache(plan, 3)
        assert len(cache) == plan.num_layers
        assert cache[0].keys.shape == (3, plan.num_kv_heads, plan.capacity, plan.head_dim)
        assert cache[0].keys.dtype == np.dtype(cfg.dtype)
        assert plan.cache_bytes(3) == sum(x.nbytes for x in jax.tree.leaves(cache))


def test_memory_check_refuses_what_cannot_fit_and_says_how_much():
    huge = plan_inference(NEURON, max_len=10 ** 9)
    with pytest.raises(CacheTooLargeError) as err:
        check_memory(huge, 1, available=8 * 2 ** 30)
    message = str(err.value)
    assert "the KV cache needs" in message and "GiB" in message and "8.0 GiB" in message
    assert f"{huge.capacity} slots" in message and "lower max_len" in message
    assert "--max-len" in err.value.flag_message
    small = plan_inference(NEURON, max_len=100)
    need = check_memory(small, 2, available=2 ** 30)
    assert small.cache_bytes(2) < need < 2 ** 30
    with pytest.raises(CacheTooLargeError):
        check_memory(small, 2, available=need - 1)
    check_memory(small, 2)  # the machine's own available memory


def test_model_takes_its_settings_from_the_plan_and_imports_no_policy():
    model = dms_jax.Decoder(ADAPTER, rngs=__import__("flax").nnx.Rngs(0))
    plan = plan_inference(ADAPTER, max_len=16)
    cache = kvcache.init_cache(plan, 1)
    ids = np.ones((1, 2), np.int32)
    with pytest.raises(ValueError, match="needs the plan it was built for"):
        model.forward(ids, cache=cache)
    with pytest.raises(ValueError, match="window=3: with a KV cache the plan decides"):
        model.forward(ids, cache=cache, plan=plan, window=3)
    with pytest.raises(ValueError, match="made for another model"):
        model.forward(ids, cache=cache, plan=plan_inference(MISTRAL, max_len=16))
    with pytest.raises(ValueError, match="pass cache="):
        model.forward(ids, plan=plan)
    out = model.forward(ids, cache=cache, plan=plan, return_logits=False)
    assert int(out.cache[0].seen[0]) == 2
    # the model module reads policies only through the plan
    tree = ast.parse(open(os.path.join(REPO, "dms_jax", "model.py")).read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "dms_jax.policies" not in imported and "dms_jax.cache" in imported


def test_plan_is_an_inference_plan_with_every_decision():
    plan = plan_inference(NEURON, policy="streaming", budget=16, max_len=100, chunk_size=32)
    assert isinstance(plan, InferencePlan)
    assert (plan.policy, plan.window, plan.mode, plan.neuron, plan.attention_impl,
            plan.max_len, plan.capacity, plan.chunk_size) == (
        get_policy("streaming"), 0, "eval", True, "tiled", 112, 16, 32)
    derived = plan.derive(get_policy("dms"))
    assert (derived.window, derived.mode, derived.capacity) == (0, "eval", 16)


def test_profiler_regions_are_named():
    """A profile of a cached forward reads by name: embed, each layer's attention (its KV cache
    step: flags, attend, evict, store) and mlp, final_norm, unembed."""
    import re

    from flax import nnx

    model = dms_jax.Decoder(ADAPTER, rngs=nnx.Rngs(0))
    plan = plan_inference(ADAPTER, max_len=16)
    graphdef, params = nnx.split(model)

    def forward(params, cache, ids):
        out = nnx.merge(graphdef, params).forward(ids, cache=cache, plan=plan)
        return out.logits, out.cache

    text = jax.jit(forward).lower(params, kvcache.init_cache(plan, 1),
                                  np.ones((1, 3), np.int32)).as_text(debug_info=True)
    scopes = {m for name in re.findall(r'loc\("jit\(forward\)/([^"]*)"', text)
              for m in [name.rsplit("/", 1)[0]]}
    for layer in range(ADAPTER.num_layers):
        for part in ("flags", "attend", "evict", "store"):
            assert any(s.startswith(f"layer_{layer}/attention/kv_cache/{part}") for s in scopes)
        assert any(s.startswith(f"layer_{layer}/mlp") for s in scopes), sorted(scopes)
    for top in ("embed", "final_norm", "unembed"):
        assert any(s.startswith(top) for s in scopes), sorted(scopes)
