"""Searches over compiled programs: the mesh shapes and remat settings a train step fits with, and
the largest decode batch that fits (each point measured by the compiler's memory analysis)."""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Sequence

import jax

from dms_jax import sharding as shd
from dms_jax.aot.memory import MemoryReport
from dms_jax.aot.programs import BatchError, DecodeSettings, TrainSettings, compile_decode, compile_train


def candidate_meshes(chips: int, batch: int, kv_heads: int) -> list[tuple[int, int, int]]:
    """(data, fsdp, tensor) over `chips` whose data x fsdp divides the batch and whose tensor
    axis divides the KV heads; FSDP-heavy shapes first (they shard weights and optimizer state
    over the most chips), then more tensor parallelism."""
    shapes = []
    for tensor in (t for t in range(1, chips + 1) if chips % t == 0 and kv_heads % t == 0):
        rest = chips // tensor
        for data in (d for d in range(1, rest + 1) if rest % d == 0):
            fsdp = rest // data
            if batch % (data * fsdp) == 0:
                shapes.append((data, fsdp, tensor))
    return sorted(shapes, key=lambda s: (s[0], s[2]))


@dataclasses.dataclass(frozen=True)
class Trial:
    mesh: tuple
    remat: bool
    report: MemoryReport | None
    error: str = ""


def suggest_train(config, devices: Sequence, *, kv_heads: int, limit: int | None, topology: str = "",
                  max_trials: int = 6, on_trial: Callable[[Trial], None] | None = None) -> list[Trial]:
    """Compile the train step for candidate meshes, remat on then off, until `max_trials` compiles;
    the trials in order (the caller picks the fitting ones)."""
    batch = int(config.train.batch_size)
    meshes = candidate_meshes(len(devices), batch, kv_heads)
    trials = []
    for mesh, remat in itertools.product(meshes, (True, False)):
        if len(trials) >= max_trials:
            break
        try:
            report = compile_train(config, devices, TrainSettings(mesh_shape=mesh, remat=remat), limit=limit,
                                   topology=topology)
            trial = Trial(mesh, remat, report)
        except (BatchError, shd.MeshError) as err:
            trial = Trial(mesh, remat, None, str(err))
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
    return trials


@dataclasses.dataclass(frozen=True)
class BatchPoint:
    batch: int
    prefill: MemoryReport | None  # None when the compiler refused the batch (`error`)
    decode: MemoryReport | None
    error: str = ""  # the compiler's out-of-memory message when it refused to compile

    @property
    def total(self) -> float:
        """Bytes per device of the larger program (they run one after the other); infinite when
        the compiler itself ran out of memory."""
        if self.prefill is None or self.decode is None:
            return math.inf
        return max(self.prefill.total, self.decode.total)


def is_compile_oom(err: Exception) -> bool:
    """Whether a compile failed because the program cannot fit the device (XLA's
    RESOURCE_EXHAUSTED, e.g. TPU temporaries larger than the HBM): a batch that does not fit,
    not an error of the search."""
    return isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(err)


@dataclasses.dataclass(frozen=True)
class BatchSearch:
    best: int  # the largest batch compiled and found to fit (0: not even the smallest)
    predicted: int  # the largest batch the line through the compiles says fits
    exact: bool  # best + one step was compiled and does not fit
    points: list  # BatchPoint, by batch


def largest_batch(cfg, devices: Sequence, settings: DecodeSettings, *, limit: int, topology: str = "",
                  max_compiles: int = 8, on_point: Callable[[BatchPoint], None] | None = None,
                  known: Sequence[BatchPoint] = ()) -> BatchSearch:
    """The largest batch that fits for `settings` (its batch ignored); `known`: points already
    compiled (not compiled again, not counted in `max_compiles`).

    Memory is close to affine in the batch (weights fixed, cache and activations per row): two
    compiles give the line, its crossing with `limit` the first guess, then compiles step by the
    batch granularity (data x fsdp) until the largest fitting batch has a failing neighbour.
    """
    mesh_step = _row_granularity(devices, settings, topology)
    points: dict[int, BatchPoint] = {p.batch: p for p in known}
    max_compiles += len(points)

    def measure(batch):
        if batch not in points:
            try:
                out = compile_decode(cfg, devices, dataclasses.replace(settings, batch=batch), limit=limit,
                                     topology=topology)
                points[batch] = BatchPoint(batch, out["prefill"], out["decode"])
            except Exception as err:  # noqa: BLE001 - only the compiler's out-of-memory is a result
                if not is_compile_oom(err):
                    raise
                points[batch] = BatchPoint(batch, None, None, error=str(err).strip().splitlines()[-1])
            if on_point is not None:
                on_point(points[batch])
        return points[batch].total <= limit

    def result(predicted):
        fits = [b for b, p in points.items() if p.total <= limit]
        best = max(fits, default=0)
        exact = best + mesh_step in points and points[best + mesh_step].total > limit
        return BatchSearch(best, predicted, exact, sorted(points.values(), key=lambda p: p.batch))

    if not measure(mesh_step):
        return result(0)
    if not measure(2 * mesh_step):
        return result(mesh_step)
    # bytes per device per row: the slope of the two compiles, but never below the row's own cache
    # (two totals within XLA's padding of each other would put the guess at billions of rows)
    per_row = max((points[2 * mesh_step].total - points[mesh_step].total) / mesh_step,
                  points[mesh_step].decode.cache / mesh_step, 1.0)
    fixed = points[mesh_step].total - per_row * mesh_step
    guess = max(mesh_step, int((limit - fixed) / per_row) // mesh_step * mesh_step)
    best = max(b for b, p in points.items() if p.total <= limit)
    failing = [b for b, p in points.items() if p.total > limit]
    fail = min(failing) if failing else None

    def bracketed():
        return fail is not None and fail - best <= mesh_step

    # the line's guess and its neighbour (exact when memory is affine), then bisection between
    # the largest fitting and the smallest failing batch (above the fits: doubling steps)
    order = [guess, guess + mesh_step, guess - mesh_step]
    gap = mesh_step
    while len(points) < max_compiles and not bracketed():
        fresh = [b for b in order if best < b and (fail is None or b < fail) and b not in points]
        if fresh:
            candidate = fresh[0]
        elif fail is None:
            candidate, gap = best + gap, 2 * gap
        else:
            candidate = max((best + fail) // 2 // mesh_step * mesh_step, best + mesh_step)
        if measure(candidate):
            best = candidate
        else:
            fail = candidate
    return result(guess)


def _row_granularity(devices, settings: DecodeSettings, topology: str) -> int:
    from dms_jax.aot.topology import mesh_for

    mesh = mesh_for(devices, settings.mesh_shape, topology)
    return shd.mesh_axis_size(mesh, ("data", "fsdp"))
