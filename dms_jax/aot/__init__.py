"""Ahead-of-time compilation for a topology, without the hardware and without weights.

    python -m dms_jax.aot train --config configs/qwen3_8b.py --topology v5p:2x2x1
    python -m dms_jax.aot decode --config configs/qwen3_8b.py --topology v5e:2x4 --context 32768

The programs are the project's own (the trainer's jitted step, `generate`'s prefill and decode)
compiled for compile-only TPU devices from libtpu (`jax.experimental.topologies`) or for N CPU
devices, from `jax.ShapeDtypeStruct` inputs sharded by the rules table; `memory_analysis()` of the
compiled program gives the bytes per chip. Modules: topology (devices, chip memory, the mesh),
shapes (model configs without weights), programs (the compiles), memory (the report), search
(--suggest and the largest decode batch).
"""
from dms_jax.aot.memory import MemoryReport
from dms_jax.aot.programs import BatchError, DecodeSettings, TrainSettings, compile_decode, compile_train
from dms_jax.aot.search import BatchSearch, largest_batch, suggest_train
from dms_jax.aot.topology import TopologyError, chip_memory, devices_for

__all__ = ["BatchError", "BatchSearch", "DecodeSettings", "MemoryReport", "TopologyError", "TrainSettings", "chip_memory",
           "compile_decode", "compile_train", "devices_for", "largest_batch", "suggest_train"]
