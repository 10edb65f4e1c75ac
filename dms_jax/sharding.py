"""Mesh construction and the one logical-axis rules table.

Every array the trainer places on devices gets its `NamedSharding` from `LOGICAL_RULES`:
parameters through `PARAM_LOGICAL_AXES` (matched on the parameter path), optimizer state through
the parameter it mirrors, batches and activations through their logical axis names.

Mesh axes: "data" (pure data parallel: params replicated), "fsdp" (data parallel with params,
gradients and optimizer state sharded along d_model), "tensor" (heads / MLP / vocab columns).
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from dms_jax import stacking

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),  # d_model of a weight: FSDP shards the weights along it
    ("act_embed", None),  # d_model of an activation
    ("heads", "tensor"),  # H * D (query heads x head_dim)
    ("kv_heads", "tensor"),  # Hkv * D
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("decision", None),  # the Hkv outputs of the DMS adapter
    ("layers", None),
    ("norm", None),
    ("cache_batch", ("data", "fsdp")),  # the KV cache's batch rows
    ("cache_heads", "tensor"),  # the KV cache's KV heads (each holds its own tokens)
)

# parameter path (dots, e.g. "layers.3.attn.q_proj.kernel") -> logical axes of its dimensions
# (a stacked layer parameter "layers.attn.q_proj.kernel" [L, ...] adds "layers" in front)
PARAM_LOGICAL_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"embed\.embedding$", ("vocab", "embed")),
    (r"attn\.q_proj\.kernel$", ("embed", "heads")),
    (r"attn\.[kv]_proj\.kernel$", ("embed", "kv_heads")),
    (r"attn\.q_proj\.bias$", ("heads",)),
    (r"attn\.[kv]_proj\.bias$", ("kv_heads",)),
    (r"attn\.o_proj\.kernel$", ("heads", "embed")),
    (r"attn\.dms_proj\.kernel$", ("embed", "decision")),
    (r"mlp\.(gate|up)_proj\.kernel$", ("embed", "mlp")),
    (r"mlp\.(gate|up)_proj\.bias$", ("mlp",)),
    (r"mlp\.down_proj\.kernel$", ("mlp", "embed")),
    (r"lm_head\.kernel$", ("embed", "vocab")),
    (r"(scale|bias)$", ("norm",)),  # norms, o / down biases
)

# activations the trainer places by name
ACTIVATION_AXES = {
    "tokens": ("batch", "seq"),  # input_ids, masks [B, T]
}


class MeshError(ValueError):
    """The requested mesh does not fit the devices (or the batch)."""


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices of all processes).

    One entry of `shape` may be -1: it takes whatever the others leave. The product must equal
    the device count exactly (a mesh over a subset of the devices is an error, not a silent
    choice). Axes are `AxisType.Auto`: the compiler propagates shardings through the model.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise MeshError(f"mesh shape {tuple(shape)} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"mesh shape {tuple(shape)}: entries must be positive, with at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise MeshError(
                f"mesh shape {tuple(shape)}: {len(devices)} devices are not divisible by {known}"
            )
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        simulate = ""
        if devices and devices[0].platform == "cpu":
            simulate = (f"; on a CPU, simulate {math.prod(shape)} devices by starting Python with "
                        f"XLA_FLAGS=--xla_force_host_platform_device_count={math.prod(shape)} "
                        "(set before JAX starts)")
        raise MeshError(
            f"mesh shape {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but "
            f"{len(devices)} are available ({jax.process_count()} process(es)); set "
            f"--config.mesh.shape (or make_mesh's shape) so that data * fsdp * tensor = "
            f"{len(devices)} (-1 fills one axis){simulate}"
        )
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def spec_axes(axes) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names) as a tuple."""
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def mesh_axis_size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in spec_axes(axes))


def logical_to_spec(logical_axes: Sequence[str | None], mesh, shape: Sequence[int] | None = None,
                    rules=LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry `logical_axes`.

    A dimension is replicated when its size is not divisible by its mesh axes (e.g. 2 KV heads on
    a tensor axis of 4), and a mesh axis is used at most once per array (first dimension wins).
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        axes = table.get(name) if name is not None else None
        if axes is not None:
            tup = tuple(a for a in spec_axes(axes) if a not in used and mesh.shape[a] > 1)
            size = mesh_axis_size(mesh, tup)
            if not tup or (shape is not None and shape[dim] % size):
                axes = None
            else:
                used.update(tup)
                axes = tup[0] if len(tup) == 1 else tup
        spec.append(axes)
    return PartitionSpec(*spec)


def logical_sharding(logical_axes, mesh, shape=None, rules=LOGICAL_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh, shape, rules))


def param_logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter at `path` (dotted); replicated when no rule matches.

    A stacked layer parameter ("layers.attn.q_proj.kernel", [L, ...], `ModelConfig.scan_layers`)
    gets ("layers", *the axes of one layer's parameter)."""
    if stacking.is_stacked_path(path) and ndim >= 1:
        return ("layers",) + param_logical_axes(path[len(stacking.PREFIX):], ndim - 1)
    for pattern, axes in PARAM_LOGICAL_AXES:
        if re.search(pattern, path) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def param_shardings(params: Mapping[str, Any], mesh, rules=LOGICAL_RULES) -> dict[str, NamedSharding]:
    """{path: NamedSharding} for a flat {dotted path: array or ShapeDtypeStruct} dict."""
    return {
        path: logical_sharding(param_logical_axes(path, len(x.shape)), mesh, x.shape, rules)
        for path, x in params.items()
    }


def mirrored_shardings(tree, params: Mapping[str, Any], shardings_by_path: Mapping[str, NamedSharding],
                       mesh):
    """Shardings for a pytree whose leaves mirror flat params (optimizer moments, masks).

    A leaf under a dict key that is a parameter path, with that parameter's shape, gets the
    parameter's sharding; anything else (step counters, scalars) is replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(key_path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        for entry in reversed(key_path):
            name = getattr(entry, "key", None)
            if isinstance(name, str) and name in shardings_by_path:
                if tuple(params[name].shape) == shape:
                    return shardings_by_path[name]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def param_path(path) -> str:
    """A parameter's dotted path ("layers.3.attn.q_proj.kernel"), the key of the rules table,
    from a jax key path (DictKey / GetAttrKey / SequenceKey entries) or a plain tuple of names
    (`nnx.to_pure_dict` flattened); nnx's "value" / "raw_value" wrappers are left out. The one
    path function of the package (the trainer's flat parameter dicts use it too)."""
    names = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
    return ".".join(str(n) for n in names if n not in ("value", "raw_value"))


def shard_model_state(state, mesh, rules=LOGICAL_RULES):
    """An `nnx.split` state placed on `mesh` by the parameter rules (inference: no optimizer)."""

    def place(key_path, x):
        axes = param_logical_axes(param_path(key_path), x.ndim)
        return jax.device_put(x, logical_sharding(axes, mesh, x.shape, rules))

    return jax.tree_util.tree_map_with_path(place, state)


def cache_logical_axes(ndim: int) -> tuple[str | None, ...]:
    """KV cache arrays are [B] or [B, Hkv, ...]: rows over the data axes, KV heads over tensor."""
    return ("cache_batch",) if ndim == 1 else ("cache_batch", "cache_heads") + (None,) * (ndim - 2)


def cache_shardings(cache, mesh, rules=LOGICAL_RULES):
    """The NamedSharding of every array of a KV cache pytree (arrays or ShapeDtypeStructs): a
    tuple of per-layer caches by `cache_logical_axes`, a `dms_jax.cache.StackedCache` the same
    behind its leading layer axis ("layers", replicated). A paged cache's arrays follow
    `dms_jax.paged.shard_specs` (its pool split with its streams when it was built for the mesh)."""
    from dms_jax.cache import StackedCache
    from dms_jax.paged import PagedLayerCache, shard_specs

    def one(x, stacked):
        axes = cache_logical_axes(x.ndim - stacked)
        return logical_sharding(("layers",) * stacked + axes, mesh, x.shape, rules)

    def layer(c, stacked):
        if isinstance(c, PagedLayerCache):
            return jax.tree.map(lambda spec: NamedSharding(mesh, spec), shard_specs(c, stacked),
                                is_leaf=lambda x: isinstance(x, PartitionSpec))
        return jax.tree.map(lambda x: one(x, stacked), c)

    if isinstance(cache, StackedCache):
        return StackedCache(layer(cache.layers, 1))
    return tuple(layer(c, 0) for c in cache)


def shard_cache(cache, mesh, rules=LOGICAL_RULES):
    """A KV cache (`dms_jax.cache.init_cache`) placed on `mesh`."""
    return jax.device_put(cache, cache_shardings(cache, mesh, rules))


def constrain(x, logical_axes, mesh, rules=LOGICAL_RULES):
    """with_sharding_constraint by logical axes (no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_sharding(logical_axes, mesh, x.shape, rules))


def maybe_initialize_distributed() -> bool:
    """Call `jax.distributed.initialize()` when launched as one of several processes.

    Set on every host (or let the cluster set them):
      JAX_COORDINATOR_ADDRESS  host:port of process 0 (e.g. 10.0.0.1:1234)
      JAX_NUM_PROCESSES        number of processes (one per host, usually)
      JAX_PROCESS_ID           this process's index, 0 .. JAX_NUM_PROCESSES - 1
    On SLURM, Open MPI and Cloud TPU pods JAX finds these itself: set DMS_DISTRIBUTED=1 there.
    Must run before anything touches the devices. Returns True when it initialised.
    """
    num = os.environ.get("JAX_NUM_PROCESSES")
    if num is not None and int(num) > 1:
        jax.distributed.initialize(
            coordinator_address=os.environ.get("JAX_COORDINATOR_ADDRESS"),
            num_processes=int(num),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
        return True
    if os.environ.get("DMS_DISTRIBUTED", "0") == "1":
        jax.distributed.initialize()
        return True
    return False
