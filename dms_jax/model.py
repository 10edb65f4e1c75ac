"""Flax NNX decoder for the Llama family (Llama 3.x, Qwen2, Qwen3, Mistral) with DMS.

One model, three forward modes (see `Decoder.forward`):
  * "plain": the original model, nothing evicted (the teacher);
  * "train": DMS training forward, Gumbel-sigmoid soft mask, needs a PRNG key;
  * "eval":  DMS evaluation forward, hard mask, no noise.
Family differences are ModelConfig fields (biases, q/k norm, sliding window, rope scaling).
With a KV cache the forward runs as its `InferencePlan` says (`dms_jax.plan`): mode, window,
policy. Profiler regions (`jax.named_scope`): embed, layer_<i>/attention (kv_cache inside it
with a cache), layer_<i>/mlp, final_norm, unembed; with `ModelConfig.scan_layers` the layers
run as one body under `lax.scan`: layers/attention, layers/mlp, with a cache too (its plan is
stacked and its cache a `StackedCache`, updated in place layer by layer).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dms_jax import paged
from dms_jax.cache import StackedCache, attend_and_update, compression_ratio
from dms_jax.config import ModelConfig, resolve_dtype
from dms_jax.layers import MLP, RMSNorm, apply_rope, rope_inv_freq, rope_tables
from dms_jax.ops import gating
from dms_jax.ops.attention import dense_attention
from dms_jax.ops.live_attention import take_rows
from dms_jax.ops.mask import is_held

MODES = ("plain", "train", "eval")
ATTENTION_IMPLS = ("auto", "dense", "blockwise")
# "auto" switches from dense to blockwise attention above this many tokens.
DENSE_MAX_TOKENS = 1024


class ModelOutput(NamedTuple):
    logits: Any  # [B, T, V] float32, or None when return_logits=False
    hidden: Any  # [B, T, d] after the final norm
    decisions: Any  # [L, B, T, Hkv] float32: train = straight-through hard, eval = 0/1; None in plain
    alpha: Any  # [L, B, T, Hkv] float32 soft alpha (train), None otherwise
    decision_logits: Any  # [L, B, T, Hkv] float32 z (train/eval), None in plain
    cache: Any = None  # updated KV cache when one was passed


class LayerContext(NamedTuple):
    """What every layer needs besides its input (built once per forward)."""

    mode: str
    positions: Any  # int32 [B, T]
    k_valid: Any  # bool [B, T] or None
    attention_impl: str
    rope: Any  # (cos, sin) f32 [B, T, D // 2] each (`rope_tables`, once per forward)
    window: int = 0  # the DMS window w the attention applies (0 without DMS)
    plan: Any = None  # the dms_jax.plan.InferencePlan when a KV cache is passed
    segment_ids: Any = None  # int32 [B, T] packed-document ids (training), or None


def weight_init(cfg: ModelConfig):
    """The random init of every projection and the embedding: normal(0, initializer_range), as
    transformers starts a Llama (the adapter alone starts at zero)."""
    return nnx.initializers.normal(cfg.initializer_range)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
        d, h, hkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = dict(kernel_init=weight_init(cfg))
        self.q_proj = nnx.Linear(d, h * hd, use_bias=cfg.qkv_bias, **init, **kw)
        self.k_proj = nnx.Linear(d, hkv * hd, use_bias=cfg.qkv_bias, **init, **kw)
        self.v_proj = nnx.Linear(d, hkv * hd, use_bias=cfg.qkv_bias, **init, **kw)
        self.o_proj = nnx.Linear(h * hd, d, use_bias=cfg.o_bias, **init, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        if cfg.dms is not None and cfg.dms.mode == "adapter":
            self.dms_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.dms_proj = nnx.Linear(
                d, hkv, use_bias=False, kernel_init=nnx.initializers.zeros_init(), **kw
            )
        self.cfg = cfg

    def decision_logits(self, residual, q):
        """z [B, T, Hkv] float32 (docs/dms.md section 1) and q with the neuron zeroed (neuron
        mode)."""
        dms = self.cfg.dms
        if dms.mode == "neuron":
            z = gating.neuron_decision_logits(q, self.cfg.num_kv_heads, dms.scale, dms.offset)
            q = gating.zero_decision_neuron(q, self.cfg.num_kv_heads)
        else:
            weight = self.dms_proj.kernel[...].T  # [Hkv, d]
            z = gating.adapter_decision_logits(self.dms_norm(residual), weight, dms.scale, dms.offset)
        if dms.per == "layer":
            z = z[..., :1]
        return z, q

    def __call__(self, residual, x, ctx: LayerContext, key=None, cache=None, out_rows=None):
        """residual: stream entering the layer, x: its input-normed version, both [B, T, d].
        out_rows: int32 [B] or None: with a cache, the output of one query per row only
        ([B, 1, d]; `dms_jax.cache.attend_and_update`)."""
        cfg = self.cfg
        batch, seq = x.shape[:2]
        q = self.q_proj(x).reshape(batch, seq, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)

        dms_on = ctx.mode != "plain" and cfg.dms is not None
        z = alpha = decisions = evict_bias = None
        if dms_on:
            z, q = self.decision_logits(residual, q)  # z: [B, T, Hkv or 1]
            if ctx.mode == "train":
                zt, alpha, decisions = gating.gumbel_sigmoid(z, key, cfg.dms.tau)
                evict_bias = gating.soft_evict_bias(zt)
            else:
                hard = gating.hard_decisions(z)
                decisions = hard.astype(jnp.float32)
                evict_bias = gating.hard_evict_bias_from_decisions(hard)
            shape = (batch, seq, cfg.num_kv_heads)
            z, decisions, evict_bias = (jnp.broadcast_to(a, shape) for a in (z, decisions, evict_bias))
            alpha = None if alpha is None else jnp.broadcast_to(alpha, shape)

        q = apply_rope(q, ctx.rope)
        k = apply_rope(k, ctx.rope)
        if dms_on and cfg.dms.mode == "neuron":
            q = gating.zero_decision_neuron(q, cfg.num_kv_heads)

        if cache is not None:
            plan = ctx.plan
            valid = jnp.ones((batch, seq), bool) if ctx.k_valid is None else ctx.k_valid
            hard = gating.hard_decisions(z) if dms_on else None  # [B, T, Hkv or 1]
            with jax.named_scope("kv_cache"):
                if plan.layout == "paged":
                    out, cache = paged.attend_and_update(
                        cache, q, k, v, hard, ctx.positions, valid, window=plan.window,
                        policy=plan.policy, sliding_window=plan.sliding_window,
                        attention=plan.attention_impl, out_rows=out_rows)
                else:
                    out, cache = attend_and_update(
                        cache, q, k, v, hard, ctx.positions, valid, window=plan.window,
                        policy=plan.policy, sliding_window=plan.sliding_window,
                        attention=plan.attention_impl, out_rows=out_rows)
        else:
            out = self._attend(q, k, v, evict_bias, ctx.window if dms_on else 0, ctx)
        out = self.o_proj(out.reshape(batch, out.shape[1], cfg.num_heads * cfg.head_dim))
        return out, (decisions, alpha, z), cache

    def _attend(self, q, k, v, evict_bias, window, ctx: LayerContext):
        seq = q.shape[1]
        impl = ctx.attention_impl
        if impl == "auto":
            impl = "dense" if seq <= DENSE_MAX_TOKENS else "blockwise"
        bias = None if evict_bias is None else jnp.swapaxes(evict_bias, 1, 2)  # [B, Hkv, T]
        kwargs = dict(
            q_pos=ctx.positions, k_pos=ctx.positions, evict_bias=bias, window=window,
            k_valid=ctx.k_valid, sliding_window=self.cfg.sliding_window,
            segment_ids=ctx.segment_ids,
        )
        if impl == "dense":
            return dense_attention(q, k, v, **kwargs)
        from dms_jax.ops.blockwise import blockwise_attention

        return blockwise_attention(q, k, v, **kwargs)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
        norm_kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm_kw)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm_kw)
        self.mlp = MLP(
            cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, dtype=dtype,
            param_dtype=param_dtype, kernel_init=weight_init(cfg), rngs=rngs,
        )

    def __call__(self, x, ctx: LayerContext, key=None, cache=None, out_rows=None):
        """x: [B, T, d] -> [B, T, d] ([B, 1, d], row b's token out_rows[b], with out_rows)."""
        with jax.named_scope("attention"):
            attn_out, aux, cache = self.attn(x, self.input_norm(x), ctx, key=key, cache=cache,
                                             out_rows=out_rows)
        if out_rows is not None:
            x = take_rows(x, out_rows)
        x = x + attn_out
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.post_attn_norm(x))
        return x, aux, cache


class Decoder(nnx.Module):
    """Decoder-only transformer. `model(input_ids)` is the plain causal forward -> logits."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
        self.config = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_init=weight_init(cfg),
        )
        layers = [DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
        # scan_layers: one DecoderLayer whose Params are stacked [L, ...] (the same draws as the
        # unrolled layout, so a seed gives the same model either way); else one module per layer
        self.layers = stack_modules(layers) if cfg.scan_layers else nnx.List(layers)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Linear(
                cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype,
                param_dtype=param_dtype, kernel_init=weight_init(cfg), rngs=rngs,
            )

    def unembed(self, hidden):
        """hidden [..., d] (after the final norm) -> logits [..., V] float32."""
        with jax.named_scope("unembed"):
            if self.config.tie_word_embeddings:
                logits = self.embed.attend(hidden)
            else:
                logits = self.lm_head(hidden)
            return logits.astype(jnp.float32)

    def forward(self, input_ids, *, attention_mask=None, positions=None, mode=None, key=None,
                return_logits=True, attention_impl=None, cache=None, plan=None, window=None,
                remat=False, segment_ids=None, outputs_at=None):
        """Run the decoder.

        input_ids: int [B, T]; attention_mask: [B, T] (1 real, 0 padding) or None;
        positions: int [B, T] or None (0..T-1, as transformers does);
        mode: "plain" (default) | "train" (needs `key`) | "eval"; attention_impl: "auto"
        (default) | "dense" | "blockwise"; window: the DMS window of mode "eval" (default: the
        config's).
        cache: the KV cache built by `dms_jax.cache.init_cache(plan, batch)` (a tuple of
        per-layer caches, or for a model with scan_layers one `StackedCache`), with `plan` its
        `dms_jax.plan.InferencePlan`: the tokens attend over the cache and are stored in it as
        the plan says (its mode, window and policy; give no mode, attention_impl or window of
        your own); the updated cache is in the output. With a cache, `positions` must continue
        each row's previous positions.
        remat: rematerialise each layer in the backward pass (training memory ~ one layer's
        activations plus every layer's input, for ~1/3 more compute).
        segment_ids: int [B, T] ids of the documents packed into each row (a token sees only its
        own document; RoPE is relative, so positions need not restart), or None.
        outputs_at: int [B] or None, with a cache: the one token per row whose hidden state is
        needed (a prompt's last; -1: none in this row, its output is meaningless). The last
        layer attends with that token's query alone and runs its MLP on that token alone (no
        other output reads the rest), while every token's K / V is stored and every query's keys
        seen are counted as usual; `hidden` (and logits) are then [B, 1, ...]. Not for policies
        that score keys by attention (H2O, TOVA, SnapKV's observation).
        """
        cfg = self.config
        validate_input_ids(input_ids, cfg.vocab_size)
        if cache is not None:
            mode, attention_impl, window = _cache_settings(plan, cfg, cache, mode,
                                                           attention_impl, window)
        elif plan is not None:
            raise ValueError("plan= describes a KV cache forward: pass cache=init_cache(plan, "
                             "batch) with it")
        mode = "plain" if mode is None else mode
        attention_impl = "auto" if attention_impl is None else attention_impl
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; use one of {MODES}")
        if cache is None and attention_impl not in ATTENTION_IMPLS:  # a plan's is checked there
            raise ValueError(f"attention_impl={attention_impl!r}; use one of {ATTENTION_IMPLS}")
        if mode != "plain" and cfg.dms is None:
            raise ValueError(
                f"mode={mode!r} needs a DMS model; load it with dms=DMSConfig(...) "
                "(dms_jax.from_pretrained(path, dms=DMSConfig()))"
            )
        if mode == "train" and key is None:
            raise ValueError("mode='train' samples Gumbel noise: pass key=jax.random.key(...)")
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids are for packed training rows; a KV cache holds one "
                             "sequence per row")
        if outputs_at is not None and cache is None:
            raise ValueError("outputs_at selects the outputs of a cached forward (a prompt chunk);"
                             " without a cache, index the full output instead")
        if remat and cache is not None:
            raise ValueError("remat is for training (it trades compute for activation memory); "
                             "leave it off with a KV cache")
        batch, seq = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        k_valid = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        window = full_sequence_window(cfg, window)
        positions = jnp.asarray(positions).astype(jnp.int32)
        ctx = LayerContext(
            mode=mode, positions=positions, k_valid=k_valid,
            attention_impl=attention_impl, window=window, plan=plan,
            segment_ids=None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32),
            rope=rope_tables(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta,
                                                      cfg.rope_scaling_dict)),
        )
        keys = jax.random.split(key, cfg.num_layers) if mode == "train" else [None] * cfg.num_layers
        with jax.named_scope("embed"):
            x = self.embed(input_ids)

        out_rows = None if outputs_at is None else jnp.asarray(outputs_at, jnp.int32)
        if isinstance(cache, StackedCache):
            x, (decisions, alpha, z), new_caches = self._scan_cached_layers(x, ctx, cache,
                                                                            out_rows)
        elif cfg.scan_layers and cache is None:
            x, (decisions, alpha, z) = self._scan_layers(x, ctx, keys if mode == "train" else None,
                                                         remat)
            new_caches = None
        else:
            x, (decisions, alpha, z), new_caches = self._loop_layers(x, ctx, keys, cache, remat,
                                                                     out_rows)
        with jax.named_scope("final_norm"):
            hidden = self.final_norm(x)
        logits = self.unembed(hidden) if return_logits else None
        return ModelOutput(logits, hidden, decisions, alpha, z, new_caches)

    def _loop_layers(self, x, ctx: LayerContext, keys, cache, remat, out_rows=None):
        """The layers in a Python loop, one program region each: the unrolled layout, and any
        forward with a KV cache (a tuple of per-layer caches; a stacked model hands each
        iteration its layer i, sliced out of the stacked parameters); out_rows: the last
        layer's (`forward`'s outputs_at).
        Returns (x, (decisions, alpha, z) each [L, ...] or None, the new caches or None)."""
        last = self.config.num_layers - 1

        def run_layer(layer, x, key, layer_cache, rows=None):
            return layer(x, ctx, key=key, cache=layer_cache, out_rows=rows)

        if remat:  # keep only each layer's input; recompute the layer in the backward pass
            run_layer = nnx.remat(run_layer)
        per_layer, new_caches = [], []
        for i in range(self.config.num_layers):
            layer = layer_at(self.layers, i) if self.config.scan_layers else self.layers[i]
            layer_cache = None if cache is None else cache[i]
            with jax.named_scope(f"layer_{i}"):
                x, aux, layer_cache = run_layer(layer, x, keys[i], layer_cache,
                                                out_rows if i == last else None)
            per_layer.append(aux)
            new_caches.append(layer_cache)
        stacked = tuple(None if aux[0] is None else jnp.stack(aux) for aux in zip(*per_layer))
        return x, stacked, None if cache is None else tuple(new_caches)

    def _scan_layers(self, x, ctx: LayerContext, keys, remat):
        """The stacked layers as one compiled body under `lax.scan` (no KV cache).

        keys: [L] PRNG keys (train) or None. Returns (x, (decisions, alpha, z)), each [L, B, T,
        Hkv] as the loop stacks them (None where the mode has none)."""
        graphdef, params = nnx.split(self.layers)  # params: [L, ...] leaves

        def body(x, layer_slice):  # x: [B, T, d]; layer_slice: (layer i's params, its key)
            layer_params, key = layer_slice
            x, aux, _ = nnx.merge(graphdef, layer_params)(x, ctx, key=key)
            return x, aux

        if remat:  # keep only each layer's input; recompute the body in the backward pass
            body = jax.checkpoint(body, prevent_cse=False)
        with jax.named_scope("layers"):
            return jax.lax.scan(body, x, (params, keys))

    def _scan_cached_layers(self, x, ctx: LayerContext, cache: StackedCache, out_rows=None):
        """The stacked layers under `lax.scan` over a StackedCache: one compiled body for every
        layer. The stacked cache rides in the carry and the body reads layer i's cache and
        writes it back with dynamic_update_slice, so a donated cache is updated in place (as
        the scan's output it would need a second buffer of the whole cache). With out_rows
        (`forward`'s outputs_at) the scan runs the first L - 1 layers and the last one runs
        after it with out_rows (its output has another shape than the carry).
        Returns (x, (decisions, alpha, z) each [L, ...] or None, the new StackedCache)."""
        graphdef, params = nnx.split(self.layers)  # params: [L, ...] leaves
        layers = self.config.num_layers

        def layer_step(x, stacked, i, rows=None):
            at = lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False)  # noqa: E731
            layer_cache = jax.tree.map(at, stacked)
            x, aux, layer_cache = nnx.merge(graphdef, jax.tree.map(at, params))(
                x, ctx, cache=layer_cache, out_rows=rows)
            stacked = jax.tree.map(lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u, i, 0),
                                   stacked, layer_cache)
            return x, stacked, aux

        def body(carry, i):
            x, stacked = carry
            x, stacked, aux = layer_step(x, stacked, i)
            return (x, stacked), aux

        scanned = layers if out_rows is None else layers - 1
        with jax.named_scope("layers"):
            (x, stacked), aux = jax.lax.scan(body, (x, cache.layers),
                                             jnp.arange(scanned, dtype=jnp.int32))
        if out_rows is not None:
            with jax.named_scope("last_layer"):
                x, stacked, last = layer_step(x, stacked, jnp.int32(layers - 1), out_rows)
            aux = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), aux, last)
        return x, aux, StackedCache(stacked)

    def __call__(self, input_ids, attention_mask=None):
        return self.forward(input_ids, attention_mask=attention_mask).logits

    def train_forward(self, input_ids, key, attention_mask=None, **kw) -> ModelOutput:
        """DMS training forward: soft Gumbel-sigmoid mask; logits, decisions and alpha."""
        return self.forward(input_ids, attention_mask=attention_mask, mode="train", key=key, **kw)

    def eval_forward(self, input_ids, attention_mask=None, **kw):
        """DMS evaluation forward (hard mask). Returns (ModelOutput, compression ratio).

        The ratio is 1 / mean(held / seen) over layers, rows and KV heads at the end of each
        row (docs/dms.md section 6), held counted from the hard decisions, the window and the
        model's sliding window by the rule the cache keeps (`dms_jax.ops.mask.is_held`), so it
        equals the CR `generate` reports for the same tokens.
        """
        out = self.forward(input_ids, attention_mask=attention_mask, mode="eval", **kw)
        return out, compression_ratio_from_decisions(
            out.decisions, attention_mask, full_sequence_window(self.config, kw.get("window")),
            sliding_window=self.config.sliding_window)


def stack_modules(modules):
    """One module of the same structure whose parameters are the modules' stacked on a leading
    axis ([len(modules), ...]); entry i is modules[i]'s (the layout `Decoder._scan_layers` runs).
    """
    graphdef, first = nnx.split(modules[0])
    pures = [nnx.to_pure_dict(nnx.state(m)) for m in modules]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *pures)
    nnx.replace_by_pure_dict(first, stacked)
    return nnx.merge(graphdef, first)


def layer_at(stacked_layers, i: int):
    """Layer i of a stacked `DecoderLayer` (`stack_modules`) as a module of its own ([...])."""
    graphdef, params = nnx.split(stacked_layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], params))


def full_sequence_window(cfg: ModelConfig, window=None) -> int:
    """The DMS window of a forward without a cache (train / eval): the given one, else the
    config's (0 without DMS). With a cache the plan decides (`dms_jax.plan.resolve_window`)."""
    if window is not None:
        return window
    return cfg.dms.window if cfg.dms is not None else 0


def _cache_settings(plan, cfg, cache, mode, attention_impl, window):
    """(mode, attention_impl, window) of a cached forward: the plan's, checked against the
    model, the cache and anything the caller gave."""
    if plan is None:
        raise ValueError("a KV cache needs the plan it was built for: "
                         "plan = dms_jax.plan_inference(model.config, ...), "
                         "cache = dms_jax.cache.init_cache(plan, batch), forward(..., plan=plan)")
    if not plan.matches(cfg):
        raise ValueError(f"this plan was made for another model ({plan.num_layers} layers, "
                         f"{plan.num_kv_heads} KV heads of {plan.head_dim}, sliding window "
                         f"{plan.sliding_window}, mode {plan.mode!r}, layers "
                         f"{'stacked' if plan.stacked else 'unrolled'}); make it with "
                         "plan_inference(model.config, ...)")
    for name, given, planned in (("mode", mode, plan.mode),
                                 ("attention_impl", attention_impl, plan.attention_impl),
                                 ("window", window, plan.window)):
        if given is not None and given != planned:
            raise ValueError(f"{name}={given!r}: with a KV cache the plan decides ({name} "
                             f"{planned!r}); leave it unset or make another plan")
    if len(cache) != cfg.num_layers:
        raise ValueError(f"cache has {len(cache)} layers, the model {cfg.num_layers}")
    if isinstance(cache, StackedCache) != plan.stacked:
        raise ValueError(f"the plan's layers are {'stacked' if plan.stacked else 'unrolled'} but "
                         f"the cache is {'not ' if plan.stacked else ''}a StackedCache: build the "
                         "cache from the plan, init_cache(plan, batch)")
    return plan.mode, plan.attention_impl, plan.window


def compression_ratio_from_decisions(decisions, attention_mask, window, *, sliding_window):
    """1 / mean(held / seen) after the whole sequence (docs/dms.md sections 5-6).

    decisions: [L, B, T, Hkv] 0/1 (decision at t flags token t-1); attention_mask [B, T] or None;
    sliding_window: the model's (None: none). A token j of a row with n real tokens is held at
    the end iff the row's last query may still see it (`dms_jax.ops.mask.is_held`: inside the
    window, n - 1 - j <= w, or its flag d[j+1] is 0; and inside the sliding window), the same
    rule the cache keeps; the ratio is `dms_jax.cache.compression_ratio`.
    """
    num_layers, batch, seq, _ = decisions.shape
    valid = jnp.ones((batch, seq), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    n = valid.sum(axis=1)  # [B] real tokens (left- or right-padded rows: positions are ranks)
    rank = jnp.cumsum(valid, axis=1) - 1  # [B, T] index of each real token
    flags = gating.shift_to_keys(decisions > 0.5, False, axis=2)  # [L, B, T, Hkv]
    # the decision of a pad token never flags a real one: zero flags whose successor is padding
    next_valid = jnp.concatenate([valid[:, 1:], jnp.zeros((batch, 1), bool)], axis=1)
    flags = flags & next_valid[None, :, :, None]
    held = is_held((n - 1)[None, :, None, None], rank[None, :, None, :],
                   jnp.swapaxes(flags, 2, 3), window, k_valid=valid[None, :, None, :],
                   sliding_window=sliding_window)  # [L, B, Hkv, T]
    return compression_ratio(held.sum(axis=-1), n)


def validate_input_ids(input_ids, vocab_size):
    """Rank check always; value check when the ids are concrete (not under jit)."""
    shape = getattr(input_ids, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(
            f"input_ids must be a [batch, seq] integer array, got shape {shape}; "
            "wrap a single sequence as ids[None, :]"
        )
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}")
    if isinstance(input_ids, jax.core.Tracer):
        return
    arr = np.asarray(input_ids)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)]
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}); found {bad[:5].tolist()} "
            f"(min {arr.min()}, max {arr.max()}): check the tokenizer matches the model"
        )
