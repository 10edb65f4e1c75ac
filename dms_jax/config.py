"""Frozen configuration dataclasses: the model shape and the DMS settings.

Family differences (Llama, Qwen2, Qwen3, Mistral) are fields here, never subclasses.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

DMS_MODES = ("neuron", "adapter")
DMS_GRANULARITIES = ("head", "layer")

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}
DTYPE_NAMES = tuple(_DTYPES)  # the storage / compute dtypes dms-jax takes, by name


def resolve_dtype(dtype: Any) -> Any:
    """Accept a jnp dtype or its name ('float32', 'bfloat16', 'float16')."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype).type if dtype is not None else jnp.float32


def dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class DMSConfig:
    """Dynamic Memory Sparsification settings (docs/dms.md sections 1-4).

    mode:   'neuron' (the last query component of each group's first head) or 'adapter'
            (a zero-initialised Linear(d_model -> Hkv) on its own RMSNorm).
    per:    'head' (one decision per KV head) or 'layer' (head 0's decision for all heads).
    window: delayed-eviction window w; a key at distance <= w is always visible.
    scale, offset: z = scale * raw - offset.
    tau:    Gumbel-sigmoid temperature (training only).
    target_cr: the compression ratio the decisions reach (a retrofit export records what its
            training reached at the end); inference sizes its cache from it. None: unknown.
    """

    mode: str = "adapter"
    per: str = "head"
    window: int = 512
    scale: float = 100.0
    offset: float = 5.0
    tau: float = 0.1
    target_cr: float | None = None

    def __post_init__(self):
        if self.mode not in DMS_MODES:
            raise ValueError(f"DMSConfig.mode={self.mode!r}; supported modes: {DMS_MODES}")
        if self.per not in DMS_GRANULARITIES:
            raise ValueError(f"DMSConfig.per={self.per!r}; supported: {DMS_GRANULARITIES}")
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"DMSConfig.window={self.window!r} must be an integer >= 0 (default 512)")
        if self.tau <= 0:
            raise ValueError(f"DMSConfig.tau={self.tau} must be > 0 (default 0.1)")
        if self.target_cr is not None and not self.target_cr >= 1.0:
            raise ValueError(f"DMSConfig.target_cr={self.target_cr} must be >= 1 (or None)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DMSConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DMS config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(d))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder shape. Built from a Hugging Face config.json by `dms_jax.hf.model_config_from_hf`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # sorted (key, value) pairs of HF rope_scaling, hashable
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k
    sliding_window: int | None = None  # Mistral: key visible iff q_pos - k_pos < sliding_window
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    model_type: str = "llama"
    architecture: str = "LlamaForCausalLM"
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    dms: DMSConfig | None = None
    # Parameter layout of the decoder layers: False keeps one module per layer ("layers.3.attn...")
    # and runs them in a Python loop; True stacks them on a leading axis of size num_layers
    # ("layers.attn..." with shape [L, ...]) and runs one compiled layer body under lax.scan, so
    # compile time and program size stop growing with depth (dms_jax.stacking converts between
    # the two). The same weights give the same outputs either way; HF files are identical.
    scan_layers: bool = False
    # std of the normal init of every projection and the embedding (HF's initializer_range): a
    # model trained from scratch starts as transformers would start it. Only the random init
    # reads it, so it is neither compared nor hashed.
    initializer_range: float = dataclasses.field(default=0.02, compare=False)
    # not compared / hashed: the same model loaded from two places compiles once
    name_or_path: str | None = dataclasses.field(default=None, compare=False)  # the directory it was loaded from (tokenizer files live there)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        resolve_dtype(self.param_dtype)
        resolve_dtype(self.dtype)
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers={self.scan_layers!r} must be True (stacked layers under "
                             "lax.scan) or False (one module per layer)")
        if not self.initializer_range > 0:
            raise ValueError(f"initializer_range={self.initializer_range} must be > 0 (HF's default: 0.02)")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)
