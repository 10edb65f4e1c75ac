"""Hugging Face import / export against transformers itself (the independent reference)."""
import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dms_jax
from dms_jax.hf import CheckpointError
from tests import hf_models

TOL = 1e-4


def _ids(seed, shape=(3, 21), vocab=97):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_logits_match_transformers(hf_model_dirs, family):
    path = hf_model_dirs[family]
    reference = hf_models.load_torch(path)
    model = dms_jax.from_pretrained(path)
    ids = _ids(1)
    np.testing.assert_allclose(np.asarray(model(ids)), hf_models.torch_logits(reference, ids), atol=TOL, rtol=0)

    # a padded batch: row 0 right-padded, row 1 left-padded, row 2 full
    mask = np.ones_like(ids)
    mask[0, -6:] = 0
    mask[1, :4] = 0
    ours = np.asarray(model(ids, attention_mask=mask))
    theirs = hf_models.torch_logits(reference, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=TOL, rtol=0)


def test_family_features_are_read(hf_model_dirs):
    cfgs = {f: dms_jax.from_pretrained(hf_model_dirs[f]).config for f in hf_models.FAMILIES}
    assert cfgs["llama"].tie_word_embeddings and dict(cfgs["llama"].rope_scaling)["rope_type"] == "llama3"
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].o_bias
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 12
    assert cfgs["mistral"].sliding_window == 7
    assert all(c.num_kv_heads == 2 and c.num_heads == 6 for c in cfgs.values())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_round_trip_through_transformers(hf_model_dirs, family, tmp_path):
    model = dms_jax.from_pretrained(hf_model_dirs[family])
    ids = _ids(2)
    ours = np.asarray(model(ids))
    out = dms_jax.save_pretrained(model, str(tmp_path / "export"))
    reloaded_hf = hf_models.load_torch(out)  # transformers reads our export
    np.testing.assert_allclose(hf_models.torch_logits(reloaded_hf, ids), ours, atol=TOL, rtol=0)
    again = dms_jax.from_pretrained(out)  # and we read it back
    np.testing.assert_array_equal(np.asarray(again(ids)), ours)
    # and once more through transformers' own save
    reloaded_hf.save_pretrained(str(tmp_path / "hf_again"))
    third = dms_jax.from_pretrained(str(tmp_path / "hf_again"))
    np.testing.assert_allclose(np.asarray(third(ids)), ours, atol=TOL, rtol=0)


def test_dms_settings_survive_export(hf_model_dirs, tmp_path):
    dms = dms_jax.DMSConfig(mode="adapter", window=8)
    model = dms_jax.from_pretrained(hf_model_dirs["qwen2"], dms=dms)
    out = dms_jax.save_pretrained(model, str(tmp_path / "dms"))
    assert json.load(open(os.path.join(out, "config.json")))["dms"]["window"] == 8
    back = dms_jax.from_pretrained(out)
    assert back.config.dms == dms


def test_sharded_safetensors_load_identically(hf_model_dirs, tmp_path):
    model = dms_jax.from_pretrained(hf_model_dirs["qwen2"])
    out = dms_jax.save_pretrained(model, str(tmp_path / "sharded"), max_shard_bytes=20_000)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 2 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    ids = _ids(3)
    np.testing.assert_array_equal(np.asarray(dms_jax.from_pretrained(out)(ids)), np.asarray(model(ids)))
    reference = hf_models.load_torch(out)  # transformers reads the sharded layout too
    np.testing.assert_allclose(hf_models.torch_logits(reference, ids), np.asarray(model(ids)), atol=TOL, rtol=0)


def test_bfloat16_parameters_and_compute(hf_model_dirs):
    model = dms_jax.from_pretrained(hf_model_dirs["llama"], dtype="bfloat16", param_dtype="bfloat16")
    assert model.embed.embedding[...].dtype == jnp.bfloat16
    ref = np.asarray(dms_jax.from_pretrained(hf_model_dirs["llama"])(_ids(4)))
    got = np.asarray(model(_ids(4)))
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


# ---------------------------------------------------------------------------------------------- bad input


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_unknown_architecture_lists_supported(hf_model_dirs, tmp_path):
    d = _copy(hf_model_dirs["llama"], tmp_path / "m")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM.*MistralForCausalLM"):
        dms_jax.from_pretrained(d)


def _edit_tensors(d, edit):
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_model_dirs, tmp_path):
    d = _copy(hf_model_dirs["qwen2"], tmp_path / "m")
    _edit_tensors(d, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        dms_jax.from_pretrained(d)


def test_unexpected_tensor_is_named(hf_model_dirs, tmp_path):
    d = _copy(hf_model_dirs["qwen2"], tmp_path / "m")
    _edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.rotary.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*rotary"):
        dms_jax.from_pretrained(d)


def test_shape_mismatch_names_both_shapes(hf_model_dirs, tmp_path):
    d = _copy(hf_model_dirs["mistral"], tmp_path / "m")
    _edit_tensors(d, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((70, 48), np.float32)}))
    with pytest.raises(CheckpointError, match=r"up_proj\.weight.*\(70, 48\).*\(48, 72\)"):
        dms_jax.from_pretrained(d)


def test_pickle_checkpoints_refused_unless_opted_in(hf_model_dirs, tmp_path):
    import torch

    d = _copy(hf_model_dirs["llama"], tmp_path / "m")
    tensors = load_file(os.path.join(d, "model.safetensors"))
    os.remove(os.path.join(d, "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="pickle.*allow_pickle=True"):
        dms_jax.from_pretrained(d)
    ids = _ids(5)
    np.testing.assert_array_equal(
        np.asarray(dms_jax.from_pretrained(d, allow_pickle=True)(ids)),
        np.asarray(dms_jax.from_pretrained(hf_model_dirs["llama"])(ids)),
    )


def test_bad_token_ids_and_rank(hf_model_dirs):
    model = dms_jax.from_pretrained(hf_model_dirs["llama"])
    with pytest.raises(ValueError, match=r"\[0, 97\).*97"):
        model(np.array([[1, 2, 97]]))
    with pytest.raises(ValueError, match=r"\[0, 97\).*-1"):
        model(np.array([[-1, 2]]))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(np.array([1, 2, 3]))


def test_failed_export_leaves_nothing_that_looks_valid(hf_model_dirs, tmp_path, monkeypatch):
    import dms_jax.hf as hf

    model = dms_jax.from_pretrained(hf_model_dirs["llama"])
    target = tmp_path / "export"

    def broken_config(cfg):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf, "hf_config_from_model_config", broken_config)
    with pytest.raises(RuntimeError, match="disk full"):
        dms_jax.save_pretrained(model, str(target))
    assert not target.exists()
    assert os.listdir(tmp_path) == []  # no temporary directory left behind either


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        dms_jax.from_pretrained(str(tmp_path / "nope"))


def test_tokenizer_travels_with_the_model(tmp_path):
    from dms_jax.assets import TINY_MODEL_DIR

    tok = dms_jax.load_tokenizer(TINY_MODEL_DIR)
    model = dms_jax.from_pretrained(TINY_MODEL_DIR)
    assert tok is not None and len(tok) == model.config.vocab_size
    out = dms_jax.save_pretrained(model, str(tmp_path / "copy"))
    again = dms_jax.load_tokenizer(out)
    text = "def forward(self, x): return x"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert dms_jax.load_tokenizer(str(tmp_path)) is None  # a directory without one


# ------------------------------------------------------------------------------ nothing lost, nothing silent


def test_export_never_replaces_a_directory_holding_other_files(hf_model_dirs, tmp_path, monkeypatch):
    from dms_jax.export_target import MARKER, ExportTargetError

    model = dms_jax.from_pretrained(hf_model_dirs["llama"])
    user_dir = tmp_path / "thesis"
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("years of work")
    with pytest.raises(ExportTargetError, match=r"thesis.*holds files that are not a dms-jax export \(thesis\.tex\)"):
        dms_jax.save_pretrained(model, str(user_dir))
    assert os.listdir(user_dir) == ["thesis.tex"] and (user_dir / "thesis.tex").read_text() == "years of work"
    monkeypatch.chdir(user_dir)  # "." is the working directory holding the user's files
    with pytest.raises(ExportTargetError, match="thesis.tex"):
        dms_jax.save_pretrained(model, ".")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")  # even empty, the working directory is never replaced
    with pytest.raises(ExportTargetError, match="current working directory"):
        dms_jax.save_pretrained(model, ".")
    (tmp_path / "notes.txt").write_text("notes")
    with pytest.raises(ExportTargetError, match="is a file"):
        dms_jax.save_pretrained(model, str(tmp_path / "notes.txt"))
    assert (tmp_path / "notes.txt").read_text() == "notes"
    assert sorted(os.listdir(tmp_path)) == ["empty", "notes.txt", "thesis"]  # no temporaries either

    # a previous export is replaced whole; once a user adds a file to it, it is not
    out = tmp_path / "export"
    dms_jax.save_pretrained(model, str(out))
    marker = json.load(open(out / MARKER))
    assert set(marker["files"]) == set(os.listdir(out)) and "config.json" in marker["files"]
    qwen = dms_jax.from_pretrained(hf_model_dirs["qwen3"])
    dms_jax.save_pretrained(qwen, str(out))
    assert json.load(open(out / "config.json"))["model_type"] == "qwen3"
    (out / "README.md").write_text("my notes on this model")
    with pytest.raises(ExportTargetError, match="README.md"):
        dms_jax.save_pretrained(model, str(out))
    assert (out / "README.md").read_text() == "my notes on this model"
    # an HF model directory without a marker (config, weights, generation config) may be replaced
    plain = _copy(hf_model_dirs["qwen2"], tmp_path / "plain")
    dms_jax.save_pretrained(model, plain)
    assert json.load(open(os.path.join(plain, "config.json")))["model_type"] == "llama"


def test_export_removes_its_own_stale_temporaries_only(hf_model_dirs, tmp_path):
    model = dms_jax.from_pretrained(hf_model_dirs["llama"])
    dead = 2 ** 22 + 12345  # above Linux's pid_max: no such process
    stale = [f".export.tmp-{dead}-abc_12", f".export.old-{dead}-x7y8z9", ".export.tmp-k3j2h1g0"]
    kept = [f".export.tmp-{os.getppid()}-live12", f".other.tmp-{dead}-abc_12", ".export.tmpfoo", "export.tmp-1-a"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 100)
    dms_jax.save_pretrained(model, str(tmp_path / "export"))
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["export"])


def _relabel(path, tensor, new_dtype):
    """Rewrite a safetensors header's dtype entry for `tensor` (same byte size, data untouched)."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header[tensor]["dtype"] = new_dtype
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    open(path, "wb").write(raw[:8] + text + raw[8 + n:])


def test_a_tensor_relabelled_as_integers_is_refused(hf_model_dirs, tmp_path):
    d = _copy(hf_model_dirs["qwen2"], tmp_path / "m")
    _relabel(os.path.join(d, "model.safetensors"), "model.layers.1.mlp.up_proj.weight", "I32")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model\.safetensors "
                                              r"has dtype int32.*floating-point"):
        dms_jax.from_pretrained(d)


def test_nonfinite_weights_are_refused_unless_allowed(hf_model_dirs, tmp_path):
    d = _copy(hf_model_dirs["qwen2"], tmp_path / "m")

    def poison(t):
        t["model.layers.0.self_attn.q_proj.weight"][3, :2] = [np.nan, np.inf]
        t["model.norm.weight"][0] = -np.inf

    _edit_tensors(d, poison)
    with pytest.raises(CheckpointError, match=r"2 tensor\(s\) hold NaN or Inf.*q_proj\.weight \(2 of 2304 values, "
                                              r"in .*model\.safetensors\).*model\.norm\.weight.*allow_nonfinite=True"):
        dms_jax.from_pretrained(d)
    with pytest.warns(RuntimeWarning, match=r"NaN or Inf.*q_proj\.weight.*model\.norm\.weight"):
        model = dms_jax.from_pretrained(d, allow_nonfinite=True)
    assert np.isnan(np.asarray(model.layers[0].attn.q_proj.kernel[...])).any()


def test_shard_paths_must_stay_inside_the_model_directory(hf_model_dirs, tmp_path):
    from dms_jax.hf_checks import ConfigError

    model = dms_jax.from_pretrained(hf_model_dirs["qwen2"])
    out = dms_jax.save_pretrained(model, str(tmp_path / "m" / "sharded"), max_shard_bytes=20_000)
    index_path = os.path.join(out, "model.safetensors.index.json")
    index = json.load(open(index_path))
    shard = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "outside").mkdir()
    shutil.move(os.path.join(out, shard), tmp_path / "outside" / shard)  # a valid shard, elsewhere
    original = dict(index["weight_map"])
    for elsewhere in (f"../../outside/{shard}", str(tmp_path / "outside" / shard)):
        index["weight_map"] = {k: elsewhere if v == shard else v for k, v in original.items()}
        json.dump(index, open(index_path, "w"))
        with pytest.raises(ConfigError, match=f"shard '{re.escape(elsewhere)}' lies outside the model directory"):
            dms_jax.from_pretrained(out)


def _set_config(d, edit):
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    cfg = edit(cfg)
    json.dump(cfg, open(path, "w"))


BAD_CONFIGS = {
    "a billion layers": (lambda c: {**c, "num_hidden_layers": 10 ** 9},
                         r"'num_hidden_layers' = 1000000000 must be in \[1, 1024\]"),
    "zero heads": (lambda c: {**c, "num_attention_heads": 0}, r"'num_attention_heads' = 0 must be in \[1, 1024\]"),
    "a JSON list": (lambda c: [c], "holds a JSON list, not an object"),
    "no hidden_size": (lambda c: {k: v for k, v in c.items() if k != "hidden_size"},
                       "required field 'hidden_size' is missing"),
    "vocab as a string": (lambda c: {**c, "vocab_size": "97"}, r"'vocab_size' = '97' must be an integer \(got a JSON str\)"),
    "heads not a multiple of kv heads": (lambda c: {**c, "num_key_value_heads": 4},
                                         "'num_attention_heads' = 6 is not a multiple of num_key_value_heads = 4"),
    "negative rope theta": (lambda c: {**c, "rope_theta": -1.0, "rope_parameters": None}, "'rope_theta' = -1.0 must be"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_json_names_the_file_and_field(hf_model_dirs, tmp_path, case):
    from dms_jax.hf_checks import ConfigError

    edit, message = BAD_CONFIGS[case]
    d = _copy(hf_model_dirs["qwen2"], tmp_path / "m")
    _set_config(d, edit)
    with pytest.raises(ConfigError, match=re.escape(os.path.join(d, "config.json")) + ": .*" + message):
        dms_jax.from_pretrained(d)


def test_malformed_json_files_are_named(hf_model_dirs, tmp_path):
    from dms_jax.assets import TINY_MODEL_DIR
    from dms_jax.hf_checks import ConfigError

    d = _copy(hf_model_dirs["qwen2"], tmp_path / "m")
    path = os.path.join(d, "config.json")
    open(path, "w").write(open(path).read()[:-30])
    with pytest.raises(ConfigError, match=re.escape(path) + r": not valid JSON \(.* at line \d+, column \d+\)"):
        dms_jax.from_pretrained(d)
    model = dms_jax.from_pretrained(hf_model_dirs["qwen2"])
    out = dms_jax.save_pretrained(model, str(tmp_path / "sharded"), max_shard_bytes=20_000)
    index = os.path.join(out, "model.safetensors.index.json")
    open(index, "w").write("{\"weight_map\": {")
    with pytest.raises(ConfigError, match=re.escape(index) + ": not valid JSON"):
        dms_jax.from_pretrained(out)
    tok = _copy(TINY_MODEL_DIR, tmp_path / "tok")
    tok_json = os.path.join(tok, "tokenizer.json")
    open(tok_json, "w").write(open(tok_json).read()[:1000])
    with pytest.raises(ConfigError, match=re.escape(tok_json) + ": not valid JSON"):
        dms_jax.load_tokenizer(tok)


def test_random_init_follows_initializer_range(tmp_path):
    """A model built from scratch starts as transformers starts it: every projection and the
    embedding normal(0, initializer_range) (the flax default, lecun-normal, left each layer's
    output ~10x the token embedding and kept the recall model from learning; docs/recall.md),
    norms at one, the DMS adapter at zero; the field survives a save and a load."""
    from flax import nnx

    from dms_jax.config import DMSConfig, ModelConfig
    from dms_jax.model import Decoder

    cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, initializer_range=0.05, dms=DMSConfig(mode="adapter"))
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, value = "/".join(map(str, path)), np.asarray(leaf.get_value())
        if "dms_proj" in name:
            assert not value.any(), name
        elif value.ndim == 2:
            assert abs(value.std() - 0.05) < 0.005, (name, value.std())
        else:
            assert np.all(value == 1.0), name  # RMSNorm scales
    dms_jax.save_pretrained(model, str(tmp_path / "m"))
    assert json.load(open(tmp_path / "m" / "config.json"))["initializer_range"] == 0.05
    assert dms_jax.from_pretrained(str(tmp_path / "m")).config.initializer_range == 0.05
    with pytest.raises(ValueError, match="initializer_range"):
        cfg.replace(initializer_range=0.0)
