"""The experimental fused prefill kernel against `live_attention` on one layer's chunk.

One layer of the `gqa-1b` shape (32 query / 8 KV heads of 64; benchmarks/vs_transformers.py) at
batch 8: a cache holding a prompt of `--context` tokens, `full` (every token) or `dms8` (the
window of 257 plus every 8th older token, the window's tokens flagged at random), and the next
chunk of 512 queries over it. Times `live_attention` (the accelerator plan's attention, XLA ops
over key blocks) and `fused_chunk_attention` (one Pallas kernel), each jitted and compiled first,
median of `--repeats` runs, and checks that they agree (max abs difference of the outputs, the
keys-seen counts equal). Prints the ratio live / fused (> 1: the kernel is faster).

    python benchmarks/fused_prefill.py --device gpu                 # contexts 8k, 32k (a GPU)
    python benchmarks/fused_prefill.py --quick                       # tiny, Pallas' interpreter
"""
from __future__ import annotations

import argparse
import functools
import time


def layer_case(batch, context, chunk, kv_heads, group, dim, kept, window, dtype, seed=0):
    """(q, q_pos, q_valid, slots, tail, extent): a cache after `context` tokens holding every
    token (kept 'full') or the window plus every 8th older one (kept 'dms8'), and the next chunk."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    if kept == "full":
        positions = np.arange(context)
    else:
        old = np.arange(0, max(context - window - 1, 0), 8)
        positions = np.concatenate([old, np.arange(max(context - window - 1, 0), context)])
    held = len(positions)
    pos = np.broadcast_to(positions.astype(np.int32), (batch, kv_heads, held)).copy()
    flags = np.zeros(pos.shape, bool)
    if kept != "full":  # the window's tokens: flagged at the model's rate (7 / 8)
        flags[..., -(window + 1):] = rng.random((batch, kv_heads, window + 1)) < 7 / 8
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    q_pos = np.broadcast_to(np.arange(context, context + chunk, dtype=np.int32), (batch, chunk))
    slots = (draw(batch, kv_heads, held, dim), draw(batch, kv_heads, held, dim),
             jnp.asarray(pos), jnp.asarray(flags))
    tail = (draw(batch, kv_heads, chunk, dim), draw(batch, kv_heads, chunk, dim),
            jnp.asarray(np.broadcast_to(q_pos[:, None], (batch, kv_heads, chunk))),
            jnp.asarray(rng.random((batch, kv_heads, chunk)) < (7 / 8 if kept != "full" else 0)),
            jnp.ones((batch, kv_heads, chunk), bool))
    q = draw(batch, chunk, kv_heads * group, dim)
    return (q, jnp.asarray(q_pos), jnp.ones((batch, chunk), bool), slots, tail,
            jnp.int32(held))


def timed(fn, repeats):
    import jax
    import numpy as np

    jax.block_until_ready(fn())  # compiled and run once
    runs = []
    for _ in range(repeats):
        tic = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - tic)
    return float(np.median(runs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="8192,32768")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--kept", default="full,dms8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--blocks", default="64x64,128x64,128x128", metavar="QxK,...",
                   help="the kernel's (block_q, block_k) tiles to time, each a row")
    p.add_argument("--device", default="gpu", choices=("cpu", "gpu"),
                   help="cpu: the kernel in Pallas' interpreter (correctness only)")
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU, interpreted")
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dms_jax.ops import live_attention as la
    from dms_jax.ops.fused_prefill import fused_chunk_attention

    if args.quick:
        args.contexts, args.batch, args.device, args.repeats = "96", 2, "cpu", 1
        args.blocks = "16x16,32x16"
    interpret = args.device == "cpu"
    kv_heads, group, dim, chunk, window = (2, 2, 16, 32, 8) if args.quick else (8, 4, 64, 512, 256)
    dtype = jnp.float32 if interpret else jnp.bfloat16
    print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}; B {args.batch}, "
          f"{kv_heads} KV heads x {group} queries of {dim}, chunk {chunk}, window {window}, "
          f"{jnp.dtype(dtype).name}{'; interpreted' if interpret else ''}", flush=True)
    print("| context | kept | held | tiles q x k | live_attention ms | fused ms | live / fused "
          "| max abs diff | seen equal |\n|" + " --- |" * 9, flush=True)
    blocks = [tuple(map(int, b.split("x"))) for b in args.blocks.split(",")]
    for context in map(int, args.contexts.split(",")):
        for kept in args.kept.split(","):
            q, q_pos, q_valid, slots, tail, extent = layer_case(
                args.batch, context, chunk, kv_heads, group, dim, kept, window, dtype)
            rule = dict(window=window, use_flags=kept != "full", sliding_window=None,
                        scale=dim ** -0.5)
            inputs = (q, q_pos, q_valid, slots, tail, extent)  # arguments, not constants of the
            live_jit = jax.jit(functools.partial(la.live_attention, **rule))  # programs
            live = lambda: live_jit(*inputs)  # noqa: E731
            want, want_seen = live()
            t_live = timed(live, args.repeats)
            for block_q, block_k in blocks:
                fused = functools.partial(fused_chunk_attention, *inputs, **rule,
                                          block_q=block_q, block_k=block_k, interpret=interpret)
                got, got_seen = fused()
                diff = float(jnp.max(jnp.abs(got.astype(jnp.float32)
                                             - want.astype(jnp.float32))))
                t_fused = timed(fused, args.repeats)
                print(f"| {context} | {kept} | {slots[2].shape[-1]} | {block_q} x {block_k} | "
                      f"{1e3 * t_live:.2f} | {1e3 * t_fused:.2f} | {t_live / t_fused:.2f}x | "
                      f"{diff:.2e} | {bool(np.array_equal(got_seen, want_seen))} |", flush=True)


if __name__ == "__main__":
    main()
