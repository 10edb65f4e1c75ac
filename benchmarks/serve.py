"""Continuous batching throughput: `full` vs `dms` 8x on the same pool of KV pages.

One random Llama (`benchmarks/vs_transformers.py`'s shapes and weights; the DMS adapter forced to
the flag rate 1 - 1/CR the same way) serves one stream of requests through `dms_jax.serve.Server`
twice, in separate processes:
  * `full`: the paged cache without eviction; rows = as many requests of the longest length as
    the pool holds at once (the server admits by reserved pages, so more rows would sit idle);
  * `dms8`: the same pool (the same `pool_pages`), a DMS model at 8x; rows = as many requests as
    the pool is expected to hold at 8x (`InferencePlan.request_pages`), at most `--max-rows`.
Requests: `--requests` prompts of lengths drawn uniformly in [context / 2, context], each asking
for `--new-tokens` tokens, all submitted at the start. Timed: the whole stream, after warm-up
streams of 1, 2, 4, ... short requests that compile every program it uses (the decode step and
each padded prefill batch), so compilation is excluded. Printed: generated tokens / s,
requests / s, mean rows busy, the pool's pages and the CR reached, and the ratio dms8 / full of
tokens / s (> 1: DMS serves more).

    python benchmarks/serve.py                            # kv shape, contexts up to 2k
    python benchmarks/serve.py --context 16384 --requests 8 --new-tokens 256     # prompt-heavy
    python benchmarks/serve.py --context 2048 --requests 8 --new-tokens 14336    # generation-heavy
    python benchmarks/serve.py --quick                    # seconds-scale smoke run
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _vs():
    spec = importlib.util.spec_from_file_location("vs_transformers",
                                                  os.path.join(HERE, "vs_transformers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def requests_for(vocab: int, num: int, context: int, new_tokens: int, seed: int = 3):
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(context // 2, context + 1, num)
    return [(rng.integers(0, vocab, int(n)).tolist(), new_tokens) for n in lengths]


def load_model(job):
    import dms_jax
    from dms_jax import DMSConfig

    dtype = job.get("dtype", "float32")
    if job["system"] == "full":
        return (dms_jax.from_pretrained(job["model_dir"], dtype=dtype, param_dtype=dtype),
                dict(policy="full"))
    vs = _vs()
    cr = float(job["system"][3:])
    model = dms_jax.from_pretrained(job["model_dir"], dtype=dtype, param_dtype=dtype, dms=DMSConfig(
        mode="adapter", window=job["window"], scale=100.0, offset=-1.0))
    calib = vs.prompts_for(model.config.vocab_size, 1, min(job["context"], 1024), seed=7)
    vs.force_flag_rate(model, calib, 1.0 - 1.0 / cr)
    return model, dict(policy="dms", target_cr=cr)


def work_flops(cfg, requests) -> tuple[float, float]:
    """The requests' useful work, counted (not timed): floating-point operations (2 per
    multiply-add) of the projections, the MLP, the unembedding and the attention's two products,
    from the shapes and each request's `Completion` (prompt and generated tokens, keys read by
    its prompt and by its decode steps, per KV head: each of its G query heads reads them), as
    the server runs a request: a prompt's last layer projects every token but attends, projects
    out and runs its MLP for the last one only (`prefill_step(last_only=True)`; its keys read
    still count every query's, so the prompt's attention is taken as (L - 1) / L of them, as
    `full`'s layers all hold the same tokens); each generated token but the last goes through
    every layer. Left out: norms, RoPE, the DMS adapter, the softmax, and work the server does
    beyond the requests' own: idle rows of a decode step (it computes all `rows`), free pages
    read when a step reads the pool in place, padding rows and tokens of prefill batches.
    returns (prefill flops, decode flops)."""
    d, D, L = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    qkv = 2 * d * (cfg.num_heads + 2 * cfg.num_kv_heads) * D
    rest = 2 * cfg.num_heads * D * d + 6 * d * cfg.intermediate_size  # o_proj, gate/up/down
    unembed = 2 * d * cfg.vocab_size
    per_key = 4 * D * (cfg.num_heads // cfg.num_kv_heads)
    prefill = decode = 0.0
    for c in requests:
        prefill += (c.prompt_len * (L * qkv + (L - 1) * rest) + rest + unembed
                    + per_key * c.kv_reads_prefill * (L - 1) / L)
        decode += (len(c.tokens) - 1) * (L * (qkv + rest) + unembed) + per_key * c.kv_reads_decode
    return prefill, decode


def run_system(job) -> dict:
    """One system over the stream (in this process): its throughput and the pool's use."""
    import numpy as np

    from dms_jax.plan import plan_inference
    from dms_jax.serve import Server

    model, kw = load_model(job)
    cfg = model.config
    max_len = job["context"] + job["new_tokens"]
    common = dict(max_len=max_len, page_size=job["page_size"], chunk_size=job["chunk"])
    full_plan = plan_inference(cfg, policy="full", layout="paged", **common)
    pool = job["full_rows"] * full_plan.request_pages(max_len)  # the same pool for both
    plan = plan_inference(cfg, layout="paged", pool_pages=pool, **common, **kw)
    rows = max(1, min(job["max_rows"], pool // plan.request_pages(max_len)))
    server = Server(model, rows=rows, pool_pages=pool, **common, **kw)
    # compile outside the timed stream: the decode step, and the prefill chunk for every batch
    # of admitted prompts the server pads to (powers of two up to `rows`)
    rng, size = np.random.default_rng(9), 1
    while True:
        server.run([(rng.integers(0, cfg.vocab_size, min(job["chunk"], job["context"])).tolist(), 2)
                    for _ in range(size)])
        if size >= rows:
            break
        size = min(rows, 2 * size)
    requests = requests_for(cfg.vocab_size, job["requests"], job["context"], job["new_tokens"])
    server.generated_tokens, busy, steps = 0, 0, 0
    server.prefill_seconds = server.decode_seconds = 0.0
    tic = time.perf_counter()
    for prompt, new in requests:
        server.submit(prompt, new)
    done = []
    while not server.idle:
        done += server.step()
        busy += sum(r is not None for r in server.slot)
        steps += 1
    seconds = time.perf_counter() - tic
    held = sum(c.held for c in done)
    seen = sum(c.seen for c in done)
    per_token = cfg.num_layers * cfg.num_kv_heads
    kv_reads = sum(c.kv_reads_prefill + c.kv_reads_decode for c in done)
    prefill_flops, decode_flops = work_flops(cfg, done)
    return dict(system=job["system"], rows=rows, pool_pages=pool, seconds=seconds,
                prefill_s=server.prefill_seconds, decode_s=server.decode_seconds,
                tokens=server.generated_tokens, tokens_per_s=server.generated_tokens / seconds,
                requests_per_s=len(done) / seconds, mean_busy_rows=busy / max(steps, 1),
                cr=seen * per_token / max(held, 1), kv_reads=kv_reads,
                prefill_gflop=prefill_flops / 1e9, decode_gflop=decode_flops / 1e9,
                gflop=(prefill_flops + decode_flops) / 1e9,
                overflow=int(np.sum([c.overflow for c in done])), requests=len(done))


def spawn(job, timeout):
    env = dict(os.environ)
    if job.get("device", "cpu") == "cpu":
        env.setdefault("XLA_FLAGS", SINGLE_THREAD_XLA)
        env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"system": job["system"], "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="kv", help="a shape of benchmarks/vs_transformers.py")
    p.add_argument("--context", type=int, default=2048, help="longest prompt")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--full-rows", type=int, default=2,
                   help="the pool holds this many full requests of the longest length")
    p.add_argument("--max-rows", type=int, default=16, help="dms rows at most")
    p.add_argument("--cr", type=float, default=8.0)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--quick", action="store_true", help="tiny shape, context 256, 6 requests")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                   help="gpu: JAX's default backend (one CUDA device)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="weights, compute and K/V (default: float32 on cpu, bfloat16 on gpu)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_system(json.loads(args.worker))), flush=True)
        return None
    if args.quick:
        args.shape, args.context, args.requests, args.new_tokens = "tiny", 256, 6, 8
        args.window, args.chunk, args.page_size = 32, 64, 16
    vs = _vs()
    dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    print(f"shape {args.shape} (L, d, ffn, H, Hkv, D, V = {vs.SHAPES[args.shape]}); "
          f"{args.requests} requests of {args.context // 2}-{args.context} prompt tokens + "
          f"{args.new_tokens} new; pool = {args.full_rows} full requests; window {args.window}; "
          f"pages of {args.page_size}; {dtype}; "
          + ("one core per process" if args.device == "cpu" else "the GPU"), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = vs.build_hf_model(args.shape, os.path.join(tmp, args.shape), dtype=dtype)
        for system in ("full", f"dms{args.cr:g}"):
            job = dict(system=system, model_dir=model_dir, context=args.context,
                       requests=args.requests, new_tokens=args.new_tokens,
                       full_rows=args.full_rows, max_rows=args.max_rows, window=args.window,
                       page_size=args.page_size, chunk=args.chunk, device=args.device,
                       dtype=dtype)
            r = spawn(job, args.timeout)
            results.append(r)
            print("  " + (f"{system}: {r['error']}" if "error" in r else
                          f"{system}: {r['rows']} rows, {r['tokens_per_s']:.1f} tokens/s, "
                          f"{r['requests_per_s']:.3f} requests/s, {r['mean_busy_rows']:.1f} rows "
                          f"busy, CR {r['cr']:.2f}, overflow {r['overflow']}, "
                          f"{r['kv_reads']:.4g} keys read, {r['gflop']:.4g} GFLOP counted "
                          f"({r['seconds']:.0f} s: "
                          f"prefill {r['prefill_s']:.1f} s, decode {r['decode_s']:.1f} s)"),
                  flush=True)
    ok = [r for r in results if "error" not in r]
    lines = ["| system | rows | pool pages | tokens/s | requests/s | mean rows busy | CR | overflow "
             "| prefill s | decode s | keys read | GFLOP counted prefill / decode | counted GFLOP/s "
             "prefill / decode |", "| --- " * 13 + "|"]
    for r in ok:
        lines.append(f"| {r['system']} | {r['rows']} | {r['pool_pages']} | {r['tokens_per_s']:.1f} | "
                     f"{r['requests_per_s']:.3f} | {r['mean_busy_rows']:.1f} | {r['cr']:.2f} | "
                     f"{r['overflow']} | {r['prefill_s']:.1f} | {r['decode_s']:.1f} | "
                     f"{r['kv_reads']:.4g} | {r['prefill_gflop']:.4g} / {r['decode_gflop']:.4g} | "
                     f"{r['prefill_gflop'] / max(r['prefill_s'], 1e-9):.3g} / "
                     f"{r['decode_gflop'] / max(r['decode_s'], 1e-9):.3g} |")
    print("\n".join(lines))
    if len(ok) == 2:
        full, dms = ok
        print(f"dms / full tokens/s: {dms['tokens_per_s'] / full['tokens_per_s']:.2f}x "
              f"(prefill time {full['prefill_s'] / max(dms['prefill_s'], 1e-9):.2f}x less, "
              f"decode time {full['decode_s'] / max(dms['decode_s'], 1e-9):.2f}x less)")
        print(f"work counted, full / dms: {full['gflop'] / dms['gflop']:.2f}x (the tokens/s ratio "
              "if both ran their operations at the same rate; keys read "
              f"{full['kv_reads'] / max(dms['kv_reads'], 1):.2f}x)")
    return results


if __name__ == "__main__":
    main()
