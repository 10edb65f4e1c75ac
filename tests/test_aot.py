"""Ahead-of-time compilation (dms_jax.aot): the trainer's step and generate's prefill / decode
compiled for simulated CPU devices (always) and a small TPU topology (when libtpu is installed),
from shapes alone; the compiler's per-device bytes shrink as the mesh grows; bad input is refused
before compiling, naming the fix."""
import dataclasses
import os
import subprocess
import sys

import jax
import pytest

from dms_jax.aot import (BatchError, DecodeSettings, TopologyError, TrainSettings, compile_decode,
                         compile_train, devices_for)
from dms_jax.aot.shapes import model_config_for_recipe, model_config_from_file, shipped_shapes
from dms_jax.aot.topology import libtpu_available
from dms_jax.train.cli import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe(name):
    return load_config_file(os.path.join(REPO, "configs", f"{name}.py"))


def scaled_recipe():
    """configs/tiny.py with the reference recipe's remat: a retrofit small enough to compile in
    seconds."""
    config = recipe("tiny")
    config.train.remat = True
    return config


def test_train_step_bytes_per_device_shrink_as_the_mesh_grows():
    config = scaled_recipe()
    one = compile_train(config, jax.devices()[:1], TrainSettings(mesh_shape=(1, 1, 1)))
    eight = compile_train(config, jax.devices()[:8], TrainSettings(mesh_shape=(1, 8, 1)))
    assert one.weights > 0 and one.optimizer > 0 and one.temporaries > 0
    # FSDP over 8 devices: weights and optimizer state split along d_model, rows over 8
    assert eight.weights <= one.weights / 4
    assert eight.optimizer < one.optimizer
    assert eight.temporaries < one.temporaries
    assert eight.total < one.total / 2


def test_decode_bytes_per_device_shrink_as_the_mesh_grows_and_dms_holds_less():
    cfg = model_config_for_recipe(recipe("tiny"))
    settings = DecodeSettings(batch=8, context=512, policy="full", chunk_size=64)
    one = compile_decode(cfg, jax.devices()[:1], dataclasses.replace(settings, mesh_shape=(1, 1, 1)))
    eight = compile_decode(cfg, jax.devices()[:8], settings)
    for name in ("prefill", "decode"):
        assert eight[name].total < one[name].total
    assert eight["decode"].cache * 8 == one["decode"].cache  # rows over data x fsdp
    dms = compile_decode(cfg, jax.devices()[:8], DecodeSettings(batch=8, context=512, policy="dms",
                                                                target_cr=8.0, chunk_size=64))
    assert dms["capacity"] < eight["capacity"] == 512
    assert dms["decode"].cache < eight["decode"].cache / 2


def test_a_paged_pool_split_over_the_mesh_holds_less_than_slots():
    """Paged dms on 8 devices: each device holds its rows' rings and its own pool, so its cache
    bytes are the pool's 1/8 and below the slot layout's (margin 0.1 shared by the heads
    against 0.5 per stream)."""
    cfg = model_config_for_recipe(recipe("tiny"))
    settings = DecodeSettings(batch=16, context=2048, policy="dms", target_cr=8.0, chunk_size=256)
    slots = compile_decode(cfg, jax.devices()[:8], settings)
    pages = compile_decode(cfg, jax.devices()[:8], dataclasses.replace(settings, layout="paged"))
    one = compile_decode(cfg, jax.devices()[:1], dataclasses.replace(settings, layout="paged",
                                                                      mesh_shape=(1, 1, 1)))
    assert pages["capacity"] < slots["capacity"]
    assert pages["decode"].cache < 0.85 * slots["decode"].cache
    # each device's pool rounds up to whole pages: within a few pages of 1/8 of one device's
    assert pages["decode"].cache * 8 == pytest.approx(one["decode"].cache, rel=0.03)


def test_largest_decode_batch_is_bracketed_by_compiles():
    """With the limit 1 byte above what 16 rows need, the search ends on 16 and has compiled 24
    (one step of data x fsdp = 8 more) and seen it not fit."""
    from dms_jax.aot import largest_batch

    cfg = model_config_for_recipe(recipe("tiny"))
    settings = DecodeSettings(batch=8, context=128, policy="dms", chunk_size=32)
    at_16 = compile_decode(cfg, jax.devices()[:8], dataclasses.replace(settings, batch=16))
    limit = max(at_16["prefill"].total, at_16["decode"].total) + 1
    found = largest_batch(cfg, jax.devices()[:8], settings, limit=limit)
    assert found.best == 16 and found.exact
    assert [p.batch for p in found.points][:2] == [8, 16]
    assert all((p.total <= limit) == (p.batch <= 16) for p in found.points)


def test_bad_input_is_refused_before_compiling_naming_the_fix():
    config = scaled_recipe()
    with pytest.raises(TopologyError, match=r"--mesh.*8"):  # 3 does not divide 8 chips
        compile_train(config, jax.devices()[:8], TrainSettings(mesh_shape=(1, 3, 1)), topology="cpu:8")
    with pytest.raises(BatchError, match="multiple of 8"):  # 4 rows over 8 fsdp shards
        compile_train(config, jax.devices()[:8], TrainSettings(mesh_shape=(1, 8, 1), batch_size=4))
    with pytest.raises(TopologyError, match="cpu:N"):
        devices_for("cpu-8")
    with pytest.raises(TopologyError, match="XLA_FLAGS"):
        devices_for(f"cpu:{jax.device_count('cpu') + 1}")
    if libtpu_available():
        with pytest.raises(TopologyError, match="not a topology libtpu knows.*v5e:2x2"):
            devices_for("v9z:2x2")
    else:
        with pytest.raises(TopologyError, match=r"libtpu.*\.\[aot\].*cpu:N"):
            devices_for("v5e:2x2")


def test_shipped_shapes_are_the_recipes_models():
    """Every recipe's hub model has shipped shapes, so no download is needed to compile it."""
    known = shipped_shapes()
    for name in ("llama3_2_1b", "qwen3_8b", "qwen_r1_1_5b", "qwen_r1_7b", "qwen_r1_32b"):
        config = recipe(name)
        assert config.model.path in known
        cfg = model_config_for_recipe(config)
        assert cfg.dtype == "bfloat16" and cfg.param_dtype == "bfloat16" and cfg.dms is not None
    assert model_config_from_file("Qwen/Qwen3-8B").num_layers == 36
    with pytest.raises(FileNotFoundError, match="--model-config"):
        model_config_from_file("nobody/unknown-model")


@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install -e '.[aot]'); "
                    "the TPU-topology compile is skipped, the cpu:N ones above still run")
def test_tpu_topology_compiles_and_bytes_shrink_with_more_chips():
    config = scaled_recipe()
    cfg = model_config_for_recipe(config)
    four, eight = devices_for("v5e:2x2"), devices_for("v5e:2x4")
    assert len(four) == 4 and len(eight) == 8 and four[0].platform == "tpu"
    small = compile_train(config, four, TrainSettings(mesh_shape=(1, -1, 1)))
    large = compile_train(config, eight, TrainSettings(mesh_shape=(1, -1, 1)))
    assert small.fits is None and small.generated_code > 0  # a real TPU program (no limit given)
    assert large.weights < small.weights and large.total < small.total
    dec4 = compile_decode(cfg, four, DecodeSettings(batch=8, context=512, policy="dms", chunk_size=64))
    dec8 = compile_decode(cfg, eight, DecodeSettings(batch=8, context=512, policy="dms", chunk_size=64))
    assert dec8["decode"].cache < dec4["decode"].cache


def test_cli_reports_bytes_per_chip_and_refuses_a_bad_mesh():
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", "JAX_PLATFORMS": ""}
    cmd = [sys.executable, "-m", "dms_jax.aot", "train", "--config", "configs/tiny.py", "--topology", "cpu:2",
           "--mesh", "1,2,1", "--seq-len", "32"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for line in ("weights (frozen + trained)", "optimizer state", "temporaries", "total", "chip memory",
                 "fits", "compile time"):
        assert line in done.stdout
    bad = subprocess.run(cmd[:-4] + ["--mesh", "1,3,1"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "--mesh" in bad.stderr and "2 chips" in bad.stderr


def test_only_the_compilers_out_of_memory_counts_as_a_batch_that_does_not_fit():
    """The batch search treats XLA's RESOURCE_EXHAUSTED at compile time (TPU temporaries over the
    HBM; the message libtpu gave for Qwen3-8B at batch 80, benchmarks/results/
    aot_qwen3_8b_decode_scanned.json) as "does not fit" and re-raises any other error."""
    from dms_jax.aot.search import is_compile_oom

    assert is_compile_oom(jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
        "(99.12G) exceeds available HBM (95.74G)."))
    assert not is_compile_oom(jax.errors.JaxRuntimeError("INVALID_ARGUMENT: shapes do not match"))
    assert not is_compile_oom(ValueError("RESOURCE_EXHAUSTED"))  # not the compiler's
