"""Eviction policies: which tokens a fixed-shape KV cache keeps after each step.

`dms_jax.cache.attend_and_update` attends over the cache slots followed by the chunk's new tokens
(the "candidates", N = S + C per batch row and KV head), then asks the policy which candidates to
keep and in what order to give them up when more than the capacity S must be kept. The cache does
the slot bookkeeping; a policy is a pure function on per-candidate arrays.

  * `full`: keep every token any later query may see (causal, and Mistral's sliding window);
  * `dms`:  keep what the rule of dms-spec.md section 4 lets the newest query see: the window
    (positions t-w .. t) and every older token whose flag (its successor's decision) is 0.

Overflow rule (both): when more than S tokens must be kept, the window goes first and the
retained (out-of-window) tokens are kept oldest first, so the newest retained tokens (those that
just left the window) are dropped, as if their flag had been set. Attention sinks and the early
context survive. Each dropped token is counted in the cache's `overflow` stat.

Training-free baselines (StreamingLLM, H2O, TOVA, SnapKV; spec section 8) plug in as further
`Policy` subclasses: set `needs_attention = True` and fold each step's attention into the per-slot
score the cache stores (`accumulate`: H2O sums it, TOVA replaces it), then rank tokens by it in
`select` through `Selection.priority` under a budget given as the cache capacity (with
`counts_overflow = False`: dropping is their normal operation).
Order: a chunk step (C > 1) attends, accumulates, then selects; a decode step (C == 1) selects
with the scores accumulated up to the previous step, writes the new token, then attends and
accumulates (the in-place update; see `dms_jax.cache.attend_and_update`). A policy that must
hold `budget` tokens plus the new one while attending uses capacity budget + 1.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax.numpy as jnp

from dms_jax.ops.mask import MASK_VALUE, is_visible, visibility_bias

# Priority of the tokens a policy must keep before any other (finite, so ties with the -inf used
# for "not kept" can never occur when ranking).
KEEP_FIRST = 1e30


class Candidates(NamedTuple):
    """Everything a policy may look at: cache slots then the chunk's tokens, [B, Hkv, N]."""

    pos: Any  # int32 [B, Hkv, N], -1 for an empty slot
    flags: Any  # bool [B, Hkv, N], DMS evict flag (decision of the successor; False if pending)
    valid: Any  # bool [B, Hkv, N], holds a real token
    scores: Any  # f32 [B, Hkv, N], the policy's per-slot score (see Policy.accumulate)
    query_pos: Any  # int32 [B], position of the newest token after this step (t)
    window: int  # DMS window w (recent tokens every policy keeps first)
    sliding_window: Any  # int | None (Mistral): keys at distance >= sliding_window are never seen


class Selection(NamedTuple):
    keep: Any  # bool [B, Hkv, N], tokens to keep if capacity allows
    priority: Any  # f32 [B, Hkv, N], higher is kept first when more than capacity are kept


@dataclasses.dataclass(frozen=True)
class Policy:
    """Base class. Frozen and hashable: passed to jitted functions as a static argument."""

    name: ClassVar[str] = "base"
    uses_decisions: ClassVar[bool] = False  # attention applies the DMS flags
    needs_attention: ClassVar[bool] = False  # accumulate() receives the step's attention
    counts_overflow: ClassVar[bool] = True  # dropping for capacity is an anomaly to report

    def select(self, cand: Candidates) -> Selection:
        raise NotImplementedError

    def accumulate(self, scores, received):
        """Per-slot scores after a step's attention.

        scores: f32 [B, Hkv, n] (stored scores; 0 for new tokens)
        received: f32 [B, Hkv, n] attention the step's real queries gave each key, summed over
                  the query heads of the group (None unless needs_attention)
        """
        return scores


def window_first_then_oldest(cand: Candidates):
    """The overflow ranking of `full` and `dms`: window tokens first, then older before newer."""
    in_window = (cand.query_pos[:, None, None] - cand.pos) <= cand.window
    return jnp.where(in_window, KEEP_FIRST, -cand.pos.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class FullPolicy(Policy):
    """Never evict (only what no later query can see: nothing, or beyond a sliding window)."""

    name: ClassVar[str] = "full"

    def select(self, cand: Candidates) -> Selection:
        bias = visibility_bias(
            cand.query_pos[:, None, None], cand.pos, None, cand.window, k_valid=cand.valid,
            sliding_window=cand.sliding_window,
        )
        keep = bias > MASK_VALUE / 2
        return Selection(keep, window_first_then_oldest(cand))


@dataclasses.dataclass(frozen=True)
class DMSPolicy(Policy):
    """Delayed eviction (spec section 5): keep what the newest query may see under section 4.

    Later queries see a subset of it (the window only moves forward and flags are only ever set),
    so nothing dropped here is needed again.
    """

    name: ClassVar[str] = "dms"
    uses_decisions: ClassVar[bool] = True

    def select(self, cand: Candidates) -> Selection:
        keep = is_visible(
            cand.query_pos[:, None, None], cand.pos, cand.flags, cand.window, k_valid=cand.valid,
            sliding_window=cand.sliding_window,
        )
        return Selection(keep, window_first_then_oldest(cand))


FULL = FullPolicy()
DMS = DMSPolicy()
POLICIES = {"full": FULL, "dms": DMS}
PLANNED = ("streaming", "h2o", "tova", "snapkv")


def get_policy(policy) -> Policy:
    """A Policy instance from itself or its name."""
    if isinstance(policy, Policy):
        return policy
    if policy in POLICIES:
        return POLICIES[policy]
    if policy in PLANNED:
        raise NotImplementedError(f"policy {policy!r} is planned but not implemented yet; "
                                  f"available: {sorted(POLICIES)}")
    raise ValueError(f"unknown policy {policy!r}; available: {sorted(POLICIES)}")
