"""DeepSeek-R1-Distill-Qwen-32B (64 layers, d 5120, 8 KV heads): FSDP x tensor
parallel (2); on several hosts keep the tensor axis within a host, e.g. (1, 8, 2) on 2 x 8 GPUs.

Reference DMS recipe (dms_jax.train.defaults.reference_recipe): adapter mode, base frozen, w 512,
CR 1 -> 16 over 510 steps, lr 3e-5 constant, AdamW b2 0.95, wd 0, clip 1.0, 32768-token sequences.

    python train.py --config configs/qwen_r1_32b.py --config.data.path=/data/traces.jsonl
    # a local copy of the model: --config.model.path=/models/<dir>; messages data: --config.data.chat_template=True
"""
from dms_jax.train.defaults import reference_recipe


def get_config():
    return reference_recipe("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", mesh_shape=(1, -1, 2), run_name="qwen_r1_32b")
