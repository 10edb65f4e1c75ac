"""Two local processes (4 CPU devices each, gloo collectives, jax.distributed) take the same steps
with the same losses as one process with 8 devices; checkpoints and the export work across them."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = (1, 8, 1)  # FSDP across both processes: no process holds a whole parameter
STEPS = 3


def _config(tmp_path):
    from tests.test_train_loop import tiny_config

    cfg = tiny_config(tmp_path, steps=STEPS, trainable="all", learning_rate=1e-3)
    cfg.mesh.shape = MESH
    return cfg


def worker(tmp_path, out_path):
    """One of the processes (launched below with JAX_* environment variables)."""
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    from dms_jax.sharding import maybe_initialize_distributed

    assert maybe_initialize_distributed()
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    from pathlib import Path

    from dms_jax.train import train

    cfg = _config(Path(tmp_path))
    cfg.checkpoint.update(dir=os.path.join(tmp_path, "ckpt"), every=2, keep=3)
    cfg.output.export_dir = os.path.join(tmp_path, "export")
    result = train(cfg)
    with open(out_path, "w") as f:
        json.dump({"losses": [h["loss"] for h in result.history], "step": result.step}, f)
    jax.distributed.shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_match_one_process_with_eight_devices(tmp_path):
    from dms_jax.train import train
    import dms_jax

    reference = train(_config(tmp_path))  # this process: 8 devices (conftest.py)
    ref_losses = [h["loss"] for h in reference.history]

    port = _free_port()
    procs = []
    for pid in range(2):
        # the parent's XLA flags but its 8 simulated devices (each process brings its own
        # 4), so both sides compile alike (conftest.py's LLVM -O0 rounds differently)
        flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                         if not f.startswith("--xla_force_host_platform_device_count"))
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}
        cmd = [sys.executable, "-m", "tests.test_train_multiprocess", str(tmp_path), str(tmp_path / f"out{pid}.json")]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0].decode(errors="replace"))
        finally:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]

    for pid in range(2):
        with open(tmp_path / f"out{pid}.json") as f:
            got = json.load(f)
        assert got["step"] == STEPS
        np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-5)
    assert sorted(int(e) for e in os.listdir(tmp_path / "ckpt") if e.isdigit()) == [2, 3]
    exported = dms_jax.from_pretrained(str(tmp_path / "export"))
    ids = np.random.default_rng(0).integers(0, 512, (2, 32)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(exported(ids)), np.asarray(reference.model(ids)), rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
