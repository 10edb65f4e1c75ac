"""What trains and how: flat parameter dicts, trainable masks, the AdamW chain.

Parameters travel through the train step as a flat dict {"layers.3.attn.q_proj.kernel": array}.
It is split into a trainable part (gradients and optimizer state exist only for it) and a frozen
part (passed in, never updated, so it stays bit-identical). A trainable leaf may be trainable
only in part: in neuron mode only the decision neuron's column of q_proj trains, expressed by a
`ColumnMask` that zeroes the other entries' gradients and updates inside the optax chain.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax.numpy as jnp
import optax
from flax import nnx

from dms_jax.config import ModelConfig
from dms_jax.sharding import param_path

TRAINABLE_CHOICES = ("all", "decision")
_ADAPTER = re.compile(r"attn\.dms_(norm|proj)\.")
_Q_PROJ = re.compile(r"attn\.q_proj\.(kernel|bias)$")


def split_model(model):
    """model -> (graphdef, flat params {dotted: array}, {dotted: path tuple})."""
    graphdef, state = nnx.split(model, nnx.Param)
    flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(state))
    return graphdef, {param_path(p): v for p, v in flat.items()}, {param_path(p): p for p in flat}


def merge_model(graphdef, params: Mapping[str, Any], paths: Mapping[str, tuple]):
    """Inverse of `split_model`: a Decoder whose parameters are `params` (works under jit)."""
    return nnx.merge(graphdef, nnx.traversals.unflatten_mapping({paths[k]: v for k, v in params.items()}))


@dataclasses.dataclass(frozen=True)
class ColumnMask:
    """Entries whose last-axis index i satisfies i % period == offset (the rest frozen).

    Neuron mode: q_proj columns h * G * D + D - 1, i.e. period G * D, offset D - 1.
    Built in-graph from an iota, so no mask array is stored or baked into the program.
    """

    period: int
    offset: int

    def array(self, shape):
        cols = jnp.arange(shape[-1]) % self.period == self.offset
        return jnp.broadcast_to(cols, shape)

    def zero_outside(self, x):
        return jnp.where(self.array(x.shape), x, jnp.zeros_like(x))

    def select(self, new, old):
        return jnp.where(self.array(new.shape), new, old)


def trainable_masks(params: Mapping[str, Any], cfg: ModelConfig, trainable: str) -> dict[str, Any]:
    """{path: True (trains) | False (frozen) | ColumnMask (trains in part)}."""
    if trainable not in TRAINABLE_CHOICES:
        raise ValueError(f"train.trainable={trainable!r}; use one of {TRAINABLE_CHOICES}")
    if trainable == "all":
        return {k: True for k in params}
    if cfg.dms is None:
        raise ValueError(
            "train.trainable='decision' trains the DMS decision path, but the model has no DMS "
            "config: set model.dms.mode to 'adapter' or 'neuron' (or train.trainable='all')"
        )
    if cfg.dms.mode == "adapter":
        masks = {k: bool(_ADAPTER.search(k)) for k in params}
    else:
        column = ColumnMask(period=cfg.group_size * cfg.head_dim, offset=cfg.head_dim - 1)
        masks = {k: (column if _Q_PROJ.search(k) else False) for k in params}
    if not any(m is not False for m in masks.values()):
        raise ValueError(f"no decision-path parameter found for DMS mode {cfg.dms.mode!r}")
    return masks


def partition(params: Mapping[str, Any], masks: Mapping[str, Any]):
    """(trainable, frozen) flat dicts."""
    trainable = {k: v for k, v in params.items() if masks[k] is not False}
    frozen = {k: v for k, v in params.items() if masks[k] is False}
    return trainable, frozen


def partial_masks(masks: Mapping[str, Any]) -> dict[str, ColumnMask]:
    return {k: m for k, m in masks.items() if isinstance(m, ColumnMask)}


def zero_outside_masks(partial: Mapping[str, ColumnMask]) -> optax.GradientTransformation:
    """optax transform: zero the entries of partly-trainable leaves that must stay frozen."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        updates = {k: partial[k].zero_outside(u) if k in partial else u for k, u in updates.items()}
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(*, learning_rate: float, b1: float, b2: float, eps: float, weight_decay: float,
                   grad_clip: float, warmup_steps: int = 0,
                   partial: Mapping[str, ColumnMask] | None = None) -> optax.GradientTransformation:
    """[zero frozen entries] -> clip by global norm -> AdamW -> [zero frozen entries].

    The gradient mask comes first so clipping sees only trainable entries; the update mask comes
    last so weight decay never touches a frozen entry.
    """
    if learning_rate <= 0:
        raise ValueError(f"train.learning_rate={learning_rate} must be > 0 (reference 3e-5)")
    lr = learning_rate
    if warmup_steps > 0:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
            [warmup_steps],
        )
    chain = []
    if partial:
        chain.append(zero_outside_masks(partial))
    if grad_clip and grad_clip > 0:
        chain.append(optax.clip_by_global_norm(grad_clip))
    chain.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    if partial:
        chain.append(zero_outside_masks(partial))
    return optax.chain(*chain)


def apply_updates(params: Mapping[str, Any], updates: Mapping[str, Any],
                  partial: Mapping[str, ColumnMask]) -> dict[str, Any]:
    """params + updates; frozen entries of partly-trainable leaves keep their exact bits."""
    out = {}
    for k, p in params.items():
        new = (p + updates[k]).astype(p.dtype)
        out[k] = partial[k].select(new, p) if k in partial else new
    return out
