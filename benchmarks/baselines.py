"""Training-free baselines vs DMS at equal held-token budgets (docs/dms.md section 8).

One model, the same prompts, every policy through `dms_jax.generate` (the same jitted prefill /
decode programs and the same cache counters): `full`, then for each target compression ratio
(2x, 4x, 8x) `dms` with its decisions forced to that ratio, and `streaming`, `h2o`, `tova`,
`snapkv` with budget = `budget_from_stats(dms.stats)` (DMS's mean held tokens per layer, row and
KV head at the end), so every row of a group holds the same number of tokens.

Printed (markdown): per policy the budget, the achieved CR (seen / held, docs/dms.md section 6), the
peak KV bytes held (sum over layers, rows, KV heads of each one's peak; SnapKV's includes the
whole prompt it prefills before compressing), those bytes relative to `full`, the KV reads of
the prefill and of the decode (keys attended, summed over queries, layers, rows, KV heads) and
the agreement with `full`'s greedy tokens: the first generated token (decided by the prefill
alone) and the mean length of the common prefix with `full`'s tokens (a random model, so a
sanity figure, not a quality measure).

The model: the shipped default model (`dms_jax.assets.TINY_MODEL_DIR`, a tiny random Llama)
loaded in DMS adapter mode (window 16, `offset=-5`), so its plain forward (full and the baselines)
is the base model and `dms` differs only by eviction. The adapter's decision weights are set per
(layer, KV head) to a random direction scaled so that the fraction of flagged tokens gives the
target CR on the prompts (quantile calibration, layer by layer on the hard-mask evaluation
forward). The achieved CR is measured, and the baselines use DMS's achieved held tokens.

    python benchmarks/baselines.py                     # 4 rows x 960 prompt + 64 new tokens
    python benchmarks/baselines.py --rows 2 --prompt 448 --new 32 --obs-window 32   # quicker
"""
from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np

import dms_jax
from dms_jax import DMSConfig
from dms_jax.assets import TINY_MODEL_DIR
from dms_jax.policies import budget_from_stats, get_policy

WINDOW = 16
SCALE, OFFSET = 100.0, -5.0  # z = 100 * proj + 5: flagged iff proj > -0.05


def flag_rate_for(cr: float, seen: int, window: int) -> float:
    """Fraction of tokens to flag so that seen / held = cr (held = window + 1 + unflagged older)."""
    older = seen - window - 1
    return float(np.clip(1.0 - (seen / cr - window - 1) / older, 0.0, 1.0))


def force_decisions(model, ids, rate: float, seed: int = 0):
    """Set each layer's adapter weights so a fraction `rate` of the prompt tokens is flagged.

    Per (layer, KV head): a random unit direction u; proj = u . RMSNorm(x) over the prompt is
    read from the evaluation forward's decision logits (z = SCALE * proj - OFFSET with weight u),
    then the weight becomes c * u with c putting the (1 - rate) quantile of proj at the threshold.
    Layer by layer, since a layer's inputs depend on the eviction in the layers before it.
    """
    rng = np.random.default_rng(seed)
    threshold = OFFSET / SCALE  # flagged iff c * proj > threshold
    for index, layer in enumerate(model.layers):
        kernel = layer.attn.dms_proj.kernel  # [d, Hkv]
        u = rng.standard_normal(kernel.shape)
        u /= np.linalg.norm(u, axis=0, keepdims=True)
        kernel[...] = jnp.asarray(u, kernel.dtype)
        z = np.asarray(model.eval_forward(jnp.asarray(ids))[0].decision_logits[index])  # [B,T,Hkv]
        proj = (z + OFFSET) / SCALE
        quantile = np.quantile(proj.reshape(-1, proj.shape[-1]), 1.0 - rate, axis=0)  # [Hkv]
        # rate > 1/2: the quantile is negative and c > 0; c * quantile = threshold
        scale = threshold / np.where(np.abs(quantile) < 1e-6, -1e-6, quantile)
        kernel[...] = jnp.asarray(u * scale[None, :], kernel.dtype)


def agreement(tokens, reference) -> tuple[float, float]:
    """(fraction of rows whose first token matches, mean common-prefix length in tokens)."""
    same = tokens == reference  # [B, N]
    prefix = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
    return float(same[:, 0].mean()), float(prefix.mean())


def row(name, held, out, full, ref_tokens):
    s = out.stats
    first, prefix = agreement(out.tokens, ref_tokens)
    return (f"| {name} | {held if held is not None else '-'} | {s.compression_ratio:.2f}x "
            f"| {s.peak_kv_bytes / 1024:.1f} | {s.peak_kv_bytes / full.peak_kv_bytes:.3f} "
            f"| {s.kv_reads_prefill:.4g} | {s.kv_reads_decode:.4g} "
            f"| {first:.2f} | {prefix:.1f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=960, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=64, help="generated tokens per row")
    parser.add_argument("--ratios", default="2,4,8", help="target compression ratios")
    parser.add_argument("--obs-window", type=int, default=64, help="SnapKV observation window")
    parser.add_argument("--sinks", type=int, default=4, help="StreamingLLM sinks")
    parser.add_argument("--chunk", type=int, default=256, help="prefill chunk")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    model = dms_jax.from_pretrained(TINY_MODEL_DIR, dms=DMSConfig(
        mode="adapter", window=WINDOW, scale=SCALE, offset=OFFSET))
    cfg = model.config
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, cfg.vocab_size, (args.rows, args.prompt)).astype(np.int32)
    seen = args.prompt + args.new - 1  # the last generated token never enters the cache
    common = dict(max_new_tokens=args.new, chunk_size=args.chunk)
    policies = {
        "streaming": get_policy("streaming", sinks=args.sinks),
        "h2o": get_policy("h2o"),
        "tova": get_policy("tova"),
        "snapkv": get_policy("snapkv", obs_window=args.obs_window),
    }

    full = dms_jax.generate(model, prompts, policy="full", **common)
    ref = full.tokens
    print(f"model: {TINY_MODEL_DIR} (L={cfg.num_layers}, Hkv={cfg.num_kv_heads}, "
          f"D={cfg.head_dim}, {cfg.dtype}), DMS adapter mode, window {WINDOW}, decisions forced")
    print(f"rows {args.rows} x (prompt {args.prompt} + {args.new} generated), greedy; "
          f"{seen} tokens seen per row; prefill chunk {args.chunk}; streaming sinks "
          f"{args.sinks}, h2o recent = budget / 2, snapkv obs_window {args.obs_window} "
          "kernel 5 avgpool\n")
    print("| policy | held tokens/head (budget) | CR (seen/held) | peak KV KiB | peak / full "
          f"| KV reads prefill | KV reads decode | 1st token = full | common prefix "
          f"(of {args.new}) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(row("full", None, full, full.stats, ref))
    for cr in (float(x) for x in args.ratios.split(",")):
        force_decisions(model, prompts, flag_rate_for(cr, seen, WINDOW), seed=args.seed)
        dms = dms_jax.generate(model, prompts, policy="dms", capacity=args.prompt + args.new,
                               **common)
        budget = budget_from_stats(dms.stats)
        print(f"| **target {cr:g}x** | | | | | | | | |")
        print(row("dms", budget, dms, full.stats, ref))
        for name, policy in policies.items():
            out = dms_jax.generate(model, prompts, policy=policy, budget=budget, **common)
            print(row(name, budget, out, full.stats, ref))
    print(f"\n(total {time.perf_counter() - t_start:.0f} s, compilation included; budget = "
          "budget_from_stats(dms.stats): DMS's mean held tokens per layer, row and KV head)")


if __name__ == "__main__":
    main()
