"""Blockwise (flash-style) DMS training attention against an independent float64 torch reference
of docs/dms.md sections 3-4, values and gradients; the shift by one and the window edge pinned by
hand; no [T, T] buffer in the compiled forward+backward at T = 8192."""
import functools
import re

import jax

jax.config.update("jax_default_matmul_precision", "highest")  # also set by conftest.py

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from dms_jax.ops import gating  # noqa: E402
from dms_jax.ops.attention import dense_attention  # noqa: E402
from dms_jax.ops.blockwise import blockwise_attention, causal_blockwise_attention  # noqa: E402

# ------------------------------------------------------------------------------------------------
# The reference: the rule of docs/dms.md section 4 written out plainly in torch float64 (autograd for the gradients).


def reference_attention(q, k, v, q_pos, k_pos, *, window, zt=None, d=None, k_valid=None,
                        sliding_window=None, segments=None):
    """q [B,T,H,D], k/v [B,T,Hkv,D] float64 tensors; q_pos/k_pos int [B,T].

    zt [B,T,Hkv] (soft: key j outside the window gets log(1 - sigmoid(zt[j+1])) added) or
    d [B,T,Hkv] bool (hard: key j outside the window is invisible iff d[j+1]). The last key has no
    decision (nothing added). A query that sees no key outputs 0.
    """
    batch, seq, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    dist = q_pos[:, :, None] - k_pos[:, None, :]  # [B, Tq, Tk]: i - j
    visible = dist >= 0
    if k_valid is not None:
        visible = visible & k_valid[:, None, :]
    if sliding_window is not None:
        visible = visible & (dist < sliding_window)
    if segments is not None:  # packed documents: a key is visible only from its own document
        visible = visible & (segments[:, :, None] == segments[:, None, :])
    outside = (dist > window)[:, None]  # [B, 1, Tq, Tk]
    visible = visible[:, None].expand(batch, num_heads, seq, seq).clone()  # [B, H, Tq, Tk]
    k_h = k.repeat_interleave(group, dim=2)  # query head h reads KV head h // group
    v_h = v.repeat_interleave(group, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k_h) / head_dim ** 0.5
    if zt is not None:
        per_key = torch.zeros_like(zt)
        per_key[:, :-1] = torch.nn.functional.logsigmoid(-zt[:, 1:])  # decision j+1 -> key j
        per_key = per_key.repeat_interleave(group, dim=2).permute(0, 2, 1)[:, :, None, :]
        logits = logits + torch.where(outside, per_key, torch.zeros_like(per_key))
    if d is not None:
        evicted = torch.zeros_like(d)
        evicted[:, :-1] = d[:, 1:]  # decision j+1 -> key j
        evicted = evicted.repeat_interleave(group, dim=2).permute(0, 2, 1)[:, :, None, :]
        visible = visible & ~(outside & evicted)
    any_visible = visible.any(-1, keepdim=True)  # [B, H, Tq, 1]
    logits = torch.where(visible, logits, torch.tensor(-torch.inf, dtype=logits.dtype))
    logits = torch.where(any_visible, logits, torch.zeros_like(logits))
    probs = torch.softmax(logits, -1) * any_visible
    return torch.einsum("bhqk,bkhd->bqhd", probs, v_h)


# ------------------------------------------------------------------------------------------------
# Fixed shape buckets (each compiles once); the data, decisions, padding and positions vary.

CASES = {
    # name: (B, T, H, Hkv, D, window, block_q, block_k, sliding_window)
    "G2_T37_w5_bq16_bk8": (2, 37, 4, 2, 8, 5, 16, 8, None),  # no block size divides T
    "G4_T64_w0_b16": (1, 64, 4, 1, 8, 0, 16, 16, None),  # window 0
    "G1_T24_w30_bq8_bk16": (2, 24, 2, 2, 8, 30, 8, 16, None),  # window >= T: nothing evictable
    "G2_T40_w3_sliding12": (2, 40, 4, 2, 8, 3, 16, 16, 12),  # Mistral sliding window too
}


def _draw(case, seed, padded):
    batch, seq, num_heads, num_kv, head_dim = case[:5]
    rng = np.random.RandomState(seed)
    data = dict(
        q=rng.randn(batch, seq, num_heads, head_dim),
        k=rng.randn(batch, seq, num_kv, head_dim),
        v=rng.randn(batch, seq, num_kv, head_dim),
        cot=rng.randn(batch, seq, num_heads, head_dim),
        # zt = (z + noise) / tau: wide logits, some saturating
        zt=rng.randn(batch, seq, num_kv) * rng.choice([1.0, 5.0, 40.0]),
        d=rng.rand(batch, seq, num_kv) < rng.uniform(0.2, 0.9),
        pos=np.tile(np.arange(seq), (batch, 1)),
        k_valid=np.ones((batch, seq), bool),
    )
    if padded:  # left padding (queries that see nothing), right padding, arbitrary positions
        for b in range(batch):
            left, right = rng.randint(0, seq // 3), rng.randint(0, seq // 3)
            data["k_valid"][b, :left] = False
            data["k_valid"][b, seq - right:] = False
            data["pos"][b] = rng.permutation(seq) + rng.randint(-5, 50)
    return data


def _loss(out, cot):
    return jnp.sum(out.astype(jnp.float32) * cot)


@functools.lru_cache(maxsize=None)
def _soft_grad_fn(case_name):
    _, _, _, _, _, window, block_q, block_k, sliding = CASES[case_name]

    def loss(q, k, v, zt, pos, k_valid, cot):
        evict_bias = jnp.swapaxes(gating.soft_evict_bias(zt), 1, 2)  # [B, Hkv, T]
        out = blockwise_attention(q, k, v, q_pos=pos, k_pos=pos, evict_bias=evict_bias,
                                  window=window, k_valid=k_valid, sliding_window=sliding,
                                  block_q=block_q, block_k=block_k)
        return _loss(out, cot), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


@functools.lru_cache(maxsize=None)
def _hard_grad_fn(case_name):
    _, _, _, _, _, window, block_q, block_k, sliding = CASES[case_name]

    def loss(q, k, v, d, pos, k_valid, cot):
        evict_bias = jnp.swapaxes(gating.hard_evict_bias_from_decisions(d), 1, 2)
        out = blockwise_attention(q, k, v, q_pos=pos, k_pos=pos, evict_bias=evict_bias,
                                  window=window, k_valid=k_valid, sliding_window=sliding,
                                  block_q=block_q, block_k=block_k)
        return _loss(out, cot), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _torch_reference(case, data, mode):
    t = {name: torch.tensor(data[name], dtype=torch.float64, requires_grad=True)
         for name in ("q", "k", "v", "zt")}
    pos = torch.tensor(data["pos"])
    out = reference_attention(
        t["q"], t["k"], t["v"], pos, pos, window=case[5], k_valid=torch.tensor(data["k_valid"]),
        sliding_window=case[8], zt=t["zt"] if mode == "soft" else None,
        d=torch.tensor(data["d"]) if mode == "hard" else None,
    )
    (out * torch.tensor(data["cot"])).sum().backward()
    grads = [t[n].grad.numpy() if t[n].grad is not None else None for n in ("q", "k", "v", "zt")]
    return out.detach().numpy(), grads


def _assert_close(actual, expected, what, tol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.all(np.isfinite(actual)), what
    err = np.max(np.abs(actual - expected)) / max(1.0, np.max(np.abs(expected)))
    assert err <= tol, f"{what}: max error {err:.3g} (relative to max(1, |ref|)) > {tol}"


def _jax_inputs(data):
    f32 = lambda name: jnp.asarray(data[name], jnp.float32)  # noqa: E731
    return f32("q"), f32("k"), f32("v"), jnp.asarray(data["pos"], jnp.int32), \
        jnp.asarray(data["k_valid"]), f32("cot")


@pytest.mark.parametrize("case_name", list(CASES))
@settings(max_examples=3, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2 ** 31 - 1), padded=st.booleans())
def test_soft_mask_values_and_gradients_match_reference(case_name, seed, padded):
    case = CASES[case_name]
    data = _draw(case, seed, padded)
    q, k, v, pos, k_valid, cot = _jax_inputs(data)
    zt = jnp.asarray(data["zt"], jnp.float32)
    (_, out), grads = _soft_grad_fn(case_name)(q, k, v, zt, pos, k_valid, cot)
    ref_out, ref_grads = _torch_reference(case, data, "soft")
    _assert_close(out, ref_out, "out")
    for name, got, want in zip(("dq", "dk", "dv", "dzt"), grads, ref_grads):
        _assert_close(got, want, name)


@pytest.mark.parametrize("case_name", list(CASES))
@settings(max_examples=2, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2 ** 31 - 1), padded=st.booleans())
def test_hard_mask_values_and_gradients_match_reference(case_name, seed, padded):
    case = CASES[case_name]
    data = _draw(case, seed, padded)
    q, k, v, pos, k_valid, cot = _jax_inputs(data)
    (_, out), grads = _hard_grad_fn(case_name)(q, k, v, jnp.asarray(data["d"]), pos, k_valid, cot)
    ref_out, ref_grads = _torch_reference(case, data, "hard")
    _assert_close(out, ref_out, "out")
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads[:3]):
        _assert_close(got, want, name)


# ------------------------------------------------------------------------------------------------
# The shift by one and the window edge, written out by hand.

PIN_T, PIN_W, EVICT_DECISION = 12, 3, 6  # the decision at token 6 evicts token 5


def _expected_visibility():
    """Visible (i, j): causal, except key 5 for queries with i - 5 > 3, i.e. i >= 9."""
    visible = np.tril(np.ones((PIN_T, PIN_T), bool))
    visible[9:, EVICT_DECISION - 1] = False
    return visible


def _probe(evict_bias):
    """With q = 0 every visible key gets the same weight; v = identity reads the weights back.
    returns the [T, T] attention weights."""
    q = jnp.zeros((1, PIN_T, 1, PIN_T), jnp.float32)
    v = jnp.eye(PIN_T, dtype=jnp.float32)[None, :, None, :]
    pos = jnp.arange(PIN_T)[None]
    out = blockwise_attention(q, q, v, q_pos=pos, k_pos=pos, evict_bias=evict_bias, window=PIN_W,
                              block_q=4, block_k=4)
    return np.asarray(out[0, :, 0, :])


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_shift_by_one_and_window_edge(mode):
    if mode == "hard":
        d = jnp.zeros((1, PIN_T, 1), bool).at[0, EVICT_DECISION, 0].set(True)
        bias = gating.hard_evict_bias_from_decisions(d)
    else:  # alpha[6] ~ 1 (log(1-alpha) = -80), every other alpha ~ 0
        zt = jnp.full((1, PIN_T, 1), -80.0).at[0, EVICT_DECISION, 0].set(80.0)
        bias = gating.soft_evict_bias(zt)
    weights = _probe(jnp.swapaxes(bias, 1, 2))
    visible = _expected_visibility()
    expected = visible / visible.sum(-1, keepdims=True)
    np.testing.assert_allclose(weights, expected, atol=1e-6)
    assert weights[8, 5] > 0.1  # i - j == w: still visible
    assert weights[9, 5] < 1e-12  # i - j == w + 1: evicted
    assert weights[11, 6] > 0.05  # the token carrying the decision is not the one evicted


def test_packed_documents_values_and_gradients_match_reference():
    """segment_ids: a query sees only keys of its own document (soft mask, blocks that do not
    divide T, documents that straddle blocks), values and gradients."""
    rng = np.random.RandomState(11)
    batch, seq, heads, kv, dim, window = 2, 23, 4, 2, 8, 3
    q, k, v = (rng.randn(batch, seq, h, dim) for h in (heads, kv, kv))
    zt = 2 * rng.randn(batch, seq, kv)
    segments = np.stack([np.repeat([0, 1, 2], [9, 5, 9]), np.repeat([0, 1], [4, 19])])
    pos = np.broadcast_to(np.arange(seq), (batch, seq))
    weights = rng.randn(batch, seq, heads, dim)

    def ours(q, k, v, zt):
        bias = jnp.swapaxes(gating.soft_evict_bias(zt), 1, 2)
        out = blockwise_attention(q, k, v, q_pos=pos, k_pos=pos, evict_bias=bias, window=window,
                                  segment_ids=jnp.asarray(segments), block_q=5, block_k=7)
        dense = dense_attention(q, k, v, q_pos=pos, k_pos=pos, evict_bias=bias, window=window,
                                segment_ids=jnp.asarray(segments))
        return jnp.sum(out * weights), out, dense

    args = [jnp.asarray(a, jnp.float32) for a in (q, k, v, zt)]
    _, out, dense = ours(*args)
    grads = jax.grad(lambda *a: ours(*a)[0], argnums=(0, 1, 2, 3))(*args)
    t_args = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v, zt)]
    want = reference_attention(*t_args[:3], torch.tensor(pos), torch.tensor(pos), window=window,
                               zt=t_args[3], segments=torch.tensor(segments))
    (want * torch.tensor(weights)).sum().backward()
    np.testing.assert_allclose(np.asarray(out), want.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(dense), want.detach().numpy(), atol=1e-5)
    for g, t in zip(grads, t_args):
        np.testing.assert_allclose(np.asarray(g), t.grad.numpy(), atol=1e-5)


def test_causal_baseline_is_dense_causal():
    rng = np.random.RandomState(3)
    q = jnp.asarray(rng.randn(1, 20, 4, 8), jnp.float32)
    k, v = (jnp.asarray(rng.randn(1, 20, 2, 8), jnp.float32) for _ in range(2))
    pos = jnp.arange(20)[None]
    got = causal_blockwise_attention(q, k, v, q_pos=pos, k_pos=pos, block_q=8, block_k=8)
    want = dense_attention(q, k, v, q_pos=pos, k_pos=pos)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_bfloat16_inputs_accumulate_in_float32():
    case = CASES["G2_T37_w5_bq16_bk8"]
    data = _draw(case, 11, False)
    q, k, v, pos, k_valid, cot = _jax_inputs(data)
    zt = jnp.asarray(data["zt"], jnp.float32)
    bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    (_, out), grads = _soft_grad_fn("G2_T37_w5_bq16_bk8")(bf(q), bf(k), bf(v), zt, pos, k_valid, cot)
    assert out.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
    assert grads[3].dtype == jnp.float32
    ref_out, ref_grads = _torch_reference(case, data, "soft")
    _assert_close(out, ref_out, "out bf16", tol=3e-2)
    _assert_close(grads[3], ref_grads[3], "dzt bf16", tol=5e-2)


# ------------------------------------------------------------------------------------------------
# Memory: the compiled forward+backward never holds a [T, T] buffer.

_SHAPE = re.compile(r"\b(?:pred|[suf]\d+|bf16)\[([0-9,]*)\]")


def _has_square_buffer(hlo_text, seq):
    return any(dims.split(",").count(str(seq)) >= 2 for dims in _SHAPE.findall(hlo_text))


def _compiled_grad_text(attention, seq):
    batch, num_heads, num_kv, head_dim = 1, 2, 1, 16
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))

    def loss(q, k, v, zt):
        evict_bias = jnp.swapaxes(gating.soft_evict_bias(zt), 1, 2)
        return jnp.sum(attention(q, k, v, q_pos=pos, k_pos=pos, evict_bias=evict_bias, window=512))

    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    args = (f32(batch, seq, num_heads, head_dim), f32(batch, seq, num_kv, head_dim),
            f32(batch, seq, num_kv, head_dim), f32(batch, seq, num_kv))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile().as_text()


def test_no_quadratic_buffer_at_8k():
    seq = 8192
    blockwise = functools.partial(blockwise_attention, block_q=512, block_k=512)
    assert not _has_square_buffer(_compiled_grad_text(blockwise, seq), seq)
    assert _has_square_buffer(_compiled_grad_text(dense_attention, seq), seq)  # the regex works
