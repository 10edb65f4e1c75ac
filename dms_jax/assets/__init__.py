"""Files shipped with the package.

- `recall_dms8x`, `recall_vanilla`: the recall models of the proof (docs/recall.md): a small
  Llama-family model pretrained on the synthetic long-context tasks of `dms_jax.eval`, and the
  last leg of its DMS retrofit towards 8x (7.60x held-token CR measured over the evaluation,
  docs/results/results.md).
  `infer.py` runs the 8x model with no arguments (`--model vanilla` the other).
- `tiny_random`: a tiny random-weight Llama with a byte-level tokenizer (`scripts/make_tiny_model.py`),
  for tests and `configs/tiny.py`: it exercises every engine path, but its text is noise.
"""
import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
TINY_MODEL_DIR = os.path.join(ASSETS_DIR, "tiny_random")
# names `infer.py --model` and `load_for_inference` accept for the shipped models
SHIPPED_MODELS = {"dms8x": os.path.join(ASSETS_DIR, "recall_dms8x"),
                  "vanilla": os.path.join(ASSETS_DIR, "recall_vanilla")}
DEFAULT_MODEL = "dms8x"
