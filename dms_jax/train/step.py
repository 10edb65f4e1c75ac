"""The pure train step: loss, gradients w.r.t. the trainable parameters only, optimizer update.

State (a dict pytree, checkpointed as is):
  step       int32 []         updates applied so far
  params     {path: array}    trainable parameters (whole leaves; ColumnMask leaves train in part)
  opt_state  optax state over `params`
  rng        uint32 key data  the run's base key; step t uses fold_in(key, t)
Frozen parameters and the teacher's copies come in as separate, never-donated arguments.
Metrics include `state_finite` (1.0 / 0.0): whether the updated params and optimizer state are
all finite.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from dms_jax.train import losses, optim, schedule

LOSSES = ("distill", "distill_plain", "lm")
KL_TOKENS = ("all", "targets")
EMBEDDING = "embed.embedding"


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """loss: "distill" (KL(student || teacher) + L_dms, student in DMS training mode),
    "distill_plain" (KL only, student without DMS: the baseline distillation step),
    "lm" (next-token cross-entropy, plain forward)."""

    loss: str = "distill"
    cr_start: float = schedule.DEFAULT_CR_START
    cr_end: float = schedule.DEFAULT_CR_END
    cr_steps: int = schedule.DEFAULT_CR_STEPS
    loss_chunk: int = 1024
    dms_loss_weight: float = 1.0
    attention_impl: str = "auto"
    remat: bool = False  # rematerialise each student layer in the backward pass
    document_attention: bool = True  # packed rows: a token attends only within its document
    kl_tokens: str = "all"  # distillation KL over "all" real tokens or the data's "targets" (loss_mask)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"train.loss={self.loss!r}; use one of {LOSSES}")
        if self.kl_tokens not in KL_TOKENS:
            raise ValueError(f"train.kl_tokens={self.kl_tokens!r}; use one of {KL_TOKENS}")


def init_state(trainable: Mapping[str, Any], optimizer: optax.GradientTransformation, rng_data):
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": dict(trainable),
        "opt_state": optimizer.init(dict(trainable)),
        "rng": rng_data,
    }


def make_train_step(graphdef, paths, masks, optimizer, step_cfg: StepConfig,
                    constrain: Callable = lambda x, axes: x) -> Callable:
    """train_step(state, frozen, teacher_params, batch) -> (state, metrics).

    teacher_params: initial copies of the trainable leaves the plain forward reads (all of them
    when every weight trains; the q_proj kernels in neuron mode; none for the adapter, which the
    plain forward never reads). batch: {"input_ids", "attention_mask", "loss_mask",
    "segment_ids"} int32 [B, T].
    constrain(x, logical_axes) places activations (sharding.constrain bound to the mesh).
    """
    partial = optim.partial_masks(masks)
    cfg = step_cfg

    def unembed_of(model):
        return lambda h: constrain(model.unembed(h), ("batch", "seq", "vocab"))

    def gathered(params):
        """FSDP: all-gather the embedding table before its row lookup (a gather from a table
        sharded along d_model makes the partitioner replicate the lookup's output instead)."""
        if EMBEDDING in params:
            params = {**params, EMBEDDING: constrain(params[EMBEDDING], (None, None))}
        return params

    def loss_fn(trainable, frozen, teacher_params, batch, key, step):
        ids, attn = batch["input_ids"], batch["attention_mask"]
        seg = {"segment_ids": batch["segment_ids"]} if cfg.document_attention else {}
        real = attn.astype(jnp.float32)
        student = optim.merge_model(graphdef, gathered({**frozen, **trainable}), paths)
        metrics = {"tokens": jnp.sum(real)}
        if cfg.loss == "lm":
            out = student.forward(ids, attention_mask=attn, mode="plain", return_logits=False,
                                  attention_impl=cfg.attention_impl, remat=cfg.remat, **seg)
            hidden = constrain(out.hidden, ("batch", "seq", "act_embed"))
            total, count = losses.language_model_ce(hidden, unembed_of(student), ids, batch["loss_mask"],
                                                    attn, cfg.loss_chunk)
            loss = total / jnp.maximum(count, 1.0)
            metrics.update(ce=loss, perplexity=jnp.exp(loss))
            return loss, metrics

        teacher_flat = {**frozen, **jax.lax.stop_gradient(trainable), **teacher_params}
        teacher = optim.merge_model(graphdef, gathered(teacher_flat), paths)
        t_out = teacher.forward(ids, attention_mask=attn, mode="plain", return_logits=False,
                                attention_impl=cfg.attention_impl, **seg)
        dms_on = cfg.loss == "distill"
        s_out = student.forward(ids, attention_mask=attn, mode="train" if dms_on else "plain",
                                key=key if dms_on else None, return_logits=False,
                                attention_impl=cfg.attention_impl, remat=cfg.remat, **seg)
        s_hidden = constrain(s_out.hidden, ("batch", "seq", "act_embed"))
        t_hidden = constrain(t_out.hidden, ("batch", "seq", "act_embed"))
        # "targets": only where the data supervises a prediction (answers of task documents)
        kl_weights = real if cfg.kl_tokens == "all" else batch["loss_mask"].astype(jnp.float32) * real
        kl_sum = losses.distillation_kl(s_hidden, t_hidden, unembed_of(student), unembed_of(teacher),
                                        kl_weights, cfg.loss_chunk)
        kl = kl_sum / jnp.maximum(jnp.sum(kl_weights), 1.0)
        loss = kl
        metrics["kl"] = kl
        if dms_on:
            target = schedule.target_fraction(step, cfg.cr_start, cfg.cr_end, cfg.cr_steps)
            dms_loss, frac = losses.compression_loss(s_out.decisions, real, target)
            loss = kl + cfg.dms_loss_weight * dms_loss
            metrics.update(
                dms_loss=dms_loss, evicted_fraction=frac,
                target_cr=1.0 / (1.0 - target), achieved_cr=losses.achieved_compression(frac),
            )
        return loss, metrics

    def train_step(state, frozen, teacher_params, batch):
        step = state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], frozen, teacher_params, batch, key, step
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optim.apply_updates(state["params"], updates, partial)
        trainable_grads = {k: partial[k].zero_outside(g) if k in partial else g for k, g in grads.items()}
        metrics.update(loss=loss, grad_norm=optax.global_norm(trainable_grads),
                       state_finite=all_finite((params, opt_state)).astype(jnp.float32))
        new_state = {"step": step + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
        return new_state, metrics

    return train_step


def all_finite(tree) -> jax.Array:
    """bool []: no NaN / Inf in any floating leaf (a finite loss can still come with an update
    that is not: the loop never saves such a state)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def teacher_leaves(masks: Mapping[str, Any]) -> list[str]:
    """Trainable leaves the plain (teacher) forward reads: they need a frozen initial copy."""
    return [k for k, m in masks.items() if m is not False and ".attn.dms_" not in k]
