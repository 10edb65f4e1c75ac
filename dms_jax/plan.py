"""The inference plan: every setting of a cached forward decided once, with every check.

    plan = dms_jax.plan_inference(model.config, max_len=4096)           # dms on a DMS model
    plan = dms_jax.plan_inference(cfg, policy="h2o", budget=256, max_len=4096)
    cache = dms_jax.cache.init_cache(plan, batch)                        # the only cache input
    out = model.forward(ids, positions=pos, cache=cache, plan=plan)      # what the model reads

`plan_inference` is the one place where these are decided (docs/dms.md section 9):
  * policy:   the given one (a name or a `Policy`), default "dms" for a DMS model, else "full";
              a policy that applies DMS decisions needs a DMS model;
  * window:   the DMS window w, the given one or the model's, for a policy that applies the
              decisions; 0 otherwise (nothing is kept for being recent);
  * mode:     the model's forward mode: "eval" when the policy applies decisions or the model is
              a neuron-mode DMS model (the retrofitted network, its decision neuron zeroed;
              policies without decisions ignore the flags), else "plain";
  * attention_impl: the cache attention (chunk queries over the slots and the chunk):
              "blockwise" reads only the live slots (an online softmax over key blocks below the
              cache's high-water mark, `dms_jax.ops.live_attention`), "tiled" the same stream
              by stream in query tiles (a CPU's caches; the chunk's own keys causally),
              "dense" every slot with the probabilities; a policy that ranks tokens by
              attention needs the scores, so "dense" only; the default is "tiled" on a CPU
              platform and "blockwise" on others for the rest;
  * max_len:  the allocated tokens per row, the asked length rounded up to a quarter octave so
              that nearby lengths share compiled programs;
  * capacity: slots per (layer, row, KV head): `capacity`, or `budget`, or for dms
              `capacity_for(max_len, w, target_cr, margin)`, else max_len; never more than
              max_len; a dms capacity holds the window (>= w + 1) unless it holds every token.
  * stacked:  a model whose layers run under scan (`ModelConfig.scan_layers`) gets its
              layers' caches as one `StackedCache` ([L, ...] arrays, layer i updated in place
              by the scanned layer body); else a tuple of per-layer caches;
  * layout:   "slots" (every stream its own `capacity` slots, `dms_jax.cache`) or "paged" (for
              full and dms: a ring of w + 1 per stream and one pool of pages per layer shared
              by every stream, `dms_jax.paged`); the pool holds `pages_per_stream` pages of
              `page_size` tokens per stream of the batch (for dms the expected retained tokens
              at target_cr plus `margin` (default 0.1: heads that keep more borrow from heads
              that keep less) plus half a page (a last page is half full on average); for full
              every token), or `pool_pages` pages in all when given.

The plan is frozen and hashable: the jitted prefill and decode steps take it as their static
argument, `dms_jax.cache.init_cache(plan, batch)` builds the cache from it alone, and `infer.py`
validates its flags against it (the errors name the flag). `cache_bytes` / `check_memory`
estimate what a plan needs before anything is allocated.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dms_jax.config import ModelConfig, dtype_name
from dms_jax.ops.live_attention import PREFILL_BLOCK, QUERY_ROWS
from dms_jax.policies import BudgetPolicy, Policy, get_policy
from dms_jax.stats import format_bytes

DEFAULT_CHUNK = 512
DEFAULT_TARGET_CR = 8.0
DEFAULT_MARGIN = 0.5
DEFAULT_PAGED_MARGIN = 0.1
DEFAULT_PAGE_SIZE = 64
LAYOUTS = ("slots", "paged")
ATTENTION_IMPLS = ("dense", "auto", "blockwise", "tiled", "fused")
# positions are int32: the largest length (and window) a plan takes
MAX_POSITION = 2 ** 31 - 1


class PlanError(ValueError):
    """A setting the plan refuses. str(): in the library's terms (`capacity=8 ...`);
    `flag_message`: the same in infer.py's flag terms (`--capacity 8 ...`)."""

    def __init__(self, message: str, flag_message: str | None = None, field: str | None = None,
                 value: Any = None):
        super().__init__(message)
        self.flag_message = flag_message or message
        self.field, self.value = field, value


def _bad(field: str, value, reason: str) -> PlanError:
    flag = "--" + field.replace("_", "-")
    return PlanError(f"{field}={value!r} {reason}", f"{flag} {value} {reason}", field, value)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _int_in(field, value, low, high, what):
    if not (_is_int(value) and low <= value <= high):
        raise _bad(field, value, f"must be >= {low} and at most {high} ({what})")
    return int(value)


@dataclasses.dataclass(frozen=True)
class InferencePlan:
    """What a cached forward runs with (see the module docstring for how each is decided)."""

    policy: Policy
    window: int  # DMS window w of the cache (0: the policy applies no decisions)
    mode: str  # the model's forward mode, "eval" or "plain"
    neuron: bool  # a neuron-mode DMS model (its decision neuron is zeroed in every policy)
    attention_impl: str  # the cache attention kernel
    sliding_window: int | None  # the model's (Mistral), or None
    max_len: int  # allocated tokens per row (positions 0 .. max_len - 1)
    capacity: int  # slots per (layer, row, KV head)
    chunk_size: int  # prefill chunk C (memory ~ cache + C tokens)
    # the cache's geometry, from the model
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # K / V dtype (the model's compute dtype)
    layout: str = "slots"  # "slots" or "paged" (dms_jax.paged)
    page_size: int = 0  # paged: tokens per page
    pages_per_stream: float = 0.0  # paged: pool pages per (row, KV head) of the batch
    pool_pages: int = 0  # paged: pool pages per layer when fixed (0: pages_per_stream x streams)
    retain_fraction: float = 1.0  # paged: (1 + margin) / CR of the tokens older than the window
    stacked: bool = False  # the layers' caches as one StackedCache (a model with scan_layers)

    @property
    def max_pages(self) -> int:
        """Paged: page-table entries per stream (enough for every token of a row)."""
        return -(-self.max_len // self.page_size) if self.page_size else 0

    def num_pages(self, batch: int) -> int:
        """Paged: the pool's pages per layer for `batch` rows."""
        return self.pool_pages or math.ceil(batch * self.num_kv_heads * self.pages_per_stream)

    def request_pages(self, tokens: int) -> int:
        """Paged: the pages per layer a row of `tokens` tokens is expected to hold (its KV heads'
        retained tokens at the plan's CR and margin, plus half a page each; `full`: exact)."""
        older = max(int(tokens) - self.window - 1, 0)
        if not self.uses_decisions:
            return self.num_kv_heads * -(-older // self.page_size)
        return math.ceil(self.num_kv_heads * (older * self.retain_fraction / self.page_size + 0.5))

    def kv_bytes(self, batch: int) -> int:
        """Key + value bytes `init_cache(self, batch)` allocates (slots, or rings + pool)."""
        token = 2 * self.head_dim * jnp.dtype(self.dtype).itemsize
        if self.layout == "paged":
            ring = batch * self.num_kv_heads * (self.window + 1)
            return self.num_layers * token * (ring + self.num_pages(batch) * self.page_size)
        return self.num_layers * token * batch * self.num_kv_heads * self.capacity

    @property
    def uses_decisions(self) -> bool:
        return self.policy.uses_decisions

    def matches(self, cfg: ModelConfig) -> bool:
        """Whether this plan was made for a model of this shape."""
        return (self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim,
                self.sliding_window) == (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
                                         cfg.head_dim, cfg.sliding_window) and (
            self.mode == "plain" or cfg.dms is not None) and self.stacked == cfg.scan_layers

    def derive(self, policy: Policy, *, capacity: int | None = None,
               chunk_size: int | None = None) -> "InferencePlan":
        """The same plan for another policy (SnapKV's prefill phases), window and mode re-decided
        by the same rules."""
        return dataclasses.replace(
            self, policy=policy, window=self.window if policy.uses_decisions else 0,
            mode=forward_mode(policy, self.neuron),
            attention_impl=resolve_attention(policy, self.attention_impl),
            capacity=self.capacity if capacity is None else int(capacity),
            chunk_size=self.chunk_size if chunk_size is None else int(chunk_size))

    # -------------------------------------------------------------------------- memory

    def cache_bytes(self, batch: int) -> int:
        """Bytes of `init_cache(self, batch)`: per slot K and V, position, flag and score; paged:
        the rings (K, V, position, flag), the pool (K, V, position) and the page tables."""
        itemsize = jnp.dtype(self.dtype).itemsize
        streams = self.num_layers * batch * self.num_kv_heads
        if self.layout == "paged":
            ring = (self.window + 1) * (2 * self.head_dim * itemsize + 4 + 1)
            pool = self.num_pages(batch) * (self.page_size * (2 * self.head_dim * itemsize + 4) + 4)
            return (streams * (ring + 4 * self.max_pages + 16) + self.num_layers * (pool + 4)
                    + self.num_layers * batch * 8)
        per_slot = 2 * self.head_dim * itemsize + 4 + 1 + 4
        return streams * (self.capacity * per_slot + 16) + self.num_layers * batch * 8

    def step_bytes(self, batch: int, chunk: int | None = None) -> int:
        """The largest temporaries of a step (a prefill chunk of C tokens), at least: its float32
        attention scores over the keys it holds at once, [B, H, C, K], and the visibility bias,
        [B, Hkv, C, K]: K = S + C for the dense attention, one block of slots or the chunk for
        the blockwise one (`dms_jax.ops.live_attention`); the tiled one holds the scores and
        bias of one stream's query tile over one block at a time."""
        chunk = min(self.chunk_size, self.max_len) if chunk is None else chunk
        keys = self.capacity + chunk
        if self.layout == "paged":  # a block of pages, the ring, the chunk
            keys = max(PREFILL_BLOCK, self.window + 1, chunk)
        elif self.attention_impl == "tiled":  # one stream's query tile at a time
            return 4 * QUERY_ROWS * min(self.capacity + chunk, PREFILL_BLOCK) * 2
        elif self.attention_impl != "dense":
            keys = max(min(self.capacity, PREFILL_BLOCK), chunk)
        return 4 * batch * chunk * keys * (self.num_heads + self.num_kv_heads)


def default_target_cr(cfg: ModelConfig) -> float:
    """The CR a dms cache is sized for by default: the model's recorded `dms.target_cr`, else 8."""
    recorded = cfg.dms.target_cr if cfg.dms is not None else None
    return float(recorded) if recorded else DEFAULT_TARGET_CR


def default_policy(cfg: ModelConfig) -> str:
    """dms for a DMS model, else full."""
    return "dms" if cfg.dms is not None else "full"


def forward_mode(policy: Policy, neuron: bool) -> str:
    """'eval' when the decisions are applied or the network is a neuron-mode retrofit."""
    return "eval" if policy.uses_decisions or neuron else "plain"


def allocated_length(max_len: int) -> int:
    """Lengths in buckets of a quarter octave (at most 25% over max_len; 64 at least)."""
    if max_len <= 64:
        return 64
    step = 1 << (int(max_len).bit_length() - 3)
    return min(-(-int(max_len) // step) * step, MAX_POSITION)


def capacity_for(max_len: int, window: int, target_cr: float = 1.0, margin: float = 0.5) -> int:
    """Slots per (layer, row, head) for rows of up to `max_len` tokens.

    DMS at compression ratio CR holds about (seen - w - 1) / CR + w + 1 tokens; heads differ,
    so `margin` adds that fraction of the expected retained count. Never more than max_len.
    """
    if not (max_len >= 1 and window >= 0 and _finite_at_least(target_cr, 1.0)
            and _finite_at_least(margin, 0.0)):
        raise ValueError(
            f"capacity_for(max_len={max_len}, window={window}, target_cr={target_cr}, "
            f"margin={margin}): need max_len >= 1, window >= 0, a finite target_cr >= 1 and "
            "a finite margin >= 0")
    retained = max(max_len - window - 1, 0) / target_cr * (1.0 + margin)
    return int(min(max_len, math.ceil(retained) + window + 1))


def _finite_at_least(value, low) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value) and value >= low)


def check_settings(*, window=None, target_cr=None, margin=DEFAULT_MARGIN, capacity=None,
                   budget=None, max_len=None, chunk_size=DEFAULT_CHUNK) -> None:
    """The checks that need no model (infer.py runs them before loading one). PlanError."""
    if window is not None:
        _int_in("window", window, 0, MAX_POSITION, "a window of n positions")
    if target_cr is not None and not _finite_at_least(target_cr, 1.0):
        raise _bad("target_cr", target_cr,
                   "must be a finite number >= 1 (8 keeps about 1/8 of the tokens)")
    if not _finite_at_least(margin, 0.0):
        raise _bad("margin", margin,
                   "must be a finite number >= 0 (the extra fraction of expected held tokens)")
    for field, value, what in (("capacity", capacity, "slots per head"),
                               ("budget", budget, "held tokens per head")):
        if value is not None and not (_is_int(value) and value >= 1):
            raise _bad(field, value, f"must be a positive integer ({what})")
    if capacity is not None and budget is not None:
        raise PlanError("give either capacity (slots per head) or budget (held tokens), not both",
                        "give --capacity (slots per head) or --budget (held tokens), not both")
    if max_len is not None:
        _int_in("max_len", max_len, 1, MAX_POSITION, "tokens per row; positions are int32")
    if not (_is_int(chunk_size) and chunk_size >= 1):
        raise _bad("chunk_size", chunk_size, "must be a positive integer (prefill chunk)")


def resolve_policy(cfg: ModelConfig, policy=None) -> Policy:
    """The policy (default: `default_policy`), refused when it needs decisions the model lacks."""
    pol = get_policy(default_policy(cfg) if policy is None else policy)
    if pol.uses_decisions and cfg.dms is None:
        raise PlanError(
            f"policy {pol.name!r} needs a DMS model (from_pretrained(path, dms=DMSConfig(...)), "
            "a config.json with a 'dms' block or a train.py export); use policy='full' or a "
            "baseline",
            f"--policy {pol.name} needs a DMS model (config.json with a 'dms' block, or a "
            "train.py export); this model has none: use --policy full or a baseline",
            "policy", pol.name)
    return pol


def resolve_window(cfg: ModelConfig, policy: Policy, window=None) -> int:
    """The cache's DMS window: the given one or the model's for a policy with decisions, else 0."""
    if window is not None:
        _int_in("window", window, 0, MAX_POSITION, "a window of n positions")
    if not policy.uses_decisions:
        return 0
    return int(cfg.dms.window if window is None else window)


def resolve_attention(policy: Policy, attention_impl: str | None = None,
                      platform: str | None = None) -> str:
    """The cache attention: scoring policies need the dense chunk attention's probabilities;
    the others read only the live slots unless "dense" is asked for: "tiled" on a CPU (a prefill
    chunk stream by stream, in query tiles that stay in a core's cache, the chunk's own keys
    causally, `dms_jax.ops.live_attention.tiled_attention`), "blockwise" elsewhere (every stream
    at once, block by block: an accelerator runs the streams in parallel; decode steps are the
    same in both). None: decided by the policy; "auto" is the platform's choice where allowed.
    "fused" (asked for only, never chosen): "blockwise" with each prefill chunk's attention as
    one Pallas kernel (`dms_jax.ops.fused_prefill`, experimental: exact in Pallas' interpreter,
    which runs it on a CPU, not yet timed on a GPU); the slot layout only.
    platform: the platform the programs are compiled for (default: the first device's)."""
    ranks = policy.needs_attention or (hasattr(policy, "observe")  # SnapKV: at prefill
                                       and policy.observe().needs_attention)
    if attention_impl is None:
        if ranks:
            return "dense"
        attention_impl = "auto"
    if attention_impl not in ATTENTION_IMPLS:
        raise _bad("attention_impl", attention_impl, f"is not one of {ATTENTION_IMPLS}")
    if ranks and attention_impl != "dense":
        raise PlanError(
            f"policy {policy.name!r} ranks tokens by the attention they receive, which only the "
            f"dense chunked cache attention computes; attention_impl={attention_impl!r} gives no "
            "scores: use attention_impl='dense'", field="attention_impl", value=attention_impl)
    if attention_impl != "auto":
        return attention_impl
    platform = jax.devices()[0].platform if platform is None else platform
    return "tiled" if platform == "cpu" else "blockwise"


def resolve_capacity(max_len: int, policy: Policy, *, window: int, target_cr: float,
                     margin: float, capacity=None, budget=None, alloc_len=None) -> int:
    """Slots per (layer, row, KV head) for rows of up to max_len tokens (errors name the fix).

    alloc_len: the allocated length (default max_len): a capacity is never more than it, and
    the dms default is sized for it. A given capacity / budget that holds all max_len tokens
    needs no room for the window or a baseline's rule (nothing is ever evicted).
    """
    alloc_len = max_len if alloc_len is None else alloc_len
    check_settings(capacity=capacity, budget=budget, target_cr=target_cr, margin=margin)
    given, field = (budget, "budget") if budget is not None else (capacity, "capacity")
    if isinstance(policy, BudgetPolicy):
        if given is None:
            raise PlanError(
                f"policy {policy.name!r} evicts down to a budget: pass budget= (held tokens per "
                "layer, row and KV head; dms_jax.policies.budget_from_stats(dms_output.stats) "
                "matches a DMS run, budget_for_ratio(tokens, ratio) a compression ratio)",
                field="budget", value=None)
        if given < max_len:  # a budget >= max_len evicts nothing: any rule fits
            policy.check_budget(int(given))
    if given is not None:
        if policy.uses_decisions and given < min(window + 1, max_len):
            raise _bad(field, given,
                       f"cannot hold the DMS window: it needs at least window + 1 = {window + 1} "
                       "slots per head; raise it or lower the window")
        return int(min(given, alloc_len))
    if not policy.uses_decisions:
        return int(alloc_len)
    return capacity_for(alloc_len, window, target_cr, margin)


def resolve_paging(max_len: int, policy: Policy, *, window: int, target_cr: float, margin,
                   page_size, pool_pages, sliding_window, capacity=None, budget=None,
                   asked_len=None):
    """(page_size, pages_per_stream, pool_pages, retain_fraction) of a paged plan, checked
    (PlanError names the fix). max_len: the allocated tokens per row; asked_len: the tokens a
    row must take (default max_len)."""
    if policy.name not in ("full", "dms"):
        raise PlanError(
            f"layout='paged' holds the full and dms policies, whose kept tokens stay for good; "
            f"{policy.name!r} evicts arbitrary tokens down to an exact budget and keeps fixed "
            "slots: use layout='slots'", f"--layout paged holds --policy full and dms; use "
            f"--layout slots for {policy.name}", "layout", "paged")
    if sliding_window is not None:
        raise PlanError(
            f"layout='paged' does not take a sliding-window model (sliding_window="
            f"{sliding_window}: its old tokens leave for good, which the append-only pages do "
            "not free): use layout='slots'", "--layout paged does not take a sliding-window "
            "model: use --layout slots", "layout", "paged")
    if capacity is not None or budget is not None:
        raise PlanError("capacity= / budget= size the slot layout; a paged pool is sized by "
                        "target_cr and margin, or pool_pages=", "--capacity / --budget size the "
                        "slot layout; size a paged pool with --target-cr and --margin",
                        "capacity", capacity if capacity is not None else budget)
    _int_in("page_size", page_size, 1, MAX_POSITION, "tokens per page")
    margin = DEFAULT_PAGED_MARGIN if margin is None else margin
    fraction = (1.0 + margin) / target_cr if policy.uses_decisions else 1.0
    if policy.uses_decisions:  # + half a page: a stream's last page is half full on average
        per_stream = round(max(max_len - window - 1, 0) * fraction / page_size + 0.5, 6)
    else:
        per_stream = -(-max_len // page_size)
    if pool_pages is not None:
        asked = max_len if asked_len is None else asked_len
        need = -(-max(asked - window - 1, 0) // page_size)
        if not (_is_int(pool_pages) and pool_pages >= 1):
            raise _bad("pool_pages", pool_pages, "must be a positive integer (pages per layer)")
        if policy.name == "full" and pool_pages < need:
            raise _bad("pool_pages", pool_pages,
                       f"cannot hold one full row of {asked} tokens ({need} pages of "
                       f"{page_size}): raise it or lower max_len")
        pool_pages = int(pool_pages)
    return int(page_size), float(per_stream), int(pool_pages or 0), float(fraction)


def plan_inference(model_config: ModelConfig, *, policy=None, window=None, capacity=None,
                   budget=None, target_cr=None, max_len=None, chunk_size=DEFAULT_CHUNK,
                   margin=None, attention_impl=None, layout="slots",
                   page_size=DEFAULT_PAGE_SIZE, pool_pages=None,
                   platform=None) -> InferencePlan:
    """Decide every setting of a cached forward once (see the module docstring); PlanError
    (a ValueError) names the setting, the limit and the fix.

    policy: a name ("full", "dms", "streaming", "h2o", "tova", "snapkv") or a `Policy`
      (`dms_jax.policies.get_policy(name, **params)`); default dms for a DMS model, else full.
    window: the DMS window (default: the model's). capacity: slots per head, or budget: held
      tokens per head (the baselines need one), or target_cr (default: the model's recorded
      `dms.target_cr`, else 8) with margin for dms. max_len: tokens per row the cache must take
      (required). chunk_size: prefill chunk. attention_impl: the cache attention, "blockwise"
      (the live slots only, every stream at once), "tiled" (the same, stream by stream in
      query tiles: the CPU's) or "dense" (every slot, with probabilities); default: "dense" for
      a policy that ranks tokens by attention, else "tiled" on a CPU platform and "blockwise"
      on others (platform: the one the programs are compiled for, default the first device's;
      an ahead-of-time compile for a TPU on this machine names it). margin: the extra fraction of
      expected retained tokens a dms cache allocates (default 0.5 per stream for slots, 0.1 of
      the pool for paged). layout: "slots" or "paged" (full and dms only), with page_size
      tokens per page and pool_pages pages per layer (default: sized for the batch, see the
      module docstring).
    """
    cfg = model_config
    if max_len is None:
        raise PlanError("max_len (tokens per row the cache must take) is required",
                        field="max_len")
    if layout not in LAYOUTS:
        raise _bad("layout", layout, f"is not one of {LAYOUTS}")
    paged_margin = margin
    if margin is None:
        margin = DEFAULT_MARGIN
    check_settings(window=window, target_cr=target_cr, margin=margin, capacity=capacity,
                   budget=budget, max_len=max_len, chunk_size=chunk_size)
    pol = resolve_policy(cfg, policy)
    eff_window = resolve_window(cfg, pol, window)
    impl = resolve_attention(pol, attention_impl, platform)
    if impl == "fused" and layout == "paged":
        raise PlanError("attention_impl='fused' reads the slot layout only; use layout='slots' "
                        "or attention_impl='blockwise' with the paged cache",
                        field="attention_impl", value=impl)
    alloc = allocated_length(int(max_len))
    cr = default_target_cr(cfg) if target_cr is None else target_cr
    paging = {}
    if layout == "paged":
        size, per_stream, pool, fraction = resolve_paging(
            alloc, pol, window=eff_window, target_cr=cr, margin=paged_margin,
            page_size=page_size, pool_pages=pool_pages, sliding_window=cfg.sliding_window,
            capacity=capacity, budget=budget, asked_len=int(max_len))
        cap = min(alloc, eff_window + 1 + math.ceil(per_stream * size))
        paging = dict(layout="paged", page_size=size, pages_per_stream=per_stream,
                      pool_pages=pool, retain_fraction=fraction,
                      attention_impl="tiled" if impl == "tiled" else "blockwise")
    else:
        cap = resolve_capacity(int(max_len), pol, window=eff_window, target_cr=cr, margin=margin,
                               capacity=capacity, budget=budget, alloc_len=alloc)
    neuron = cfg.dms is not None and cfg.dms.mode == "neuron"
    plan = InferencePlan(
        policy=pol, window=eff_window, mode=forward_mode(pol, neuron), neuron=neuron,
        attention_impl=impl, sliding_window=cfg.sliding_window, max_len=alloc, capacity=cap,
        chunk_size=int(chunk_size), num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=dtype_name(cfg.dtype),
        stacked=cfg.scan_layers)
    return dataclasses.replace(plan, **paging) if paging else plan


# ----------------------------------------------------------------------------- memory


class CacheTooLargeError(PlanError):
    """The plan's cache (and its largest step) would not fit in the memory available."""


def available_memory(device=None) -> int | None:
    """Bytes free for new arrays on `device` (default: the first device): the host's available
    RAM for a CPU device, bytes_limit - bytes_in_use for an accelerator; None when unknown."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    return None if not limit else int(limit) - int(stats.get("bytes_in_use", 0))


def check_memory(plan: InferencePlan, batch: int, *, mesh=None, available: int | None = None):
    """Refuse a plan whose cache plus its largest step would not fit, before allocating it.

    On a mesh the cache is split over the devices that hold its rows and KV heads (the rules of
    `dms_jax.sharding`); simulated CPU devices share the host's RAM, so a CPU plan is compared
    whole. available: bytes free (default: `available_memory`). Returns the bytes needed per
    device; raises CacheTooLargeError saying how much is needed and what to change.
    """
    cache, step = plan.cache_bytes(batch), plan.step_bytes(batch)
    device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
    shards = 1
    if mesh is not None and device.platform != "cpu":
        from dms_jax import sharding as shd

        spec = shd.logical_to_spec(shd.cache_logical_axes(4), mesh,
                                   (batch, plan.num_kv_heads, plan.capacity, plan.head_dim))
        shards = math.prod(shd.mesh_axis_size(mesh, axes) for axes in spec)
    need = (cache + step) // shards
    free = available_memory(device) if available is None else available
    if free is not None and need > free:
        where = "host RAM" if device.platform == "cpu" else f"{device.platform} device memory"
        what = (f"the KV cache needs {format_bytes(need)}"
                + (" per device" if shards > 1 else "")
                + f" ({format_bytes(cache // shards)} for {plan.num_layers} layers x {batch} row(s) "
                f"x {plan.num_kv_heads} KV heads x {plan.capacity} slots, plus "
                f"{format_bytes(step // shards)} for a prefill chunk's attention) but only "
                f"{format_bytes(free)} of {where} is available")
        raise CacheTooLargeError(
            f"{what}: lower max_len (allocated {plan.max_len} tokens per row), the batch or "
            "chunk_size, raise target_cr, or give a smaller capacity / budget",
            f"{what}: lower --max-len or --max-new-tokens ({plan.max_len} tokens per row "
            "allocated), the batch or --chunk-size, raise --target-cr, or give a smaller "
            "--capacity / --budget", field="max_len", value=plan.max_len)
    return need
