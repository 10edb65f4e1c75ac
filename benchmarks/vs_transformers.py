"""dms_jax against PyTorch + transformers on the same random Llama weights: prefill, decode, memory.

One random `LlamaForCausalLM` per shape (seeded, built with transformers and saved with
`save_pretrained` to a temporary directory) is run by
  * transformers: `LlamaForCausalLM.from_pretrained(dir, attn_implementation="sdpa")`, its default
    `DynamicCache`, a greedy generate-style loop (prefill with `logits_to_keep=1`, then one token
    per step, argmax), under `torch.inference_mode()`;
  * dms_jax `full`: `dms_jax.from_pretrained(dir)` then `dms_jax.generate(..., policy="full")`;
  * dms_jax `full-paged`, `dms8-paged`: the same on the paged cache (`layout="paged"`: a ring of
    the window per stream and one pool of pages per layer, sized for the expected held tokens);
  * dms_jax `dms` at 4x and 8x: the same weights with a DMS adapter whose decisions are forced to
    the flag rate 1 - 1/CR (the adapter's projection is random and rescaled per layer and KV head
    so that a fraction 1 - 1/CR of a calibration prompt's tokens is flagged: the cache then
    holds about (seen - w - 1) / CR + w + 1 tokens), `generate(..., policy="dms", target_cr=CR)`.
Each (system, shape, context, batch) runs in a fresh subprocess, so its peak process memory
(`resource.getrusage` max RSS: libraries, weights, cache and temporaries) is its own. Systems are
interleaved per configuration, so a slow phase of a shared machine hits them alike.

Measured: prefill seconds (the prompt in, the first token sampled), decode ms per step (mean over
`--new-tokens` steps, each one token per row), peak RSS, KV bytes (transformers: the
DynamicCache's tensors at the end; dms_jax: the allocated cache and the peak held K/V).
Each timed run is repeated until 5 s have been timed (at most `--repeats` times) and the medians
are reported, so a sub-second prefill does not rest on one run. Compilation is excluded from the
dms_jax timings (`generate` compiles each program before it times it and reports compilation
apart), and both systems first run a warm-up of one prefill chunk and a few decode steps on the
same programs (first executions are slower).
Both systems run single-threaded on one core: torch.set_num_threads(1) and XLA_FLAGS
"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" (pin the whole run with
`taskset -c N`), so the ratios compare the engines, not their thread pools.

    python benchmarks/vs_transformers.py                      # contexts 1k, 4k; batch 4
    python benchmarks/vs_transformers.py --contexts 2048,8192 --batches 4 --shapes gqa
    python benchmarks/vs_transformers.py --quick              # tiny shape, 1 context
    python benchmarks/vs_transformers.py --profile gqa,1024,4  # per-op time: prefill chunk, decode
    python benchmarks/vs_transformers.py --profile gqa,1024,4,full,paged   # the same, paged cache
    python benchmarks/vs_transformers.py --contexts 32768 --json 32k.json   # also save the records
    python benchmarks/vs_transformers.py --merge 8k.json,32k.json --plot p.png  # saved runs joined
Ratios printed: transformers time / dms_jax time (> 1: dms_jax faster).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
MiB = 2 ** 20

# name -> (layers, hidden, ffn, heads, kv heads, head dim, vocab)
SHAPES = {
    # Llama-3-like: grouped-query attention (8 query heads per 2 KV heads), weights dominate
    "gqa": (8, 512, 1536, 8, 2, 64, 8192),
    # the K/V read dominates a decode step: 2 layers, d 128, 4 KV heads of 64 (no GQA)
    "kv": (2, 128, 512, 4, 4, 64, 512),
    # for --quick (a seconds-scale smoke run)
    "tiny": (2, 64, 128, 4, 2, 16, 256),
    # for an accelerator (--device gpu): Llama-3.2-1B's layer (d 2048, GQA 32/8, head dim 64,
    # ffn 8192), 8 of them, vocab 32000: 0.62 B parameters, K/V 16 KiB per token in bfloat16
    "gqa-1b": (8, 2048, 8192, 32, 8, 64, 32000),
}
DEVICES = ("cpu", "gpu")
SYSTEMS = ("transformers", "full", "dms4", "dms8", "full-paged", "dms8-paged")
DEFAULT_SYSTEMS = ("transformers", "full", "dms4", "dms8")
# o_proj and down_proj scaled by this at build time (timing does not depend on weight values)
RESIDUAL_SCALE = 0.05
# each configuration's timed run is repeated (at most --repeats times) until this many seconds
# have been timed, and the median reported
MIN_TIMED_S = 5.0


# ----------------------------------------------------------------------------- the weights


def build_hf_model(shape: str, out_dir: str, seed: int = 0, dtype: str = "float32") -> str:
    """A random LlamaForCausalLM of `shape` saved to out_dir (in `dtype`, untied head)."""
    import torch
    import transformers

    layers, hidden, ffn, heads, kv_heads, head_dim, vocab = SHAPES[shape]
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=1 << 17, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # small residual updates: each layer's input stays close to the
        for layer in model.model.layers:  # token's embedding, so the forced DMS decisions
            layer.self_attn.o_proj.weight.mul_(RESIDUAL_SCALE)  # depend on the token, not on
            layer.mlp.down_proj.weight.mul_(RESIDUAL_SCALE)  # the row (see force_flag_rate)
    model.to(getattr(torch, dtype)).save_pretrained(out_dir)
    return out_dir


def prompts_for(vocab: int, batch: int, context: int, seed: int = 1):
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, (batch, context)).astype(np.int32)


# ----------------------------------------------------------------------------- the workers


def run_transformers(job) -> dict:
    import torch
    import transformers

    gpu = job.get("device", "cpu") == "gpu"
    if not gpu:
        torch.set_num_threads(1)
    device = torch.device("cuda" if gpu else "cpu")
    sync = torch.cuda.synchronize if gpu else (lambda: None)  # CUDA runs asynchronously
    model = transformers.LlamaForCausalLM.from_pretrained(
        job["model_dir"], attn_implementation="sdpa",
        dtype=getattr(torch, job.get("dtype", "float32"))).to(device).eval()
    ids = torch.from_numpy(prompts_for(model.config.vocab_size, job["batch"], job["context"])
                           ).long().to(device)
    steps = job["new_tokens"]
    # the cache argument: `cache` in newer transformers, `past_key_values` before (deprecated since)
    arg = ("cache" if "cache" in inspect.signature(type(model).forward).parameters
           else "past_key_values")
    with torch.inference_mode():
        warm = transformers.DynamicCache(config=model.config)  # warm-up: one chunk, 4 steps
        model(ids[:, :job["chunk"]], use_cache=True, logits_to_keep=1, **{arg: warm})
        for _ in range(4):
            model(ids[:, :1], use_cache=True, **{arg: warm})
        del warm

        def once():
            tic = time.perf_counter()
            cache = transformers.DynamicCache(config=model.config)
            out = model(ids, use_cache=True, logits_to_keep=1, **{arg: cache})
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            prefill_s = time.perf_counter() - tic
            tokens = [tok]
            tic = time.perf_counter()
            for _ in range(steps):
                out = model(tok, use_cache=True, **{arg: cache})
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(tok)
            sync()
            decode_ms = 1e3 * (time.perf_counter() - tic) / steps
            return dict(prefill_s=prefill_s, decode_ms=decode_ms, cache=cache,
                        tokens=torch.cat(tokens, 1).tolist())

        run = repeated(once, job.get("repeats", 1))
    cache = run.pop("cache")
    kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    if gpu:
        run["device_peak"] = int(torch.cuda.max_memory_allocated())
    return dict(run, kv_bytes=int(kv), kv_held=int(kv), cr=1.0, overflow=0)


def force_flag_rate(model, prompt, flag_rate: float, rounds: int = 4, seed: int = 0):
    """Set each layer's DMS adapter so that a fraction `flag_rate` of `prompt`'s tokens is flagged
    per KV head: a random projection, each column rescaled so that its (1 - flag_rate) quantile
    of raw logits sits at the threshold offset / scale (z > 0 flags); a column whose quantile has
    the other sign (the residual stream's mean leans on it) is negated first. Layers feed each
    other, so a few rounds. returns the flag rate reached on the prompt.

    The rate carries over to other prompts only if a layer's input depends on its token more
    than on the row: with full-size residual updates a random model's deeper layers drift per
    row (per-row flag rates of 0.5-1.0 for a target of 0.875, and overflowing caches), hence
    `RESIDUAL_SCALE` in `build_hf_model`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    dms = model.config.dms
    threshold = dms.offset / dms.scale  # raw > threshold  <=>  z > 0
    keys = jax.random.split(jax.random.key(seed), len(model.layers))
    for layer, key in zip(model.layers, keys):
        proj = layer.attn.dms_proj
        proj.kernel[...] = jax.random.normal(key, proj.kernel.shape, proj.kernel.dtype)
    for _ in range(rounds):
        out, _ = model.eval_forward(jnp.asarray(prompt))
        raw = (np.asarray(out.decision_logits, np.float32) + dms.offset) / dms.scale  # [L, B, T, Hkv]
        quant = np.quantile(raw, 1.0 - flag_rate, axis=(1, 2))  # [L, Hkv]
        # the right sign: rescale to the threshold; the wrong one: negate (next round rescales)
        factor = np.where(quant * threshold > 0, threshold / np.where(quant == 0, 1, quant), -1.0)
        for layer, f in zip(model.layers, factor):
            proj = layer.attn.dms_proj
            proj.kernel[...] = proj.kernel[...] * jnp.asarray(f, proj.kernel.dtype)
    out, _ = model.eval_forward(jnp.asarray(prompt))
    return float((np.asarray(out.decisions, np.float32) > 0).mean())


def system_model(system: str, model_dir: str, context: int, window: int,
                 dtype: str = "float32"):
    """(model, generate's policy keywords) of a dms_jax system: "full", or "dms<CR>" (a DMS
    adapter whose flag rate is set to 1 - 1 / CR on a calibration prompt: `force_flag_rate`);
    weights and compute in `dtype`."""
    import dms_jax
    from dms_jax import DMSConfig

    if system == "full":
        return dms_jax.from_pretrained(model_dir, dtype=dtype, param_dtype=dtype), dict(policy="full")
    cr = float(system[3:])
    model = dms_jax.from_pretrained(model_dir, dtype=dtype, param_dtype=dtype, dms=DMSConfig(
        mode="adapter", window=window, scale=100.0, offset=-1.0))
    calib = prompts_for(model.config.vocab_size, 1, min(context, 1024), seed=7)
    force_flag_rate(model, calib, 1.0 - 1.0 / cr)
    return model, dict(policy="dms", target_cr=cr)


def run_dms_jax(job) -> dict:
    import numpy as np

    import dms_jax

    system, _, layout = job["system"].partition("-")  # "dms8-paged": dms8 on the paged cache
    model, kw = system_model(system, job["model_dir"], job["context"], job["window"],
                             job.get("dtype", "float32"))
    ids = prompts_for(model.config.vocab_size, job["batch"], job["context"])
    kw.update(max_new_tokens=job["new_tokens"] + 1, chunk_size=job["chunk"],
              max_len=job["context"] + job["new_tokens"] + 1)
    if layout:
        kw.update(layout=layout)
    if job.get("attention"):  # the plan's cache attention (e.g. "fused"), else the platform's
        kw.update(attention_impl=job["attention"])
    # warm-up on the same programs (same plan, chunk and decode buffer): one chunk of the prompt
    # (first executions of a compiled program are slower; transformers gets the same warm-up)
    dms_jax.generate(model, ids[:, :min(job["chunk"], job["context"])], **kw)
    def once():
        out = dms_jax.generate(model, ids, **kw)
        s = out.stats
        return dict(prefill_s=s.prefill_seconds,
                    decode_ms=1e3 * s.decode_seconds / job["new_tokens"],
                    compile_s=s.compile_seconds, kv_bytes=int(s.allocated_kv_bytes),
                    kv_held=float(s.peak_kv_bytes), cr=float(s.compression_ratio),
                    overflow=int(s.overflow), capacity=int(s.capacity),
                    tokens=np.asarray(out.tokens).tolist())

    run = repeated(once, job.get("repeats", 1))
    if job.get("device", "cpu") == "gpu":
        import jax
        run["device_peak"] = int(jax.local_devices()[0].memory_stats()["peak_bytes_in_use"])
    return run


def repeated(once, most: int, timed_s: float = MIN_TIMED_S) -> dict:
    """`once()` (a dict with prefill_s and decode_ms) run until `timed_s` seconds have been timed
    or `most` times (at least once): the first run's record with the median prefill and decode
    times of all runs and the number of runs (`repeats`). A sub-second prefill then rests on
    several runs, not on one that a shared machine slowed down."""
    import numpy as np

    runs, spent = [], 0.0
    while not runs or (len(runs) < most and spent < timed_s):
        runs.append(once())
        spent += runs[-1]["prefill_s"] + 1e-3 * runs[-1]["decode_ms"]
    median = {k: float(np.median([r[k] for r in runs])) for k in ("prefill_s", "decode_ms")}
    return dict(runs[0], **median, repeats=len(runs))


def peak_rss_bytes() -> int:
    """This process's own peak resident memory: VmHWM of /proc/self/status (Linux: the peak of
    this address space, new at exec), else `ru_maxrss`, which on Linux carries the parent's peak
    across fork and exec (a parent that built a large model would floor every worker's figure;
    the parents of the CPU tables peaked at 379-500 MiB, below every worker's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(job: dict) -> dict:
    run = run_transformers if job["system"] == "transformers" else run_dms_jax
    result = run(job)
    result["max_rss"] = peak_rss_bytes()
    return result


def spawn(job: dict, timeout: float) -> dict:
    """`job` in a fresh process (single-threaded on a CPU); its result, or {"error": ...}."""
    env = dict(os.environ)
    if job.get("device", "cpu") == "cpu":
        env.update(XLA_FLAGS=os.environ.get("XLA_FLAGS", SINGLE_THREAD_XLA), OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1", JAX_PLATFORMS="cpu")
    else:  # the device's memory taken as needed, so its peak is the program's own
        env.update(XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        err = proc.stderr.strip().splitlines() or ["no output"]
        # the exception's own line (JAX appends a note after it), else the last line
        named = [ln for ln in err if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", ln)]
        return {"error": (named or err)[-1][:200], "stderr_tail": err[-30:]}  # tail: --json
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------- report


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def table(results, systems) -> str:
    """Markdown table: per configuration the transformers figures and each dms_jax system's
    ratio (transformers time / dms_jax time; > 1: dms_jax faster)."""
    head = ["shape", "ctx", "B", "tf prefill s", "tf decode ms"]
    for s in systems[1:]:
        head += [f"{s} prefill", f"{s} decode"]
    dms = [s for s in systems if s.startswith("dms")]
    # on an accelerator the peak of its memory (allocator's figure), else the process's peak RSS
    peak = ("device_peak" if any("device_peak" in r for by in results.values()
                                 for r in by.values()) else "max_rss")
    head += ["CR " + "/".join(dms),
             ("peak GPU MiB " if peak == "device_peak" else "peak RSS MiB ") + "/".join(systems),
             "KV MiB " + "/".join(systems), "tokens = tf"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, by_sys in results.items():
        shape, context, batch = key
        tf = by_sys.get("transformers", {})
        row = [shape, f"{context // 1024}k" if context >= 1024 else str(context), str(batch),
               f"{tf['prefill_s']:.2f}" if "prefill_s" in tf else tf.get("error", "-"),
               f"{tf['decode_ms']:.1f}" if "decode_ms" in tf else "-"]
        for s in systems[1:]:
            r = by_sys.get(s, {})
            if "error" in r:
                row += [r["error"][:40], "-"]
                continue
            row += [f"{r['prefill_s']:.2f} s ({ratio(tf.get('prefill_s'), r['prefill_s'])})",
                    f"{r['decode_ms']:.1f} ({ratio(tf.get('decode_ms'), r['decode_ms'])})"]
        row.append("/".join(f"{by_sys[s]['cr']:.1f}" if "cr" in by_sys.get(s, {}) else "-"
                            for s in dms) or "-")
        row.append("/".join(f"{by_sys[s][peak] / MiB:.0f}" if peak in by_sys.get(s, {})
                            else "-" for s in systems))
        row.append("/".join(f"{by_sys[s]['kv_bytes'] / MiB:.1f}"
                            if "kv_bytes" in by_sys.get(s, {}) else "-" for s in systems))
        ref = tf.get("tokens")
        full = by_sys.get("full", {}).get("tokens")
        row.append("-" if not (ref and full) else
                   f"{sum(a == b for ra, rb in zip(ref, full) for a, b in zip(ra, rb))}"
                   f"/{sum(len(r) for r in ref)}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results, systems, path, where="1 CPU core each, float32"):
    """Per (shape, batch) panel: decode step time against context per system (log-log), and
    below it the prefill time when the results hold more than one context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(k[0], k[2]) for k in results})
    metrics = [("decode_ms", "decode ms / step")]
    if len({k[1] for k in results}) > 1:
        metrics.append(("prefill_s", "prefill s"))
    fig, axes = plt.subplots(len(metrics), len(panels), figsize=(4.2 * len(panels),
                                                                 3.6 * len(metrics)),
                             squeeze=False)
    for col, (shape, batch) in enumerate(panels):
        keys = sorted(k for k in results if (k[0], k[2]) == (shape, batch))
        for (field, label), ax in zip(metrics, axes[:, col]):
            for s in systems:
                pts = [(k[1], results[k][s][field]) for k in keys
                       if field in results[k].get(s, {})]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=s)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(label)
            ax.set_title(f"{shape} shape, batch {batch}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"time vs context ({where})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save_results(results, path):
    """The measured configurations as JSON records (shape, context, batch, system, figures)."""
    records = [dict(shape=k[0], context=k[1], batch=k[2], system=s, **r)
               for k, by_sys in results.items() for s, r in by_sys.items()]
    with open(path, "w") as f:
        json.dump(records, f, indent=1)


def load_results(paths):
    """Records of `save_results` files -> (results, systems in first-seen order); a later file's
    figures replace an earlier one's for the same (shape, context, batch, system)."""
    results, systems = {}, []
    for path in paths:
        with open(path) as f:
            for rec in json.load(f):
                key = (rec.pop("shape"), rec.pop("context"), rec.pop("batch"))
                system = rec.pop("system")
                results.setdefault(key, {})[system] = rec
                if system not in systems:
                    systems.append(system)
    return dict(sorted(results.items())), systems


# ----------------------------------------------------------------------------- profile


def profile(shape: str, context: int, batch: int, system: str = "full", layout: str = "slots",
            chunk: int = 512, steps: int = 16, window: int = 256,
            trace_dir: str = "/tmp/dms_vs_transformers_profile", dtype: str = "float32"):
    """Per-op time (jax.profiler trace, ops grouped by the source line they came from) of the
    last prefill chunk of a `context`-token prompt and of a decode step, on random weights of
    `shape`, through the library's own jitted `prefill_step` and `decode_loop`, for `system`
    ("full" or "dms<CR>", as in the table) on the cache `layout` ("slots" or "paged"), weights
    and compute in `dtype`, on JAX's default backend."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dms_jax.cache import init_cache
    from dms_jax.plan import plan_inference
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:  # imported as a module (the tests), not run as a script
        sys.path.insert(0, here)
    from decode import _hlo_sources, _trace_breakdown  # benchmarks/decode.py

    gen = importlib.import_module("dms_jax.generate")  # the module (dms_jax.generate: the function)
    with tempfile.TemporaryDirectory() as tmp:
        model, kw = system_model(system, build_hf_model(shape, tmp), context, window, dtype)
    plan = plan_inference(model.config, max_len=context + 2 * steps + 2, layout=layout,
                          chunk_size=chunk, **kw)
    graphdef, params = nnx.split(model)
    cache = init_cache(plan, batch)
    ids = jnp.asarray(prompts_for(model.config.vocab_size, batch, context))
    valid, last = jnp.ones((batch, chunk), bool), jnp.full((batch,), -1, jnp.int32)
    hidden = jnp.zeros((batch, model.config.hidden_size), dtype)
    positions = jnp.arange(context, dtype=jnp.int32)[None].repeat(batch, 0)
    step = gen.prefill_step.lower(graphdef, params, cache, ids[:, :chunk], valid,
                                  positions[:, :chunk], hidden, last, plan=plan,
                                  last_only=gen.prefill_last_only(plan)).compile()
    for c in range(context // chunk):
        cols = slice(c * chunk, (c + 1) * chunk)
        if c == context // chunk - 1:
            jax.profiler.start_trace(os.path.join(trace_dir, "prefill"))
        tic = time.perf_counter()
        _, hidden, cache = step(params, cache, ids[:, cols], valid, positions[:, cols], hidden,
                                last)
        jax.block_until_ready(hidden)
    jax.profiler.stop_trace()
    print(f"{shape} {system} B={batch}: prefill chunk of {chunk} at position "
          f"{context - chunk} over {plan.capacity} slots: {time.perf_counter() - tic:.2f} s")
    print(_trace_breakdown(os.path.join(trace_dir, "prefill"), _hlo_sources(step.as_text()), 1))
    stop, row_max = jnp.full((2,), -1, jnp.int32), jnp.full((batch,), steps + 1, jnp.int32)
    start = jnp.full((batch,), context, jnp.int32)

    def carry():
        return gen.start_decode(jnp.zeros(batch, jnp.int32), row_max, stop, jax.random.key(0),
                                max_new=steps + 1)

    loop = gen.decode_loop.lower(graphdef, params, cache, carry(), start, row_max, stop,
                                 plan=plan, sampling=gen.Sampling(), segment=steps).compile()
    out, cache = loop(params, cache, carry(), start, row_max, stop, sampling=gen.Sampling())
    jax.block_until_ready(out)  # warm-up (the positions repeat: a timing run only)
    jax.profiler.start_trace(os.path.join(trace_dir, "decode"))
    tic = time.perf_counter()
    out, cache = loop(params, cache, carry(), start, row_max, stop, sampling=gen.Sampling())
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    print(f"decode at {context}: {1e3 * (time.perf_counter() - tic) / steps:.1f} ms/step")
    print(_trace_breakdown(os.path.join(trace_dir, "decode"), _hlo_sources(loop.as_text()),
                           steps))


# ----------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="1024,4096")
    p.add_argument("--batches", default="4")
    p.add_argument("--shapes", default="gqa,kv", help=f"of {sorted(SHAPES)}")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"of {SYSTEMS} (-paged: the paged cache, dms_jax.paged)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed")
    p.add_argument("--window", type=int, default=256, help="DMS window w")
    p.add_argument("--chunk", type=int, default=512, help="dms_jax prefill chunk")
    p.add_argument("--repeats", type=int, default=5,
                   help=f"timed runs per configuration at most: repeated until {MIN_TIMED_S:g} s "
                        "are timed, the median reported")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    p.add_argument("--plot", default="docs/results/vs_transformers.png")
    p.add_argument("--quick", action="store_true", help="tiny shape, context 256, batch 2")
    p.add_argument("--device", default="cpu", choices=DEVICES,
                   help="gpu: both systems on the first CUDA device (torch 'cuda', JAX's default "
                        "backend), timings synchronised, peak device memory reported")
    p.add_argument("--attention", default="",
                   help="dms_jax's cache attention (plan_inference's attention_impl, e.g. fused: "
                        "the experimental Pallas prefill kernel; slot layout only); default: "
                        "the platform's")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="weights, compute and K/V of both systems (default: float32 on cpu, "
                        "bfloat16 on gpu)")
    p.add_argument("--profile", default="", metavar="SHAPE,CONTEXT,BATCH[,SYSTEM[,LAYOUT]]",
                   help="per-op time of a prefill chunk and a decode step instead")
    p.add_argument("--json", default="", help="also save the results here (JSON records)")
    p.add_argument("--merge", default="", metavar="A.json,B.json",
                   help="measure nothing: the table and plot of saved runs (--json), merged")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    where = (f"1 CPU core each, {dtype}" if args.device == "cpu" else f"one GPU, {dtype}")
    if args.merge:
        results, systems = load_results(args.merge.split(","))
        if systems[0] != "transformers":
            raise SystemExit("--merge: the first file must hold transformers' runs (the ratios' "
                             "baseline); save a run that includes them with --json")
        print(table(results, systems))
        if args.plot:
            plot(results, systems, args.plot, where)  # --device / --dtype: the saved runs'
            print(f"plot: {args.plot}")
        return results
    if args.profile:
        shape, context, batch, *system_layout = args.profile.split(",")
        return profile(shape, int(context), int(batch), *system_layout, chunk=args.chunk,
                       window=args.window, dtype=dtype)
    if args.quick:
        args.contexts, args.batches, args.shapes, args.new_tokens = "256", "2", "tiny", 4
        args.window, args.chunk = 32, 64
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    systems = args.systems.split(",")
    if systems[0] != "transformers" or not set(systems) <= set(SYSTEMS):
        raise SystemExit(f"--systems must start with transformers and be of {SYSTEMS}")
    print("each configuration in a fresh process " + (
          f"on one core (affinity {sorted(os.sched_getaffinity(0))}); torch threads 1; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', SINGLE_THREAD_XLA)!r}"
          if args.device == "cpu" else "on the GPU") +
          f"; {dtype}; dms_jax compilation excluded; {args.new_tokens} decode steps; window "
          f"{args.window}; prefill chunk {args.chunk}", flush=True)
    results, tic = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            model_dir = build_hf_model(shape, os.path.join(tmp, shape), dtype=dtype)
            print(f"shape {shape}: L, d, ffn, H, Hkv, D, V = {SHAPES[shape]}", flush=True)
            for context in contexts:
                for batch in batches:
                    by_sys = results.setdefault((shape, context, batch), {})
                    for system in systems:
                        job = dict(system=system, model_dir=model_dir, context=context,
                                   batch=batch, new_tokens=args.new_tokens, window=args.window,
                                   chunk=args.chunk, repeats=args.repeats,
                                   device=args.device, dtype=dtype, attention=args.attention)
                        t0 = time.perf_counter()
                        by_sys[system] = r = spawn(job, args.timeout)
                        print(f"  {shape} ctx={context} B={batch} {system:12s} "
                              + (r["error"] if "error" in r else
                                 f"prefill {r['prefill_s']:.3f} s decode {r['decode_ms']:.2f} "
                                 f"ms/step rss {r['max_rss'] / MiB:.0f} MiB "
                                 + (f"gpu {r['device_peak'] / MiB:.0f} MiB "
                                    if "device_peak" in r else "") +
                                 f"cr {r['cr']:.2f} "
                                 f"overflow {r['overflow']} (median of {r.get('repeats', 1)})")
                              + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                              flush=True)
                        if args.json:  # as it goes: a run cut short keeps what it measured
                            save_results(results, args.json)
    print(table(results, systems))
    if args.json:
        save_results(results, args.json)
        print(f"results: {args.json}")
    print("ratios: transformers time / dms_jax time (> 1: dms_jax faster); CR: seen / held "
          "reached; KV: transformers' DynamicCache, dms_jax's allocated cache; tokens = tf: "
          "greedy tokens of dms_jax full equal to transformers'")
    if args.plot:
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        plot(results, systems, args.plot, where)
        print(f"plot: {args.plot}")
    print(f"total {time.perf_counter() - tic:.0f} s")
    return results


if __name__ == "__main__":
    main()
