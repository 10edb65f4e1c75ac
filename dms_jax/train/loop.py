"""The training loop: model, data, mesh, jitted step, checkpoints, progress, export.

    from dms_jax.train import train
    result = train(config)   # config: an ml_collections ConfigDict like configs/tiny.py

Resumes automatically from the newest intact checkpoint in checkpoint.dir (damaged newer ones are
skipped, set aside and named); a run already at train.steps says so and trains nothing.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dms_jax import sharding as shd
from dms_jax.config import DMSConfig, ModelConfig
from dms_jax.train import evaluate, optim, schedule
from dms_jax.train.checkpoint import Checkpointer, ResumeError, abstract_like
from dms_jax.train.data import build_data
from dms_jax.train.health import TrainingHealth
from dms_jax.train.metrics import MetricsWriter, load_records, truncate_records
from dms_jax.train.outputs import check_output_paths, holds_export
from dms_jax.train.step import StepConfig, init_state, make_train_step, teacher_leaves

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss, or the train state after an update, became NaN or infinite; the run stopped
    without saving that step."""


@dataclasses.dataclass
class TrainResult:
    model: Any  # the trained Decoder (parameters in their storage dtypes)
    history: list  # metrics of the steps this call ran
    step: int  # steps completed (including resumed ones)
    resumed_from: int | None
    checkpoint_dir: str | None
    export_dir: str | None
    trainable: dict | None = None  # the trained leaves as optimised (float32 master copies)
    warnings: list = dataclasses.field(default_factory=list)  # training-health warnings (health.py)
    skipped_checkpoints: list = dataclasses.field(default_factory=list)  # (step, why) damaged, skipped
    already_complete: str | None = None  # the message when the checkpoint was already at train.steps


def _opt(section, key, default=None):
    value = section.get(key, default) if hasattr(section, "get") else getattr(section, key, default)
    return default if value in (None, "") else value


# ----------------------------------------------------------------------------------------------
# model and tokenizer


def dms_config(model_cfg) -> DMSConfig | None:
    dms = _opt(model_cfg, "dms")
    if not dms or not _opt(dms, "mode"):
        return None
    return DMSConfig(**{k: v for k, v in dict(dms).items() if v not in (None, "")})


def load_model(model_cfg, seed: int):
    """config.model -> Decoder: from_pretrained(model.path) or a random init from model.init."""
    from flax import nnx

    import dms_jax
    from dms_jax.model import Decoder

    dms = dms_config(model_cfg)
    path = _opt(model_cfg, "path")
    if path:
        return dms_jax.from_pretrained(path, dtype=_opt(model_cfg, "dtype"),
                                       param_dtype=_opt(model_cfg, "param_dtype"), dms=dms,
                                       scan_layers=bool(_opt(model_cfg, "scan_layers", False)))
    return Decoder(random_model_config(model_cfg), rngs=nnx.Rngs(seed))


def random_model_config(model_cfg) -> ModelConfig:
    """The ModelConfig of a random model: config.model.init's fields, dtypes and DMS settings."""
    init = dict(_opt(model_cfg, "init", {}))
    if not init:
        raise ValueError("set model.path (a Hugging Face model directory or hub id) or model.init (a random model)")
    init.setdefault("scan_layers", bool(_opt(model_cfg, "scan_layers", False)))
    return ModelConfig(**init, dtype=_opt(model_cfg, "dtype", "float32"),
                       param_dtype=_opt(model_cfg, "param_dtype", "float32"), dms=dms_config(model_cfg))


def load_tokenizer_for(config):
    """data.tokenizer (must exist when set), else the model directory's tokenizer, else None."""
    import dms_jax
    from dms_jax.hf import resolve_model_dir
    from dms_jax.train.data import DataError

    explicit = _opt(config.data, "tokenizer")
    if explicit:
        try:
            tokenizer = dms_jax.load_tokenizer(resolve_model_dir(explicit))
        except FileNotFoundError as err:
            raise DataError(f"data.tokenizer={explicit!r}: {err}") from err
        if tokenizer is None:
            raise DataError(f"data.tokenizer={explicit!r} holds no tokenizer files (tokenizer.json ...)")
        return tokenizer
    path = _opt(config.model, "path")
    if not path:
        return None
    try:
        return dms_jax.load_tokenizer(resolve_model_dir(path))
    except FileNotFoundError:
        return None  # the model load reports it


# ----------------------------------------------------------------------------------------------
# arrays across processes


def put_global(host, sharding):
    """A global jax.Array from a host array every process holds whole (params, batches)."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(array) -> np.ndarray:
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


# ----------------------------------------------------------------------------------------------
# validation


def step_config(config) -> StepConfig:
    t = config.train
    if int(t.steps) <= 0:
        raise ValueError(f"train.steps={t.steps} must be > 0")
    schedule.validate_schedule(float(t.cr_start), float(t.cr_end), int(t.cr_steps))
    return StepConfig(
        loss=t.loss, cr_start=float(t.cr_start), cr_end=float(t.cr_end), cr_steps=int(t.cr_steps),
        loss_chunk=int(_opt(t, "loss_chunk", 1024)), dms_loss_weight=float(_opt(t, "dms_loss_weight", 1.0)),
        attention_impl=_opt(t, "attention_impl", "auto"), remat=bool(_opt(t, "remat", False)),
        document_attention=bool(_opt(t, "document_attention", True)),
        kl_tokens=str(_opt(t, "kl_tokens", "all")),
    )


def validate_batch(batch_size: int, mesh) -> None:
    data_shards = shd.mesh_axis_size(mesh, ("data", "fsdp"))
    if batch_size % data_shards:
        raise shd.MeshError(
            f"train.batch_size={batch_size} is not divisible by data * fsdp = {data_shards} "
            f"(mesh {dict(mesh.shape)}): use a multiple of {data_shards}"
        )


def validate_dms(step_cfg: StepConfig, dms: DMSConfig | None, seq_len: int) -> None:
    if step_cfg.loss != "distill":
        return
    if dms is None:
        raise ValueError("train.loss='distill' retrofits DMS: set model.dms.mode ('adapter' or 'neuron')")
    if seq_len <= dms.window + 1:
        raise ValueError(
            f"train.seq_len={seq_len} <= DMS window + 1 = {dms.window + 1}: no key is ever outside the "
            f"window, so eviction never changes attention and nothing can be learned; use "
            f"seq_len > {dms.window + 1} (the reference uses 32768 with window 512) or a smaller "
            "model.dms.window"
        )


# ----------------------------------------------------------------------------------------------
# the jitted step and its state


@dataclasses.dataclass
class Trainer:
    """Everything the loop (and benchmarks/train_step.py) needs around the jitted step."""

    step_fn: Any  # jit(train_step): (state, frozen, teacher, batch) -> (state, metrics); donates state
    init_fn: Any  # jit: trainable params -> fresh state
    abstract_state: Any
    state_shardings: Any
    trainable_params: dict  # global arrays, the initial values (consumed by init_fn)
    frozen: dict  # global arrays, never updated
    teacher: dict  # global arrays: initial copies of trainable leaves the teacher reads
    batch_sharding: Any
    graphdef: Any
    paths: dict
    layout: dict  # what a checkpoint of this state must match
    param_dtypes: dict  # each parameter's storage dtype in the model

    def params_from(self, state) -> dict:
        """Every parameter (flat path -> array), trained ones from `state`, in storage dtypes."""
        return {**self.frozen, **{k: v.astype(self.param_dtypes[k]) for k, v in state["params"].items()}}

    def model_from(self, state):
        """The Decoder with the state's trained parameters, in their storage dtypes.

        One process: the parameters stay where they are (sharded over the mesh). Several
        processes: gathered into host numpy arrays on every process (for the export)."""
        params = self.params_from(state)
        if jax.process_count() > 1:
            params = {k: to_host(v) for k, v in params.items()}
        return optim.merge_model(self.graphdef, params, self.paths)


@dataclasses.dataclass
class StepProgram:
    """The jitted train step and everything about its arguments, from parameter shapes alone
    (concrete arrays or `jax.ShapeDtypeStruct`s): the trainer runs it, `dms_jax.aot` compiles
    it for a topology without weights."""

    step_fn: Any  # jit(train_step): (state, frozen, teacher, batch) -> (state, metrics); donates state
    init_fn: Any  # jit: trainable params -> fresh state
    abstract_state: Any  # ShapeDtypeStructs of the state
    state_shardings: Any
    param_shardings: dict  # {path: NamedSharding} of every parameter
    batch_sharding: Any
    trainable_keys: tuple  # parameters the optimiser updates (held in master_dtype)
    frozen_keys: tuple  # parameters passed in, never updated
    teacher_keys: tuple  # trainable leaves the teacher reads (an initial copy in storage dtype)
    master_dtypes: dict  # {trainable path: dtype the optimiser holds it in}
    param_dtypes: dict  # each parameter's storage dtype in the model
    layout: dict  # what a checkpoint of this state must match

    def abstract_args(self, params: dict, batch_shape) -> tuple:
        """ShapeDtypeStructs (with shardings) of step_fn's arguments, for `.lower(...)`."""
        def spec(path, dtype):
            return jax.ShapeDtypeStruct(params[path].shape, dtype, sharding=self.param_shardings[path])

        state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                             self.abstract_state, self.state_shardings)
        frozen = {k: spec(k, self.param_dtypes[k]) for k in self.frozen_keys}
        teacher = {k: spec(k, self.param_dtypes[k]) for k in self.teacher_keys}
        batch = {k: jax.ShapeDtypeStruct(tuple(batch_shape), jnp.int32, sharding=self.batch_sharding)
                 for k in BATCH_KEYS}
        return state, frozen, teacher, batch


def make_step_program(graphdef, paths, params: dict, model_cfg: ModelConfig, mesh, step_cfg: StepConfig,
                      train_cfg, *, seed: int, batch_shape) -> StepProgram:
    """Shardings from the rules table, the optimiser, and the train step jitted over `mesh` with
    in/out shardings and the state donated. params: {path: array or ShapeDtypeStruct}."""
    t = train_cfg
    masks = optim.trainable_masks(params, model_cfg, t.trainable)
    p_shard = shd.param_shardings(params, mesh)
    param_dtypes = {k: jnp.dtype(v.dtype) for k, v in params.items()}
    trainable_keys = tuple(k for k in params if masks[k] is not False)
    frozen_keys = tuple(k for k in params if masks[k] is False)
    master = _opt(t, "master_dtype", "float32")
    # trainable leaves live (and are optimised) in float32; bf16 would round lr 3e-5 steps away
    master_dtypes = {k: jnp.dtype(master) if master and jnp.issubdtype(param_dtypes[k], jnp.floating)
                     else param_dtypes[k] for k in trainable_keys}
    teacher_keys = tuple(teacher_leaves(masks)) if step_cfg.loss != "lm" else ()
    optimizer = optim.make_optimizer(
        learning_rate=float(t.learning_rate), b1=float(t.b1), b2=float(t.b2), eps=float(t.eps),
        weight_decay=float(t.weight_decay), grad_clip=float(t.grad_clip),
        warmup_steps=int(_opt(t, "warmup_steps", 0)), partial=optim.partial_masks(masks),
    )
    rng_data = np.asarray(jax.random.key_data(jax.random.key(seed)))
    trainable_abstract = {k: jax.ShapeDtypeStruct(params[k].shape, master_dtypes[k]) for k in trainable_keys}
    abstract_state = jax.eval_shape(lambda tr: init_state(tr, optimizer, rng_data), trainable_abstract)
    state_sh = shd.mirrored_shardings(abstract_state, params, p_shard, mesh)
    batch_sh = shd.logical_sharding(shd.ACTIVATION_AXES["tokens"], mesh, tuple(batch_shape))
    step_fn = jax.jit(
        make_train_step(graphdef, paths, masks, optimizer, step_cfg, lambda x, axes: shd.constrain(x, axes, mesh)),
        in_shardings=(state_sh, {k: p_shard[k] for k in frozen_keys}, {k: p_shard[k] for k in teacher_keys},
                      {k: batch_sh for k in BATCH_KEYS}),
        out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=(0,),
    )
    init_fn = jax.jit(lambda tr: init_state(tr, optimizer, rng_data), out_shardings=state_sh)
    layout = {"params": {k: [list(params[k].shape), str(master_dtypes[k])] for k in trainable_keys},
              "loss": step_cfg.loss, "trainable": t.trainable}
    return StepProgram(step_fn, init_fn, abstract_state, state_sh, p_shard, batch_sh, trainable_keys,
                       frozen_keys, teacher_keys, master_dtypes, param_dtypes, layout)


def build_trainer(model, mesh, step_cfg: StepConfig, train_cfg, *, seed: int, batch_shape) -> Trainer:
    """Shard the model's parameters over `mesh` and jit the train step with in/out shardings."""
    graphdef, params, paths = optim.split_model(model)
    host = {k: np.asarray(jax.device_get(v)) for k, v in params.items()}
    del params
    prog = make_step_program(graphdef, paths, host, model.config, mesh, step_cfg, train_cfg, seed=seed,
                             batch_shape=batch_shape)
    p_shard = prog.param_shardings
    trainable_host = {k: host[k].astype(prog.master_dtypes[k]) for k in prog.trainable_keys}
    teacher = {k: put_global(host[k], p_shard[k]) for k in prog.teacher_keys}
    put = lambda arrays: {k: put_global(v, p_shard[k]) for k, v in arrays.items()}  # noqa: E731
    return Trainer(prog.step_fn, prog.init_fn, prog.abstract_state, prog.state_shardings, put(trainable_host),
                   put({k: host[k] for k in prog.frozen_keys}), teacher, prog.batch_sharding, graphdef, paths,
                   prog.layout, prog.param_dtypes)


BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask", "segment_ids")


# ----------------------------------------------------------------------------------------------
# the loop


def _restore(ckpt: Checkpointer, trainer: Trainer, data):
    """(state, step, data position, resumed-from step, skipped) from the newest intact checkpoint;
    skipped: [(step, why)] of the damaged newer ones."""

    def same_data(step, meta):
        if meta.get("data") != data.fingerprint():
            raise ResumeError(
                f"the checkpoint at step {step} was written with data {meta.get('data')}, now "
                f"{data.fingerprint()}: the data order could not be restored; use the same data"
            )

    target = abstract_like(trainer.abstract_state, trainer.state_shardings)
    state, meta, step, skipped = ckpt.restore_newest_intact(target, trainer.layout, "use a fresh checkpoint.dir",
                                                            check_meta=same_data)
    if state is None:
        return None, 0, 0, None, []
    return state, int(meta.get("step", step)), int(meta["data_position"]), step, skipped


def reached_compression_ratio(history, metrics_path, steps: int) -> float | None:
    """Mean training CR (1 / (1 - mean d)) over the last tenth of the first `steps` steps, from
    this process's history and, across resumes, the metrics file (the last record of each step;
    a line torn by a kill is skipped). The export and a checkpoint restored for inference both
    record it as dms.target_cr (`with_reached_cr`)."""
    by_step = {}
    if metrics_path and os.path.exists(metrics_path):
        by_step.update({r.get("step"): r for r in load_records(metrics_path, steps)})
    by_step.update({h.get("step"): h for h in history})
    first = steps - max(1, steps // 10)
    tail = [r["achieved_cr"] for k, r in by_step.items()
            if isinstance(k, int) and first < k <= steps and "achieved_cr" in r]
    return max(1.0, round(float(np.mean(tail)), 2)) if tail else None


def with_reached_cr(model, reached: float | None, loss: str):
    """The model with dms.target_cr = the CR its training reached (inference sizes its cache by
    it); unchanged for a model without DMS, a non-retrofit loss, or an unknown CR."""
    if model.config.dms is not None and loss == "distill" and reached:
        model.config = dataclasses.replace(
            model.config, dms=dataclasses.replace(model.config.dms, target_cr=reached))
    return model


def _run_complete_message(start: int, steps: int, ckpt_dir: str) -> str:
    where = (f"the run in {ckpt_dir} is already complete: step {start} of {steps}" if start == steps else
             f"the checkpoint in {ckpt_dir} is at step {start}, beyond train.steps={steps}")
    return (f"{where}; nothing to train. To train further raise train.steps (e.g. "
            f"--config.train.steps={start + max(steps // 2, 1)}); to start over use a fresh checkpoint.dir")


def train(config, *, devices=None, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run (or resume) the training described by `config`; see configs/tiny.py for the fields.

    devices: the devices to build the mesh over (default: all). on_step(step, metrics) is called
    after every step (tests use it to simulate a crash).
    """
    from tqdm.auto import tqdm

    t = config.train
    seed = int(_opt(config, "seed", 0))
    seq_len, batch_size, steps = int(t.seq_len), int(t.batch_size), int(t.steps)
    # everything checkable without the model first: bad settings fail before a long load
    export_dir = _opt(config.output, "export_dir")
    check_output_paths(_opt(config.checkpoint, "dir"), _opt(config.output, "dir"), export_dir)
    step_cfg = step_config(config)
    mesh = shd.make_mesh(tuple(config.mesh.shape), devices)
    validate_batch(batch_size, mesh)
    if _opt(config.model, "dms") is not None and dms_config(config.model) is not None:
        validate_dms(step_cfg, dms_config(config.model), seq_len)
    tokenizer = load_tokenizer_for(config)
    data = build_data(config.data, tokenizer, seq_len=seq_len, batch_size=batch_size, vocab_size=None)

    model = load_model(config.model, seed)
    validate_dms(step_cfg, model.config.dms, seq_len)
    data.check_vocab(model.config.vocab_size)
    trainer = build_trainer(model, mesh, step_cfg, t, seed=seed, batch_shape=(batch_size, seq_len))
    del model
    task_eval = evaluate.build_task_eval(_opt(config, "eval"), tokenizer, seq_len=seq_len)
    eval_every = int(config.eval.every) if task_eval is not None else 0

    ckpt, state, start, position, resumed_from, skipped = None, None, 0, 0, None, []
    if _opt(config.checkpoint, "dir"):
        ckpt = Checkpointer(config.checkpoint.dir, every=int(config.checkpoint.every),
                            keep=int(config.checkpoint.keep),
                            async_save=bool(_opt(config.checkpoint, "async_save", True)))
        if _opt(config.checkpoint, "resume", True):
            state, start, position, resumed_from, skipped = _restore(ckpt, trainer, data)
    if state is None:
        state = trainer.init_fn(trainer.trainable_params)
    trainer.trainable_params = None  # donated into the state from here on

    lead = jax.process_index() == 0
    out_dir = _opt(config.output, "dir")
    if start >= steps and ckpt is not None:  # nothing to train: say so, never re-export over an export
        ckpt.close()
        return _already_complete(config, trainer, state, start, steps, ckpt, export_dir, out_dir, tokenizer,
                                 resumed_from, skipped)
    writer = MetricsWriter(out_dir if lead else None, tensorboard=bool(_opt(config.output, "tensorboard", True)),
                           resume_step=start)
    progress = tqdm(total=steps, initial=start, disable=not (lead and _opt(config.output, "progress", True)),
                    desc="retrofit" if step_cfg.loss == "distill" else step_cfg.loss, dynamic_ncols=True)
    health = TrainingHealth(step_cfg.cr_steps, bar_label="retrofit" if step_cfg.loss == "distill" else step_cfg.loss)
    history = []
    next_batch = None
    last_eval = None

    def device_batch(pos):
        return {k: put_global(v, trainer.batch_sharding) for k, v in data.batch(pos).items()}

    try:
        tic = time.perf_counter()
        for step in range(start, steps):
            batch = next_batch if next_batch is not None else device_batch(position)
            state, metrics = trainer.step_fn(state, trainer.frozen, trainer.teacher, batch)
            # while the device runs this step, the host prepares the next batch
            next_batch = device_batch(position + 1) if step + 1 < steps else None
            record = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not math.isfinite(record["loss"]) or record.get("state_finite", 1.0) < 1.0:
                raise _non_finite_error(record, step + 1, position, ckpt)
            health.update(record, step + 1)  # zero_grad_steps, and a warning while one is active
            position += 1
            now = time.perf_counter()
            elapsed, tic = now - tic, now
            record.update(step=step + 1, data_position=position, step_time=elapsed,
                          tokens_per_s=record["tokens"] / max(elapsed, 1e-9))
            if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
                record.update(evaluate.score(task_eval, trainer.params_from(state), trainer.graphdef,
                                             trainer.paths, dms_mode=step_cfg.loss == "distill"))
                last_eval = record["eval/mean"]
            history.append(record)
            writer.write(record)
            postfix = {k: f"{record[k]:.4g}" for k in
                       ("loss", "kl", "ce", "target_cr", "achieved_cr", "tokens_per_s") if k in record}
            if last_eval is not None:
                postfix["eval"] = f"{last_eval:.3f}"
            progress.set_postfix(postfix, refresh=False)
            progress.update()
            health.show(progress)  # the bar names a warning while it lasts
            if ckpt is not None and ckpt.should_save(step + 1, final=step + 1 == steps):
                ckpt.save(step + 1, state, {"step": step + 1, "data_position": position, "seed": seed,
                                            "layout": trainer.layout, "data": data.fingerprint(),
                                            "reached_cr": reached_compression_ratio(history, writer.path, step + 1)})
            if on_step is not None:
                on_step(step + 1, record)
    finally:
        progress.close()
        writer.close()
        if ckpt is not None:
            ckpt.close()

    reached = reached_compression_ratio(history, writer.path, steps)
    schedule_cr = history[-1].get("target_cr") if history else None
    warnings = health.final(reached, schedule_cr)
    trained = with_reached_cr(trainer.model_from(state), reached, step_cfg.loss)
    if export_dir:
        _export(trained, export_dir, tokenizer, _training_record(step_cfg, steps, reached, schedule_cr, warnings))
    return TrainResult(trained, history, max(start, steps), resumed_from, ckpt.directory if ckpt else None,
                       os.path.abspath(export_dir) if export_dir else None, dict(state["params"]),
                       warnings=warnings, skipped_checkpoints=skipped)


def _non_finite_error(record: dict, step: int, position: int, ckpt: Checkpointer | None) -> NonFiniteLossError:
    last_good = None
    if ckpt is not None:  # never holds a non-finite state: save() refuses one, the loop stops first
        ckpt.wait()
        last_good = ckpt.latest_step()
    if math.isfinite(record["loss"]):
        what = (f"the update of step {step} made the train state non-finite (the loss {record['loss']:.4g} was "
                f"finite, grad norm {record.get('grad_norm')}): the update overflowed")
    else:
        what = f"the loss became {record['loss']} at step {step} (KL {record.get('kl')}, grad norm {record.get('grad_norm')})"
    return NonFiniteLossError(
        f"{what}; stopped at step {step} without saving it. Last good checkpoint: "
        + (f"step {last_good} in {ckpt.directory}" if last_good is not None else "none")
        + ". Lower train.learning_rate or check the data at position "
        f"{position} (resuming from the checkpoint replays the same batches)."
    )


def _training_record(step_cfg: StepConfig, steps: int, reached, schedule_cr, warnings) -> dict:
    """What the training reached, for the export's config.json (besides dms.target_cr)."""
    record = {"loss": step_cfg.loss, "steps": steps, "warnings": list(warnings)}
    if step_cfg.loss == "distill":
        record.update(reached_cr=reached, schedule_cr=schedule_cr)
    return {"dms_jax_training": record}


def _export(model, export_dir: str, tokenizer, extra_config: dict | None) -> None:
    if jax.process_index() == 0:
        import dms_jax

        dms_jax.save_pretrained(model, export_dir, tokenizer=tokenizer, extra_config=extra_config)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dms_jax export")


def _already_complete(config, trainer, state, start, steps, ckpt, export_dir, out_dir, tokenizer,
                      resumed_from, skipped) -> TrainResult:
    """A checkpoint already at (or past) train.steps: report it; export only where no export is."""
    message = _run_complete_message(start, steps, ckpt.directory)
    metrics_path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
    if metrics_path and jax.process_index() == 0:  # records a killed run wrote past its checkpoint
        truncate_records(metrics_path, start)
    reached = reached_compression_ratio([], metrics_path, start)
    trained = with_reached_cr(trainer.model_from(state), reached, trainer.layout["loss"])
    exported = None
    if export_dir and holds_export(export_dir):
        message += f". The export in {export_dir} is left as it is"
    elif export_dir:
        _export(trained, export_dir, tokenizer, None)
        exported = os.path.abspath(export_dir)
        message += f". It had no export yet: exported to {export_dir}"
    log.warning("%s", message)
    return TrainResult(trained, [], start, resumed_from, ckpt.directory, exported, dict(state["params"]),
                       skipped_checkpoints=skipped, already_complete=message)
