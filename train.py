"""Retrofit a model with DMS (or pretrain a small one): a thin CLI over `dms_jax.train.train`.

    python train.py                                   # configs/tiny.py: a tiny run on the CPU
    python train.py --config configs/qwen3_8b.py --config.data.path=data.jsonl \
        --config.checkpoint.dir=/ckpt/q8 --config.output.export_dir=/out/q8-dms
    python train.py --config.train.steps=100 --config.mesh.shape="(2,4,1)"

Every field of the config file can be overridden with --config.<section>.<field>=value
(`python train.py --help` lists them with their defaults). Runs resume from the newest intact
checkpoint in checkpoint.dir; a run already at train.steps says so and trains nothing. Several hosts: start the same
command on each with JAX_COORDINATOR_ADDRESS=host0:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i
(or DMS_DISTRIBUTED=1 on SLURM / Open MPI / Cloud TPU, where JAX finds them itself).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, "configs", "tiny.py")


def check_command_line(argv):
    """--help lists the config fields (exit 0); a --config.<field> that names no field is one
    line naming it and the close matches (exit 2). Runs before the config flag is defined: that
    already applies the overrides of argv."""
    from dms_jax.train import cli

    config_path = cli.config_file_from_argv(argv[1:], _DEFAULT_CONFIG)
    if not (os.path.isfile(config_path) or os.path.isfile(config_path.split(":", 1)[0])):
        print(f"error: --config {config_path}: no such file (a configs/*.py file)", file=sys.stderr)
        sys.exit(2)
    config = cli.load_config_file(config_path)
    if any(arg in cli.HELP_FLAGS for arg in argv[1:]):
        print(cli.help_text(__doc__, config_path, config))
        sys.exit(0)
    problem = cli.unknown_field(config, argv[1:]) if config is not None else None
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    check_command_line(sys.argv)
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "training config file (configs/*.py)", lock_config=True,
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
    if result.already_complete:
        print(result.already_complete)
        return 0
    for warning in result.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    last = result.history[-1] if result.history else {}
    summary = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "kl", "ce", "achieved_cr", "target_cr") if k in last)
    print(f"done: step {result.step}" + (f" ({summary})" if summary else ""))
    if result.export_dir:
        print(f"exported to {result.export_dir}")
    return 0


def parse_flags(argv):
    """absl's flag parsing, with a malformed flag value reported in one line (exit 2)."""
    try:
        return flags.FLAGS(argv)
    except Exception as err:  # flags.Error, or ml_collections' own errors on a bad override
        print(f"error: {' '.join(str(err).split())} (train.py --help lists the config fields)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.path.insert(0, _HERE)
    app.run(main, flags_parser=parse_flags)
