"""Checkpoints with orbax `CheckpointManager`: train state + JSON metadata, auto-resume.

A checkpoint holds the train state pytree (trainable params, optimizer state, step, RNG key data)
and JSON metadata (data position, data fingerprint, the parameter layout). Orbax writes each step
into a temporary directory and renames it into place only once complete (atomic finalisation),
so `latest_step()` never returns a half-written checkpoint. Frozen parameters are not saved: they
are the base model's, reloaded from where they came from.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class ResumeError(ValueError):
    """A checkpoint exists but does not belong to this run's configuration."""


class Checkpointer:
    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        if every <= 0:
            raise ValueError(f"checkpoint.every={every} must be > 0")
        if keep <= 0:
            raise ValueError(f"checkpoint.keep={keep} must be > 0")
        self.directory = os.path.abspath(directory)
        self.every = int(every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        self.manager.reload()  # see what other processes / earlier runs finalised
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int, *, final: bool = False) -> bool:
        """Every `every` steps, and the run's last step."""
        return final or step % self.every == 0

    def save(self, step: int, state, meta: dict) -> bool:
        """Start saving `step` (asynchronously by default; visible once finalised)."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
        """Restore `step` into arrays with the shardings of `abstract_state` (ShapeDtypeStructs)."""
        meta = self.restore_meta(step)
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
        except (ValueError, KeyError) as err:
            raise ResumeError(
                f"checkpoint step {step} in {self.directory} does not match this run's train state "
                f"({type(err).__name__}: {err}); use a fresh checkpoint.dir or the same config"
            ) from err
        return restored["state"], meta

    def restore_meta(self, step: int) -> dict:
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with shardings: the restore target for `Checkpointer.restore`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
