"""Layers under scan (ModelConfig.scan_layers) against the unrolled model as the reference.

The unrolled layout (one module per layer, a Python loop) is the reference: the same weights,
loaded from the same Hugging Face files or converted by `dms_jax.stacking`, must give the same
logits, decisions, alpha, compression ratio and gradients (remat on and off), the same HF files,
the same generated tokens and cache stats (slots and paged), the same training losses, and
parameter shardings with the "layers" axis in front.
"""
import copy
import dataclasses
import filecmp
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import dms_jax
from dms_jax import DMSConfig, stacking
from dms_jax import cache as kvcache
from dms_jax import sharding as shd
from dms_jax.generate import generate
from dms_jax.model import Decoder
from dms_jax.policies import get_policy
from dms_jax.train import train
from dms_jax.train.optim import merge_model, split_model
from tests.crash import Killed, kill_at
from tests.test_train_loop import REPO, losses_of, tiny_config

NEURON = DMSConfig(mode="neuron", window=4, offset=-2.0)  # decisions from q: many evictions


def _ids(seed, shape=(2, 24), vocab=97):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def scanned_copy(model):
    """The same weights in the stacked layout, converted by the stack rule (no HF files)."""
    cfg = model.config.replace(scan_layers=True)
    flat = {k: np.asarray(v) for k, v in split_model(model)[1].items()}
    graphdef, _, paths = split_model(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    stacked = stacking.stack_layers(flat, cfg.num_layers)
    return merge_model(graphdef, {k: jnp.asarray(v) for k, v in stacked.items()}, paths)


def assert_close(got, want, atol=1e-6, err_msg=""):
    assert (got is None) == (want is None), err_msg
    if want is not None:
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=atol, err_msg=err_msg)


# --------------------------------------------------------------------------------------------
# the stack rule


def test_stack_rule_round_trips_and_names_what_is_wrong():
    rng = np.random.default_rng(0)
    flat = {"embed.embedding": rng.standard_normal((5, 3)),
            **{f"layers.{i}.attn.q_proj.kernel": rng.standard_normal((3, 4)) for i in range(3)},
            **{f"layers.{i}.input_norm.scale": rng.standard_normal(3) for i in range(3)}}
    stacked = stacking.stack_layers(flat, 3)
    assert sorted(stacked) == ["embed.embedding", "layers.attn.q_proj.kernel", "layers.input_norm.scale"]
    assert stacked["layers.attn.q_proj.kernel"].shape == (3, 3, 4)
    np.testing.assert_array_equal(stacked["layers.attn.q_proj.kernel"][2], flat["layers.2.attn.q_proj.kernel"])
    back = stacking.unstack_layers(stacked, 3)
    assert sorted(back) == sorted(flat)
    for k in flat:
        np.testing.assert_array_equal(back[k], flat[k])
    assert stacking.is_stacked_path("layers.attn.q_proj.kernel")
    assert not stacking.is_stacked_path("layers.0.attn.q_proj.kernel")
    assert not stacking.is_stacked_path("embed.embedding")
    with pytest.raises(ValueError, match=r"layers \[2\] missing"):
        stacking.stack_layers({k: v for k, v in flat.items() if k != "layers.2.input_norm.scale"}, 3)
    with pytest.raises(ValueError, match="different shapes"):
        stacking.stack_layers({**flat, "layers.1.input_norm.scale": np.zeros(4)}, 3)
    with pytest.raises(ValueError, match="leading axis num_layers=4"):
        stacking.unstack_layers(stacked, 4)
    with pytest.raises(ValueError, match="already stacked"):
        stacking.stack_layers(stacked, 3)


# --------------------------------------------------------------------------------------------
# forward and gradients


@pytest.mark.parametrize("family", ["qwen3"])  # q/k norms; llama: the generate test, qwen2: gradients
def test_scanned_forward_equals_unrolled(hf_model_dirs, family):
    """Compiled forwards (eager op-by-op execution rounds differently from a compiled scan body,
    ~1e-6, and scale / tau = 1000 amplifies that in alpha)."""
    unrolled = dms_jax.from_pretrained(hf_model_dirs[family], dms=NEURON)
    scanned = dms_jax.from_pretrained(hf_model_dirs[family], dms=NEURON, scan_layers=True)
    assert scanned.config.scan_layers and not unrolled.config.scan_layers
    q = nnx.to_pure_dict(nnx.state(scanned))["layers"]["attn"]["q_proj"]["kernel"]
    assert q.shape == (unrolled.config.num_layers,) + unrolled.layers[0].attn.q_proj.kernel.shape
    ids = _ids(0)
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    key = jax.random.key(3)
    calls = {
        "plain": lambda m, ids, mask: m(ids, mask),
        "train": lambda m, ids, mask: m.train_forward(ids, key, mask),
        "eval": lambda m, ids, mask: m.eval_forward(ids, mask),
        "blockwise": lambda m, ids, mask: m.forward(ids, attention_mask=mask, mode="eval",
                                                     attention_impl="blockwise"),
    }
    for name, call in calls.items():
        want, got = (jax.jit(lambda ids, mask, m=m: call(m, ids, mask))(ids, mask) for m in (unrolled, scanned))
        if name == "eval":
            (want, want_cr), (got, got_cr) = want, got
            assert float(want_cr) > 1.3  # decisions really evict
            assert float(got_cr) == pytest.approx(float(want_cr), rel=1e-6)
        if name == "plain":
            assert_close(got, want, err_msg=name)
            continue
        for field in ("logits", "hidden", "decisions", "alpha"):
            assert_close(getattr(got, field), getattr(want, field), err_msg=f"{name} {field}")
        # z = scale * raw - offset (|z| ~ 100): 1e-6 on raw
        assert_close(got.decision_logits, want.decision_logits, atol=1e-6 * NEURON.scale,
                     err_msg=f"{name} decision_logits")
        assert got.decisions.shape == (unrolled.config.num_layers, 2, 24, unrolled.config.num_kv_heads)
    # eager calls too (op by op vs one compiled body: round-off only)
    assert_close(scanned(ids, mask), unrolled(ids, mask), atol=1e-5, err_msg="eager plain")
    assert_close(scanned.eval_forward(ids, mask)[0].decisions, unrolled.eval_forward(ids, mask)[0].decisions,
                 atol=0, err_msg="eager eval decisions")


@pytest.mark.parametrize("remat", [False, True])
def test_gradients_equal_unrolled(hf_model_dirs, remat):
    unrolled = dms_jax.from_pretrained(hf_model_dirs["qwen2"], dms=DMSConfig(window=4))  # adapter, biases
    graphdef, params, paths = split_model(unrolled)
    rng = np.random.default_rng(1)  # a random adapter, so decisions and their gradients are not trivial
    params = {k: (jnp.asarray(rng.standard_normal(v.shape) * 0.05, v.dtype) if ".dms_proj." in k else v)
              for k, v in params.items()}
    scanned = scanned_copy(merge_model(graphdef, params, paths))
    s_graphdef, s_params, s_paths = split_model(scanned)
    ids = _ids(2)

    def loss_fn(graphdef, paths):
        def loss(params):
            out = merge_model(graphdef, params, paths).train_forward(ids, jax.random.key(5), remat=remat)
            return jnp.mean(jax.nn.logsumexp(out.logits, -1)) + jnp.mean(out.alpha)
        return jax.jit(jax.value_and_grad(loss))

    want_loss, want = loss_fn(graphdef, paths)(params)
    got_loss, got = loss_fn(s_graphdef, s_paths)(s_params)
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6)
    got = stacking.unstack_layers({k: np.asarray(v) for k, v in got.items()}, scanned.config.num_layers)
    assert sorted(got) == sorted(want)
    assert np.abs(np.asarray(want["layers.1.attn.dms_proj.kernel"])).max() > 1e-4
    for k in want:
        assert_close(got[k], want[k], atol=1e-6, err_msg=k)


# --------------------------------------------------------------------------------------------
# Hugging Face files


def test_hf_export_is_byte_identical_and_loads_either_way(hf_model_dirs, tmp_path):
    unrolled = dms_jax.from_pretrained(hf_model_dirs["qwen3"], dms=NEURON)
    scanned = dms_jax.from_pretrained(hf_model_dirs["qwen3"], dms=NEURON, scan_layers=True)
    a = dms_jax.save_pretrained(unrolled, str(tmp_path / "unrolled"))
    b = dms_jax.save_pretrained(scanned, str(tmp_path / "scanned"))
    names = sorted(f for f in os.listdir(a) if not f.startswith("."))
    assert names == sorted(f for f in os.listdir(b) if not f.startswith("."))
    assert "model.safetensors" in names
    for name in names:
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name
    # sharded exports too (the index names one tensor per layer)
    c = dms_jax.save_pretrained(scanned, str(tmp_path / "sharded"), max_shard_bytes=20_000)
    assert os.path.exists(os.path.join(c, "model.safetensors.index.json"))
    want = split_model(unrolled)[1]
    for path in (b, c):
        back = split_model(dms_jax.from_pretrained(path))[1]  # unrolled
        assert sorted(back) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(want[k]), err_msg=k)
        stacked = split_model(dms_jax.from_pretrained(path, scan_layers=True))[1]
        for k, v in stacking.unstack_layers(stacked, unrolled.config.num_layers).items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(want[k]), err_msg=k)


# --------------------------------------------------------------------------------------------
# the KV-cache path


def assert_same_generation(got, want):
    assert got.sequences() == want.sequences()
    for field in dataclasses.fields(want.stats):
        if field.name.endswith("seconds"):
            continue
        w, g = getattr(want.stats, field.name), getattr(got.stats, field.name)
        if isinstance(w, str):
            assert g == w, field.name
        else:
            np.testing.assert_allclose(np.asarray(g, float), np.asarray(w, float), rtol=1e-6, err_msg=field.name)


@pytest.mark.parametrize("policy,layout", [("full", "slots"), ("dms", "slots"), ("dms", "paged"),
                                           ("snapkv", "slots")])
def test_generate_equals_unrolled(hf_model_dirs, policy, layout):
    """The scanned model runs the cache path under scan too: its cache is one StackedCache whose
    layer i is the unrolled model's cache i, token for token, and a continuation from it (dms)
    matches the unrolled one's."""
    from tests.test_generate import randomised_dms_model

    unrolled = randomised_dms_model(hf_model_dirs["llama"])
    scanned = scanned_copy(unrolled)
    prompts = [_ids(4 + n, (1, n))[0].tolist() for n in (17, 6, 25)]
    sizing = dict(capacity=64) if layout == "slots" else dict(page_size=4, target_cr=1.0)
    if policy == "snapkv":
        policy, sizing = get_policy("snapkv", obs_window=4), dict(budget=12)
    kw = dict(max_new_tokens=9, chunk_size=8, max_len=64, policy=policy, layout=layout, **sizing)
    want, got = generate(unrolled, prompts, **kw), generate(scanned, prompts, **kw)
    assert_same_generation(got, want)
    assert isinstance(got.state.cache, kvcache.StackedCache) and len(got.state.cache) == unrolled.config.num_layers
    for i, layer in enumerate(got.state.cache):
        jax.tree.map(np.testing.assert_array_equal, layer, want.state.cache[i])
    if policy == "dms":
        assert want.stats.compression_ratio > 1.5
        turn = [_ids(40 + n, (1, n))[0].tolist() for n in (3, 5, 1)]
        assert_same_generation(generate(scanned, turn, state=got.state, max_new_tokens=4),
                               generate(unrolled, turn, state=want.state, max_new_tokens=4))


def test_scanned_generate_on_a_split_pool_equals_unrolled_on_one_device(hf_model_dirs):
    """The stacked paged cache split over a mesh (rows over data x fsdp, KV heads over tensor,
    a pool per device): the step runs per device under shard_map inside the layer scan."""
    from tests.test_generate import randomised_dms_model

    unrolled = randomised_dms_model(hf_model_dirs["llama"])
    scanned = scanned_copy(unrolled)
    prompts = [_ids(7 + n, (1, n))[0].tolist() for n in (17, 6, 25, 11)]
    kw = dict(max_new_tokens=9, chunk_size=8, max_len=64, policy="dms", layout="paged", page_size=4,
              target_cr=1.0)
    want = generate(unrolled, prompts, **kw)
    got = generate(scanned, prompts, mesh=shd.make_mesh((2, 2, 2)), **kw)
    assert_same_generation(got, want)
    layers = got.state.cache.layers
    assert layers.shards.count == 8 and layers.num_free.shape == (unrolled.config.num_layers, 8)
    assert layers.pool_keys.sharding.spec == P(None, ("data", "fsdp", "tensor"))


def test_server_of_the_scanned_model_equals_the_unrolled_one(hf_model_dirs):
    """Continuous batching over a stacked paged pool: the same completions as the unrolled
    model's server (requests wait for pages, finished rows give them back, per layer under vmap)."""
    from dms_jax.serve import Server
    from tests.test_generate import randomised_dms_model

    unrolled = randomised_dms_model(hf_model_dirs["llama"])
    scanned = scanned_copy(unrolled)
    rng = np.random.default_rng(5)
    requests = [(rng.integers(0, 97, n).tolist(), m) for n, m in ((12, 5), (3, 6), (20, 2), (7, 4))]
    kw = dict(rows=2, max_len=32, page_size=4, target_cr=1.0, pool_pages=2 * 8 * unrolled.config.num_kv_heads,
              chunk_size=8)
    servers = [Server(m, **kw) for m in (unrolled, scanned)]
    want, got = (sorted(s.run(requests), key=lambda c: c.request_id) for s in servers)
    assert isinstance(servers[1].cache, kvcache.StackedCache)
    fields = lambda c: (c.tokens, c.held, c.seen, c.kv_reads_prefill, c.kv_reads_decode)  # noqa: E731
    assert [fields(c) for c in got] == [fields(c) for c in want]
    assert max(c.admitted_step for c in got) > 0  # some requests waited for pages
    assert servers[1].idle and servers[1].reserved_pages == 0
    assert all(int(layer.num_free) == servers[1].num_pages for layer in servers[1].cache)


def test_stacked_cache_reads_as_layers_and_refuses_the_other_form(hf_model_dirs):
    """A stacked plan builds a StackedCache whose layers are the tuple form's, it shards with the
    layer axis replicated in front, maps per layer under vmap, and a forward given the other form
    of cache (or a plan of the other layout) names the fix."""
    from dms_jax.plan import plan_inference
    from tests.test_generate import randomised_dms_model

    unrolled = randomised_dms_model(hf_model_dirs["llama"])
    scanned = scanned_copy(unrolled)
    plan = plan_inference(scanned.config, max_len=32, capacity=16)
    assert plan.stacked and not plan_inference(unrolled.config, max_len=32, capacity=16).stacked
    stacked = kvcache.init_cache(plan, 2)
    layers = unrolled.config.num_layers
    assert stacked.layers.keys.shape == (layers, 2, unrolled.config.num_kv_heads, 16, unrolled.config.head_dim)
    flat = kvcache.init_cache(dataclasses.replace(plan, stacked=False), 2)
    for got, want in zip(stacked, flat):
        jax.tree.map(np.testing.assert_array_equal, got, want)
    mapped = kvcache.map_layers(lambda c: c.replace(seen=c.seen + 1), stacked)
    assert isinstance(mapped, kvcache.StackedCache) and np.asarray(mapped.layers.seen).tolist() == [[1, 1]] * layers
    mesh = shd.make_mesh((2, 2, 2))
    placed = shd.shard_cache(kvcache.init_cache(plan, 4), mesh)  # 4 rows over data x fsdp
    assert placed.layers.keys.sharding.spec == P(None, ("data", "fsdp"), "tensor", None, None)
    assert placed.layers.seen.sharding.spec == P(None, ("data", "fsdp"))
    ids = jnp.asarray(_ids(1, (2, 4)))
    with pytest.raises(ValueError, match=r"not a StackedCache.*init_cache\(plan, batch\)"):
        scanned.forward(ids, cache=flat, plan=plan)
    with pytest.raises(ValueError, match="another model.*layers stacked"):
        unrolled.forward(ids, cache=stacked, plan=plan)


# --------------------------------------------------------------------------------------------
# sharding and the trainer


def test_stacked_parameters_get_the_layers_axis_first():
    mesh = shd.make_mesh((2, 2, 2))
    params = {"layers.attn.q_proj.kernel": jnp.zeros((3, 32, 32)),
              "layers.attn.dms_proj.kernel": jnp.zeros((3, 32, 2)),
              "layers.mlp.down_proj.kernel": jnp.zeros((3, 64, 32)),
              "layers.input_norm.scale": jnp.zeros((3, 32)),
              "layers.0.attn.q_proj.kernel": jnp.zeros((32, 32)),
              "final_norm.scale": jnp.zeros((32,))}
    assert shd.param_logical_axes("layers.attn.q_proj.kernel", 3) == ("layers", "embed", "heads")
    assert shd.param_logical_axes("layers.input_norm.scale", 2) == ("layers", "norm")
    specs = {k: s.spec for k, s in shd.param_shardings(params, mesh).items()}
    assert specs["layers.attn.q_proj.kernel"] == P(None, "fsdp", "tensor")
    assert specs["layers.attn.dms_proj.kernel"] == P(None, "fsdp", None)
    assert specs["layers.mlp.down_proj.kernel"] == P(None, "tensor", "fsdp")
    assert specs["layers.input_norm.scale"] == P(None, None)
    assert specs["layers.0.attn.q_proj.kernel"] == P("fsdp", "tensor")
    assert specs["final_norm.scale"] == P(None)


def test_trainer_with_stacked_layers_equals_unrolled_and_resumes(tmp_path):
    """Same seed: the stacked model is the same random model, so a sharded (2, 2, 2) run with remat
    gives the unrolled single-device run's losses; a killed stacked run resumes from its checkpoint
    bit-exactly, and its export is ordinary HF files that load into either layout."""
    cfg = tiny_config(tmp_path, steps=4, trainable="all", learning_rate=1e-3)
    ref = train(cfg, devices=jax.devices()[:1])
    scan = copy.deepcopy(cfg)
    scan.model.scan_layers = True
    scan.mesh.shape, scan.train.remat = (2, 2, 2), True
    sharded = train(scan)
    assert sharded.model.config.scan_layers
    # the first loss is a KL of ~6e-7 between nearly equal distributions: rounding noise, which
    # moves with the reduction order (the thread count of the host), hence the absolute tolerance
    np.testing.assert_allclose(losses_of(sharded), losses_of(ref), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(losses_of(sharded, "achieved_cr"), losses_of(ref, "achieved_cr"), rtol=1e-6)

    run = copy.deepcopy(cfg)
    run.model.scan_layers = True
    run.checkpoint.update(dir=str(tmp_path / "ckpt"), every=2, keep=3)
    run.output.update(dir=str(tmp_path / "run"), export_dir=str(tmp_path / "export"))
    with pytest.raises(Killed):
        train(run, on_step=kill_at(3))
    resumed = train(run)
    assert resumed.resumed_from == 2
    np.testing.assert_allclose(losses_of(resumed), losses_of(ref)[2:], rtol=1e-5, atol=1e-7)
    ids = _ids(6, (2, 32), vocab=512)
    want = resumed.model.eval_forward(ids)[0]
    for scan_layers in (False, True):
        got = dms_jax.from_pretrained(resumed.export_dir, scan_layers=scan_layers).eval_forward(ids)[0]
        assert_close(got.logits, want.logits, atol=1e-6, err_msg=f"export scan_layers={scan_layers}")
        np.testing.assert_array_equal(np.asarray(got.decisions), np.asarray(want.decisions))


def test_aot_compiles_the_scanned_train_step_with_the_unrolled_bytes():
    """`python -m dms_jax.aot train` on simulated devices (FSDP over 8): the scanned step holds the
    same weights and optimizer bytes per device as the unrolled one."""
    from dms_jax.aot import TrainSettings, compile_train
    from dms_jax.train.cli import load_config_file

    config = load_config_file(os.path.join(REPO, "configs", "tiny.py"))
    reports = {scan: compile_train(config, jax.devices()[:8], TrainSettings(mesh_shape=(1, 8, 1), remat=True,
                                                                             scan_layers=scan))
               for scan in (False, True)}
    assert reports[True].weights == reports[False].weights > 0
    assert reports[True].optimizer == reports[False].optimizer > 0


def test_aot_compiles_the_scanned_decode_with_the_unrolled_cache_bytes():
    """`python -m dms_jax.aot decode` on 8 simulated devices: the scanned prefill chunk and decode
    loop (a StackedCache) hold the same weight and cache bytes per device as the unrolled ones."""
    from dms_jax.aot import DecodeSettings, compile_decode
    from dms_jax.aot.shapes import model_config_for_recipe
    from dms_jax.train.cli import load_config_file

    cfg = model_config_for_recipe(load_config_file(os.path.join(REPO, "configs", "tiny.py")))
    settings = DecodeSettings(batch=8, context=256, policy="dms", chunk_size=64)
    got = {scan: compile_decode(cfg.replace(scan_layers=scan), jax.devices()[:8], settings) for scan in (False, True)}
    assert got[True]["capacity"] == got[False]["capacity"]
    for name in ("prefill", "decode"):
        assert got[True][name].cache == got[False][name].cache > 0
        assert got[True][name].weights == got[False][name].weights > 0


def test_a_checkpoint_of_the_other_layout_is_refused_naming_scan_layers():
    from dms_jax.train.checkpoint import ResumeError, check_layout

    unrolled = {"params": {"layers.0.attn.dms_proj.kernel": [[32, 2], "float32"]}, "loss": "distill"}
    stacked = {"params": {"layers.attn.dms_proj.kernel": [[2, 32, 2], "float32"]}, "loss": "distill"}
    with pytest.raises(ResumeError, match="its layers are stacked, this run's unrolled; set model.scan_layers=True"):
        check_layout({"layout": stacked}, unrolled, 4, "ckpt", "use a fresh checkpoint.dir")
    with pytest.raises(ResumeError, match="its layers are unrolled, this run's stacked; set model.scan_layers=False"):
        check_layout({"layout": unrolled}, stacked, 4, "ckpt", "use a fresh checkpoint.dir")
    with pytest.raises(ResumeError, match=r"loss differ\); use a fresh"):  # no hint when layouts agree
        check_layout({"layout": unrolled}, {**unrolled, "loss": "lm"}, 4, "ckpt", "use a fresh checkpoint.dir")


def test_big_recipes_use_the_scanned_layout():
    from dms_jax.aot.shapes import model_config_for_recipe
    from tests.test_train_loop import load_config_file

    for name in ("llama3_2_1b", "qwen_r1_1_5b", "qwen_r1_7b", "qwen3_8b", "qwen_r1_32b"):
        assert model_config_for_recipe(load_config_file(name)).scan_layers, name
    assert not model_config_for_recipe(load_config_file("tiny")).scan_layers


# --------------------------------------------------------------------------------------------
# the benchmark


def test_benchmark_runs_at_a_seconds_scale(capsys):
    spec = importlib.util.spec_from_file_location("scan_layers_bench", os.path.join(REPO, "benchmarks", "scan_layers.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--layers", "2", "--hidden", "32", "--head-dim", "8", "--heads", "4",
                          "--seq", "32", "--loss-chunk", "16", "--window", "4", "--steps", "1",
                          "--context", "40", "--decode-tokens", "4", "--policy", "dms"])
    train, gen = results["train"], results["generate"]
    assert train["scanned"]["loss"] == pytest.approx(train["unrolled"]["loss"], rel=1e-5)
    assert gen["scanned"]["tokens"] == gen["unrolled"]["tokens"]
    out = capsys.readouterr().out
    assert out.count("| scanned / unrolled |") == 2 and "same tokens from both layouts: True" in out
