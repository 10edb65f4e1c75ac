"""Retrofit losses and the CR schedule (docs/dms.md section 7) against float64 numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dms_jax.train import losses, schedule

B, T, D, V = 2, 12, 8, 40


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    hs, ht = rng.standard_normal((2, B, T, D)).astype(np.float32)
    ws, wt = (rng.standard_normal((2, D, V)) * 0.7).astype(np.float32)
    mask = np.ones((B, T), np.float32)
    mask[1, 9:] = 0  # a padded tail
    return hs, ht, ws, wt, mask


@pytest.mark.parametrize("chunk", [1, 5, 12, 64])  # 5 does not divide T: padded chunk
def test_chunked_kl_matches_float64_reference(problem, chunk):
    hs, ht, ws, wt, mask = problem
    got = losses.distillation_kl(jnp.asarray(hs), jnp.asarray(ht), lambda h: h @ ws, lambda h: h @ wt,
                                 jnp.asarray(mask), chunk)
    ls = _np_log_softmax(hs.astype(np.float64) @ ws)
    lt = _np_log_softmax(ht.astype(np.float64) @ wt)
    want = (np.exp(ls) * (ls - lt)).sum(-1)  # KL(student || teacher) per token
    assert np.all(want >= 0)
    np.testing.assert_allclose(float(got), (want * mask).sum(), rtol=1e-5)


def test_chunked_kl_gradient_equals_dense_gradient(problem):
    hs, ht, ws, wt, mask = problem

    def dense(w):  # the whole [B, T, V] at once, written out plainly
        ps = jax.nn.softmax(hs @ w, -1)
        pt = jax.nn.softmax(ht @ wt, -1)
        return jnp.sum(mask * jnp.sum(ps * (jnp.log(ps) - jnp.log(pt)), -1))

    chunked = lambda w: losses.distillation_kl(hs, ht, lambda h: h @ w, lambda h: h @ wt, mask, 5)
    np.testing.assert_allclose(jax.grad(chunked)(ws), jax.grad(dense)(ws), rtol=1e-4, atol=1e-6)


def test_chunked_loss_never_holds_full_logits():
    """Compiled scratch memory of loss + gradient stays far below one [B, T, V] float32 array."""
    b, t, d, v = 2, 1024, 16, 4096
    hs = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    mask = jax.ShapeDtypeStruct((b, t), jnp.float32)

    def loss(w, hs, ht, mask):
        return losses.distillation_kl(hs, ht, lambda h: h @ w, lambda h: h @ w, mask, 128)

    compiled = jax.jit(jax.grad(loss)).lower(w, hs, hs, mask).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    full_logits = b * t * v * 4
    assert temp < full_logits / 2, (temp, full_logits)


def test_cross_entropy_next_token_with_masks():
    rng = np.random.default_rng(1)
    h = rng.standard_normal((B, T, D)).astype(np.float32)
    w = rng.standard_normal((D, V)).astype(np.float32)
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    attn = np.ones((B, T), np.int32)
    attn[0, 10:] = 0
    loss_mask = attn.copy()
    loss_mask[1, 4] = 0  # a document's last token: its successor belongs to the next document
    total, count = losses.language_model_ce(jnp.asarray(h), lambda x: x @ w, ids, loss_mask, attn, 5)
    logp = _np_log_softmax(h.astype(np.float64) @ w)
    want, n = 0.0, 0
    for b in range(B):
        for t in range(T - 1):
            if loss_mask[b, t] and attn[b, t + 1]:
                want -= logp[b, t, ids[b, t + 1]]
                n += 1
    assert int(count) == n
    np.testing.assert_allclose(float(total), want, rtol=1e-5)


def test_compression_loss_is_one_sided_mean_over_layers_heads_real_tokens():
    rng = np.random.default_rng(2)
    d = (rng.random((3, B, T, 2)) < 0.3).astype(np.float32)  # [L, B, T, Hkv]
    mask = np.ones((B, T), np.float32)
    mask[0, 7:] = 0
    d[:, 0, 7:] = 1.0  # decisions on padding must not count
    frac_ref = (d * mask[None, :, :, None]).sum() / (3 * 2 * mask.sum())
    loss, frac = losses.compression_loss(jnp.asarray(d), jnp.asarray(mask), 0.5)
    assert float(frac) == pytest.approx(frac_ref, rel=1e-6)
    assert float(loss) == pytest.approx(max(0.0, 0.5 - frac_ref), rel=1e-6)
    loss_low, _ = losses.compression_loss(jnp.asarray(d), jnp.asarray(mask), 0.1)
    assert float(loss_low) == 0.0  # one-sided: evicting more than asked is not penalised
    assert float(losses.achieved_compression(jnp.float32(0.75))) == pytest.approx(4.0)


def test_compression_loss_gradient_flows_through_straight_through_decisions():
    from dms_jax.ops import gating

    z = jnp.full((1, 1, 64, 2), -0.2)
    mask = jnp.ones((1, 64))

    def loss(z):
        _, _, hard = gating.gumbel_sigmoid(z, jax.random.key(0), 0.1)
        return losses.compression_loss(hard, mask, 0.9)[0]

    assert float(jnp.sum(jax.grad(loss)(z))) < 0  # raising z (more eviction) lowers the loss


def test_schedule_reference_recipe():
    cr = lambda s: float(schedule.compression_ratio(s, 1.0, 16.0, 510))
    assert cr(0) == 1.0
    assert cr(238) == pytest.approx(8.0, abs=0.01)  # "8x reached near step 238"
    assert cr(510) == 16.0 and cr(2000) == 16.0
    assert float(schedule.target_fraction(510, 1.0, 16.0, 510)) == pytest.approx(1 - 1 / 16)
    assert float(schedule.target_fraction(0, 1.0, 16.0, 510)) == 0.0
    assert float(schedule.compression_ratio(3, 2.0, 4.0, 0)) == 4.0
    # the same function under jit with a traced step
    assert float(jax.jit(lambda s: schedule.compression_ratio(s, 1.0, 16.0, 510))(255)) == pytest.approx(8.5)


@pytest.mark.parametrize("start,end", [(0.5, 8.0), (1.0, 0.9)])
def test_schedule_rejects_compression_below_one(start, end):
    with pytest.raises(ValueError, match="must be >= 1"):
        schedule.validate_schedule(start, end, 100)
