"""Step time and peak memory of a DMS retrofit step vs a plain distillation step.

Same model, shapes, trainable set and teacher; the only difference is the student: DMS training
forward (Gumbel-sigmoid decisions, soft eviction bias, compression loss) vs the plain forward.
Printed as ratios (target: retrofit / plain <= 1.3x). Compare with --trainable all (the default):
with --trainable decision the plain step has nothing to train (the adapter is unused without DMS),
so XLA drops its whole backward pass and the ratio measures forward vs forward + backward.

    python benchmarks/train_step.py                      # CPU-sized defaults
    python benchmarks/train_step.py --hidden 2048 --layers 16 --seq 8192 --vocab 128256 --dtype bfloat16
"""
import argparse
import statistics
import time
from types import SimpleNamespace

import jax
import numpy as np
from flax import nnx

from dms_jax import DMSConfig, ModelConfig
from dms_jax import sharding as shd
from dms_jax.model import Decoder
from dms_jax.train.loop import build_trainer, put_global
from dms_jax.train.step import StepConfig


def build(args, loss, remat=False):
    dms = DMSConfig(mode=args.dms_mode, window=args.window)
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                      head_dim=args.hidden // args.heads, dtype=args.dtype, param_dtype=args.dtype, dms=dms)
    mesh = shd.make_mesh((-1, 1, 1))
    train_cfg = SimpleNamespace(trainable=args.trainable, learning_rate=3e-5, b1=0.9, b2=0.95, eps=1e-8,
                                weight_decay=0.0, grad_clip=1.0, warmup_steps=0)
    step_cfg = StepConfig(loss=loss, cr_start=1.0, cr_end=8.0, cr_steps=100, loss_chunk=args.loss_chunk,
                          remat=remat)
    trainer = build_trainer(Decoder(cfg, rngs=nnx.Rngs(0)), mesh, step_cfg, train_cfg, seed=0,
                            batch_shape=(args.batch, args.seq))
    state = trainer.init_fn(trainer.trainable_params)
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids),
             "segment_ids": np.zeros_like(ids)}
    batch = {k: put_global(v, trainer.batch_sharding) for k, v in batch.items()}
    compiled = trainer.step_fn.lower(state, trainer.frozen, trainer.teacher, batch).compile()
    return compiled, state, trainer.frozen, trainer.teacher, batch


class Runner:
    """One compiled step with its (donated, threaded-through) state."""

    def __init__(self, args, loss, remat=False):
        self.compiled, self.state, self.frozen, self.teacher, self.batch = build(args, loss, remat)
        mem = self.compiled.memory_analysis()
        self.temp = mem.temp_size_in_bytes
        self.peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        self.times = []

    def step(self, record=True):
        tic = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.frozen, self.teacher, self.batch)
        jax.block_until_ready(metrics)
        if record:
            self.times.append(time.perf_counter() - tic)

    @property
    def time(self):
        return statistics.median(self.times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--loss-chunk", type=int, default=256)
    p.add_argument("--dms-mode", default="adapter", choices=["adapter", "neuron"])
    p.add_argument("--trainable", default="all", choices=["all", "decision"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; model d={args.hidden} L={args.layers} "
          f"H={args.heads}/{args.kv_heads} V={args.vocab}; batch {args.batch} x {args.seq} tokens; "
          f"window {args.window}; trainable={args.trainable}; {args.dtype}")
    plain, dms = Runner(args, "distill_plain"), Runner(args, "distill")
    remat = Runner(args, "distill", remat=True)
    runners = (plain, dms, remat)
    for _ in range(args.warmup):
        for r in runners:
            r.step(record=False)
    for _ in range(args.steps):  # interleaved, so load from other processes hits all alike
        for r in runners:
            r.step()
    mib = 2 ** 20
    print(f"{'step':<26}{'time (s)':>10}{'peak (MiB)':>12}{'scratch (MiB)':>15}")
    for name, r in (("plain distillation", plain), ("DMS retrofit", dms),
                    ("DMS retrofit, remat", remat)):
        print(f"{name:<26}{r.time:>10.4f}{r.peak / mib:>12.1f}{r.temp / mib:>15.1f}")
    print(f"ratio retrofit / plain: time {dms.time / plain.time:.3f}x, "
          f"peak memory {dms.peak / plain.peak:.3f}x (target <= 1.3x)")
    print(f"per-layer remat (train.remat=True) / without: time {remat.time / dms.time:.3f}x, "
          f"scratch memory {remat.temp / dms.temp:.3f}x")
    print("peak memory = compiled arguments + outputs + scratch - donated (XLA memory analysis)")


if __name__ == "__main__":
    main()
