"""Checkpoints with orbax `CheckpointManager`: train state + JSON metadata, auto-resume.

A checkpoint holds the train state pytree (trainable params, optimizer state, step, RNG key data)
and JSON metadata (data position, data fingerprint, the parameter layout, a checksum of every
state leaf). Orbax writes each step into a temporary directory and renames it into place only once
complete (atomic finalisation), so `latest_step()` never returns a half-written checkpoint. Frozen
parameters are not saved: they are the base model's, reloaded from where they came from.

A finalised checkpoint can still be damaged later (a truncated or bit-flipped file):
`restore_newest_intact` verifies what it reads (metadata parses, arrays read, checksums match,
values finite) and falls back to the newest intact step, setting the damaged ones aside as
`<step>.unreadable` and saying which and why.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dms_jax import stacking

log = logging.getLogger(__name__)


class ResumeError(ValueError):
    """A checkpoint exists but does not belong to this run's configuration (or none is intact)."""


class CorruptCheckpointError(ResumeError):
    """A checkpoint step cannot be read back as it was written."""

    def __init__(self, step: int, directory: str, reason: str):
        super().__init__(f"checkpoint step {step} in {directory} cannot be restored: {reason}")
        self.step, self.reason = step, reason


def check_layout(meta: dict, layout: dict, step: int, directory: str, fix: str) -> None:
    """The one test that a checkpoint was written by this configuration: the trainable
    parameters' shapes / dtypes, the loss and the trainable set recorded at save time."""
    saved = meta.get("layout")
    if saved != layout:
        raise ResumeError(
            f"the checkpoint at step {step} in {directory} was written by a different configuration "
            f"(trainable parameters / loss differ){_scan_layers_hint(saved, layout)}; {fix}")


def _scan_layers_hint(saved, layout: dict) -> str:
    """Names model.scan_layers when the two layouts differ in how the layers are laid out."""

    def stacked(lay):
        params = lay.get("params") if isinstance(lay, dict) else None
        return None if not params else any(stacking.is_stacked_path(k) for k in params)

    written, wanted = stacked(saved), stacked(layout)
    if written is None or wanted is None or written == wanted:
        return ""
    return (f": its layers are {'stacked' if written else 'unrolled'}, this run's "
            f"{'stacked' if wanted else 'unrolled'}; set model.scan_layers={written} to resume it")


def _leaf_checksum(x):
    """A uint32 sum of the leaf's bit patterns (wrapping): any flipped bit changes it."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, bits) if x.dtype != bits else x
    return jnp.sum(words.astype(jnp.uint32), dtype=jnp.uint32)


def _leaf_finite(x):
    return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)


@jax.jit
def _fingerprint(state):
    return jax.tree.map(_leaf_checksum, state), jax.tree.map(_leaf_finite, state)


def state_fingerprint(state) -> tuple[dict[str, int], list[str]]:
    """({leaf path: checksum}, [paths of leaves holding NaN / Inf]) of a state pytree: one cheap
    pass on the devices, a few scalars to the host."""
    sums, finite = jax.device_get(_fingerprint(state))
    checksums = {jax.tree_util.keystr(p): int(v) for p, v in jax.tree_util.tree_leaves_with_path(sums)}
    bad = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(finite) if not bool(v)]
    return checksums, bad


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
        """Start saving `step` (asynchronously by default; visible once finalised). The metadata
        gains a checksum of every state leaf; a state holding NaN / Inf is never saved."""
        checksums, nonfinite = state_fingerprint(state)
        if nonfinite:
            raise FloatingPointError(
                f"refusing to save checkpoint step {step}: the state holds NaN / Inf values in "
                f"{', '.join(nonfinite[:5])}{' ...' if len(nonfinite) > 5 else ''}")
        meta = {**meta, "checksums": checksums}
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
        """Restore `step` into arrays with the shardings of `abstract_state` (ShapeDtypeStructs)."""
        meta = self.restore_meta(step)
        state = self._restore_state(step, abstract_state)
        return state, meta

    def restore_verified(self, step: int, abstract_state, layout: dict | None = None, layout_fix: str = "",
                         *, check_meta: Callable[[int, dict], None] | None = None) -> tuple[Any, dict]:
        """`restore` that also checks the metadata (the layout when given: ResumeError naming
        `layout_fix`; then `check_meta(step, meta)`, which may raise) and that the state is the
        one saved (checksums, finite values): CorruptCheckpointError if not."""
        meta = self.restore_meta(step)
        if layout is not None:
            check_layout(meta, layout, step, self.directory, layout_fix)
        if check_meta is not None:
            check_meta(step, meta)
        state = self._restore_state(step, abstract_state)
        problem = verify_state(state, meta)
        if problem is not None:
            raise CorruptCheckpointError(step, self.directory, problem)
        return state, meta

    def _restore_state(self, step: int, abstract_state):
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)),
            )
        except Exception as err:  # a damaged file (or a state of another optimizer structure)
            raise CorruptCheckpointError(step, self.directory, "its train state cannot be read "
                                         f"({type(err).__name__}: {_first_line(err)})") from err
        return restored["state"]

    def restore_meta(self, step: int) -> dict:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # truncated / damaged JSON
            raise CorruptCheckpointError(step, self.directory, "its metadata cannot be read "
                                         f"({type(err).__name__}: {_first_line(err)})") from err
        if not isinstance(meta, dict):
            raise CorruptCheckpointError(step, self.directory,
                                         f"its metadata is a JSON {type(meta).__name__}, not an object")
        return dict(meta)

    def restore_newest_intact(self, abstract_state, layout: dict | None = None, layout_fix: str = "", *,
                              check_meta: Callable[[int, dict], None] | None = None,
                              set_aside: bool = True) -> tuple[Any, dict, int, list[tuple[int, str]]]:
        """(state, meta, step, skipped) of the newest step that reads back intact.

        layout / check_meta: as for `restore_verified`; a ResumeError there (a checkpoint of
        another configuration) stops the search: that is not damage. Damaged steps are skipped with a warning, listed
        in `skipped` as (step, reason) and, with `set_aside`, renamed to `<step>.unreadable` on
        the lead process so that the run can write that step again. Raises ResumeError when no
        step is intact; returns (None, None, None, []) when there are no checkpoints."""
        skipped: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, meta = self.restore_verified(step, abstract_state, layout, layout_fix, check_meta=check_meta)
            except CorruptCheckpointError as err:
                log.warning("skipping checkpoint step %d in %s: %s", step, self.directory, err.reason)
                skipped.append((step, err.reason))
                continue
            if skipped and set_aside:
                self._set_aside([s for s, _ in skipped])
            return state, meta, step, skipped
        if skipped:
            listed = "; ".join(f"step {s}: {why}" for s, why in skipped)
            raise ResumeError(
                f"no checkpoint in {self.directory} can be restored ({listed}). If they were written by "
                "another configuration use the same config; otherwise move the directory away (or "
                "set a fresh checkpoint.dir) to start over")
        return None, None, None, []

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            for step in steps:
                src = os.path.join(self.directory, str(step))
                dst, n = src + ".unreadable", 1
                while os.path.exists(dst):
                    dst, n = f"{src}.unreadable-{n}", n + 1
                if os.path.isdir(src):
                    os.rename(src, dst)
                    log.warning("moved the unreadable checkpoint step %d aside to %s", step, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dms_jax checkpoint set aside")
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def verify_state(state, meta: dict) -> str | None:
    """Why a restored state is not the one that was saved (None: it is): a leaf whose checksum
    differs from the one recorded at save time, or values that are not finite."""
    checksums, nonfinite = state_fingerprint(state)
    saved = meta.get("checksums")
    if saved is not None:
        differ = [k for k, v in checksums.items() if saved.get(k) != v]
        if differ:
            return (f"the checksums saved with it differ for {len(differ)} of {len(checksums)} state "
                    f"leaves ({', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}): a file is damaged")
    if nonfinite:
        return f"it holds NaN / Inf values ({', '.join(nonfinite[:3])}{' ...' if len(nonfinite) > 3 else ''})"
    return None


def _first_line(err) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with shardings: the restore target for `Checkpointer.restore`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
