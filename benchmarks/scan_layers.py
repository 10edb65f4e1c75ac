"""Layers unrolled (a Python loop, one program region per layer) vs stacked under `lax.scan`
(ModelConfig.scan_layers: one compiled layer body), both measured in this run and printed as
scanned / unrolled ratios, for two programs:
  * train: the retrofit train step's compile time, program size and step time;
  * generate: `dms_jax.generate` over the KV cache (the scanned model's cache is one
    `StackedCache`, updated in place layer by layer): compile time (prefill chunk + decode loop),
    prefill time and decode ms per token, and the same tokens from both layouts.
Same model and weights in both layouts.

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


def run_generate(args, scan_layers: bool) -> dict:
    """`generate` of `--decode-tokens` tokens after a `--context`-token prompt per row."""
    from dms_jax.generate import generate

    model = Decoder(model_config(args, scan_layers), rngs=nnx.Rngs(0))  # same draws either layout
    prompts = np.random.default_rng(1).integers(0, args.vocab, (args.batch, args.context)).astype(np.int32)
    kw = dict(max_new_tokens=args.decode_tokens, policy=args.policy, chunk_size=min(512, args.context))
    out = generate(model, prompts, **kw)
    st = out.stats
    return dict(compile_s=st.compile_seconds, prefill_s=st.prefill_seconds,
                decode_ms=1e3 * st.decode_seconds / max(args.decode_tokens - 1, 1),
                tokens=out.sequences(), cr=st.compression_ratio)


def table(results: dict, columns) -> str:
    """A markdown table of the layouts' figures and the scanned / unrolled ratios; columns:
    (title, key, format) per figure."""
    rows = ["| layout | " + " | ".join(t for t, _, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, r in results.items():
        rows.append(f"| {name} | " + " | ".join(fmt(r[k]) for _, k, fmt in columns) + " |")
    u, s = results["unrolled"], results["scanned"]
    rows.append("| scanned / unrolled | " + " | ".join(f"{s[k] / u[k]:.2f}x" for _, k, _ in columns) + " |")
    return "\n".join(rows)


TRAIN_COLUMNS = (("compile (s)", "compile_s", "{:.1f}".format), ("compiled HLO (k chars)", "hlo_chars",
                 lambda v: f"{v / 1e3:.0f}"), ("step (ms)", "step_ms", "{:.0f}".format))
GENERATE_COLUMNS = (("compile (s)", "compile_s", "{:.1f}".format), ("prefill (s)", "prefill_s", "{:.2f}".format),
                    ("decode (ms/token)", "decode_ms", "{:.1f}".format))


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
    p.add_argument("--programs", default="train,generate", help="train, generate, or both")
    p.add_argument("--context", type=int, default=2048, help="generate: prompt tokens per row")
    p.add_argument("--decode-tokens", type=int, default=32, help="generate: tokens generated per row")
    p.add_argument("--policy", default="full", help="generate: the cache policy (full, dms, ...)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    programs = [p.strip() for p in args.programs.split(",") if p.strip()]
    unknown = set(programs) - {"train", "generate"}
    if unknown or not programs:
        raise SystemExit(f"--programs {args.programs!r}: use train, generate or train,generate")
    shape = (f"L={args.layers} d={args.hidden} H={args.heads}/{args.kv_heads}x{args.head_dim} V={args.vocab}; "
             f"{args.dtype}")
    results = {}
    if "train" in programs:
        print(f"device: {jax.devices()[0].device_kind}; retrofit train step (distill, trainable="
              f"{args.trainable}, remat={bool(args.remat)}); {shape}; batch {args.batch} x {args.seq} tokens",
              flush=True)
        runners = {name: Runner(args, scan) for name, scan in LAYOUTS.items()}
        for r in runners.values():
            r.step(record=False)  # warm-up
        for _ in range(args.steps):  # interleaved, so load from other processes hits both alike
            for r in runners.values():
                r.step()
        train = {name: r.result() for name, r in runners.items()}
        print(table(train, TRAIN_COLUMNS))
        u, s = train["unrolled"]["loss"], train["scanned"]["loss"]
        print(f"loss after {1 + args.steps} steps: unrolled {u:.6f}, scanned {s:.6f} (same weights)")
        results["train"] = train
    if "generate" in programs:
        print(f"generate (policy {args.policy}): {shape}; batch {args.batch}, prompt {args.context} tokens, "
              f"{args.decode_tokens} generated", flush=True)
        gen = {name: run_generate(args, scan) for name, scan in LAYOUTS.items()}
        print(table(gen, GENERATE_COLUMNS))
        same = gen["unrolled"]["tokens"] == gen["scanned"]["tokens"]
        print(f"same tokens from both layouts: {same}; CR {gen['scanned']['cr']:.2f}")
        results["generate"] = gen
    return results


if __name__ == "__main__":
    main()
