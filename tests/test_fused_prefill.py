"""The experimental fused prefill kernel (`dms_jax.ops.fused_prefill`, Pallas) in Pallas'
interpreter on the CPU: the outputs and keys-seen counts of `live_attention` for a prefill chunk,
under the DMS rule (flags, a window, partly live slots, padding queries), `full` (no flags) and a
sliding window, in float32 and bfloat16, with several tiles per stream and tiles that straddle
query groups."""
import re

import jax.numpy as jnp
import numpy as np
import pytest

from dms_jax.ops import live_attention as la
from dms_jax.ops.fused_prefill import fused_chunk_attention


def chunk_case(seed, *, batch=2, chunk=16, heads=4, kv_heads=2, dim=8, slots=40, live=(40, 23)):
    """A cache of `slots` per stream (row b's first live[b] slots hold positions 0..), random
    flags; a chunk at the next positions whose second row has 11 real queries."""
    rng = np.random.default_rng(seed)
    keys, values = (rng.standard_normal((batch, kv_heads, slots, dim)) for _ in range(2))
    pos = np.tile(np.arange(slots, dtype=np.int32), (batch, kv_heads, 1))
    for b, n in enumerate(live):
        pos[b, :, n:] = -1
    flags = rng.random(pos.shape) < 0.6
    q = rng.standard_normal((batch, chunk, heads, dim))
    q_pos = np.stack([np.arange(n, n + chunk, dtype=np.int32) for n in live])
    q_valid = np.arange(chunk)[None] < np.array([chunk, 11])[:, None]
    tail = (rng.standard_normal((batch, kv_heads, chunk, dim)),
            rng.standard_normal((batch, kv_heads, chunk, dim)),
            np.broadcast_to(q_pos[:, None], (batch, kv_heads, chunk)),
            rng.random((batch, kv_heads, chunk)) < 0.6,
            np.broadcast_to(q_valid[:, None], (batch, kv_heads, chunk)))
    return q, q_pos, q_valid, (keys, values, pos, flags), tail


@pytest.mark.parametrize("rule, block_q, block_k", [
    (dict(window=5, use_flags=True, sliding_window=None), 8, 8),  # DMS, 4 tiles per stream
    (dict(window=5, use_flags=True, sliding_window=None), 32, 16),  # a tile = two groups
    (dict(window=0, use_flags=False, sliding_window=None), 16, 32),  # full; block > chunk
    (dict(window=0, use_flags=False, sliding_window=9), 8, 8),  # a sliding window
])
def test_fused_prefill_equals_live_attention(rule, block_q, block_k):
    q, q_pos, q_valid, slots, tail = chunk_case(0)
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        slot_args = (cast(slots[0]), cast(slots[1]), jnp.asarray(slots[2]), jnp.asarray(slots[3]))
        tail_args = (cast(tail[0]), cast(tail[1])) + tuple(map(jnp.asarray, tail[2:]))
        extent = la.live_extent(slot_args[2])
        want, want_seen = la.live_attention(cast(q), q_pos, q_valid, slot_args, tail_args,
                                            extent, **rule, scale=0.3, block=8)
        got, got_seen = fused_chunk_attention(cast(q), q_pos, q_valid, slot_args, tail_args,
                                              extent, **rule, scale=0.3, block_q=block_q,
                                              block_k=block_k, interpret=True)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got, np.float32)[q_valid],
                                   np.asarray(want, np.float32)[q_valid], rtol=tol, atol=tol)
        np.testing.assert_array_equal(got_seen, want_seen)


@pytest.mark.parametrize("slots, dtype", [(128, jnp.bfloat16), (40, jnp.float32)])
def test_the_kernel_lowers_to_triton_for_cuda(slots, dtype):
    """Lowered for CUDA on this CPU (no GPU needed): one Triton kernel (Pallas' Triton backend,
    not Mosaic GPU), power-of-two tiles only (a 40-slot cache read in blocks of 32)."""
    q, q_pos, q_valid, cache, tail = chunk_case(2, chunk=64, heads=8, kv_heads=2, dim=64,
                                                slots=slots, live=(slots, slots - 17))
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    lowered = fused_chunk_attention.trace(
        cast(q), jnp.asarray(q_pos), jnp.asarray(q_valid),
        (cast(cache[0]), cast(cache[1]), jnp.asarray(cache[2]), jnp.asarray(cache[3])),
        (cast(tail[0]), cast(tail[1])) + tuple(map(jnp.asarray, tail[2:])), jnp.int32(slots),
        window=5, use_flags=True, sliding_window=None, scale=0.125,
    ).lower(lowering_platforms=("cuda",))
    targets = re.findall(r"custom_call @([\w$.]+)", lowered.as_text())
    assert targets == ["__gpu$xla.gpu.triton"]


def test_fused_prefill_refuses_tiles_that_are_not_powers_of_two():
    q, q_pos, q_valid, slots, tail = chunk_case(1)
    with pytest.raises(ValueError, match="block_q=24 and block_k=64 must be powers of two"):
        fused_chunk_attention(jnp.asarray(q), q_pos, q_valid, tuple(map(jnp.asarray, slots)),
                              tuple(map(jnp.asarray, tail)), jnp.int32(40), window=5,
                              use_flags=True, sliding_window=None, scale=0.3, block_q=24,
                              interpret=True)


def test_the_benchmark_runs_interpreted_and_the_two_agree(capsys):
    """benchmarks/fused_prefill.py --quick: the seconds-scale run of the GPU check."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "fused_prefill.py")
    spec = importlib.util.spec_from_file_location("fused_prefill_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--quick"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 96 |")]
    assert len(rows) == 4 and all(row.endswith("| True |") for row in rows)  # 2 kept x 2 tiles
    assert all(float(row.split("|")[8]) < 1e-5 for row in rows)  # max abs diff
