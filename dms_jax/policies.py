"""Eviction policies: which tokens a fixed-shape KV cache keeps after each step.

`dms_jax.cache.attend_and_update` attends over the cache slots followed by the chunk's new tokens
(the "candidates", N = S + C per batch row and KV head), then asks the policy which candidates to
keep and in what order to give them up when more than the capacity S must be kept. The cache does
the slot bookkeeping; a policy is a pure function on per-candidate arrays.

  * `full`: keep every token any later query may see (causal, and Mistral's sliding window);
  * `dms`:  keep what the rule of docs/dms.md section 4 lets the newest query see: the window
    (positions t-w .. t) and every older token whose flag (its successor's decision) is 0.

Overflow rule (both): when more than S tokens must be kept, the window goes first and the
retained (out-of-window) tokens are kept oldest first, so the newest retained tokens (those that
just left the window) are dropped, as if their flag had been set. Attention sinks and the early
context survive. Each dropped token is counted in the cache's `overflow` stat.

Training-free baselines (docs/dms.md section 8), `get_policy(name, **params)`:

  * `streaming` (StreamingLLM): the first `sinks` tokens and the most recent ones;
  * `h2o` (Heavy-Hitter Oracle): per KV head, a recent window plus the tokens with the largest
    attention received, summed over every query so far;
  * `tova` (Token Omission Via Attention): the tokens with the largest attention from the newest
    query, averaged over the heads of the layer (the same tokens for every KV head of a layer);
  * `snapkv`: the prompt scored once by the attention of its last `obs_window` queries, pooled
    over neighbouring positions; the top tokens plus the observation window are kept.

Budget convention (all four): the cache capacity S is the budget, in tokens held per (layer, row,
KV head), counted like DMS's held tokens: the newest token is one of them, sinks and windows are
inside it, and S is exactly the number of keys each decode query attends to (itself included). The
stats (held, peak bytes, KV reads) come from the same cache counters as for DMS.

Step order and exactness: a chunk step (C > 1) attends (each of its queries over the cache plus
the chunk, causally), folds the attention into the stored scores (`accumulate`: H2O sums it, TOVA
replaces it), then keeps at most S tokens; a decode step (C == 1) first keeps S of the S cached
tokens plus the new one, ranking them with the scores accumulated up to the previous query, writes
the new token in place, then attends and accumulates. The newest token is never evicted in the step
that brings it. So a decode step is the original method's step with its eviction deferred by one
step: the originals attend over their kept set plus the new token and then evict with that query's
attention; here that eviction happens at the start of the next step, with the same scores, so
after step t the cache holds the original's kept set of step t - 1 plus token t, exactly what
query t attended to (StreamingLLM's original evicts before attending: no deferral). With budget
S the methods equal the originals run with: StreamingLLM start_size + recent_size = S; H2O hh_size +
recent_size = S - 1 (recent = recent_size + 1 here, the newest included); TOVA cache_size = S - 1;
SnapKV max_capacity_prompt = S (then decoding stays within S). A chunk step is the same method at
chunk granularity; with chunk 1 it is the token-by-token original. Tokens dropped for the budget are
the policies' normal operation, not an overflow (`counts_overflow = False`).
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, ClassVar, NamedTuple

import jax.numpy as jnp
import numpy as np

from dms_jax.ops.mask import is_held, is_visible

# Priority of the tokens a policy must keep before any other (finite, so ties with the -inf used
# for "not kept" can never occur when ranking).
KEEP_FIRST = 1e30
# Priority of the tokens a baseline's rule protects (sinks, recent window, observation window):
# below the newest token, above every attention score.
PROTECTED = 1e29
# SnapKV: tokens without a prefill score (the observation window, decoded tokens) rank above every
# score and among themselves by position: RECENCY_TIER + position (exact for positions < 2**23).
RECENCY_TIER = float(2 ** 23)
# The stored score that marks such a token (attention scores are >= 0).
UNSCORED = -1.0

ATTENTION_FROM = ("all", "newest")
POOLINGS = ("avgpool", "maxpool")


class Candidates(NamedTuple):
    """Everything a policy may look at: cache slots then the chunk's tokens, [B, Hkv, N]."""

    pos: Any  # int32 [B, Hkv, N], -1 for an empty slot
    flags: Any  # bool [B, Hkv, N], DMS evict flag (decision of the successor; False if pending)
    valid: Any  # bool [B, Hkv, N], holds a real token
    scores: Any  # f32 [B, Hkv, N], the policy's per-slot score (see Policy.accumulate)
    query_pos: Any  # int32 [B], position of the newest token after this step (t)
    window: int  # DMS window w (recent tokens every policy keeps first)
    sliding_window: Any  # int | None (Mistral): keys at distance >= sliding_window are never seen
    capacity: Any = None  # int, slots per stream S (the budget of the baselines)


class Selection(NamedTuple):
    keep: Any  # bool [B, Hkv, N], tokens to keep if capacity allows
    priority: Any  # f32 [B, Hkv, N], higher is kept first when more than capacity are kept


@dataclasses.dataclass(frozen=True)
class Policy:
    """Base class. Frozen and hashable: passed to jitted functions as a static argument.

    Its dataclass fields are the policy's parameters (`get_policy(name, **params)`).
    """

    name: ClassVar[str] = "base"
    uses_decisions: ClassVar[bool] = False  # attention applies the DMS flags
    needs_attention: ClassVar[bool] = False  # accumulate() receives the step's attention
    attention_from: ClassVar[str] = "all"  # whose attention: "all" real queries, or the "newest"
    counts_overflow: ClassVar[bool] = True  # dropping for capacity is an anomaly to report
    new_score: ClassVar[float] = 0.0  # the stored score a new token starts with

    def select(self, cand: Candidates) -> Selection:
        raise NotImplementedError

    def accumulate(self, scores, received):
        """Per-slot scores after a step's attention (called only for rows with a scoring query).

        scores: f32 [B, Hkv, n] (stored scores; `new_score` for new tokens)
        received: f32 [B, Hkv, n] attention the step's scoring queries (see `attention_from`)
                  gave each key, summed over those queries and the query heads of the group
        """
        return scores

    def min_budget(self) -> tuple[int, str]:
        """(fewest held tokens per KV head the policy works with, what they are)."""
        return 1, "the newest token"

    def check_budget(self, budget) -> None:
        """Raise ValueError unless `budget` (held tokens per KV head) can hold the policy's rule."""
        need, what = self.min_budget()
        try:
            ok = not isinstance(budget, bool) and operator.index(budget) >= need
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(
                f"budget={budget!r} held tokens per KV head is too small for policy "
                f"{self.name!r}: it holds {what} = {need}; use budget >= {need}"
                + self._budget_fix())

    def _budget_fix(self) -> str:
        return ""


def visible_to_newest(cand: Candidates):
    """bool [B, Hkv, N]: real tokens the newest query (or a later one) can still see, no eviction
    (causal, and beyond a sliding window nothing is ever seen again): `is_held` with no flags."""
    return is_held(cand.query_pos[:, None, None], cand.pos, False, cand.window,
                   k_valid=cand.valid, sliding_window=cand.sliding_window)


def window_first_then_oldest(cand: Candidates):
    """The overflow ranking of `full` and `dms`: window tokens first, then older before newer."""
    # inside the window = still visible with every flag set (the one rule, ops/mask.py)
    in_window = is_visible(cand.query_pos[:, None, None], cand.pos, True, cand.window)
    return jnp.where(in_window, KEEP_FIRST, -cand.pos.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class FullPolicy(Policy):
    """Never evict (only what no later query can see: nothing, or beyond a sliding window)."""

    name: ClassVar[str] = "full"

    def select(self, cand: Candidates) -> Selection:
        return Selection(visible_to_newest(cand), window_first_then_oldest(cand))


@dataclasses.dataclass(frozen=True)
class DMSPolicy(Policy):
    """Delayed eviction (docs/dms.md section 5): keep what the newest query may see under section 4.

    Later queries see a subset of it (the window only moves forward and flags are only ever set),
    so nothing dropped here is needed again.
    """

    name: ClassVar[str] = "dms"
    uses_decisions: ClassVar[bool] = True

    def select(self, cand: Candidates) -> Selection:
        keep = is_held(cand.query_pos[:, None, None], cand.pos, cand.flags, cand.window,
                       k_valid=cand.valid, sliding_window=cand.sliding_window)
        return Selection(keep, window_first_then_oldest(cand))


# ----------------------------------------------------------------------------- baselines


def _check_int(policy, field, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"policy {policy!r}: {field}={value!r} must be an integer >= {low}")


@dataclasses.dataclass(frozen=True)
class BudgetPolicy(Policy):
    """A training-free baseline: keep every visible token, and when more than the capacity S
    remain, keep the newest token, then the tokens the method's rule protects, then the highest
    `rank` (see the module docstring for the step order and the budget convention)."""

    counts_overflow: ClassVar[bool] = False

    def rank(self, cand: Candidates):
        """f32 [B, Hkv, N]: higher is kept first (PROTECTED for the rule's fixed tokens)."""
        raise NotImplementedError

    def select(self, cand: Candidates) -> Selection:
        newest = cand.pos == cand.query_pos[:, None, None]
        return Selection(visible_to_newest(cand), jnp.where(newest, KEEP_FIRST, self.rank(cand)))


@dataclasses.dataclass(frozen=True)
class StreamingPolicy(BudgetPolicy):
    """StreamingLLM (Xiao et al. 2023, mit-han-lab/streaming-llm): the first `sinks` tokens of the
    row (positions < sinks, the attention sinks) and the most recent budget - sinks tokens.

    sinks: attention-sink tokens kept forever (the original's start_size, default 4). The recent
    window is the rest of the budget (the original's recent_size = budget - sinks; it evicts
    before the new tokens attend, so the budget is what each query sees, as here). Positions keep
    their original values (no re-indexing of positions inside the cache).
    """

    name: ClassVar[str] = "streaming"
    sinks: int = 4

    def __post_init__(self):
        _check_int(self.name, "sinks", self.sinks, 0)

    def min_budget(self):
        return self.sinks + 1, f"{self.sinks} sinks + the newest token"

    def _budget_fix(self):
        return " or fewer sinks (get_policy('streaming', sinks=...))"

    def rank(self, cand):
        return jnp.where(cand.pos < self.sinks, PROTECTED, cand.pos.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class H2OPolicy(BudgetPolicy):
    """H2O (Zhang et al. 2023, FMInference/H2O): per KV head, the `recent` most recent tokens plus
    the heavy hitters, the tokens with the largest attention received, summed over every query
    that has seen them (and over the query heads of the group); one token is evicted at every
    decode step once over budget.

    recent: recent tokens kept regardless of score, the newest included; None (default): half the
    budget, rounded up (the original's equal split heavy_ratio = recent_ratio, i.e. hh_size =
    recent_size, with the newest token counted in the recent part). The rest of the budget holds
    the heavy hitters.
    """

    name: ClassVar[str] = "h2o"
    needs_attention: ClassVar[bool] = True
    recent: int | None = None

    def __post_init__(self):
        if self.recent is not None:
            _check_int(self.name, "recent", self.recent, 1)

    def recent_for(self, capacity: int) -> int:
        return capacity - capacity // 2 if self.recent is None else self.recent

    def min_budget(self):
        if self.recent is None:
            return 1, "the newest token"
        return self.recent, f"the recent window of {self.recent} tokens (the newest included)"

    def _budget_fix(self):
        return " or a smaller recent window (get_policy('h2o', recent=...))"

    def accumulate(self, scores, received):
        return scores + received

    def rank(self, cand):
        recent = cand.query_pos[:, None, None] - cand.pos < self.recent_for(cand.capacity)
        return jnp.where(recent, PROTECTED, cand.scores)


@dataclasses.dataclass(frozen=True)
class TOVAPolicy(BudgetPolicy):
    """TOVA (Oren et al. 2024, schwartz-lab-NLP/TOVA): keep the tokens with the largest attention
    from the newest query, averaged over all heads of the layer, so every KV head of a layer keeps
    the same tokens. No parameters: the budget is the original's cache_size + 1.

    The stored score is replaced at every step by the newest query's attention (the mean over the
    layer's KV heads of the sum over each group's query heads: the head average times the group
    size, the same ranking).
    """

    name: ClassVar[str] = "tova"
    needs_attention: ClassVar[bool] = True
    attention_from: ClassVar[str] = "newest"

    def accumulate(self, scores, received):
        return jnp.broadcast_to(received.mean(axis=1, keepdims=True), received.shape)

    def rank(self, cand):
        return cand.scores


@dataclasses.dataclass(frozen=True)
class SnapKVPolicy(BudgetPolicy):
    """SnapKV (Li et al. 2024, FasterDecoding/SnapKV): compress the prompt once, then decode.

    Prefill (driven by `dms_jax.generate`): the whole prompt goes into a cache large enough to hold
    it (so SnapKV's peak memory is the full prompt), the last `obs_window` prompt tokens of every
    row in a final step whose queries' attention is summed per key (`observe()`); then
    `prompt_priority` scores every older prompt token by that attention (summed over the window's
    queries and the group's query heads, as kvpress does for grouped-query attention), smoothed by
    a 1-D pooling of width `kernel_size` over neighbouring positions (zero padding, as
    torch's avg_pool1d / max_pool1d with padding kernel_size // 2), and the cache is compacted
    to the budget: the observation window plus the top budget - obs_window scored tokens (equal
    scores, common under max pooling, keep the earlier position; then they also leave later).

    Decode (this policy): new tokens are appended; when over budget the token with the lowest
    prefill score goes first; tokens without one (the observation window and decoded tokens)
    rank above every scored token and among themselves newest first, so once every scored token
    is gone the cache becomes a sliding window. The original appends without a limit.

    obs_window: observation window, the last prompt queries that score the prompt (default 64,
    as SnapKVCluster; its example configs use 32). kernel_size: pooling width, odd (default 5).
    pooling: "avgpool" (default) or "maxpool". The budget must exceed obs_window (as the
    original's max_capacity_prompt > window_size).
    """

    name: ClassVar[str] = "snapkv"
    new_score: ClassVar[float] = UNSCORED
    obs_window: int = 64
    kernel_size: int = 5
    pooling: str = "avgpool"

    def __post_init__(self):
        _check_int(self.name, "obs_window", self.obs_window, 1)
        _check_int(self.name, "kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"policy 'snapkv': kernel_size={self.kernel_size} must be odd "
                             "(a pooling window centred on each token, e.g. 5 or 7)")
        if self.pooling not in POOLINGS:
            raise ValueError(f"policy 'snapkv': pooling={self.pooling!r}; use one of {POOLINGS}")

    def min_budget(self):
        return (self.obs_window + 1,
                f"the observation window of {self.obs_window} tokens + at least one scored token")

    def _budget_fix(self):
        return " or a smaller observation window (get_policy('snapkv', obs_window=...))"

    def rank(self, cand):
        unscored = cand.scores < 0
        return jnp.where(unscored, RECENCY_TIER + cand.pos.astype(jnp.float32), cand.scores)

    def observe(self) -> Policy:
        """The policy of the prefill's last step (keeps everything, sums the attention)."""
        return SNAPKV_OBSERVE

    def prompt_priority(self, pos, scores, last_pos):
        """Rank a fully prefilled prompt for compaction.

        pos: int32 [B, Hkv, S] (-1 empty; the prompt's positions are consecutive); scores: f32
        [B, Hkv, S], attention each key received from the observation window's queries;
        last_pos: int32 [B], the prompt's last position.
        returns (priority [B, Hkv, S]: PROTECTED for the window, the pooled score for older
                 tokens, -inf for empty slots;
                 stored scores [B, Hkv, S]: the pooled score, UNSCORED for the window)
        """
        valid = pos >= 0
        in_window = valid & (last_pos[:, None, None] - pos < self.obs_window)
        prefix = valid & ~in_window
        pooled = pool_by_position(jnp.where(prefix, scores, 0.0), prefix, pos, self.kernel_size,
                                  self.pooling)
        priority = jnp.where(in_window, PROTECTED, jnp.where(prefix, pooled, -jnp.inf))
        return priority, jnp.where(in_window, UNSCORED, jnp.where(prefix, pooled, 0.0))


@dataclasses.dataclass(frozen=True)
class SnapKVObserve(Policy):
    """SnapKV's prefill phase: keep every token (as `full`), sum the attention of every real query
    per key (the step that feeds the observation window)."""

    name: ClassVar[str] = "snapkv-observe"
    needs_attention: ClassVar[bool] = True

    def accumulate(self, scores, received):
        return scores + received

    def select(self, cand: Candidates) -> Selection:
        return Selection(visible_to_newest(cand), window_first_then_oldest(cand))


def pool_by_position(values, mask, pos, kernel_size: int, pooling: str):
    """1-D pooling over neighbouring positions of each stream, slots in any order.

    values: f32 [..., S]; mask: bool [..., S] (entries that take part; others count as padding);
    pos: int32 [..., S] (distinct among masked entries, consecutive for an unbroken sequence).
    Padding is 0 for "avgpool" (divided by kernel_size always, as count_include_pad) and -inf for
    "maxpool". returns f32 [..., S], the pooled value at each slot (meaningless where ~mask).
    """
    order = jnp.argsort(jnp.where(mask, pos, jnp.iinfo(jnp.int32).max), axis=-1)
    fill = 0.0 if pooling == "avgpool" else -jnp.inf
    x = jnp.take_along_axis(jnp.where(mask, values, fill), order, axis=-1)  # by position
    half, n = kernel_size // 2, x.shape[-1]
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(half, half)], constant_values=fill)
    windows = jnp.stack([padded[..., i:i + n] for i in range(kernel_size)])  # [K, ..., S]
    pooled = windows.sum(0) / kernel_size if pooling == "avgpool" else windows.max(0)
    return jnp.take_along_axis(pooled, jnp.argsort(order, axis=-1), axis=-1)  # back to slots


# ----------------------------------------------------------------------------- registry


FULL = FullPolicy()
DMS = DMSPolicy()
SNAPKV_OBSERVE = SnapKVObserve()
POLICY_TYPES = {
    "full": FullPolicy, "dms": DMSPolicy, "streaming": StreamingPolicy, "h2o": H2OPolicy,
    "tova": TOVAPolicy, "snapkv": SnapKVPolicy,
}


def policy_params(name: str) -> dict[str, Any]:
    """{parameter: default} of a policy name."""
    return {f.name: f.default for f in dataclasses.fields(POLICY_TYPES[name])}


def get_policy(policy, **params) -> Policy:
    """A Policy instance from itself or its name and parameters, e.g.
    `get_policy("streaming", sinks=4)`, `get_policy("snapkv", obs_window=32, pooling="maxpool")`.
    Unknown names or parameters raise ValueError naming the known ones."""
    if isinstance(policy, Policy):
        if params:
            raise ValueError(f"parameters {sorted(params)} apply to a policy name, not to the "
                             f"Policy instance {policy!r}")
        return policy
    if policy not in POLICY_TYPES:
        raise ValueError(f"unknown policy {policy!r}; available: {sorted(POLICY_TYPES)}")
    known = policy_params(policy)
    unknown = sorted(set(params) - set(known))
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
        raise ValueError(f"policy {policy!r} has no parameter {', '.join(unknown)}; "
                         f"its parameters (defaults): {listed}")
    return POLICY_TYPES[policy](**params)


# ----------------------------------------------------------------------------- equal budgets


def budget_for_ratio(tokens: int, compression_ratio: float) -> int:
    """Held tokens per KV head that give `compression_ratio` (seen / held) over `tokens` tokens
    per row: round(tokens / ratio), at least 1."""
    if not compression_ratio >= 1.0:
        raise ValueError(f"compression_ratio={compression_ratio} must be >= 1 (seen / held)")
    return max(1, int(round(tokens / compression_ratio)))


def budget_from_stats(stats) -> int:
    """The budget that compares a baseline with a finished run (e.g. DMS) at equal held tokens.

    stats: the run's `GenerateStats`. Returns round(mean over layers, rows and KV heads of the
    tokens held at the end), at least 1: a baseline with that budget holds that many per head
    (all heads equally; DMS's heads differ), so for rows of equal length its compression ratio
    (seen / held, docs/dms.md section 6) equals the run's and so do its held bytes.
    """
    held = np.asarray(stats.held_tokens, np.float64)
    if held.size == 0 or not math.isfinite(float(held.mean())):
        raise ValueError("budget_from_stats: the stats hold no tokens (run generate first)")
    return max(1, int(round(float(held.mean()))))
