"""Retrofit a model with DMS (or pretrain a small one): a thin CLI over `dms_jax.train.train`.

    python train.py                                   # configs/tiny.py: a tiny run on the CPU
    python train.py --config configs/qwen3_8b.py --config.data.path=data.jsonl \
        --config.checkpoint.dir=/ckpt/q8 --config.output.export_dir=/out/q8-dms
    python train.py --config.train.steps=100 --config.mesh.shape="(2,4,1)"

Every field of the config file can be overridden with --config.<section>.<field>=value. Runs
resume from the newest complete checkpoint in checkpoint.dir. Several hosts: start the same
command on each with JAX_COORDINATOR_ADDRESS=host0:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i
(or DMS_DISTRIBUTED=1 on SLURM / Open MPI / Cloud TPU, where JAX finds them itself).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "tiny.py"), "training config file (configs/*.py)",
    lock_config=True,
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; fields go as --config.section.field=value")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    from dms_jax.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()  # before anything touches the devices
    from dms_jax.train import NonFiniteLossError, train

    config = _CONFIG.value
    try:
        result = train(config)
    except (NonFiniteLossError, ValueError, FileNotFoundError) as err:
        if flags.FLAGS["verbosity"].present:
            raise
        print(f"error: {type(err).__name__}: {err}\n(--verbosity=0 shows the traceback)", file=sys.stderr)
        return 2
    last = result.history[-1] if result.history else {}
    summary = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "kl", "ce", "achieved_cr", "target_cr") if k in last)
    print(f"done: step {result.step}" + (f" ({summary})" if summary else ""))
    if result.export_dir:
        print(f"exported to {result.export_dir}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, _HERE)
    app.run(main)
