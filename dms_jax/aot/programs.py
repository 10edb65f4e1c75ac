"""The project's own programs, compiled for a set of devices from shapes alone.

    report = compile_train(config, devices, mesh_shape=(1, -1, 1))    # the trainer's jitted step
    reports = compile_decode(cfg, devices, batch=8, context=32768, policy="dms", target_cr=8.0)

Nothing here writes a second step function: the train step is `dms_jax.train.loop`'s
`make_step_program` (the one `train.py` runs), the inference programs are `dms_jax.generate`'s
`prefill_step` and `decode_loop` with the cache of `dms_jax.cache.init_cache` for the plan of
`dms_jax.plan.plan_inference`. Inputs are `jax.ShapeDtypeStruct`s carrying the shardings of the
rules table (`dms_jax.sharding`), so no weight is read and no device memory is touched.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from dms_jax import sharding as shd
from dms_jax.aot.memory import MemoryReport, compile_and_measure, shard_bytes
from dms_jax.aot.shapes import abstract_model, model_config_for_recipe
from dms_jax.aot.topology import mesh_for
from dms_jax.config import ModelConfig


class BatchError(ValueError):
    """A batch the mesh cannot split evenly."""


def check_batch(batch: int, mesh, flag: str) -> None:
    """Rows are split over data x fsdp: the batch must be a multiple of it (before compiling)."""
    shards = shd.mesh_axis_size(mesh, ("data", "fsdp"))
    if batch < 1 or batch % shards:
        raise BatchError(
            f"{flag} = {batch} is not divisible by data * fsdp = {shards} (mesh "
            f"{dict(mesh.shape)}): use a multiple of {shards}, or a mesh with fewer data / fsdp "
            "shards (--mesh)")


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What a train-step compile varies (defaults: the recipe's)."""

    mesh_shape: tuple | None = None
    remat: bool | None = None
    scan_layers: bool | None = None  # model.scan_layers: layers stacked under lax.scan
    batch_size: int | None = None
    seq_len: int | None = None


def compile_train(config, devices: Sequence, settings: TrainSettings = TrainSettings(), *,
                  limit: int | None = None, topology: str = "") -> MemoryReport:
    """Compile the retrofit train step of a training config (configs/*.py) for `devices` and
    measure it per device."""
    from dms_jax.train import loop

    config = _with_overrides(config, settings)
    t = config.train
    batch, seq = int(t.batch_size), int(t.seq_len)
    step_cfg = loop.step_config(config)
    cfg = model_config_for_recipe(config)
    mesh = mesh_for(devices, tuple(config.mesh.shape), topology)
    check_batch(batch, mesh, "--batch (train.batch_size)")
    loop.validate_dms(step_cfg, cfg.dms, seq)
    graphdef, params, paths = abstract_model(cfg)
    prog = loop.make_step_program(graphdef, paths, params, cfg, mesh, step_cfg, t, seed=0,
                                  batch_shape=(batch, seq))
    state, frozen, teacher, batch_args = prog.abstract_args(params, (batch, seq))
    weights = shard_bytes((state["params"], frozen, teacher))
    _, report = compile_and_measure(prog.step_fn, (state, frozen, teacher, batch_args), limit=limit,
                                    weights=weights, optimizer=shard_bytes(state["opt_state"]))
    return report


def _with_overrides(config, s: TrainSettings):
    config = config.copy_and_resolve_references()
    if s.mesh_shape is not None:
        config.mesh.shape = tuple(s.mesh_shape)
    if s.remat is not None:
        config.train.remat = bool(s.remat)
    if s.scan_layers is not None:
        config.model.scan_layers = bool(s.scan_layers)
    if s.batch_size is not None:
        config.train.batch_size = int(s.batch_size)
    if s.seq_len is not None:
        config.train.seq_len = int(s.seq_len)
    return config


# ----------------------------------------------------------------------------- inference


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    batch: int
    context: int  # tokens per row the cache takes (prompt + generated)
    policy: str = "dms"
    target_cr: float | None = 8.0
    margin: float | None = None  # None: the plan's default for the layout (0.5 slots, 0.1 paged)
    chunk_size: int = 512
    mesh_shape: tuple = (1, -1, 1)
    segment: int = 16  # decode tokens per compiled while_loop call (a buffer bucket)
    layout: str = "slots"  # or "paged": rings + a pool split over the mesh with the streams


def decode_model_config(cfg: ModelConfig, policy: str) -> ModelConfig:
    """Inference runs in the compute dtype of the weights; dms needs a DMS model (adapter mode
    by default when the config has none: the retrofit's)."""
    from dms_jax.config import DMSConfig

    if policy != "full" and cfg.dms is None:
        cfg = cfg.replace(dms=DMSConfig())
    return cfg


def compile_decode(cfg: ModelConfig, devices: Sequence, s: DecodeSettings, *, limit: int | None = None,
                   topology: str = "") -> dict:
    """Compile `generate`'s prefill chunk and decode loop for `s.batch` rows of `s.context`
    tokens: {"prefill": MemoryReport, "decode": MemoryReport, "capacity": tokens per stream the
    cache holds (slots; paged: the ring plus the stream's share of the pool)}."""
    from flax import nnx

    from dms_jax import cache as kvcache
    from dms_jax.generate import DecodeCarry, decode_loop, prefill_last_only, prefill_step
    from dms_jax.plan import plan_inference
    from dms_jax.sampling import Sampling

    cfg = decode_model_config(cfg, s.policy)
    mesh = mesh_for(devices, s.mesh_shape, topology)
    check_batch(s.batch, mesh, "--batch")
    plan = plan_inference(cfg, policy=s.policy, target_cr=s.target_cr if s.policy != "full" else None,
                          max_len=s.context, chunk_size=s.chunk_size, margin=s.margin, layout=s.layout,
                          platform=devices[0].platform)  # the target's attention (TPU: blockwise)
    from dms_jax.model import Decoder

    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shd.logical_sharding(
            shd.param_logical_axes(shd.param_path(path), len(x.shape)), mesh, x.shape)), state)
    shapes = jax.eval_shape(lambda: kvcache.init_cache(plan, s.batch, mesh=mesh))
    cache = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                         shapes, shd.cache_shardings(shapes, mesh))
    rows = shd.logical_sharding(("cache_batch",), mesh, (s.batch,))
    row_major = shd.logical_sharding(("cache_batch", None), mesh, (s.batch, 1))

    def arg(shape, dtype, sharding=None):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding or (row_major if len(shape) == 2 else rows))

    chunk = min(plan.chunk_size, plan.max_len)
    dtype = jnp.dtype(plan.dtype)
    parts = dict(weights=shard_bytes(params), cache=shard_bytes(cache))
    prefill_args = (graphdef, params, cache, arg((s.batch, chunk), jnp.int32), arg((s.batch, chunk), jnp.bool_),
                    arg((s.batch, chunk), jnp.int32), arg((s.batch, cfg.hidden_size), dtype),
                    arg((s.batch,), jnp.int32))
    _, prefill = compile_and_measure(prefill_step, prefill_args, limit=limit, static=dict(
        plan=plan, last_only=prefill_last_only(plan)), **parts)
    key = jax.eval_shape(lambda: jax.random.key(0))
    carry = DecodeCarry(arg((), jnp.int32, _replicated(mesh)), arg((s.batch, s.segment), jnp.int32),
                        arg((s.batch,), jnp.int32), arg((s.batch,), jnp.bool_), arg((s.batch,), jnp.int32),
                        jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=_replicated(mesh)))
    decode_args = (graphdef, params, cache, carry, arg((s.batch,), jnp.int32), arg((s.batch,), jnp.int32),
                   arg((8,), jnp.int32, _replicated(mesh)))
    _, decode = compile_and_measure(decode_loop, decode_args, limit=limit, static=dict(
        plan=plan, sampling=Sampling(0.0, 0, 1.0), segment=s.segment), **parts)
    capacity = plan.capacity
    if plan.layout == "paged":  # the allocated cache's own figure (a split pool rounds up per device)
        capacity = (shapes.layers if isinstance(shapes, kvcache.StackedCache) else shapes[0]).capacity
    return {"prefill": prefill, "decode": decode, "capacity": capacity}


def _replicated(mesh):
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec())

