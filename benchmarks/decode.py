"""Decode speed and KV memory: `full` vs `dms` with the flags forced to a target compression ratio.

For each (context, batch) the same model decodes from three caches, interleaved call by call:
`full` (every token held) and `dms` at CR 4 and 8. Printed per row: decode tokens/s, the speed
ratio dms / full (median of the per-repeat ratios, full and dms timed back to back), the ideal
ratio from bytes moved per step, and peak / allocated KV bytes from `cache_stats`.

The decode step is the library's own `dms_jax.generate.decode_loop` (jitted, cache and carry
donated, `lax.while_loop` over the steps), compiled before it is timed.

How the decode-starting state is built (prefilling 16k-32k tokens x batch 16 through attention
on a CPU would take far longer than the decode being measured): the cache is written directly,
with random keys / values, per layer, row and KV head:
  * full: capacity = context + every token decoded in the run (so it never overflows); positions
    0 .. context-1 in slots 0 .. context-1, no flags;
  * dms at CR c: capacity = `capacity_for(context + decoded, window, c, margin)` (what
    `generate(..., target_cr=c)` allocates); held = the window (positions context-w-1 ..
    context-1, all flagged but the newest, whose flag is pending) plus R retained older tokens
    (unflagged, evenly spaced over positions 0 .. context-w-2), where
      --held seen-held  (default)  R = context / c - (w + 1): seen / held = c exactly, the CR of
                                    docs/dms.md section 6 (held includes the window);
      --held flag-rate             R = (context - w - 1) / c: what a model flagging a fraction
                                    1 - 1/c of the tokens holds (seen / held < c: the window
                                    counts in full).
  When context / c < w + 1 (2k at 4x and 8x, 4k at 8x with w = 512) dms holds just the window:
  the achieved CR (column achCR) is then below c.
  `seen`, `last_pos`, `last_slot` (the slot of the newest token) and `peak_held` are set to match.
Forced flags during decode: the model runs in adapter mode with `dms_proj` at its zero init and
`DMSConfig(offset=-5)`, so z = +5 > 0 for every token and head: every new token flags its
predecessor, the token leaving the window is always flagged and freed, and the held count stays
at its starting value (the achieved CR after the run, printed, is c x (seen after / seen before)).
`full` runs the same model with policy `full` (mode "plain", no decisions).
After the run every (layer, row, KV head) is checked to hold exactly the expected positions (full:
all so far; dms: the retained ones and the newest w + 1) with no overflow; a row that fails is
marked `!held/overflow`.

Bytes per step (ideal ratio): parameters (read once per step) + K/V of every slot of the
fixed-shape cache (the kernel attends over all `capacity` slots, held or free), per layer, row
and KV head. `ideal` uses capacity; `ideal(held)` uses the held tokens (what a kernel reading
only held slots would move).
On a CPU, sp/id can exceed 1: a dms cache of a few MiB per layer stays partly in the last-level
cache, and XLA's CPU dot for probs @ V runs at a lower bandwidth for long slot axes (>= ~12k
slots) than for short ones, which penalises `full` (and dms 4x at 32k) per byte. The machine may
be shared: the per-call spread of the speed ratio is printed (speed min-max).

    python benchmarks/decode.py                  # contexts 2k-32k, batch 1/4/16, CR 4 and 8
    python benchmarks/decode.py --quick          # contexts 2k, 16k; batch 1, 4
    python benchmarks/decode.py --contexts 16384,32768 --batches 16 --held flag-rate
    python benchmarks/decode.py --profile 16384,16   # per-op time of one decode_loop (full, dms 8x)
"""
from __future__ import annotations

import argparse
import functools
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dms_jax.cache import LayerCache, cache_stats
from dms_jax.config import DMSConfig, ModelConfig, resolve_dtype
from dms_jax.generate import Sampling, decode_loop, start_decode
from dms_jax.model import Decoder
from dms_jax.plan import capacity_for, plan_inference

GiB = 2 ** 30
MiB = 2 ** 20


def model_config(args) -> ModelConfig:
    """A shape where the K/V read per step dominates: few layers, no GQA, small d and vocab."""
    return ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_layers=args.layers, num_heads=args.kv_heads, num_kv_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=1 << 20, dtype=args.dtype,
        param_dtype=args.dtype,
        # zero dms_proj and a negative offset: z = +5 for every token, i.e. every token flags
        # its predecessor (the forced-flag set-up described in the module docstring)
        dms=DMSConfig(mode="adapter", window=args.window, offset=-5.0),
    )


# ----------------------------------------------------------------------------- the start state


def held_positions(context, window, cr, rule):
    """Positions held at the start of decode (ascending) and their flags, for one stream."""
    window_pos = np.arange(max(context - window - 1, 0), context)
    if cr is None:  # full
        return np.arange(context), np.zeros(context, bool)
    older = max(context - window - 1, 0)
    if rule == "seen-held":
        retained = int(round(context / cr)) - len(window_pos)
    else:  # flag-rate
        retained = int(round(older / cr))
    retained = min(max(retained, 0), older)
    old_pos = (np.arange(retained) * older) // max(retained, 1)  # evenly spaced, distinct
    pos = np.concatenate([old_pos, window_pos]).astype(np.int32)
    flags = np.concatenate([np.zeros(retained, bool), np.ones(len(window_pos), bool)])
    flags[-1] = False  # the newest token's flag is pending
    return pos, flags


@functools.partial(jax.jit, static_argnames=("batch", "num_kv_heads", "head_dim", "dtype"))
def _layer_state(key, pos_row, flag_row, *, batch, num_kv_heads, head_dim, dtype):
    """One LayerCache holding `pos_row` (int32 [S], -1 free) in every (row, KV head)."""
    slots = pos_row.shape[0]
    shape = (batch, num_kv_heads, slots)
    block = 256  # random K/V tiled along the slots (threefry over GiBs would dominate set-up)
    kv = jax.random.normal(key, (2, batch, num_kv_heads, block, head_dim), jnp.float32)
    kv = jnp.tile(kv, (1, 1, 1, -(-slots // block), 1))[:, :, :, :slots].astype(dtype)
    held = (pos_row >= 0).sum(dtype=jnp.int32)
    last_slot = jnp.argmax(pos_row).astype(jnp.int32)  # slot of the newest position
    return LayerCache(
        keys=kv[0], values=kv[1],
        pos=jnp.broadcast_to(pos_row, shape),
        flags=jnp.broadcast_to(flag_row, shape),
        scores=jnp.zeros(shape, jnp.float32),
        last_slot=jnp.full(shape[:2], last_slot, jnp.int32),
        last_pos=jnp.full((batch,), pos_row.max(), jnp.int32),
        seen=jnp.full((batch,), pos_row.max() + 1, jnp.int32),
        overflow=jnp.zeros(shape[:2], jnp.int32),
        kv_reads=jnp.zeros(shape[:2], jnp.float32),
        peak_held=jnp.full(shape[:2], held, jnp.int32),
    )


def build_cache(cfg, batch, capacity, pos, flags, seed=0):
    if len(pos) > capacity:
        raise ValueError(f"{len(pos)} held tokens do not fit capacity {capacity}")
    pos_row = np.full(capacity, -1, np.int32)
    pos_row[:len(pos)] = pos
    flag_row = np.zeros(capacity, bool)
    flag_row[:len(flags)] = flags
    keys = jax.random.split(jax.random.key(seed), cfg.num_layers)
    return tuple(_layer_state(keys[i], pos_row, flag_row, batch=batch,
                              num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                              dtype=resolve_dtype(cfg.dtype)) for i in range(cfg.num_layers))


# ----------------------------------------------------------------------------- one variant


class Variant:
    """One cache (full or dms at a CR) decoding `steps` tokens per call with `decode_loop`."""

    def __init__(self, name, model, cfg, batch, context, capacity, pos, flags, cr, steps, calls,
                 window):
        self.name, self.cr, self.batch, self.steps, self.context = name, cr, batch, steps, context
        self.capacity, self.start_held = capacity, len(pos)
        self.retained = pos[pos < context - window - 1]  # held tokens older than the window
        self.graphdef, self.params = nnx.split(model)
        # the library's plan for this cache (its length: any bound >= the capacity)
        self.plan = plan_inference(cfg, policy="dms" if cr is not None else "full",
                                   window=window, capacity=capacity,
                                   max_len=cfg.max_position_embeddings)
        self.sampling = Sampling()
        self.cache = build_cache(cfg, batch, capacity, pos, flags)
        self.next_pos = context  # position of the next token fed
        self.row_max = np.full(batch, steps + 1, np.int32)
        self.stop_ids = np.full(8, -1, np.int32)
        self.first = np.random.default_rng(1).integers(0, cfg.vocab_size, batch).astype(np.int32)
        self.times = []
        tic = time.perf_counter()
        carry = self._carry()
        self.compiled = decode_loop.lower(
            self.graphdef, self.params, self.cache, carry, self._next_pos(), self.row_max,
            self.stop_ids, plan=self.plan, sampling=self.sampling, segment=steps).compile()
        self.compile_s = time.perf_counter() - tic
        self.calls_left = calls

    def _carry(self):
        return start_decode(self.first, self.row_max, self.stop_ids, jax.random.key(0),
                            max_new=self.steps + 1)

    def _next_pos(self):
        return np.full(self.batch, self.next_pos, np.int32)

    def run(self, record=True):
        """One decode_loop call of `steps` tokens per row; returns its wall time."""
        if self.calls_left <= 0:
            raise RuntimeError("capacity was sized for fewer calls")
        carry = self._carry()
        jax.block_until_ready(carry)
        tic = time.perf_counter()
        carry, self.cache = self.compiled(self.params, self.cache, carry, self._next_pos(),
                                          self.row_max, self.stop_ids, sampling=self.sampling)
        jax.block_until_ready((carry, self.cache))
        elapsed = time.perf_counter() - tic
        if int(carry.i) != self.steps + 1:
            raise RuntimeError(f"{self.name}: decode_loop stopped after {int(carry.i) - 1} steps")
        self.first = np.asarray(carry.cur)
        self.next_pos += self.steps
        self.calls_left -= 1
        if record:
            self.times.append(elapsed)
        return elapsed

    def tok_s(self):
        return self.batch * self.steps / statistics.median(self.times)

    def stats(self):
        s = cache_stats(self.cache)
        return dict(cr=float(s.compression_ratio), peak=float(s.peak_held_bytes),
                    alloc=int(s.allocated_bytes), held=np.asarray(s.held),
                    seen=np.asarray(s.seen), overflow=int(np.asarray(s.overflow).sum()),
                    positions_ok=self.positions_ok())

    def positions_ok(self):
        """Every (layer, row, head) holds exactly the expected positions after the run: the
        retained old ones and the newest w + 1 (dms), or every position so far (full)."""
        seen = self.next_pos  # positions 0 .. next_pos - 1 have entered the cache
        if self.cr is None:
            expected = np.arange(seen)
        else:
            window = self.plan.window
            expected = np.concatenate([self.retained,
                                       np.arange(max(seen - window - 1, 0), seen)])
        for layer in self.cache:
            pos = np.sort(np.asarray(layer.pos), axis=-1)[..., -len(expected):]
            held = (np.asarray(layer.pos) >= 0).sum(axis=-1)
            if not ((held == len(expected)).all() and (pos == expected).all()):
                return False
        return True


def kv_bytes(cfg, batch, tokens):
    """K + V bytes of `tokens` slots per (layer, row, KV head)."""
    return (cfg.num_layers * batch * cfg.num_kv_heads * tokens * 2 * cfg.head_dim
            * jnp.dtype(resolve_dtype(cfg.dtype)).itemsize)


def param_bytes(params):
    return sum(x.nbytes for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- the sweep


def steps_for(args, context, batch):
    """Tokens per decode_loop call: enough work per call to time, bounded for the big ones."""
    if args.steps:
        return args.steps
    return int(np.clip(args.token_budget // (context * batch), 8, 64))


def measure(args, model, cfg, pbytes, context, batch):
    steps = steps_for(args, context, batch)
    calls = args.repeats + 1  # + the warm-up call
    decoded = calls * steps
    max_len = context + decoded
    variants = []
    pos, flags = held_positions(context, args.window, None, args.held)
    variants.append(Variant("full", model, cfg, batch, context, max_len, pos, flags, None, steps,
                            calls, args.window))
    for cr in args.crs:
        cap = capacity_for(max_len, args.window, cr, args.margin)
        pos, flags = held_positions(context, args.window, cr, args.held)
        variants.append(Variant(f"dms{cr:g}", model, cfg, batch, context, cap, pos, flags, cr,
                                steps, calls, args.window))
    compile_s = sum(v.compile_s for v in variants)
    for v in variants:
        v.run(record=False)  # warm-up
    ratios = {v.name: [] for v in variants[1:]}
    for _ in range(args.repeats):  # interleaved: full, dms4, dms8, full, ...
        t_full = variants[0].run()
        for v in variants[1:]:
            ratios[v.name].append(t_full / v.run())
    full = variants[0]
    fs = full.stats()
    rows = []

    def step_bytes(tokens):  # parameters + K/V of `tokens` slots per (layer, row, KV head)
        return pbytes + kv_bytes(cfg, batch, tokens)

    for v in variants[1:]:
        s = v.stats()
        ideal = step_bytes(full.capacity) / step_bytes(v.capacity)
        ideal_held = step_bytes(context + decoded / 2) / step_bytes(v.start_held)  # mid-run
        speed = statistics.median(ratios[v.name])
        ok_held = (bool((s["held"] == v.start_held).all()) and s["positions_ok"]
                   and fs["positions_ok"])
        rows.append(dict(
            context=context, batch=batch, cr=v.cr, steps=steps, full_tok_s=full.tok_s(),
            dms_tok_s=v.tok_s(), speed=speed, ideal=ideal, ideal_held=ideal_held,
            frac=speed / ideal, achieved_cr=s["cr"], held=v.start_held, held_ok=ok_held,
            cap_full=full.capacity, cap_dms=v.capacity,
            peak_full=fs["peak"], peak_dms=s["peak"], alloc_full=fs["alloc"],
            alloc_dms=s["alloc"], overflow=s["overflow"] + fs["overflow"],
            spread=(min(ratios[v.name]), max(ratios[v.name])),
            full_ms=1e3 * statistics.median(full.times) / steps,
            dms_ms=1e3 * statistics.median(v.times) / steps,
        ))
    del variants
    return rows, compile_s


HEADER = (f"{'ctx':>6} {'B':>3} {'CR':>3} {'full tok/s':>10} {'dms tok/s':>10} {'speed':>6} "
          f"{'ideal':>6} {'sp/id':>6} {'id(held)':>8} {'achCR':>6} {'held':>5} {'cap':>5} "
          f"{'peakKV full':>11} {'peakKV dms':>10} {'peak x':>7} {'alloc full':>10} "
          f"{'alloc dms':>9} {'alloc x':>7} {'ms/step f|d':>12} {'speed min-max':>13}")


def fmt_row(r):
    return (f"{r['context']:>6} {r['batch']:>3} {r['cr']:>3g} {r['full_tok_s']:>10.1f} "
            f"{r['dms_tok_s']:>10.1f} {r['speed']:>6.2f} {r['ideal']:>6.2f} {r['frac']:>6.2f} "
            f"{r['ideal_held']:>8.2f} {r['achieved_cr']:>6.2f} {r['held']:>5} {r['cap_dms']:>5} "
            f"{r['peak_full'] / MiB:>7.1f} MiB {r['peak_dms'] / MiB:>6.1f} MiB "
            f"{r['peak_full'] / r['peak_dms']:>7.2f} {r['alloc_full'] / MiB:>6.0f} MiB "
            f"{r['alloc_dms'] / MiB:>5.0f} MiB {r['alloc_full'] / r['alloc_dms']:>7.2f} "
            f"{r['full_ms']:>6.2f}|{r['dms_ms']:<5.2f} "
            f"{r['spread'][0]:>6.2f}-{r['spread'][1]:<6.2f}"
            + ("" if r["held_ok"] and r["overflow"] == 0 else "  !held/overflow")).rstrip()


def _hlo_sources(hlo_text):
    """{instruction name: 'function:line'} of the innermost Python frame in its metadata."""
    sections, current = {}, None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = sections.setdefault(line, {})
            continue
        m = re.match(r"^(\d+) (.*)$", line) if current is not None else None
        if m:
            current[int(m.group(1))] = m.group(2)
        elif line.strip():
            current = None
    funcs = {k: v.strip('"') for k, v in sections.get("FunctionNames", {}).items()}
    files = {k: v.strip('"').rsplit("/", 1)[-1] for k, v in sections.get("FileNames", {}).items()}
    locs = {}
    for k, v in sections.get("FileLocations", {}).items():
        f = dict(re.findall(r"(\w+)=(\d+)", v))
        locs[k] = f"{funcs.get(int(f['function_name_id']), '?')} "\
                  f"({files.get(int(f['file_name_id']), '?')}:{f['line']})"
    frames = {k: int(dict(re.findall(r"(\w+)=(\d+)", v))["file_location_id"])
              for k, v in sections.get("StackFrames", {}).items()}
    names = {}
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ROOT )?%?([\w.-]+) = (.*?) ([\w-]+)\(", line)
        if not m:
            continue
        name, shape, opcode = m.groups()
        frame = re.search(r"stack_frame_id=(\d+)", line)
        src = locs.get(frames.get(int(frame.group(1)), -1)) if frame else None
        base = re.sub(r"\.\d+$", "", name)  # dot.72 -> dot (one entry for every layer)
        names[name] = f"{src} [{opcode} {shape}]" if src else f"<{base} {shape}>"
    return names


def _trace_breakdown(trace_dir, sources, steps, top=12):
    """Thread-ms per step of the XLA ops in the newest trace under trace_dir, by source line."""
    import glob
    import os
    from collections import Counter

    from jax.profiler import ProfileData

    path = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
               key=os.path.getmtime)
    by_op = Counter()
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):
                continue
            for ev in line.events:
                if not ev.name.startswith(("ThunkExecutor", "Slinky")):
                    by_op[ev.name] += ev.duration_ns
    by_src = Counter()
    for op, ns in by_op.items():
        by_src[sources.get(op, f"<{op}>")] += ns
    total = sum(by_op.values())
    lines = [f"    {total / 1e6 / steps:8.3f} ms/step  all XLA ops (summed over threads)"]
    for src, ns in by_src.most_common(top):
        lines.append(f"    {ns / 1e6 / steps:8.3f} ms/step  {100 * ns / total:5.1f}%  {src}")
    return "\n".join(lines)


def profile(args, model, cfg, context, batch):
    """jax.profiler trace of one decode_loop call for full and dms at each CR: time per step by
    the source line each XLA op came from (attention dots carry no metadata: shown by shape)."""
    import os

    out = os.path.abspath(args.profile_dir)
    steps = steps_for(args, context, batch)
    max_len = context + 3 * steps
    runs = [("full", None, max_len)] + [
        (f"dms{cr:g}", cr, capacity_for(max_len, args.window, cr, args.margin)) for cr in args.crs]
    for name, cr, cap in runs:
        pos, flags = held_positions(context, args.window, cr, args.held)
        v = Variant(name, model, cfg, batch, context, cap, pos, flags, cr, steps, 3, args.window)
        v.run(record=False)
        trace_dir = os.path.join(out, f"{name}_{context}_{batch}")
        jax.profiler.start_trace(trace_dir)
        t = v.run()
        jax.profiler.stop_trace()
        print(f"{name} ctx={context} B={batch} capacity {cap}: {1e3 * t / steps:.2f} ms/step "
              f"(wall, traced); trace in {trace_dir}")
        print(_trace_breakdown(trace_dir, _hlo_sources(v.compiled.as_text()), steps), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="contexts 2k,16k; batch 1,4; 3 repeats")
    p.add_argument("--contexts", default="2048,4096,8192,16384,32768")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--crs", default="4,8", help="target compression ratios for dms")
    p.add_argument("--held", choices=("seen-held", "flag-rate"), default="seen-held",
                   help="what dms holds at the start (see the module docstring)")
    p.add_argument("--margin", type=float, default=0.5, help="capacity_for margin (default 0.5)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7, help="timed calls per variant (+1 warm-up)")
    p.add_argument("--steps", type=int, default=0, help="decode steps per call (0: automatic)")
    p.add_argument("--token-budget", type=int, default=1 << 20,
                   help="automatic steps = clip(budget / (context * batch), 8, 64)")
    p.add_argument("--max-full-kv-gib", type=float, default=2.5,
                   help="skip (context, batch) whose full cache exceeds this")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--kv-heads", type=int, default=4, help="= query heads (no GQA)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--profile", default="", help="CONTEXT,BATCH: trace one call instead")
    p.add_argument("--profile-dir", default="/tmp/dms_decode_profile")
    args = p.parse_args(argv)
    if args.quick:
        args.contexts, args.batches, args.repeats = "2048,16384", "1,4", 3
    args.crs = [float(c) for c in args.crs.split(",")]

    cfg = model_config(args)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    pbytes = param_bytes(nnx.state(model))
    tok_kv = kv_bytes(cfg, 1, 1)
    print(f"model: L={cfg.num_layers} d={cfg.hidden_size} ffn={cfg.intermediate_size} "
          f"H=Hkv={cfg.num_kv_heads} D={cfg.head_dim} V={cfg.vocab_size} {cfg.dtype}; "
          f"DMS adapter, w={args.window}, every token flagged (held constant); "
          f"start state --held {args.held}; capacity margin {args.margin}")
    print(f"bytes per step: params {pbytes / MiB:.2f} MiB; K/V {tok_kv} B per token (all layers) "
          f"-> full at 2k x B1 {kv_bytes(cfg, 1, 2048) / MiB:.0f} MiB, "
          f"32k x B16 {kv_bytes(cfg, 16, 32768) / GiB:.2f} GiB")
    if args.profile:
        context, batch = (int(x) for x in args.profile.split(","))
        return profile(args, model, cfg, context, batch)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {args.repeats} timed calls per "
          f"variant after a warm-up, full and dms interleaved; speed = median over calls of "
          f"t_full / t_dms", flush=True)

    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rows, skipped = [], []
    tic = time.perf_counter()
    for context in contexts:
        for batch in batches:
            full_kv = kv_bytes(cfg, batch, context + steps_for(args, context, batch)
                               * (args.repeats + 1))
            if full_kv > args.max_full_kv_gib * GiB:
                skipped.append((context, batch, f"full cache {full_kv / GiB:.2f} GiB > "
                                f"--max-full-kv-gib {args.max_full_kv_gib}"))
                continue
            t0 = time.perf_counter()
            new, compile_s = measure(args, model, cfg, pbytes, context, batch)
            rows += new
            print(f"  measured ctx={context} B={batch}: {time.perf_counter() - t0:.1f} s "
                  f"(compile {compile_s:.1f} s)", file=sys.stderr, flush=True)
            for r in new:
                print(fmt_row(r), file=sys.stderr, flush=True)

    print(HEADER)
    print("-" * len(HEADER))
    for r in rows:
        print(fmt_row(r))
    for context, batch, why in skipped:
        print(f"skipped ctx={context} B={batch}: {why}")
    print("speed = dms tok/s / full tok/s; ideal = (params + K/V of all full slots) / (params + "
          "K/V of all dms slots) per step; sp/id = speed / ideal; id(held) = the same with held "
          "tokens; achCR = seen / held after the run (docs/dms.md section 6); peak x = peak held KV "
          "full / dms (cache_stats.peak_held_bytes); alloc x = allocated K/V full / dms")
    top = [r for r in rows if r["context"] >= 16384 and r["cr"] == max(args.crs)]
    if top:
        slowest = min(top, key=lambda r: r["frac"])
        smallest = min(top, key=lambda r: r["peak_full"] / r["peak_dms"])
        print(f"targets at context >= 16k, CR {max(args.crs):g}: speed / ideal >= 0.8: "
              f"{'met' if slowest['frac'] >= 0.8 else 'NOT met'} (min {slowest['frac']:.2f} at "
              f"ctx={slowest['context']} B={slowest['batch']}); peak KV dms <= 1/7 of full: "
              f"{'met' if smallest['peak_full'] / smallest['peak_dms'] >= 7 else 'NOT met'} "
              f"(min full / dms {smallest['peak_full'] / smallest['peak_dms']:.2f} at "
              f"ctx={smallest['context']} B={smallest['batch']})")
    if not all(r["held_ok"] and r["overflow"] == 0 for r in rows):
        print("WARNING: rows marked !held/overflow did not hold the intended tokens")
    print(f"total {time.perf_counter() - tic:.0f} s")


if __name__ == "__main__":
    main()
