"""Checkpoints: orbax's atomic finalisation means a save cut short by a killed process is never
resumed from; the newest complete step is."""
import logging
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dms_jax.train.checkpoint import Checkpointer, ResumeError

WRITER = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp, numpy as np
    from dms_jax.train.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], every=1, keep=5)
    ckpt.save(1, {"w": jnp.arange(8.0), "step": jnp.int32(1)}, {"data_position": 1})
    ckpt.wait()
    big = jnp.asarray(np.random.default_rng(0).standard_normal((64, 1024, 1024), np.float32))  # 256 MiB
    ckpt.save(2, {"w": big, "step": jnp.int32(2)}, {"data_position": 2})
    os._exit(0)  # killed while the step-2 write is in flight: no finalisation, no clean-up
""")


def test_a_save_cut_short_is_never_resumed_from(tmp_path):
    directory = str(tmp_path / "ckpt")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", WRITER, directory], check=True, env=env, timeout=120)
    entries = os.listdir(directory)
    assert "1" in entries and "2" not in entries, entries
    assert any(e.startswith("2.orbax-checkpoint-tmp") for e in entries), entries  # the half-written one

    ckpt = Checkpointer(directory, every=1, keep=5)
    assert ckpt.latest_step() == 1
    target = {"w": jax.ShapeDtypeStruct((8,), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    state, meta = ckpt.restore(1, target)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(8.0))
    assert meta["data_position"] == 1
    ckpt.close()


def _array_files(directory):
    """The array data files of a checkpoint's state (the OCDBT data files, `d/*`)."""
    return [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names
            if os.path.basename(root) == "d"]


def _truncate(path, keep=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def _flip_middle_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _each_array_file(damage):
    return lambda d: [damage(path) for path in _array_files(os.path.join(d, "state"))]


DAMAGE = {  # (what is done to step 2, why it must be skipped)
    "truncated array file": (_each_array_file(_truncate), "its train state cannot be read"),
    "bit-flipped array file": (_each_array_file(_flip_middle_byte),
                               "the checksums saved with it differ for 1 of 2 state leaves \\(\\['w'\\]\\)"
                               "|its train state cannot be read"),
    "truncated metadata file": (lambda d: _truncate(os.path.join(d, "meta", "metadata")),
                                "its metadata cannot be read \\(JSONDecodeError"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, case, caplog):
    directory = str(tmp_path / "ckpt")
    ckpt = Checkpointer(directory, every=1, keep=5, async_save=False)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.arange(4096.0) * step, "step": jnp.int32(step)}, {"data_position": step})
    ckpt.close()
    damage, reason = DAMAGE[case]
    damage(os.path.join(directory, "2"))

    ckpt = Checkpointer(directory, every=1, keep=5, async_save=False)
    target = {"w": jax.ShapeDtypeStruct((4096,), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    with caplog.at_level(logging.WARNING):
        state, meta, step, skipped = ckpt.restore_newest_intact(target)
    assert step == 1 and meta["data_position"] == 1
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(4096.0))
    assert [s for s, _ in skipped] == [2] and re.search(reason, skipped[0][1]), skipped
    assert re.search("skipping checkpoint step 2 in .*ckpt: (?:" + reason + ")", caplog.text), caplog.text
    # set aside (not deleted), so the run can write step 2 again
    assert sorted(os.listdir(directory)) == ["1", "2.unreadable"] and ckpt.all_steps() == [1]
    ckpt.save(2, {"w": jnp.zeros(4096), "step": jnp.int32(2)}, {"data_position": 2})
    ckpt.close()


def test_no_intact_checkpoint_is_an_error_naming_each_step(tmp_path):
    directory = str(tmp_path / "ckpt")
    ckpt = Checkpointer(directory, every=1, keep=5, async_save=False)
    ckpt.save(1, {"w": jnp.arange(8.0)}, {"data_position": 1})
    with pytest.raises(FloatingPointError, match=r"refusing to save checkpoint step 2.*\['w'\]"):
        ckpt.save(2, {"w": jnp.array([1.0, jnp.nan])}, {"data_position": 2})
    ckpt.close()
    _truncate(os.path.join(directory, "1", "meta", "metadata"))
    ckpt = Checkpointer(directory, every=1, keep=5, async_save=False)
    with pytest.raises(ResumeError, match=r"no checkpoint in .*ckpt can be restored \(step 1: its metadata"):
        ckpt.restore_newest_intact({"w": jax.ShapeDtypeStruct((8,), jnp.float32)})
    assert os.listdir(directory) == ["1"]  # nothing set aside when there is nothing to fall back to
    ckpt.close()
