"""benchmarks/vs_transformers.py at a seconds scale: its workers in this process on its tiny shape.

Checks what its table rests on (never its timings): dms_jax `full` decodes the same greedy
tokens as transformers from the same weights, the forced decisions reach the asked flag rate,
and the dms caches are smaller than the full one.
"""
import importlib.util
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    spec = importlib.util.spec_from_file_location(
        "vs_transformers", os.path.join(REPO, "benchmarks", "vs_transformers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model_dir = module.build_hf_model("tiny", str(tmp_path_factory.mktemp("tiny")))
    return module, model_dir


def test_full_matches_transformers_and_dms_holds_less(bench):
    module, model_dir = bench
    job = dict(model_dir=model_dir, context=96, batch=2, new_tokens=3, window=16, chunk=32)
    ref = module.run_transformers(dict(job, system="transformers"))
    full = module.run_dms_jax(dict(job, system="full"))
    assert full["tokens"] == ref["tokens"]  # greedy, 1 + 3 tokens per row
    assert ref["kv_bytes"] == 2 * 2 * 2 * (96 + 3) * 2 * 16 * 4  # L, B, Hkv, tokens, K+V, D, f32
    for system in ("dms4", "dms8"):
        dms = module.run_dms_jax(dict(job, system=system))
        assert dms["cr"] > 1.5 and dms["kv_bytes"] < full["kv_bytes"]
        assert dms["overflow"] >= 0  # reported (a tiny model's heads vary; the table shows it)


@pytest.mark.parametrize("cr", [4, 8])
def test_forced_decisions_reach_the_flag_rate(bench, cr):
    import dms_jax
    from dms_jax import DMSConfig

    module, model_dir = bench
    model = dms_jax.from_pretrained(model_dir, dms=DMSConfig(mode="adapter", window=16,
                                                             scale=100.0, offset=-1.0))
    prompt = module.prompts_for(model.config.vocab_size, 1, 256, seed=7)
    rate = module.force_flag_rate(model, prompt, 1.0 - 1.0 / cr)
    assert rate == pytest.approx(1.0 - 1.0 / cr, abs=0.01)
    out, _ = model.eval_forward(np.asarray(prompt))
    per_head = (np.asarray(out.decisions) > 0).mean(axis=(1, 2))  # [L, Hkv]
    np.testing.assert_allclose(per_head, 1.0 - 1.0 / cr, atol=0.02)
