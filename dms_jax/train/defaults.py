"""Every training config field with its default (the reference recipe's optimiser and schedule,
docs/dms.md section 7). The files in configs/ start from `base_config()` and change a few fields."""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Every field, with the reference recipe's optimiser (docs/dms.md section 7)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        path="",  # a Hugging Face model directory or hub id; empty: random init from model.init
        dtype="float32",  # compute dtype ("bfloat16" on accelerators)
        param_dtype="",  # storage dtype; empty: the checkpoint's
        init=ml_collections.ConfigDict(),  # ModelConfig fields for a random model
        # layers stacked [L, ...] under lax.scan (ModelConfig.scan_layers): one compiled layer body,
        # compile time independent of depth; same weights, outputs and exports as unrolled
        scan_layers=False,
        # DMS settings (mode "" = no DMS, e.g. for language-model pretraining)
        dms=ml_collections.ConfigDict(dict(mode="adapter", per="head", window=512, scale=100.0,
                                           offset=5.0, tau=0.1)),
    ))
    c.train = ml_collections.ConfigDict(dict(
        loss="distill",  # "distill" (KL + L_dms), "distill_plain" (KL, no DMS), "lm" (next-token CE)
        trainable="decision",  # "decision" (adapter / decision neuron only) or "all"
        steps=510,
        batch_size=8,  # global, in sequences
        seq_len=32768,
        master_dtype="float32",  # dtype of the trainable parameters and their updates ("": as stored)
        learning_rate=3e-5, warmup_steps=0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
        cr_start=1.0, cr_end=16.0, cr_steps=510,  # CR(step) = start + (end - start) min(step / S, 1)
        dms_loss_weight=1.0,
        loss_chunk=1024,  # tokens per vocabulary-projection chunk of the loss
        attention_impl="auto",
        remat=False,  # rematerialise each layer in the backward pass (long sequences, big models)
        document_attention=True,  # packed rows: attend only within each document (segment ids)
        kl_tokens="all",  # distillation KL over "all" tokens or the data's "targets" (answers)
    ))
    c.data = ml_collections.ConfigDict(dict(
        path="",  # local JSONL / JSON / text / parquet / csv file, directory or glob
        format="",  # default: from the extension
        hub_id="", hub_config="", split="train",  # a hub dataset when no path is given
        text_field="text", messages_field="messages",
        chat_template=False,  # render `messages` with the tokenizer's chat template
        tokenizer="",  # default: the model's (model.path)
        seed=0,  # shuffling seed
        max_documents=0,  # 0: all
        skip_bad_rows=False,  # a row without its text, or not JSON: an error naming file and line; True skips and counts them
        cache_dir="",  # datasets cache; default ~/.cache/huggingface/datasets
        keep_in_memory=False,
        eos_id=-1,  # pre-tokenised data without a tokenizer: the separator id (-1: none)
        packing="concat",  # "concat" (cut every seq_len) or "bin" (documents whole, rows padded)
    ))
    # held-out task examples (dms_jax.eval.tasks) scored teacher-forced every `every` steps
    c.eval = ml_collections.ConfigDict(dict(every=0, tasks="", length=0, examples=16, seed=0))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))  # (data, fsdp, tensor); -1 fills
    c.checkpoint = ml_collections.ConfigDict(dict(dir="", every=100, keep=3, resume=True, async_save=True))
    c.output = ml_collections.ConfigDict(dict(dir="", export_dir="", progress=True, tensorboard=True))
    return c


def reference_recipe(model_path: str, mesh_shape=(-1, 1, 1), run_name: str = "run") -> ml_collections.ConfigDict:
    """The reference retrofit (docs/dms.md section 7) for a Hugging Face model.

    Adapter mode, base weights frozen (teacher = the same weights without eviction), window 512,
    CR 1 -> 16 over 510 steps, constant lr 3e-5, AdamW b2 0.95, no weight decay, clip 1.0,
    32768-token sequences, bfloat16. The global batch of 8 sequences (one per GPU of an 8-GPU
    host) is this project's choice; the recipe does not fix it.
    The paper's variant: --config.train.trainable=all and about +1 CR per 100 steps
    (--config.train.cr_end=8 --config.train.cr_steps=700).
    """
    c = base_config()
    c.model.update(path=model_path, dtype="bfloat16", scan_layers=True)  # compile one layer body, not L
    c.train.update(loss="distill", trainable="decision", remat=True)  # 32k tokens: keep layer inputs only
    c.mesh.shape = tuple(mesh_shape)
    c.checkpoint.update(dir=f"runs/{run_name}/checkpoints", every=50, keep=3)
    c.output.update(dir=f"runs/{run_name}", export_dir=f"runs/{run_name}/export")
    return c
