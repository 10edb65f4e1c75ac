"""Capacity under a fixed KV memory budget: the largest batch per context for `full` and `dms` 8x,
on the slot layout and on the paged one, by the cache's own accounting, confirmed by running it.

For each context and system the largest batch B whose cache (`InferencePlan.cache_bytes(B)`:
keys, values, positions, flags, page tables, counters; exactly the bytes `init_cache` allocates,
tested in tests/test_paged.py) fits in `--budget-mib` is found by bisection. Then, at the
`--confirm` contexts, each system really runs `generate` at that batch (a prompt of the context
minus `--new-tokens`, then `--new-tokens` tokens; `strict=True`, so a cache that overflows fails
the run) and the allocated bytes are checked against the budget. `dms` runs the random Llama of
`benchmarks/vs_transformers.py` with its DMS adapter forced to the flag rate 1 - 1/CR.

    python benchmarks/capacity.py                                   # kv shape, 160 MiB
    python benchmarks/capacity.py --contexts 4096,16384,32768 --confirm 16384
    python benchmarks/capacity.py --quick                           # seconds-scale smoke run
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 2 ** 20
SYSTEMS = ("full", "full-paged", "dms8", "dms8-paged")


def _load(name):
    """A sibling benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plan_for(cfg, system: str, context: int, *, window: int, page_size: int, margin=None):
    import dataclasses

    from dms_jax import DMSConfig
    from dms_jax.plan import plan_inference

    name, _, layout = system.partition("-")
    if name == "full":
        return plan_inference(cfg, policy="full", max_len=context, layout=layout or "slots",
                              **({"page_size": page_size} if layout else {}))
    dms_cfg = dataclasses.replace(cfg, dms=DMSConfig(mode="adapter", window=window))
    return plan_inference(dms_cfg, policy="dms", target_cr=float(name[3:]), max_len=context,
                          layout=layout or "slots", margin=margin,
                          **({"page_size": page_size} if layout else {}))


def largest_batch(plan, budget: int, limit: int = 1 << 16) -> int:
    """The largest B with plan.cache_bytes(B) <= budget (0 if not even one row fits)."""
    lo, hi = 0, 1
    while hi <= limit and plan.cache_bytes(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if plan.cache_bytes(mid) <= budget else (lo, mid)
    return lo


def confirm(model_dir, system, context, batch, budget, *, window, page_size, new_tokens,
            margin=None):
    """Run `generate` at (batch, context) strictly; returns what it allocated and reached. The
    model is benchmarks/serve.py's (`load_model`: dms forced to the flag rate 1 - 1/CR)."""
    import dms_jax
    from dms_jax.cache import CacheOverflowError

    name, _, layout = system.partition("-")
    model, kw = _load("serve").load_model(dict(system=name, model_dir=model_dir, window=window,
                                                context=context))
    if layout:
        kw.update(layout=layout, page_size=page_size)
    if name != "full":
        kw.update(margin=margin)
    ids = _load("vs_transformers").prompts_for(model.config.vocab_size, batch, context - new_tokens)
    tic = time.perf_counter()
    try:
        out = dms_jax.generate(model, ids, max_new_tokens=new_tokens, max_len=context, strict=True,
                               **kw)
    except CacheOverflowError as err:  # the margin was too small for this batch
        return dict(cache_bytes=0, fits=False, cr=float("nan"), overflow=None,
                    error=str(err).split(":")[0], seconds=time.perf_counter() - tic)
    s = out.stats
    cache_bytes = sum(x.nbytes for c in out.state.cache for x in _leaves(c))
    return dict(cache_bytes=int(cache_bytes), fits=cache_bytes <= budget, cr=s.compression_ratio,
                overflow=s.overflow, seconds=time.perf_counter() - tic)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="kv", help="a shape of benchmarks/vs_transformers.py")
    p.add_argument("--budget-mib", type=float, default=160.0)
    p.add_argument("--contexts", default="4096,16384,32768")
    p.add_argument("--confirm", default="4096", help="contexts run for real ('' for none)")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--margin", type=float, default=None,
                   help="dms caches' margin over the expected retained tokens (default: the plan's, "
                        "0.5 for slots, 0.1 for pages)")
    p.add_argument("--quick", action="store_true", help="tiny shape, 2 MiB, contexts 512 / 1024")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.budget_mib, args.contexts, args.confirm = "tiny", 2.0, "512,1024", "512"
        args.window, args.page_size, args.new_tokens = 16, 16, 2
    vs = _load("vs_transformers")
    budget = int(args.budget_mib * MiB)
    contexts = [int(c) for c in args.contexts.split(",")]
    confirm_at = {int(c) for c in args.confirm.split(",") if c}
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = vs.build_hf_model(args.shape, os.path.join(tmp, args.shape))
        import dms_jax

        cfg = dms_jax.from_pretrained(model_dir).config
        print(f"shape {args.shape} (L, d, ffn, H, Hkv, D, V = {vs.SHAPES[args.shape]}); budget "
              f"{args.budget_mib:g} MiB of KV cache; dms window {args.window}; pages of "
              f"{args.page_size}; dms margin "
              f"{'the plan default' if args.margin is None else args.margin}", flush=True)
        for context in contexts:
            for system in SYSTEMS:
                plan = plan_for(cfg, system, context, window=args.window, page_size=args.page_size,
                                margin=args.margin)
                batch = largest_batch(plan, budget)
                r = results[(context, system)] = dict(batch=batch, bytes=plan.cache_bytes(batch))
                if context in confirm_at and batch:
                    r.update(confirm(model_dir, system, context, batch, budget, window=args.window,
                                     page_size=args.page_size, new_tokens=args.new_tokens,
                                     margin=args.margin))
                print(f"  ctx {context} {system:11s} batch {batch}" + (
                    f" ran: {r['cache_bytes'] / MiB:.1f} MiB allocated, CR {r['cr']:.2f}, "
                    f"overflow {r.get('error', r['overflow'])} ({r['seconds']:.0f} s)"
                    if "cr" in r else ""),
                    file=sys.stderr, flush=True)
            full = results[(context, "full")]["batch"]
            cells = []
            for system in SYSTEMS:
                r = results[(context, system)]
                ran = ("" if "cr" not in r else ", ran: OVERFLOW" if "error" in r
                       else f", ran: CR {r['cr']:.2f}, {'fits' if r['fits'] else 'OVER BUDGET'}")
                cells.append(f"{r['batch']} ({r['batch'] / full:.1f}x{ran})" if full else
                             f"{r['batch']}{ran}")
            rows.append(f"| {context} | " + " | ".join(cells) + " |")
    print(f"| context | {' | '.join(SYSTEMS)} |\n|" + " --- |" * (len(SYSTEMS) + 1))
    print("\n".join(rows))
    print("largest batch whose whole cache fits the budget (ratio to full's); ran: generate at that "
          "batch with strict=True (no overflow) and its allocated cache within the budget")
    return results


if __name__ == "__main__":
    main()
