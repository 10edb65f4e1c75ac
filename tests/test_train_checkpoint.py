"""Checkpoints: orbax's atomic finalisation means a save cut short by a killed process is never
resumed from; the newest complete step is."""
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np

from dms_jax.train.checkpoint import Checkpointer

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
    import jax

    target = {"w": jax.ShapeDtypeStruct((8,), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    state, meta = ckpt.restore(1, target)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(8.0))
    assert meta["data_position"] == 1
    ckpt.close()
