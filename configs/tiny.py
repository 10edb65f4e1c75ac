"""Tiny retrofit: a random 2-layer model, the package's byte-level BPE tokenizer, the README as
data. Runs in seconds on a CPU; the tests and `python train.py` with no arguments use it.

    python train.py --config configs/tiny.py --config.train.steps=50 --config.mesh.shape="(2,4,1)"
"""
import os

import ml_collections

from dms_jax.train.defaults import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config() -> ml_collections.ConfigDict:
    from dms_jax.assets import TINY_MODEL_DIR

    c = base_config()
    c.model.init = ml_collections.ConfigDict(dict(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, max_position_embeddings=4096,
    ))
    c.model.dms.window = 8
    c.train.update(steps=40, batch_size=8, seq_len=64, learning_rate=3e-3, cr_start=1.0, cr_end=4.0,
                   cr_steps=20, loss_chunk=16)
    # the format follows the extension (.md reads as text), so a --config.data.path=x.jsonl over
    # this config is read as JSON lines
    c.data.update(path=os.path.join(REPO, "README.md"), tokenizer=TINY_MODEL_DIR)
    c.checkpoint.update(dir=os.path.join(REPO, "runs", "tiny", "checkpoints"), every=10, keep=2)
    c.output.update(dir=os.path.join(REPO, "runs", "tiny"), export_dir=os.path.join(REPO, "runs", "tiny", "export"))
    return c
