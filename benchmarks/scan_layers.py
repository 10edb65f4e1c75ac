"""Compile time, program size and step time of the retrofit train step: layers unrolled (a Python
loop, one program region per layer) vs stacked under `lax.scan` (ModelConfig.scan_layers: one
compiled layer body). Same model, weights, batch and step; both measured in this run, printed as
scanned / unrolled ratios.

    python benchmarks/scan_layers.py                    # 32 layers, d 256, CPU-sized
    python benchmarks/scan_layers.py --layers 2 --seq 64 --steps 1   # seconds (the test runs this)
"""
from __future__ import annotations

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

LAYOUTS = {"unrolled": False, "scanned": True}


def model_config(args, scan_layers: bool) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                       num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                       head_dim=args.head_dim, dtype=args.dtype, param_dtype=args.dtype,
                       dms=DMSConfig(mode="adapter", window=args.window), scan_layers=scan_layers)


class Runner:
    """One layout's compiled train step (compile seconds and HLO size measured) with its state."""

    def __init__(self, args, scan_layers: bool):
        mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
        train_cfg = SimpleNamespace(trainable=args.trainable, learning_rate=3e-5, b1=0.9, b2=0.95, eps=1e-8,
                                    weight_decay=0.0, grad_clip=1.0, warmup_steps=0)
        step_cfg = StepConfig(loss="distill", cr_start=1.0, cr_end=8.0, cr_steps=100,
                              loss_chunk=args.loss_chunk, remat=bool(args.remat))
        model = Decoder(model_config(args, scan_layers), rngs=nnx.Rngs(0))  # same draws either layout
        trainer = build_trainer(model, mesh, step_cfg, train_cfg, seed=0, batch_shape=(args.batch, args.seq))
        self.state = trainer.init_fn(trainer.trainable_params)
        self.frozen, self.teacher = trainer.frozen, trainer.teacher
        ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids),
                 "segment_ids": np.zeros_like(ids)}
        self.batch = {k: put_global(v, trainer.batch_sharding) for k, v in batch.items()}
        tic = time.perf_counter()
        self.compiled = trainer.step_fn.lower(self.state, self.frozen, self.teacher, self.batch).compile()
        self.compile_s = time.perf_counter() - tic
        self.hlo_chars = len(self.compiled.as_text())
        self.times, self.loss = [], None

    def step(self, record=True):
        tic = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.frozen, self.teacher, self.batch)
        self.loss = float(jax.block_until_ready(metrics["loss"]))
        if record:
            self.times.append(time.perf_counter() - tic)

    def result(self) -> dict:
        return dict(compile_s=self.compile_s, hlo_chars=self.hlo_chars,
                    step_ms=1e3 * statistics.median(self.times), loss=self.loss)


def table(results: dict) -> str:
    """A markdown table of the layouts' figures and the scanned / unrolled ratios."""
    rows = ["| layout | compile (s) | compiled HLO (k chars) | step (ms) |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['compile_s']:.1f} | {r['hlo_chars'] / 1e3:.0f} | {r['step_ms']:.0f} |")
    u, s = results["unrolled"], results["scanned"]
    rows.append(f"| scanned / unrolled | {s['compile_s'] / u['compile_s']:.2f}x | "
                f"{s['hlo_chars'] / u['hlo_chars']:.2f}x | {s['step_ms'] / u['step_ms']:.2f}x |")
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)  # the tiny tokenizer's
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--loss-chunk", type=int, default=256)
    p.add_argument("--trainable", default="decision", choices=["all", "decision"])
    p.add_argument("--remat", type=int, default=1, help="1: rematerialise each layer (as the recipes)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=5, help="timed steps per layout (after one warm-up; median)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}; retrofit train step (distill, trainable="
          f"{args.trainable}, remat={bool(args.remat)}); L={args.layers} d={args.hidden} "
          f"H={args.heads}/{args.kv_heads}x{args.head_dim} V={args.vocab}; batch {args.batch} x "
          f"{args.seq} tokens; {args.dtype}", flush=True)
    runners = {name: Runner(args, scan) for name, scan in LAYOUTS.items()}
    for r in runners.values():
        r.step(record=False)  # warm-up
    for _ in range(args.steps):  # interleaved, so load from other processes hits both alike
        for r in runners.values():
            r.step()
    results = {name: r.result() for name, r in runners.items()}
    print(table(results))
    u, s = results["unrolled"]["loss"], results["scanned"]["loss"]
    print(f"loss after {1 + args.steps} steps: unrolled {u:.6f}, scanned {s:.6f} (same weights)")
    return results


if __name__ == "__main__":
    main()
