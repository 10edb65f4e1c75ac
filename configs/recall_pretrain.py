"""Pretrain the small recall model (the vanilla model of the proof) on the synthetic tasks.

A Llama-family decoder (4 layers, d 128, MLP 256, 4 query / 2 KV heads of 32, tied embeddings, 0.5M
parameters) learns the tasks of `dms_jax.eval.tasks` from documents of 63, 127 and 255 tokens
binned whole into 256-token rows, with the loss on the answers only. Made by
`python scripts/build_recall_models.py` (stage "pretrain"), which writes the tokenizer and the
corpus first; by hand:

    python train.py --config configs/recall_pretrain.py
"""
import os

import ml_collections

from dms_jax.train.defaults import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "runs", "recall")


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.model.init = ml_collections.ConfigDict(dict(
        vocab_size=340, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=32, max_position_embeddings=2048, tie_word_embeddings=True,
        rope_theta=10000.0, initializer_range=0.02,
    ))
    c.model.dms.mode = ""  # a plain model; DMS comes with the retrofit
    c.train.update(loss="lm", trainable="all", steps=6000, batch_size=16, seq_len=256,
                   learning_rate=1e-3, warmup_steps=200, b2=0.98, weight_decay=0.0, grad_clip=1.0,
                   loss_chunk=256)
    c.data.update(path=os.path.join(RUN, "data", "pretrain.jsonl"), tokenizer=os.path.join(RUN, "tokenizer"),
                  packing="bin")
    c.eval.update(every=100, examples=16)
    c.checkpoint.update(dir=os.path.join(RUN, "pretrain", "checkpoints"), every=200, keep=3)
    c.output.update(dir=os.path.join(RUN, "pretrain"), export_dir=os.path.join(RUN, "vanilla"),
                    tensorboard=False)
    return c
