"""What `dms_jax.generate` reports: the cache's figures (docs/dms.md section 6) and timings."""
from __future__ import annotations

import dataclasses

import numpy as np

from dms_jax.cache import compression_ratio


@dataclasses.dataclass
class GenerateStats:
    """Per-call figures. CR = seen / held per (layer, row, KV head), averaged as 1/mean(held/seen)
    (docs/dms.md section 6, `dms_jax.cache.compression_ratio`). Bytes count keys and values. Times are wall-clock seconds, compilation
    excluded (each program is compiled before it is timed)."""

    policy: str
    capacity: int  # slots per (layer, row, KV head)
    compression_ratio: float
    compression_ratio_per_layer: np.ndarray  # [L]
    compression_ratio_per_head: np.ndarray  # [L, Hkv]
    held_tokens: np.ndarray  # [L, B, Hkv] held at the end
    seen_tokens: np.ndarray  # [B]
    held_kv_bytes: float  # held at the end
    peak_kv_bytes: float  # sum over (layer, row, KV head) of the most each held at any step
    allocated_kv_bytes: int  # the fixed buffers
    full_kv_bytes: float  # what a full cache would hold for the same tokens
    kv_reads_prefill: float  # keys read by the prompt's queries (summed over layers, rows, heads)
    kv_reads_decode: float  # keys read by the decode steps' queries
    overflow: int  # tokens dropped because a head's slots were full
    prefill_tokens: int
    decode_tokens: int
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def table(self) -> str:
        """A printable two-column table."""
        rows = [
            ("policy", self.policy),
            ("compression ratio (seen/held)", f"{self.compression_ratio:.2f}x"),
            ("CR per layer", " ".join(f"{x:.2f}" for x in self.compression_ratio_per_layer)),
            ("tokens seen (per row)", " ".join(str(int(x)) for x in self.seen_tokens)),
            ("KV held / full cache",
             f"{format_bytes(self.held_kv_bytes)} / {format_bytes(self.full_kv_bytes)}"),
            ("peak KV held", format_bytes(self.peak_kv_bytes)),
            ("KV allocated", f"{format_bytes(self.allocated_kv_bytes)} ({self.capacity} slots/head)"),
            ("KV reads prefill / decode", f"{self.kv_reads_prefill:.4g} / {self.kv_reads_decode:.4g}"),
            ("overflow (tokens dropped)", str(self.overflow)),
            ("prefill", f"{self.prefill_tokens} tok in {self.prefill_seconds:.3f} s"),
            ("decode", f"{self.decode_tokens} tok in {self.decode_seconds:.3f} s "
                       f"({self.decode_tokens_per_s:.1f} tok/s)"),
            ("compile", f"{self.compile_seconds:.2f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def format_bytes(n: float) -> str:
    """A byte count for people: 512 B, 1.5 KiB, 3.2 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024



def make_generate_stats(s, policy_name, cache, cfg, *, prefill_tokens, decode_tokens, kv_before,
                          kv_after_prefill, prefill_s, decode_s, compile_s) -> GenerateStats:
    """GenerateStats from `cache_stats` of the final cache `s` (device arrays) and the call's
    counters; kv_before / kv_after_prefill: the caches' cumulative KV reads before the call and
    after its prefill."""
    held = np.asarray(s.held)  # [L, B, Hkv]
    seen = np.asarray(s.seen)  # [B]
    per_head = np.asarray(compression_ratio(held, seen, axis=1))  # [L, Hkv]
    per_layer = np.asarray(compression_ratio(held, seen, axis=(1, 2)))  # [L]
    token_bytes = cache[0].token_bytes
    kv_total = float(np.asarray(s.kv_reads).sum())
    return GenerateStats(
        policy=policy_name,
        capacity=cache[0].capacity,
        compression_ratio=float(s.compression_ratio),
        compression_ratio_per_layer=per_layer,
        compression_ratio_per_head=per_head,
        held_tokens=held,
        seen_tokens=seen,
        held_kv_bytes=float(s.held_bytes),
        peak_kv_bytes=float(s.peak_held_bytes),
        allocated_kv_bytes=int(s.allocated_bytes),
        full_kv_bytes=float(seen.sum()) * cfg.num_layers * cfg.num_kv_heads * token_bytes,
        kv_reads_prefill=kv_after_prefill - kv_before,
        kv_reads_decode=kv_total - kv_after_prefill,
        overflow=int(np.asarray(s.overflow).sum()),
        prefill_tokens=prefill_tokens,
        decode_tokens=decode_tokens,
        prefill_seconds=prefill_s,
        decode_seconds=decode_s,
        compile_seconds=compile_s,
    )
