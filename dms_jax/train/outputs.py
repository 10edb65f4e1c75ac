"""Where a run writes, checked before any training: an export replaces its directory whole, so it
must not be, hold or sit inside the checkpoint directory, and must not be or hold the output
directory (the metrics); an existing export directory must be a previous export.
"""
from __future__ import annotations

import os

from dms_jax.export_target import ExportTargetError, check_export_target


class OutputPathError(ValueError):
    """The run's output paths overlap so that the export would delete the run's own files."""


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def check_output_paths(checkpoint_dir: str | None, output_dir: str | None, export_dir: str | None) -> None:
    """Raise OutputPathError when the export would replace the checkpoints or the metrics, and
    ExportTargetError when export_dir exists and holds anything but a previous export."""
    if not export_dir:
        return
    export = _real(export_dir)
    fix = ("give output.export_dir a directory of its own, e.g. output.export_dir=<output.dir>/export "
           "(the layout of the configs in configs/)")
    if checkpoint_dir:
        ckpt = _real(checkpoint_dir)
        if _within(ckpt, export) or _within(export, ckpt):
            relation = ("is" if ckpt == export else "holds" if _within(ckpt, export) else "is inside")
            raise OutputPathError(
                f"output.export_dir={export_dir} {relation} the checkpoint directory checkpoint.dir="
                f"{checkpoint_dir}: the export replaces its directory whole and would delete the "
                f"checkpoints; {fix}")
    if output_dir:
        out = _real(output_dir)
        if _within(out, export):
            relation = "is" if out == export else "holds"
            raise OutputPathError(
                f"output.export_dir={export_dir} {relation} the output directory output.dir={output_dir}: "
                f"the export replaces its directory whole and would delete the run's metrics; {fix}")
    try:
        check_export_target(export)
    except ExportTargetError as err:
        raise ExportTargetError(f"output.export_dir: {err}") from None


def holds_export(export_dir: str | None) -> bool:
    """Whether export_dir already holds an export (config.json and weights)."""
    return bool(export_dir) and os.path.isfile(os.path.join(export_dir, "config.json"))
