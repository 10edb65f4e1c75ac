"""Tiny random Hugging Face models for the tests: odd sizes, GQA, each family's quirks."""
import torch
import transformers

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

_COMMON = dict(
    vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
    num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
    rms_norm_eps=1e-5,
)


def config(name: str):
    if name == "llama":  # Llama 3.2 style: llama3 rope scaling, tied embeddings
        return transformers.LlamaConfig(
            **_COMMON, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 32},
        )
    if name == "qwen2":  # q/k/v biases
        return transformers.Qwen2Config(**_COMMON, tie_word_embeddings=False)
    if name == "qwen3":  # q/k norm, head_dim decoupled from hidden / heads
        return transformers.Qwen3Config(**_COMMON, head_dim=12, tie_word_embeddings=False)
    if name == "mistral":  # sliding window (small, so the tests cross it)
        return transformers.MistralConfig(**_COMMON, sliding_window=7, tie_word_embeddings=False)
    raise KeyError(name)


def build(name: str, out_dir: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    cfg = config(name)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # random biases / norms so that every tensor matters
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(out_dir)
    return out_dir


def load_torch(out_dir: str):
    return transformers.AutoModelForCausalLM.from_pretrained(
        out_dir, attn_implementation="eager", dtype=torch.float32).eval()


def torch_logits(model, ids, attention_mask=None):
    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return model(torch.tensor(ids), **kw).logits.float().numpy()
