"""A model to run, from whatever a user points at: a Hugging Face model directory (a train.py
export included), a hub id, a train.py output directory, or a train.py checkpoint directory (or one
step of it) restored over the run's base model.

    from dms_jax.train.restore import load_for_inference
    loaded = load_for_inference("runs/q8", train_config="configs/qwen3_8b.py")
    loaded.model, loaded.tokenizer, loaded.model_dir

Bad paths raise ValueError / FileNotFoundError naming the problem and the fix, in the terms of
`infer.py`'s flags (path is --model, train_config --train-config, base_model --base-model).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable, NamedTuple

import jax

import dms_jax
from dms_jax import sharding as shd
from dms_jax.assets import DEFAULT_MODEL, SHIPPED_MODELS
from dms_jax.train import loop
from dms_jax.train.checkpoint import Checkpointer, abstract_like


class LoadedModel(NamedTuple):
    model: Any  # a dms_jax.Decoder
    tokenizer: Any  # a transformers tokenizer, or None (the model ships none)
    model_dir: str | None  # the directory with config.json / generation_config.json, if any
    description: str  # what was loaded, for a log line


def load_for_inference(path: str | None = None, *, train_config: str | None = None,
                       base_model: str | None = None, dtype: str | None = None,
                       log: Callable[[str], Any] | None = None) -> LoadedModel:
    """The model at `path` with its tokenizer.

    path: a Hugging Face model directory or hub id; a train.py output directory (its export/ when
      present, else its checkpoints/); or a train.py checkpoint directory or one step of it
      (<dir>/<step>), which needs `train_config`: the newest complete step (or that step) is
      restored over the run's base model. None: the `train_config` run's export, else its
      checkpoints; without a config, the package's default model (the shipped DMS 8x recall
      model). The names of `dms_jax.assets.SHIPPED_MODELS` ("dms8x", "vanilla") select the
      shipped recall models.
    train_config: the config file (configs/*.py) the train.py run used.
    base_model: overrides the config's model.path (needs `train_config`).
    dtype: compute dtype ("float32", "bfloat16", "float16"; default: float32, or the config's).
    log: called with a line about what was chosen (an export found, a checkpoint restored).
    """
    log = log or _silent
    if base_model and not train_config:
        raise ValueError("--base-model overrides the model.path of --train-config; give both")
    config = (load_train_config(train_config, base_model=base_model, dtype=dtype)
              if train_config else None)
    target = path
    if target is None and config is not None:
        export, checkpoints = config.output.get("export_dir", ""), config.checkpoint.get("dir", "")
        has_export = export and os.path.isfile(os.path.join(export, "config.json"))
        target = export if has_export else checkpoints
        if not target or not os.path.isdir(target):
            raise ValueError(f"the --train-config run has no export "
                             f"({export or 'output.export_dir unset'}) nor checkpoints "
                             f"({checkpoints or 'checkpoint.dir unset'}); "
                             "run train.py first or pass --model")
    if target is None:
        target = DEFAULT_MODEL
    if target in SHIPPED_MODELS and not os.path.exists(target):
        if not os.path.isfile(os.path.join(SHIPPED_MODELS[target], "config.json")):
            raise FileNotFoundError(
                f"the shipped model {target!r} is missing from {SHIPPED_MODELS[target]}: rebuild it "
                "with python scripts/build_recall_models.py, or pass --model DIR")
        target = SHIPPED_MODELS[target]
    local = os.path.expanduser(target)

    if os.path.isdir(local) and not os.path.isfile(os.path.join(local, "config.json")):
        if os.path.isfile(os.path.join(local, "export", "config.json")):
            local = os.path.join(local, "export")
            log(f"{target} is a train.py output directory: using its export {local}")
        else:
            ckpt_dir, step = _find_checkpoints(local, target)
            if config is None:
                raise ValueError(
                    f"--model {target} is a train.py checkpoint directory: restoring it needs the "
                    "run's config, so add --train-config configs/NAME.py (the file the run used; "
                    "--base-model DIR overrides its model.path), or pass the run's export "
                    "directory (output.export_dir) instead")
            return restore_checkpoint(config, ckpt_dir, step, config_name=train_config, log=log)
    elif not os.path.isdir(local):
        if os.path.exists(local):
            raise ValueError(f"--model {target} is a file; pass the directory that holds config.json")
        if _looks_like_path(target):
            raise FileNotFoundError(f"--model {target}: no such directory "
                                    "(a hub id looks like owner/name)")

    model = dms_jax.from_pretrained(local, dtype=dtype)
    model_dir = model.config.name_or_path or local
    return LoadedModel(model, dms_jax.load_tokenizer(model_dir), model_dir, target)


def _silent(message: str) -> None:
    pass


def _find_checkpoints(path: str, target: str) -> tuple[str, int | None]:
    """(checkpoint directory, step or None for the newest) of a directory without config.json."""
    nested = os.path.join(path, "checkpoints")  # a train.py output directory
    if is_step_dir(path):
        ckpt_dir, step = os.path.split(os.path.normpath(path))
        return ckpt_dir, int(step)
    if os.path.isdir(nested) and is_checkpoint_dir(nested):
        return nested, None
    if is_checkpoint_dir(path):
        return path, None
    raise ValueError(
        f"--model {target}: no config.json there, and it is not a train.py output or "
        "checkpoint directory; pass a Hugging Face model directory, a train.py export "
        "(output.export_dir), or a checkpoint directory with --train-config")


def is_checkpoint_dir(path: str) -> bool:
    """An orbax CheckpointManager directory: numbered step directories."""
    return any(name.isdigit() and os.path.isdir(os.path.join(path, name))
               for name in os.listdir(path))


def is_step_dir(path: str) -> bool:
    """One step of it: <dir>/<step>/state."""
    return (os.path.basename(os.path.normpath(path)).isdigit()
            and os.path.isdir(os.path.join(path, "state")))


def _metrics_of(config, ckpt_dir: str) -> str | None:
    """The metrics.jsonl of the run that wrote `ckpt_dir`: the config's output.dir when ckpt_dir
    is its checkpoint.dir, else a train.py output directory holding ckpt_dir."""
    candidates = [os.path.dirname(os.path.normpath(os.path.abspath(ckpt_dir)))]
    ckpt_cfg, out_cfg = config.checkpoint.get("dir", ""), config.output.get("dir", "")
    if ckpt_cfg and out_cfg and os.path.realpath(ckpt_cfg) == os.path.realpath(ckpt_dir):
        candidates.insert(0, out_cfg)
    for directory in candidates:
        path = os.path.join(directory, "metrics.jsonl")
        if os.path.isfile(path):
            return path
    return None


def _looks_like_path(text: str) -> bool:
    return (text.startswith((".", "/", "~")) or text.count("/") > 1
            or (os.sep != "/" and os.sep in text))


def load_train_config(path: str, *, base_model: str | None = None, dtype: str | None = None):
    """The ConfigDict of a train.py config file (its get_config()), with model.path replaced by
    `base_model` and model.dtype by `dtype` where given."""
    local = os.path.expanduser(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"--train-config {path}: no such file (a configs/*.py file)")
    spec = importlib.util.spec_from_file_location("dms_train_config", local)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--train-config {path} defines no get_config()")
    config = module.get_config()
    if base_model:
        config.model.path = base_model
    if dtype:
        config.model.dtype = dtype
    return config


def restore_checkpoint(config, ckpt_dir: str, step: int | None = None, *, config_name: str = "",
                       log: Callable[[str], Any] | None = None) -> LoadedModel:
    """The run's base model with its trained parameters from checkpoint `step` (default: the
    newest intact one), rebuilt the way `dms_jax.train.train` builds it (same config, one device),
    with dms.target_cr set to the CR the run had reached at that step, as its export records it
    (so both size the inference cache the same way). `config_name` names the config in the error
    for a checkpoint written by another configuration."""
    log = log or _silent
    ckpt = Checkpointer(ckpt_dir, every=1, keep=1 << 30, async_save=False)
    try:
        steps = ckpt.all_steps()
        if (step is not None and step not in steps) or not steps:
            raise ValueError(f"no complete checkpoint {'' if step is None else f'step {step} '}in "
                             f"{ckpt_dir} (steps found: {sorted(steps) or 'none'})")
        seed = int(config.get("seed", 0))
        model = loop.load_model(config.model, seed)
        mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
        trainer = loop.build_trainer(model, mesh, loop.step_config(config), config.train, seed=seed,
                                     batch_shape=(1, int(config.train.seq_len)))
        del model

        fix = f"it does not match --train-config {config_name}: pass the config the run used"
        target = abstract_like(trainer.abstract_state, trainer.state_shardings)
        if step is None:
            state, meta, step, skipped = ckpt.restore_newest_intact(target, trainer.layout, fix, set_aside=False)
            for s, why in skipped:
                log(f"skipped checkpoint step {s} in {ckpt_dir}: {why}")
        else:
            state, meta = ckpt.restore_verified(step, target, trainer.layout, fix)
    finally:
        ckpt.close()
    reached = meta.get("reached_cr")
    if reached is None:  # checkpoints written before the meta recorded it: the run's metrics
        reached = loop.reached_compression_ratio([], _metrics_of(config, ckpt_dir), step)
    model = loop.with_reached_cr(trainer.model_from(state), reached, trainer.layout["loss"])
    base = config.model.path or f"random init (seed {seed})"
    log(f"restored checkpoint step {step} from {ckpt_dir} over {base}"
        + (f" (CR reached in training: {reached})" if reached else ""))
    tokenizer = loop.load_tokenizer_for(config)
    model_dir = config.model.path if config.model.path and os.path.isdir(config.model.path) else None
    return LoadedModel(model, tokenizer, model_dir, f"{ckpt_dir} (step {step})")
