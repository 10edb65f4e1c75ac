"""The trainer end to end on the tiny config (8 simulated CPU devices, see conftest.py).

Shardings must not change the numbers, a killed run must resume bit-exactly (data order included),
a short retrofit must move the achieved CR toward the schedule with a small KL while frozen
weights keep their exact bits, and the export must reload into the same DMS model.
"""
import copy
import dataclasses
import importlib.util
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import dms_jax
from dms_jax import sharding as shd
from dms_jax.train import NonFiniteLossError, train
from dms_jax.train.data import DataError
from dms_jax.train.optim import split_model
from tests.crash import Killed, kill_at

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_file(name):
    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def write_corpus(path, docs=80, seed=0):
    """Random 'words' over a fixed alphabet, in JSONL."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 8))) for _ in range(60)]
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(20, 80)))}) + "\n")
    return str(path)


def tiny_config(tmp_path, **train_overrides):
    c = load_config_file("tiny")
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        write_corpus(corpus)
    c.data.update(path=str(corpus), format="", keep_in_memory=True, cache_dir=str(tmp_path / "hf_cache"))
    c.checkpoint.dir = ""
    c.output.update(dir="", export_dir="", progress=False)
    c.train.update(**train_overrides)
    return c


def bits(x):
    x = np.asarray(x)
    return x.view(np.uint32 if x.dtype.itemsize == 4 else np.uint16)


def losses_of(result, key="loss"):
    return np.array([h[key] for h in result.history])


# --------------------------------------------------------------------------------------------


def test_meshes_give_the_same_losses(tmp_path):
    """(8,1,1) data parallel, (2,4,1) with FSDP, (2,2,2) with tensor parallel (and with remat) and
    one device: same losses (all weights train, so parameters, gradients and Adam moments are all
    sharded)."""
    cfg = tiny_config(tmp_path, steps=4, trainable="all", learning_rate=1e-3)
    runs = {"single": train(cfg, devices=jax.devices()[:1])}
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        c = copy.deepcopy(cfg)
        c.mesh.shape = shape
        runs[shape] = train(c)
    c = copy.deepcopy(cfg)  # per-layer rematerialisation changes memory, not the numbers
    c.mesh.shape, c.train.remat = (2, 2, 2), True
    runs["remat"] = train(c)
    ref = losses_of(runs["single"])
    assert ref[-1] != ref[0]  # the weights moved
    for shape, run in runs.items():
        np.testing.assert_allclose(losses_of(run), ref, rtol=1e-5, atol=1e-8, err_msg=str(shape))
        # KL alone is a small difference of log-probabilities (~6): f32 round-off is ~1e-7 absolute
        np.testing.assert_allclose(losses_of(run, "kl"), losses_of(runs["single"], "kl"), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(losses_of(run, "achieved_cr"), losses_of(runs["single"], "achieved_cr"), rtol=1e-6)


def _array_files(directory):
    """The array data files of a checkpoint's state (the OCDBT data files, `d/*`)."""
    return [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names
            if os.path.basename(root) == "d"]


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Killed after step 5 (checkpoints 2 and 4), the newest checkpoint then damaged (truncated
    array files) and the metrics' last line torn: the resumed run falls back to step 2, says why,
    and reproduces the uninterrupted run bit for bit, its metrics file holding each step once."""
    cfg = tiny_config(tmp_path, steps=6)
    cfg.checkpoint.update(every=2, keep=5)
    straight = copy.deepcopy(cfg)
    straight.checkpoint.dir = str(tmp_path / "straight")
    ref = train(straight)

    crashed = copy.deepcopy(cfg)
    crashed.checkpoint.dir = str(tmp_path / "crashed")
    crashed.output.dir = str(tmp_path / "run")
    with pytest.raises(Killed):
        train(crashed, on_step=kill_at(5))
    steps_dir = tmp_path / "crashed"
    assert sorted(int(p) for p in os.listdir(steps_dir) if p.isdigit()) == [2, 4]
    # a checkpoint half-written when the process died must never be picked up
    shutil.copytree(steps_dir / "2", steps_dir / "6.orbax-checkpoint-tmp-1234567")
    shutil.rmtree(steps_dir / "6.orbax-checkpoint-tmp-1234567" / "state")
    # a finalised checkpoint damaged afterwards is skipped, with the reason
    for path in _array_files(steps_dir / "4" / "state"):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "r+b") as f:  # killed while writing the last line
        f.truncate(os.path.getsize(metrics) - 20)

    resumed = train(crashed)
    assert resumed.resumed_from == 2
    assert [s for s, _ in resumed.skipped_checkpoints] == [4]
    assert "its train state cannot be read" in resumed.skipped_checkpoints[0][1]
    assert "4.unreadable" in os.listdir(steps_dir)  # set aside, not deleted
    assert [h["step"] for h in resumed.history] == [3, 4, 5, 6]
    assert [h["data_position"] for h in resumed.history] == [h["data_position"] for h in ref.history[2:]]
    np.testing.assert_array_equal(losses_of(resumed), losses_of(ref)[2:])  # exact, not approximate
    for k, v in split_model(ref.model)[1].items():
        np.testing.assert_array_equal(bits(split_model(resumed.model)[1][k]), bits(v), err_msg=k)
    logged = [json.loads(line) for line in open(metrics)]  # each step once, the replayed ones rewritten
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal([r["loss"] for r in logged], losses_of(ref))


@pytest.fixture(scope="module")
def retrofit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrofit")
    cfg = tiny_config(tmp, steps=30)
    cfg.output.update(dir=str(tmp / "run"), export_dir=str(tmp / "export"))
    cfg.checkpoint.dir = str(tmp / "run" / "checkpoints")  # every 10, keep 2 (configs/tiny.py)
    initial = dms_jax.Decoder(
        dms_jax.ModelConfig(**cfg.model.init, dms=dms_jax.DMSConfig(**cfg.model.dms)), rngs=nnx.Rngs(cfg.seed)
    )
    return cfg, initial, train(cfg)


def _kl(student_logits, teacher_logits):
    ls = np.asarray(jax.nn.log_softmax(np.asarray(student_logits, np.float64)))
    lt = np.asarray(jax.nn.log_softmax(np.asarray(teacher_logits, np.float64)))
    return float((np.exp(ls) * (ls - lt)).sum(-1).mean())


def test_retrofit_raises_compression_with_small_kl_and_frozen_base(retrofit):
    cfg, initial, result = retrofit
    hist = result.history
    assert hist[0]["achieved_cr"] < 1.05 and hist[0]["target_cr"] == 1.0
    assert hist[-1]["target_cr"] == pytest.approx(4.0)
    assert np.mean([h["achieved_cr"] for h in hist[-5:]]) > 2.0  # moving toward the schedule
    with open(os.path.join(cfg.output.dir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert [r["step"] for r in logged] == list(range(1, 31))
    assert {"loss", "kl", "target_cr", "achieved_cr", "tokens_per_s"} <= set(logged[-1])

    # hard-decision evaluation: real compression, and a KL far below evicting everything
    ids = np.random.default_rng(3).integers(0, 512, (4, 64)).astype(np.int32)
    model = result.model
    out, ratio = model.eval_forward(ids)
    teacher_logits = model(ids)  # plain mode: the adapter is unused, the base is the original
    np.testing.assert_array_equal(np.asarray(teacher_logits), np.asarray(initial(ids)))
    evict_all = dataclasses.replace(model.config, dms=dataclasses.replace(model.config.dms, offset=-5.0))
    baseline = nnx.merge(nnx.split(dms_jax.Decoder(evict_all, rngs=nnx.Rngs(cfg.seed)))[0], nnx.state(initial))
    out_all, ratio_all = baseline.eval_forward(ids)  # adapter 0, offset -5: z = +5, all evicted
    # (1.5 with the normal(0.02) init of the random base; the training CR of the last steps is > 2)
    assert float(ratio) > 1.4 and float(ratio_all) > 6
    kl_trained, kl_all = _kl(out.logits, teacher_logits), _kl(out_all.logits, teacher_logits)
    assert kl_trained < 0.6 * kl_all, (kl_trained, kl_all)

    # only the adapter moved; every base weight keeps its exact bits
    _, before, _ = split_model(initial)
    _, after, _ = split_model(model)
    for k in before:
        same = np.array_equal(bits(before[k]), bits(after[k]))
        assert same == (".attn.dms_" not in k), k


def test_export_reloads_into_the_same_dms_model(retrofit):
    cfg, _, result = retrofit
    assert result.export_dir == os.path.abspath(cfg.output.export_dir)
    with open(os.path.join(result.export_dir, "config.json")) as f:
        exported = json.load(f)["dms"]
    assert exported["window"] == cfg.model.dms.window
    # the CR the decisions reached at the end is recorded: generate / infer.py size the cache by it
    tail = [h["achieved_cr"] for h in result.history[-3:]]  # the last tenth of 30 steps
    assert exported["target_cr"] == pytest.approx(np.mean(tail), abs=0.006)
    reloaded = dms_jax.from_pretrained(result.export_dir)
    ids = np.random.default_rng(4).integers(0, 512, (2, 64)).astype(np.int32)
    want, want_cr = result.model.eval_forward(ids)
    got, got_cr = reloaded.eval_forward(ids)
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got.decisions), np.asarray(want.decisions))
    assert float(got_cr) == float(want_cr)
    assert dms_jax.load_tokenizer(result.export_dir) is not None
    training = json.load(open(os.path.join(result.export_dir, "config.json")))["dms_jax_training"]
    assert training == {"loss": "distill", "steps": 30, "warnings": [], "reached_cr": exported["target_cr"],
                        "schedule_cr": pytest.approx(4.0)}


def test_a_checkpoint_restored_for_inference_records_the_cr_its_export_records(retrofit):
    from dms_jax.train.restore import restore_checkpoint

    cfg, _, result = retrofit
    restored = restore_checkpoint(cfg, cfg.checkpoint.dir).model  # the newest step, 30
    exported = dms_jax.from_pretrained(result.export_dir)
    assert restored.config.dms.target_cr == exported.config.dms.target_cr == result.model.config.dms.target_cr
    assert restored.config.dms == exported.config.dms  # so both size the inference cache alike


def test_running_a_finished_run_again_says_so_and_keeps_its_export(retrofit):
    cfg, _, result = retrofit
    config_json = os.path.join(result.export_dir, "config.json")
    before = (os.stat(config_json).st_mtime_ns, sorted(os.listdir(result.export_dir)))
    # a longer run of the same config, killed after its step-30 checkpoint, had logged steps 31-32
    metrics = os.path.join(cfg.output.dir, "metrics.jsonl")
    with open(metrics) as f:
        last = json.loads(f.readlines()[-1])
    with open(metrics, "a") as f:
        for step in (31, 32):
            f.write(json.dumps({**last, "step": step}) + "\n")
    again = train(cfg)
    with open(metrics) as f:  # the records are cut back to the checkpoint the run stands on
        assert max(json.loads(line)["step"] for line in f) == 30
    assert again.already_complete and again.history == [] and again.step == 30
    assert re.search(r"already complete: step 30 of 30; nothing to train\. To train further raise train\.steps "
                     r"\(e\.g\. --config\.train\.steps=45\); to start over use a fresh checkpoint\.dir\. The export "
                     r"in .*export is left as it is", again.already_complete)
    assert (os.stat(config_json).st_mtime_ns, sorted(os.listdir(result.export_dir))) == before
    assert again.export_dir is None


def test_neuron_mode_trains_only_the_decision_columns(tmp_path):
    cfg = tiny_config(tmp_path, steps=3)
    cfg.model.dms.mode = "neuron"
    cfg.model.init.qkv_bias = True
    result = train(cfg)
    initial = dms_jax.Decoder(
        dms_jax.ModelConfig(**cfg.model.init, dms=dms_jax.DMSConfig(**cfg.model.dms)), rngs=nnx.Rngs(cfg.seed)
    )
    _, before, _ = split_model(initial)
    _, after, _ = split_model(result.model)
    mc = result.model.config
    columns = [h * mc.group_size * mc.head_dim + mc.head_dim - 1 for h in range(mc.num_kv_heads)]
    for k in before:
        b, a = bits(before[k]), bits(after[k])
        if k.endswith("attn.q_proj.kernel") or k.endswith("attn.q_proj.bias"):
            changed = np.nonzero(np.any((b != a).reshape(-1, b.shape[-1]), axis=0))[0]
            assert set(changed) <= set(columns) and len(changed) > 0, (k, changed)
        else:
            np.testing.assert_array_equal(a, b, err_msg=k)


def test_bfloat16_model_keeps_float32_master_copies_of_what_trains(tmp_path):
    cfg = tiny_config(tmp_path, steps=3, learning_rate=3e-5)  # the reference learning rate
    cfg.model.update(dtype="bfloat16", param_dtype="bfloat16")
    result = train(cfg)
    scale = np.asarray(result.trainable["layers.0.attn.dms_norm.scale"])
    assert scale.dtype == np.float32
    # 1 + 3 steps of ~3e-5 is below bfloat16's resolution at 1 (2^-7): only a float32 master moves
    assert 0 < np.abs(scale - 1.0).max() < 2 ** -8
    initial = dms_jax.Decoder(
        dms_jax.ModelConfig(**cfg.model.init, dtype="bfloat16", param_dtype="bfloat16",
                            dms=dms_jax.DMSConfig(**cfg.model.dms)), rngs=nnx.Rngs(cfg.seed))
    _, before, _ = split_model(initial)
    _, after, _ = split_model(result.model)
    for k in before:
        assert after[k].dtype == before[k].dtype == jax.numpy.bfloat16, k
        if ".attn.dms_" not in k:
            np.testing.assert_array_equal(bits(after[k]), bits(before[k]), err_msg=k)


def test_language_model_loss_learns(tmp_path):
    cfg = tiny_config(tmp_path, steps=15, loss="lm", trainable="all", learning_rate=1e-2)
    cfg.model.dms.mode = ""  # a plain model, as for pretraining
    ce = losses_of(train(cfg), "ce")
    assert ce[0] > 0.9 * np.log(512)  # random init: about uniform over the 512 tokens
    assert ce[-1] < ce[0] - 0.5


# -------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors(tmp_path):
    cfg = tiny_config(tmp_path)
    cases = [
        (dict(data=dict(path=str(tmp_path / "nope.jsonl"))), DataError, "no such file"),
        (dict(train=dict(seq_len=9)), ValueError, r"seq_len=9 <= DMS window \+ 1 = 9"),
        (dict(train=dict(cr_end=0.5)), ValueError, "cr_end=0.5: a compression ratio must be >= 1"),
        (dict(mesh=dict(shape=(2, 2, 1))), shd.MeshError, "needs 4 devices but 8 are available"),
        (dict(train=dict(batch_size=6)), shd.MeshError, "batch_size=6 is not divisible by data \\* fsdp = 8"),
        (dict(train=dict(trainable="some")), ValueError, "trainable='some'"),
        (dict(data=dict(tokenizer="/nonexistent/tokenizer")), DataError, "data.tokenizer='/nonexistent/tokenizer'"),
    ]
    (tmp_path / "empty.jsonl").write_text("")
    cases.append((dict(data=dict(path=str(tmp_path / "empty.jsonl"))), DataError, "empty"))
    for overrides, error, message in cases:
        c = copy.deepcopy(cfg)
        for section, fields in overrides.items():
            getattr(c, section).update(fields)
        with pytest.raises(error, match=message):
            train(c)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # an absurd learning rate overflows the weights after the first update
    cfg = tiny_config(tmp_path, steps=6, trainable="all", learning_rate=1e36, grad_clip=0.0)
    cfg.checkpoint.update(dir=str(tmp_path / "ckpt"), every=1, keep=10)
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+).*Last good checkpoint: step (\d+)") as err:
        train(cfg)
    import re

    bad, good = map(int, re.search(r"at step (\d+).*Last good checkpoint: step (\d+)", str(err.value)).groups())
    assert good == bad - 1
    assert max(int(p) for p in os.listdir(tmp_path / "ckpt") if p.isdigit()) == good


def test_a_non_finite_update_is_never_saved_and_the_last_good_checkpoint_is_good(tmp_path):
    """The issue's reproduction, small: a run resumed with learning_rate=inf has a finite loss at
    its first step but an update that is not; it stops before saving, names the newest checkpoint,
    and that checkpoint resumes at the normal learning rate."""
    cfg = tiny_config(tmp_path, steps=2)
    cfg.checkpoint.update(dir=str(tmp_path / "ckpt"), every=1, keep=10)
    train(cfg)
    bad = copy.deepcopy(cfg)
    bad.train.update(steps=3, learning_rate=float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"the update of step 3 made the train state non-finite \(the loss "
                                                 r"[0-9.]+ was finite.*Last good checkpoint: step 2 in .*ckpt"):
        train(bad)
    assert sorted(int(p) for p in os.listdir(tmp_path / "ckpt") if p.isdigit()) == [1, 2]
    cfg.train.steps = 3
    resumed = train(cfg)
    assert resumed.resumed_from == 2 and np.isfinite(losses_of(resumed)).all()


def test_overlapping_output_paths_are_refused_before_training(tmp_path):
    from dms_jax.export_target import ExportTargetError
    from dms_jax.train.outputs import OutputPathError

    r = tmp_path / "R"
    cases = [  # (checkpoint.dir, output.dir, export_dir, message)
        ("", r, r, r"export_dir=.*R is the output directory output.dir=.*R: the export replaces its directory "
                   r"whole and would delete the run's metrics; give output.export_dir a directory of its own"),
        (r, "", r, "is the checkpoint directory checkpoint.dir=.*would delete the checkpoints"),
        (r / "ckpt", r / "out", r, "holds the checkpoint directory"),
        (r, "", r / "export", "is inside the checkpoint directory"),
        ("", r / "out", r, "holds the output directory"),
    ]
    for ckpt_dir, out_dir, export_dir, message in cases:
        cfg = tiny_config(tmp_path)
        cfg.checkpoint.dir, cfg.output.dir, cfg.output.export_dir = str(ckpt_dir), str(out_dir), str(export_dir)
        with pytest.raises(OutputPathError, match=message):
            train(cfg, on_step=lambda *a: pytest.fail("trained"))
    assert not r.exists()  # nothing was created
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    cfg = tiny_config(tmp_path)
    cfg.output.export_dir = str(tmp_path / "mine")
    with pytest.raises(ExportTargetError, match=r"output.export_dir: .*holds files that are not a dms-jax export \(notes"):
        train(cfg, on_step=lambda *a: pytest.fail("trained"))
    # the layout of the configs in configs/ is fine: checkpoints and export inside the output dir
    cfg = tiny_config(tmp_path, steps=1)
    cfg.checkpoint.dir, cfg.output.dir, cfg.output.export_dir = str(r / "checkpoints"), str(r), str(r / "export")
    assert train(cfg).export_dir == str(r / "export")


def test_vanished_gradients_are_reported_and_recorded_in_the_export(tmp_path):
    """learning_rate=1e6 saturates the decisions after one step: the gradient norm is exactly 0
    from step 2 on. The run says so (log, metrics, result) and its export records it."""
    cfg = tiny_config(tmp_path, steps=5, learning_rate=1e6)
    cfg.output.update(dir=str(tmp_path / "run"), export_dir=str(tmp_path / "export"))
    result = train(cfg)
    assert [h["grad_norm"] == 0 for h in result.history] == [False, True, True, True, True]
    assert [h["zero_grad_steps"] for h in result.history] == [0, 1, 2, 3, 4]
    assert "warning" not in result.history[2] and result.history[3]["warning"].startswith("gradients vanished")
    assert len(result.warnings) == 1 and re.match(
        r"gradients vanished: the gradient norm has been exactly 0 for 3 steps \(since step 2\).*lower "
        r"train\.learning_rate", result.warnings[0])
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert logged[-1]["warning"].startswith("gradients vanished") and logged[-1]["zero_grad_steps"] == 4
    exported = json.load(open(tmp_path / "export" / "config.json"))
    assert exported["dms_jax_training"]["warnings"] == result.warnings
    assert exported["dms_jax_training"]["reached_cr"] == exported["dms"]["target_cr"] == pytest.approx(
        result.history[-1]["achieved_cr"], abs=0.006)


def test_compression_far_behind_the_schedule_is_reported():
    from dms_jax.train.health import TrainingHealth

    def run(achieved):
        health = TrainingHealth(cr_steps=20)
        records = [{"step": s, "grad_norm": 1.0, "achieved_cr": a, "target_cr": min(1 + 3 * s / 20, 4.0)}
                   for s, a in enumerate(achieved, 1)]
        for r in records:
            health.update(r, r["step"])
        return records, health

    # the tiny retrofit's own curve: lagging while the target ramps, ~0.8 of its evicted fraction after
    healthy, health = run([1.0 + 0.07 * s for s in range(20)] + [2.4, 2.5, 2.6, 2.7, 2.6, 2.7, 2.8, 2.8, 2.7, 2.5, 2.9])
    assert health.warnings == [] and health.final(2.7, 4.0) == []
    # vanished gradients (lr 1e6): stuck near CR 1.7 against 4
    stuck, health = run([1.7] * 31)
    assert all("warning" not in r for r in stuck[:29])  # nothing until 10 steps after the ramp
    assert stuck[29]["warning"] == ("compression far behind the schedule: CR 1.70 reached against 4.00 asked "
                                    "(mean of the last 10 steps)")
    assert health.final(1.7, 4.0)[-1] == ("compression far behind the schedule: the run reached CR 1.70 against "
                                          "4.00 asked at its end")


def test_a_torn_metrics_line_is_skipped_by_name(tmp_path, caplog):
    from dms_jax.train.loop import reached_compression_ratio
    from dms_jax.train.metrics import truncate_records

    path = tmp_path / "metrics.jsonl"
    records = [json.dumps({"step": s, "achieved_cr": 2.0 + s / 10}) for s in range(1, 11)]
    path.write_text("\n".join(records[:9]) + "\n" + records[9][:-7])  # killed while writing step 10
    with caplog.at_level("WARNING"):
        assert reached_compression_ratio([], str(path), 9) == 2.9  # the last tenth of 9 steps: step 9
        assert reached_compression_ratio([], str(path), 10) is None  # step 10 was never written whole
    assert f"{path}, line 10: skipped, not a JSON record" in caplog.text
    assert truncate_records(str(path), 8) == 2  # a resume at step 8: steps 9 and the torn 10 go
    assert [json.loads(line)["step"] for line in open(path)] == list(range(1, 9))
