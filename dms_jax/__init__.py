"""dms-jax: Dynamic Memory Sparsification (learned KV-cache eviction) in JAX / Flax NNX."""
from dms_jax.config import DMSConfig, ModelConfig
from dms_jax.generate import GenerateOutput, GenerationState, generate
from dms_jax.hf import from_pretrained, load_tokenizer, save_pretrained
from dms_jax.model import Decoder, ModelOutput
from dms_jax.plan import InferencePlan, plan_inference

__all__ = [
    "DMSConfig",
    "Decoder",
    "GenerateOutput",
    "GenerationState",
    "InferencePlan",
    "ModelConfig",
    "ModelOutput",
    "from_pretrained",
    "generate",
    "load_tokenizer",
    "plan_inference",
    "save_pretrained",
]
__version__ = "0.1.0"
