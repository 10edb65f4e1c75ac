"""DMS wired into the decoder: decision modes, initial no-op, the zeroed neuron, gradients."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dms_jax
from dms_jax import DMSConfig
from dms_jax.model import compression_ratio_from_decisions
from tests.compiled import reference_forward


def _ids(seed, shape=(2, 24)):
    return np.random.RandomState(seed).randint(0, 97, shape).astype(np.int32)


@pytest.fixture(scope="module")
def llama_dir(hf_model_dirs):
    return hf_model_dirs["llama"]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_adapter_at_init_equals_plain_model_exactly(hf_model_dirs, family):
    model = dms_jax.from_pretrained(hf_model_dirs[family], dms=DMSConfig(mode="adapter", window=3))
    ids = _ids(0)
    out, ratio = model.eval_forward(ids)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(model(ids)))
    assert float(out.decisions.max()) == 0.0  # z = -offset everywhere: nothing evicted
    np.testing.assert_allclose(np.asarray(out.decision_logits), -5.0)
    assert float(ratio) == pytest.approx(1.0)
    # training mode: the noise rarely crosses the offset (P = sigmoid(-5) ~ 0.7%)
    train = model.train_forward(ids, jax.random.key(0))
    assert float(train.decisions.mean()) < 0.03


def test_neuron_mode_differs_only_through_the_zeroed_neuron(hf_model_dirs, monkeypatch):
    """With a window covering the sequence nothing can be evicted, so neuron-mode DMS logits must
    equal transformers' logits for the same model with the decision neuron (component D-1 of the
    first query head of each group) zeroed before RoPE (its q_proj row) and after RoPE."""
    import torch
    from transformers.models.qwen2 import modeling_qwen2

    from tests import hf_models

    dms = DMSConfig(mode="neuron", window=64)
    path = hf_model_dirs["qwen2"]  # q bias too
    model = dms_jax.from_pretrained(path, dms=dms)
    ids = _ids(1)
    dms_logits = np.asarray(model.eval_forward(ids)[0].logits)
    assert np.abs(dms_logits - np.asarray(model(ids))).max() > 1e-4  # the neuron mattered

    cfg = model.config
    head_dim, group = cfg.head_dim, cfg.group_size
    rows = [h * group * head_dim + head_dim - 1 for h in range(cfg.num_kv_heads)]
    reference = hf_models.load_torch(path)
    with torch.no_grad():
        for layer in reference.model.layers:
            layer.self_attn.q_proj.weight[rows] = 0.0
            layer.self_attn.q_proj.bias[rows] = 0.0
    rope = modeling_qwen2.apply_rotary_pos_emb

    def rope_then_zero(q, k, cos, sin, *args, **kw):  # q: [B, H, T, D]
        q, k = rope(q, k, cos, sin, *args, **kw)
        q = q.clone()
        q[:, ::group, :, head_dim - 1] = 0.0
        return q, k

    monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", rope_then_zero)
    np.testing.assert_allclose(dms_logits, hf_models.torch_logits(reference, ids), atol=1e-5, rtol=0)


def test_neuron_decision_logits_come_from_the_first_head_of_each_group(hf_model_dirs):
    dms = DMSConfig(mode="neuron", window=4, scale=100.0, offset=5.0)
    model = dms_jax.from_pretrained(hf_model_dirs["llama"], dms=dms)
    ids = _ids(2, (1, 10))
    z = np.asarray(model.eval_forward(ids)[0].decision_logits)  # [L, B, T, Hkv]
    # independent recomputation of layer 0: q = input_norm(embed) @ Wq, component D-1 of heads 0, G
    cfg = model.config
    emb = np.asarray(model.embed.embedding[...])[ids[0]].astype(np.float64)
    scale = np.asarray(model.layers[0].input_norm.scale[...])
    x = emb / np.sqrt((emb ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * scale
    q = (x @ np.asarray(model.layers[0].attn.q_proj.kernel[...])).reshape(10, cfg.num_heads, cfg.head_dim)
    expected = 100.0 * q[:, :: cfg.group_size, -1] - 5.0
    np.testing.assert_allclose(z[0, 0], expected, atol=1e-3)


def test_per_layer_granularity_shares_head_zero(hf_model_dirs):
    model = dms_jax.from_pretrained(hf_model_dirs["llama"], dms=DMSConfig(mode="neuron", per="layer", window=2))
    out = model.train_forward(_ids(3), jax.random.key(1))
    d = np.asarray(out.decisions)
    np.testing.assert_array_equal(d, np.broadcast_to(d[..., :1], d.shape))


def _randomise_adapter(model, seed=0, scale=0.2):
    keys = jax.random.split(jax.random.key(seed), len(model.layers))
    for key, layer in zip(keys, model.layers):
        kernel = layer.attn.dms_proj.kernel
        kernel[...] = scale * jax.random.normal(key, kernel[...].shape)
    return model


def test_gradients_reach_the_decision_path(hf_model_dirs):
    model = _randomise_adapter(
        dms_jax.from_pretrained(hf_model_dirs["qwen3"], dms=DMSConfig(mode="adapter", window=2)))
    ids = _ids(4)
    is_decision = nnx.All(nnx.Param, nnx.PathContains("dms_proj"))

    def loss(m):
        out = m.train_forward(ids, jax.random.key(0))
        return jnp.mean(jax.nn.log_softmax(out.logits)[..., 0]) + out.decisions.mean()

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, is_decision))(model)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(float(jnp.abs(g).sum()) > 0 for g in leaves)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}
    assert names and all("dms_proj" in n for n in names)  # the frozen ones get no gradient


def test_eval_compression_ratio_matches_a_direct_count():
    rng = np.random.RandomState(0)
    num_layers, batch, seq, heads, window = 2, 3, 17, 2, 3
    decisions = (rng.rand(num_layers, batch, seq, heads) < 0.7).astype(np.float32)
    mask = np.ones((batch, seq), np.int32)
    mask[1, 12:] = 0  # right padding
    ratios = []
    for layer in range(num_layers):
        for b in range(batch):
            n = int(mask[b].sum())
            for h in range(heads):
                held = sum(1 for j in range(n) if n - 1 - j <= window or (j + 1 < n and decisions[layer, b, j + 1, h] == 0)
                           or j + 1 >= n)
                ratios.append(held / n)
    expected = 1.0 / np.mean(ratios)
    got = float(compression_ratio_from_decisions(jnp.asarray(decisions), mask, window,
                                                     sliding_window=None))
    assert got == pytest.approx(expected, rel=1e-6)


def test_modes_need_a_dms_model_and_a_key(hf_model_dirs):
    plain = dms_jax.from_pretrained(hf_model_dirs["llama"])
    with pytest.raises(ValueError, match="needs a DMS model"):
        plain.eval_forward(_ids(5))
    dms = dms_jax.from_pretrained(hf_model_dirs["llama"], dms=DMSConfig())
    with pytest.raises(ValueError, match="key"):
        dms.forward(_ids(5), mode="train")
    with pytest.raises(ValueError, match="mode="):
        dms.forward(_ids(5), mode="soft")
    with pytest.raises(ValueError, match="DMSConfig.window"):
        DMSConfig(window=-1)
    with pytest.raises(ValueError, match="DMSConfig.mode"):
        DMSConfig(mode="magic")


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_packed_documents_equal_documents_run_alone(hf_model_dirs, impl):
    """With segment_ids, each document of a packed row gets the logits (hard DMS evaluation) it
    gets alone: no attention across documents, and RoPE is relative so positions may run on."""
    model = dms_jax.from_pretrained(hf_model_dirs["qwen3"], dms=DMSConfig(window=2, offset=-2.0))
    rng = np.random.default_rng(12)
    docs = [rng.integers(0, 97, n) for n in (7, 12, 5)]
    packed = np.concatenate(docs)[None]
    segments = np.repeat(np.arange(3), [len(d) for d in docs])[None]
    packed_logits, _ = reference_forward(model, jnp.asarray(packed), jnp.asarray(segments),
                                         attention_impl=impl)
    start = 0
    for doc in docs:
        alone, _ = reference_forward(model, jnp.asarray(doc)[None], attention_impl=impl)
        np.testing.assert_allclose(np.asarray(packed_logits[0, start:start + len(doc)]),
                                   np.asarray(alone[0]), atol=1e-4, rtol=0)
        start += len(doc)
