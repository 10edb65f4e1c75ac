"""Per-device memory of a compiled program, from the compiler's own `memory_analysis()`."""
from __future__ import annotations

import dataclasses
import math

import jax

from dms_jax.stats import format_bytes


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes per device of one compiled program (XLA's buffer assignment).

    arguments: every input (weights, optimiser state, cache, batch); outputs; aliased: outputs
    written in place of donated inputs (counted once); temporaries: activations and scratch;
    generated_code: the program itself. `weights` / `optimizer` / `cache` split the arguments by
    what they hold (from the inputs' shard shapes).
    """

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    generated_code: int
    limit: int | None  # bytes per device (the chip's HBM); None: unknown
    compile_s: float
    weights: int = 0
    optimizer: int = 0
    cache: int = 0

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

    @property
    def fits(self) -> bool | None:
        return None if self.limit is None else self.total <= self.limit

    def rows(self) -> list[tuple[str, str]]:
        """(what, bytes per device) lines, as printed."""
        rows = [("weights (frozen + trained)", self.weights)]
        if self.optimizer:
            rows.append(("optimizer state", self.optimizer))
        if self.cache:
            rows.append(("KV cache", self.cache))
        rows += [("all arguments", self.arguments), ("outputs (not aliased)", self.outputs - self.aliased),
                 ("temporaries", self.temporaries), ("generated code", self.generated_code),
                 ("total", self.total)]
        out = [(name, format_bytes(value)) for name, value in rows]
        if self.limit is not None:
            out.append(("chip memory", format_bytes(self.limit)))
            out.append(("fits", f"yes ({100 * self.total / self.limit:.0f}% used)" if self.fits
                        else f"NO ({format_bytes(self.total - self.limit)} over)"))
        out.append(("compile time", f"{self.compile_s:.1f} s"))
        return out

    def table(self) -> str:
        width = max(len(name) for name, _ in self.rows())
        return "\n".join(f"  {name:<{width}}  {value}" for name, value in self.rows())


def shard_bytes(tree) -> int:
    """Bytes per device of a pytree of ShapeDtypeStructs / arrays with shardings (the largest
    shard of each leaf: what one device holds)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * jax.numpy.dtype(leaf.dtype).itemsize
    return total


def compile_and_measure(lowerable, args, *, limit, static=None, **parts) -> tuple[object, MemoryReport]:
    """Compile `lowerable` (a jitted function) for `args` and measure it: (compiled, report).
    parts: the byte counts of `weights`, `optimizer`, `cache` for the report."""
    import time

    t0 = time.perf_counter()
    compiled = lowerable.lower(*args, **(static or {})).compile()
    compile_s = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError("this backend reports no memory analysis for compiled programs")
    return compiled, MemoryReport(
        arguments=int(stats.argument_size_in_bytes), outputs=int(stats.output_size_in_bytes),
        aliased=int(stats.alias_size_in_bytes), temporaries=int(stats.temp_size_in_bytes),
        generated_code=int(stats.generated_code_size_in_bytes), limit=limit, compile_s=compile_s,
        **parts)
