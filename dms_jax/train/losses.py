"""Retrofit and language-model losses (docs/dms.md section 7), chunked over the sequence.

The vocabulary projection is applied one sequence chunk at a time inside a rematerialised
`lax.scan`, so neither the forward nor the backward pass ever holds the [B, T, V] logits of the
student or the teacher: only [B, C, V] for one chunk C at a time.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def kl_divergence(student_logits, teacher_logits):
    """KL(student || teacher) = sum_v p_s (log p_s - log p_t).  [..., V] x2 -> [...] float32."""
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(log_ps) * (log_ps - log_pt), axis=-1)


def cross_entropy(logits, targets):
    """-log softmax(logits)[target].  logits [..., V], targets int [...] -> [...] float32."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def _chunks(x, chunk: int):
    """[B, T, ...] -> [T / C, B, C, ...] after zero-padding T up to a multiple of C."""
    batch, seq = x.shape[:2]
    pad = (-seq) % chunk
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(batch, (seq + pad) // chunk, chunk, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1)


def chunked_sum(token_fn: Callable, inputs: tuple, weights, chunk: int):
    """sum_{b,t} weights[b, t] * token_fn(*chunk_of_inputs)[b, t], one sequence chunk at a time.

    inputs: arrays [B, T, ...]; weights [B, T]; token_fn maps [B, C, ...] chunks to [B, C].
    The body is rematerialised, so the backward pass recomputes each chunk's logits instead of
    storing them.
    """
    seq = weights.shape[1]
    chunk = max(1, min(int(chunk), seq))
    xs = tuple(_chunks(x, chunk) for x in inputs) + (_chunks(weights.astype(jnp.float32), chunk),)

    @jax.checkpoint
    def body(total, chunk_inputs):
        *args, w = chunk_inputs
        return total + jnp.sum(token_fn(*args) * w), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total


def distillation_kl(student_hidden, teacher_hidden, student_unembed, teacher_unembed, weights,
                    chunk: int):
    """Sum over tokens of weights * KL(student || teacher), never holding full logits.

    student_hidden, teacher_hidden: [B, T, d] (after the final norm); weights [B, T] (1 = a real
    token); *_unembed: hidden [B, C, d] -> logits [B, C, V] float32. The teacher gets no gradient.
    """

    def token_kl(h_s, h_t):
        logits_s = student_unembed(h_s)
        logits_t = jax.lax.stop_gradient(teacher_unembed(h_t))
        return kl_divergence(logits_s, logits_t)

    return chunked_sum(token_kl, (student_hidden, jax.lax.stop_gradient(teacher_hidden)), weights, chunk)


def language_model_ce(hidden, unembed, input_ids, loss_mask, attention_mask, chunk: int):
    """Next-token cross-entropy summed over counted positions; returns (sum, count).

    Position t predicts input_ids[t + 1]; it counts when loss_mask[t] and attention_mask[t + 1]
    (the last position of a row never counts).
    """
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    next_real = jnp.concatenate([attention_mask[:, 1:], jnp.zeros_like(attention_mask[:, :1])], axis=1)
    weights = (loss_mask * next_real).astype(jnp.float32)

    def token_ce(h, tgt):
        return cross_entropy(unembed(h), tgt)

    return chunked_sum(token_ce, (hidden, targets), weights, chunk), jnp.sum(weights)


def eviction_fraction(decisions, mask):
    """mean(d) over layers, KV heads and non-padding tokens.  decisions [L, B, T, Hkv], mask [B, T]."""
    mask = mask.astype(jnp.float32)
    num_layers, _, _, heads = decisions.shape
    total = jnp.sum(decisions.astype(jnp.float32) * mask[None, :, :, None])
    return total / (num_layers * heads * jnp.maximum(jnp.sum(mask), 1.0))


def compression_loss(decisions, mask, target):
    """One-sided L_dms = max(0, target - frac) on straight-through hard decisions; (loss, frac)."""
    frac = eviction_fraction(decisions, mask)
    return jnp.maximum(0.0, target - frac), frac


def achieved_compression(frac):
    """Logged training CR = 1 / (1 - mean hard decision) (docs/dms.md section 6)."""
    return 1.0 / jnp.maximum(1.0 - frac, 1e-6)
