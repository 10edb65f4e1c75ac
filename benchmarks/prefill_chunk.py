"""One prefill chunk timed at chosen positions: what a chunk costs per row as the cache grows.

For each system ("full", "dms<CR>": the forced-rate DMS model of benchmarks/vs_transformers.py)
a prompt is prefilled chunk by chunk through the library's jitted `prefill_step`; at each asked
position the next chunk is run `--repeats` times on copies of the cache and its best time is
printed per row (ms per row-chunk). A chunk's cost is then a fixed part (projections, MLP,
RoPE, the K / V writes, the cache's bookkeeping) plus a part per key read: the fixed part is
the cost at position 0 less its self-attention, the per-key part the slope between positions.
Each system runs in this process, one after the other; run it single-threaded on one core
(as the other benchmarks: XLA_FLAGS below and `taskset -c 1`) and alternate A/B runs in one
session to compare two versions of the engine.

    export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    taskset -c 1 python benchmarks/prefill_chunk.py                          # kv, paged, B 8
    taskset -c 1 python benchmarks/prefill_chunk.py --layout slots --batch 4 --shape gqa
    python benchmarks/prefill_chunk.py --quick                               # tiny, seconds
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def chunk_times(system: str, model_dir: str, *, layout: str, batch: int, positions, chunk: int,
                window: int, repeats: int) -> list[tuple[int, float]]:
    """[(position, best ms per row over `repeats` runs)] of one chunk at each position."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dms_jax.cache import init_cache
    from dms_jax.plan import plan_inference
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import vs_transformers as vs

    gen = importlib.import_module("dms_jax.generate")
    context = max(positions) + chunk
    model, kw = vs.system_model(system, model_dir, context, window)
    plan = plan_inference(model.config, max_len=context, layout=layout, chunk_size=chunk, **kw)
    graphdef, params = nnx.split(model)
    cache = init_cache(plan, batch)
    ids = jnp.asarray(vs.prompts_for(model.config.vocab_size, batch, context))
    pos = jnp.arange(context, dtype=jnp.int32)[None].repeat(batch, 0)
    hidden = jnp.zeros((batch, model.config.hidden_size), jnp.float32)

    def args(c, hidden):  # fresh buffers: the step donates what it is given
        cols = slice(c * chunk, (c + 1) * chunk)
        return (ids[:, cols], jnp.ones((batch, chunk), bool), pos[:, cols], hidden,
                jnp.full((batch,), -1, jnp.int32))

    step = gen.prefill_step.lower(graphdef, params, cache, *args(0, hidden), plan=plan,
                                  last_only=gen.prefill_last_only(plan)).compile()
    out = []
    for c in range(context // chunk):
        if c * chunk in positions:
            best = float("inf")
            for _ in range(repeats):
                copied = jax.tree.map(jnp.copy, (cache, hidden))
                a = args(c, copied[1])
                jax.block_until_ready((copied, a))
                tic = time.perf_counter()
                jax.block_until_ready(step(params, copied[0], *a))
                best = min(best, time.perf_counter() - tic)
            out.append((c * chunk, 1e3 * best / batch))
        _, hidden, cache = step(params, cache, *args(c, hidden))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="kv", help="a shape of benchmarks/vs_transformers.py")
    p.add_argument("--systems", default="full,dms8")
    p.add_argument("--layout", default="paged", choices=("slots", "paged"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--positions", default="0,512,2048,4096,8192,12288",
                   help="chunk starts, multiples of --chunk")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny shape, positions 0,64, chunk 32")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.positions, args.chunk, args.window, args.repeats = "tiny", "0,64", 32, 8, 2
        args.batch = 2
    positions = [int(x) for x in args.positions.split(",")]
    if any(x % args.chunk for x in positions):
        raise SystemExit(f"--positions {args.positions}: each must be a multiple of --chunk "
                         f"{args.chunk}")
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import vs_transformers as vs

    print(f"shape {args.shape}, {args.layout}, B {args.batch}, chunks of {args.chunk}: best of "
          f"{args.repeats}, ms per row", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = vs.build_hf_model(args.shape, os.path.join(tmp, args.shape))
        for system in args.systems.split(","):
            results[system] = chunk_times(system, model_dir, layout=args.layout,
                                          batch=args.batch, positions=positions,
                                          chunk=args.chunk, window=args.window,
                                          repeats=args.repeats)
            print(f"  {system:8s} " + "  ".join(f"{p}: {ms:.2f}" for p, ms in results[system]),
                  flush=True)
    return results


if __name__ == "__main__":
    main()
