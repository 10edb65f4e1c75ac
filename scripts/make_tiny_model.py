"""Build the tiny random model shipped in dms_jax/assets/tiny_random (deterministic).

A Llama-shaped decoder (GQA, tied embeddings) with random weights and a byte-level BPE tokenizer
trained on this repository's own text. Its output is not meaningful language: it exists so that the
tests and `configs/tiny.py` exercise the whole engine offline in seconds (`python infer.py --model
dms_jax/assets/tiny_random`). Neuron-mode DMS is
recorded in its config.json, so the random weights give a real mix of evicted and kept tokens.

The tokenizer is trained on the package's sources at build time, so a rebuild after the sources
changed gives a different (equally valid) model; `target_cr` in its config.json is the CR its
random decisions reach on infer.py's built-in prompt, measured here, so inference sizes the
cache for what the model really keeps.

    python scripts/make_tiny_model.py [--out dms_jax/assets/tiny_random]
"""
import argparse
import dataclasses
import glob
import os
import sys

import jax
from flax import nnx
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

import dms_jax
from dms_jax.config import DMSConfig, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_tokenizer(vocab_size: int):
    texts = []
    for path in sorted(glob.glob(os.path.join(ROOT, "dms_jax", "**", "*.py"), recursive=True)):
        with open(path) as f:
            texts.append(f.read())
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")


def measure_cr(model, tokenizer) -> float:
    """The CR the model's decisions reach on infer.py's built-in prompt (2 decimals)."""
    sys.path.insert(0, ROOT)
    from infer import DEFAULT_PROMPT

    ids = tokenizer(DEFAULT_PROMPT)["input_ids"]
    _, cr = model.eval_forward(jax.numpy.asarray(ids)[None])
    return round(float(cr), 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "dms_jax", "assets", "default_model"))
    args = parser.parse_args()
    tokenizer = build_tokenizer(vocab_size=512)
    cfg = ModelConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, tie_word_embeddings=True,
        max_position_embeddings=8192, rms_norm_eps=1e-5,
        dms=DMSConfig(mode="neuron", window=16, scale=100.0, offset=5.0),
    )
    model = dms_jax.Decoder(cfg, rngs=nnx.Rngs(jax.random.key(0)))
    # record the CR its (random) decisions reach on English text, so inference sizes its cache
    # for what this model really keeps (DMSConfig.target_cr)
    measured = measure_cr(model, tokenizer)
    model.config = dataclasses.replace(cfg, dms=dataclasses.replace(cfg.dms, target_cr=measured))
    print(f"DMS compression ratio on infer.py's built-in prompt: {measured}")
    dms_jax.save_pretrained(model, args.out, tokenizer=tokenizer)
    print(f"wrote {args.out}: {sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))} bytes")


if __name__ == "__main__":
    main()
