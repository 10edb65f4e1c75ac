"""train.py and the config files: the reference recipe's values, and a CLI run on a tiny HF model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dms_jax
from tests.test_train_loop import REPO, load_config_file

MODELS = ["llama3_2_1b", "qwen3_8b", "qwen_r1_1_5b", "qwen_r1_7b", "qwen_r1_32b"]


@pytest.mark.parametrize("name", MODELS)
def test_model_configs_carry_the_reference_recipe(name):
    c = load_config_file(name)
    assert c.model.path and c.model.dtype == "bfloat16"
    assert (c.model.dms.mode, c.model.dms.window, c.model.dms.scale, c.model.dms.offset, c.model.dms.tau) == (
        "adapter", 512, 100.0, 5.0, 0.1)
    t = c.train
    assert (t.loss, t.trainable, t.cr_start, t.cr_end, t.cr_steps) == ("distill", "decision", 1.0, 16.0, 510)
    assert (t.learning_rate, t.b2, t.weight_decay, t.grad_clip, t.seq_len) == (3e-5, 0.95, 0.0, 1.0, 32768)
    assert len(c.mesh.shape) == 3


def test_cli_retrofits_a_hugging_face_model_and_exports_it(tmp_path, hf_model_dirs):
    rng = np.random.default_rng(0)
    with open(tmp_path / "ids.jsonl", "w") as f:  # the tiny HF models ship no tokenizer: token ids
        for _ in range(40):
            f.write(json.dumps({"input_ids": rng.integers(2, 97, rng.integers(10, 40)).tolist()}) + "\n")
    args = [
        "--config", os.path.join(REPO, "configs", "qwen_r1_1_5b.py"),
        f"--config.model.path={hf_model_dirs['qwen2']}", "--config.model.dtype=float32",
        "--config.model.dms.window=8", f"--config.data.path={tmp_path / 'ids.jsonl'}", "--config.data.eos_id=1",
        "--config.data.keep_in_memory=True", f"--config.data.cache_dir={tmp_path / 'cache'}",
        "--config.train.seq_len=32", "--config.train.steps=3", "--config.train.learning_rate=1e-3",
        "--config.mesh.shape=(2,2,2)", f"--config.checkpoint.dir={tmp_path / 'ckpt'}",
        f"--config.output.dir={tmp_path / 'run'}", f"--config.output.export_dir={tmp_path / 'export'}",
        "--config.output.progress=False",
    ]
    run = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: step 3" in run.stdout
    exported = dms_jax.from_pretrained(str(tmp_path / "export"))
    assert exported.config.dms.mode == "adapter" and exported.config.qkv_bias
    base = dms_jax.from_pretrained(hf_model_dirs["qwen2"])
    ids = rng.integers(0, 97, (2, 16)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(exported(ids)), np.asarray(base(ids)))  # base frozen
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["3"]

    exported_at = os.stat(tmp_path / "export" / "config.json").st_mtime_ns
    again = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete: step 3 of 3; nothing to train. To train further raise train.steps" in again.stdout
    assert "is left as it is" in again.stdout and "done:" not in again.stdout
    assert os.stat(tmp_path / "export" / "config.json").st_mtime_ns == exported_at  # not re-exported


def test_cli_reports_bad_arguments(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--config.train.cr_end=0.5",
                          f"--config.checkpoint.dir={tmp_path}", "--config.output.dir=", "--config.output.export_dir="],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "cr_end=0.5: a compression ratio must be >= 1" in run.stderr


def test_cli_names_an_unknown_field_in_one_line_and_help_lists_the_fields(tmp_path):
    train_py = os.path.join(REPO, "train.py")
    run = subprocess.run([sys.executable, train_py, "--config.train.stepz=3"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip() == ("error: unknown config field train.stepz; did you mean train.steps or "
                                  "train.cr_steps? (train.py --help lists every field)")
    helped = subprocess.run([sys.executable, train_py, "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert helped.returncode == 0, helped.stderr[-2000:]
    for line in ("--config.train.steps=40", "--config.train.learning_rate=0.003", "--config.data.format=''",
                 "--config.data.skip_bad_rows=False", "--config.checkpoint.every=10"):  # configs/tiny.py's
        assert f"\n  {line}\n" in helped.stdout, line
