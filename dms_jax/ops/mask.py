"""The one visibility rule (docs/dms.md section 4).

Every attention path (blockwise soft training attention, dense hard evaluation, chunked prefill
and decode over the cache, the baselines' scoring) builds its additive score bias here.

For query position `i` and key position `j`:
  * `j > i` (or the key slot is invalid / outside a sliding window / in another packed
    document): masked;
  * `i - j <= window`: visible, bias 0;
  * `i - j > window`: bias = `evict_bias[j]`, where `evict_bias[j]` is
      - training (soft):  log(1 - alpha[j+1]) = log_sigmoid(-zt[j+1])
      - evaluation/inference (hard): MASK_VALUE if d[j+1] == 1 else 0.
The shift by one (decision at `j+1` governs key `j`) is applied by `dms_jax.ops.gating` before
the per-key `evict_bias` reaches this rule.
"""
from __future__ import annotations

import jax.numpy as jnp

# A large finite negative: exp() of it underflows to 0, and unlike -inf it never yields NaN when a
# row is fully masked or when it meets another mask value.
MASK_VALUE = -1e30


def visibility_bias(q_pos, k_pos, evict_bias, window, *, k_valid=None, sliding_window=None,
                    q_seg=None, k_seg=None):
    """Additive attention bias from the DMS rule. All inputs broadcast against each other.

    q_pos:      int   [..., Tq, 1]  query positions
    k_pos:      int   [..., 1, Tk]  key positions
    evict_bias: float [..., 1, Tk]  per-key bias applied outside the window, or None (no eviction)
    window:     int   delayed-eviction window w (>= 0)
    k_valid:    bool  [..., 1, Tk]  key slot holds a real token (None: all valid)
    sliding_window: int | None  Mistral-style: visible only if i - j < sliding_window
    q_seg, k_seg: int [..., Tq, 1], [..., 1, Tk] packed-document ids (None: one document);
                  a key is visible only from its own document
    returns:    float [..., Tq, Tk]  0 (visible), evict_bias (outside window) or MASK_VALUE
    """
    distance = q_pos - k_pos
    allowed = distance >= 0
    if k_valid is not None:
        allowed = allowed & k_valid
    if sliding_window is not None:
        allowed = allowed & (distance < sliding_window)
    if q_seg is not None:
        allowed = allowed & (q_seg == k_seg)
    if evict_bias is None:
        inside = jnp.zeros((), jnp.float32)
    else:
        inside = jnp.where(distance > window, evict_bias.astype(jnp.float32), 0.0)
    return jnp.where(allowed, inside, MASK_VALUE)


def visible(bias):
    """bool: which entries of a `visibility_bias` (scores plus it, too) a query may see."""
    return bias > MASK_VALUE / 2


def hard_evict_bias(evict_flags):
    """Hard per-key bias from boolean flags (True = evicted once outside the window)."""
    return jnp.where(evict_flags, MASK_VALUE, 0.0).astype(jnp.float32)


def is_visible(q_pos, k_pos, evict_flags, window, *, k_valid=None, sliding_window=None):
    """Boolean form of the same rule for hard flags (used by the cache and the tests)."""
    bias = visibility_bias(
        q_pos, k_pos, hard_evict_bias(evict_flags), window, k_valid=k_valid,
        sliding_window=sliding_window,
    )
    return visible(bias)


def is_held(newest_pos, k_pos, evict_flags, window, *, k_valid, sliding_window):
    """Whether a key is still held once the token at `newest_pos` is in: the newest query (or any
    later one, which sees a subset) may still see it under the rule, sliding window included.

    The one definition of what a cache holds (docs/dms.md section 5): the cache's policies keep
    exactly these keys (dms with its flags, full and the baselines' visible set with none), and
    the evaluation forward's compression ratio counts them (`Decoder.eval_forward`), so both
    report the same CR for the same tokens. `k_valid` and `sliding_window` have no default:
    every caller says what it knows (None: no sliding window).
    """
    return is_visible(newest_pos, k_pos, evict_flags, window, k_valid=k_valid,
                      sliding_window=sliding_window)
