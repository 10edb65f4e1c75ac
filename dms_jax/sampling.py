"""Choosing the next token: greedy, temperature, top-k and top-p (nucleus) sampling."""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0: greedy (top_k / top_p ignored).

    top_k: keep the k most likely tokens (0: all); top_p: keep the smallest set whose probability
    reaches p (1.0: all). Both filters apply before sampling at `temperature`.
    A pytree: temperature and top_p are traced values (a new value compiles nothing); greedy,
    top_k and whether a nucleus filter applies are static (part of the compiled program).
    """

    temperature: Any = 0.0
    top_k: int = 0
    top_p: Any = 1.0

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)):
            return  # rebuilt from traced leaves (checked when it was made)
        check_sampling(self.temperature, self.top_k, self.top_p)

    @property
    def greedy(self) -> bool:
        flags = self.__dict__.get("_flags")
        return flags[0] if flags else self.temperature == 0.0

    @property
    def nucleus(self) -> bool:
        flags = self.__dict__.get("_flags")
        return flags[1] if flags else self.top_p < 1.0

    def tree_flatten(self):
        return (self.temperature, self.top_p), (self.top_k, self.greedy, self.nucleus)

    @classmethod
    def tree_unflatten(cls, static, leaves):
        obj = object.__new__(cls)
        for name, value in (("temperature", leaves[0]), ("top_p", leaves[1]),
                            ("top_k", static[0]), ("_flags", static[1:])):
            object.__setattr__(obj, name, value)
        return obj


def _keyword(field, value):
    return f"{field}={value!r}"


def check_sampling(temperature, top_k, top_p, spell=_keyword) -> None:
    """The sampling settings' one check (ValueError); `spell(field, value)` names a setting in
    the caller's terms (infer.py: `--top-p 0.0`)."""
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature)
            and temperature >= 0):
        raise ValueError(f"{spell('temperature', temperature)} must be a finite number >= 0 "
                         "(0: greedy)")
    if not (isinstance(top_k, numbers.Integral) and not isinstance(top_k, bool) and top_k >= 0):
        raise ValueError(f"{spell('top_k', top_k)} must be an integer >= 0 (0: no top-k filter)")
    if not (isinstance(top_p, numbers.Real) and 0.0 < top_p <= 1.0):
        raise ValueError(f"{spell('top_p', top_p)} must be in (0, 1] (1.0: no nucleus filter)")


def sample_logits(logits, key, sampling: Sampling):
    """logits: f32 [B, V]; key: PRNG key -> int32 [B]."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32)
    # shift first: the best token stays at 0 however small the temperature (no inf - inf)
    logits = (logits - logits.max(axis=-1, keepdims=True)) / sampling.temperature
    if sampling.top_k:
        k = min(sampling.top_k, logits.shape[-1])
        kth = jax.lax.top_k(logits, k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.nucleus:
        order = jnp.argsort(-logits, axis=-1)  # [B, V]
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        drop_sorted = before >= sampling.top_p  # the most likely token is never dropped
        drop = jnp.zeros_like(drop_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
