"""Training attention: time and peak memory of forward+backward, DMS vs plain causal vs dense.

Every (implementation, T) is measured in a fresh subprocess, so the peak resident memory
(`ru_maxrss` of that process) belongs to that configuration alone; a baseline child that only
imports JAX and allocates the inputs is measured too and subtracted.

  dms     blockwise_attention with the soft DMS mask (gradients to q, k, v and the decision logits)
  causal  causal_blockwise_attention (same kernel, no eviction bias): the baseline
  dense   dense_attention with the soft DMS mask (materialises [T, T] scores)

    python benchmarks/train_attention.py                  # T = 1k, 2k, 4k, 8k; dense up to 4k
    python benchmarks/train_attention.py --dense-max 8192 # dense at 8k too (~19 GiB, ~5 min)
    python benchmarks/train_attention.py --seqs 1024,2048 --repeats 9
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

IMPLS = ("baseline", "causal", "dms", "dense")


def child(args):
    """Measure one configuration; print one JSON line."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from dms_jax.ops import gating
    from dms_jax.ops.attention import dense_attention
    from dms_jax.ops.blockwise import blockwise_attention, causal_blockwise_attention

    seq, batch, heads, kv_heads, dim = args.seq, args.batch, args.heads, args.kv_heads, args.head_dim
    rng = np.random.RandomState(0)
    dtype = jnp.dtype(args.dtype)
    q = jnp.asarray(rng.randn(batch, seq, heads, dim), dtype)
    k = jnp.asarray(rng.randn(batch, seq, kv_heads, dim), dtype)
    v = jnp.asarray(rng.randn(batch, seq, kv_heads, dim), dtype)
    zt = jnp.asarray(rng.randn(batch, seq, kv_heads) * 10.0, jnp.float32)
    cot = jnp.asarray(rng.randn(batch, seq, heads, dim), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    blocks = dict(block_q=args.block, block_k=args.block)

    def dms_loss(attention, **kw):
        def loss(q, k, v, zt):
            evict_bias = jnp.swapaxes(gating.soft_evict_bias(zt), 1, 2)  # [B, Hkv, T]
            out = attention(q, k, v, q_pos=pos, k_pos=pos, evict_bias=evict_bias,
                            window=args.window, **kw)
            return jnp.sum(out.astype(jnp.float32) * cot)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))

    def causal_loss(q, k, v, zt):
        del zt
        out = causal_blockwise_attention(q, k, v, q_pos=pos, k_pos=pos, **blocks)
        return jnp.sum(out.astype(jnp.float32) * cot)

    result = dict(impl=args.impl, seq=seq)
    if args.impl != "baseline":
        step = {"dms": lambda: dms_loss(blockwise_attention, **blocks),
                "dense": lambda: dms_loss(dense_attention),
                "causal": lambda: jax.jit(jax.grad(causal_loss, argnums=(0, 1, 2, 3)))}[args.impl]()
        start = time.perf_counter()
        compiled = step.lower(q, k, v, zt).compile()
        result["compile_s"] = time.perf_counter() - start
        stats = compiled.memory_analysis()  # XLA's own accounting of the program's buffers
        if stats is not None:
            result["xla_temp_mib"] = stats.temp_size_in_bytes / 2 ** 20
        jax.block_until_ready(compiled(q, k, v, zt))  # warm-up
        walls, cpus = [], []
        for _ in range(args.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled(q, k, v, zt))
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        # best of N: the machine may be shared; CPU time (all threads) is less sensitive to that
        result["time_s"], result["cpu_s"] = min(walls), min(cpus)
    else:
        jax.block_until_ready((q, k, v, zt, cot))
    result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps(result))


def run_child(args, impl, seq):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--impl", impl, "--seq", str(seq)]
    for name in ("batch", "heads", "kv_heads", "head_dim", "window", "block", "repeats", "dtype"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(impl=impl, seq=seq, error=f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="1024,2048,4096,8192")
    p.add_argument("--dense-max", type=int, default=4096,
                   help="skip dense above this T (dense at 8192 peaks near 19 GiB RSS)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    seqs = [int(s) for s in args.seqs.split(",")]
    print(f"forward+backward, B={args.batch} H={args.heads} Hkv={args.kv_heads} D={args.head_dim} "
          f"w={args.window} block={args.block} {args.dtype}; best of {args.repeats} after a "
          f"warm-up call; one fresh process per row; net = max RSS - baseline child's max RSS")
    rows = {}
    for seq in seqs:
        for impl in IMPLS:
            if impl == "dense" and seq > args.dense_max:
                continue
            rows[impl, seq] = run_child(args, impl, seq)
            print(f"  measured {impl:8s} T={seq}: {rows[impl, seq]}", file=sys.stderr, flush=True)

    def net(impl, seq):
        r, base = rows.get((impl, seq), {}), rows.get(("baseline", seq), {})
        if "max_rss_mib" not in r or "max_rss_mib" not in base:
            return None
        return r["max_rss_mib"] - base["max_rss_mib"]

    header = (f"{'T':>6} {'impl':>7} {'wall s':>7} {'cpu s':>7} {'x causal':>8} {'RSS MiB':>8} "
              f"{'net MiB':>8} {'net x T0':>8} {'XLA tmp MiB':>11} {'tmp x T0':>8}")
    print(header)
    print("-" * len(header))
    for seq in seqs:
        for impl in ("causal", "dms", "dense"):
            r = rows.get((impl, seq))
            if r is None:
                continue
            if "error" in r:
                print(f"{seq:>6} {impl:>7} failed: {r['error']}")
                continue
            causal = rows.get(("causal", seq), {}).get("cpu_s")
            ratio = f"{r['cpu_s'] / causal:8.2f}" if causal else f"{'-':>8}"
            mem, mem0 = net(impl, seq), net(impl, seqs[0])
            growth = f"{mem / mem0:8.2f}" if mem0 else f"{'-':>8}"
            tmp, tmp0 = r.get("xla_temp_mib"), rows.get((impl, seqs[0]), {}).get("xla_temp_mib")
            tmp_s = f"{tmp:11.1f}" if tmp is not None else f"{'-':>11}"
            tmp_growth = f"{tmp / tmp0:8.2f}" if tmp is not None and tmp0 else f"{'-':>8}"
            print(f"{seq:>6} {impl:>7} {r['time_s']:7.3f} {r['cpu_s']:7.3f} {ratio} "
                  f"{r['max_rss_mib']:8.0f} {mem:8.0f} {growth} {tmp_s} {tmp_growth}")
    print(f"x causal = CPU time / causal blockwise CPU time at the same T (target for dms <= 1.25); "
          f"net = max RSS - baseline child (includes the compiler's own memory); "
          f"XLA tmp = temp buffers of the compiled program; x T0 = relative to T={seqs[0]} "
          f"(linear memory: x T0 = T / T0)")

if __name__ == "__main__":
    main()
