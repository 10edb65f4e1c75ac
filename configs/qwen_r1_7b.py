"""DeepSeek-R1-Distill-Qwen-7B (28 layers, d 3584, 4 KV heads): FSDP over one host.

Reference DMS recipe (dms_jax.train.defaults.reference_recipe): adapter mode, base frozen, w 512,
CR 1 -> 16 over 510 steps, lr 3e-5 constant, AdamW b2 0.95, wd 0, clip 1.0, 32768-token sequences.

    python train.py --config configs/qwen_r1_7b.py --config.data.path=/data/traces.jsonl
    # a local copy of the model: --config.model.path=/models/<dir>; messages data: --config.data.chat_template=True
"""
from dms_jax.train.defaults import reference_recipe


def get_config():
    return reference_recipe("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", mesh_shape=(1, -1, 1), run_name="qwen_r1_7b")
