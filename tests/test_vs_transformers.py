"""benchmarks/vs_transformers.py at a seconds scale: its workers in this process on its tiny shape.

Checks what its table rests on (never its timings): dms_jax `full` decodes the same greedy
tokens as transformers from the same weights, the forced decisions reach the asked flag rate,
and the dms caches are smaller than the full one.
"""
import importlib.util
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    spec = importlib.util.spec_from_file_location(
        "vs_transformers", os.path.join(REPO, "benchmarks", "vs_transformers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model_dir = module.build_hf_model("tiny", str(tmp_path_factory.mktemp("tiny")))
    return module, model_dir


def test_full_matches_transformers_and_dms_holds_less(bench):
    module, model_dir = bench
    job = dict(model_dir=model_dir, context=96, batch=2, new_tokens=3, window=16, chunk=32)
    ref = module.run_transformers(dict(job, system="transformers"))
    full = module.run_dms_jax(dict(job, system="full"))
    assert full["tokens"] == ref["tokens"]  # greedy, 1 + 3 tokens per row
    assert ref["kv_bytes"] == 2 * 2 * 2 * (96 + 3) * 2 * 16 * 4  # L, B, Hkv, tokens, K+V, D, f32
    for system in ("dms4", "dms8"):
        dms = module.run_dms_jax(dict(job, system=system))
        assert dms["cr"] > 1.5 and dms["kv_bytes"] < full["kv_bytes"]
        assert dms["overflow"] >= 0  # reported (a tiny model's heads vary; the table shows it)


def test_bfloat16_workers_run_both_systems_in_bfloat16(bench, tmp_path):
    """`--dtype bfloat16` (the GPU runs' default): a bfloat16 checkpoint, both systems' K/V in
    bfloat16 (half the float32 bytes), the forced decisions still reach the flag rate."""
    module, _ = bench
    model_dir = module.build_hf_model("tiny", str(tmp_path / "bf16"), dtype="bfloat16")
    job = dict(model_dir=model_dir, context=96, batch=2, new_tokens=3, window=16, chunk=32,
               dtype="bfloat16")
    ref = module.run_transformers(dict(job, system="transformers"))
    assert ref["kv_bytes"] == 2 * 2 * 2 * (96 + 3) * 2 * 16 * 2  # L, B, Hkv, tokens, K+V, D, bf16
    full = module.run_dms_jax(dict(job, system="full"))
    dms = module.run_dms_jax(dict(job, system="dms8-paged"))
    assert full["kv_held"] == ref["kv_bytes"]
    assert full["tokens"][0][0] == ref["tokens"][0][0]  # the prefill's token
    assert dms["cr"] > 1.5 and dms["kv_bytes"] < full["kv_bytes"]


def test_the_table_reports_device_memory_when_measured(bench):
    module, _ = bench
    fig = dict(prefill_s=1.0, decode_ms=10.0, cr=1.0, kv_bytes=1 << 20, max_rss=1 << 28)
    gpu = {("gqa-1b", 8192, 8): {"transformers": dict(fig, device_peak=3 << 30),
                                 "full": dict(fig, device_peak=1 << 30)}}
    text = module.table(gpu, ["transformers", "full"])
    assert "peak GPU MiB transformers/full" in text and "| 3072/1024 |" in text
    cpu = {k: {s: {f: v for f, v in r.items() if f != "device_peak"} for s, r in by.items()}
           for k, by in gpu.items()}
    assert "peak RSS MiB" in module.table(cpu, ["transformers", "full"])


@pytest.mark.parametrize("cr", [4, 8])
def test_forced_decisions_reach_the_flag_rate(bench, cr):
    import dms_jax
    from dms_jax import DMSConfig

    module, model_dir = bench
    model = dms_jax.from_pretrained(model_dir, dms=DMSConfig(mode="adapter", window=16,
                                                             scale=100.0, offset=-1.0))
    prompt = module.prompts_for(model.config.vocab_size, 1, 256, seed=7)
    rate = module.force_flag_rate(model, prompt, 1.0 - 1.0 / cr)
    assert rate == pytest.approx(1.0 - 1.0 / cr, abs=0.01)
    out, _ = model.eval_forward(np.asarray(prompt))
    per_head = (np.asarray(out.decisions) > 0).mean(axis=(1, 2))  # [L, Hkv]
    np.testing.assert_allclose(per_head, 1.0 - 1.0 / cr, atol=0.02)


def test_saved_runs_merge_into_one_table_and_plot(bench, tmp_path, capsys):
    """Runs at different contexts, saved with --json, give one table and one plot (--merge);
    a later run's figures replace an earlier one's for the same configuration."""
    module, _ = bench
    fig = dict(prefill_s=1.0, decode_ms=10.0, cr=1.0, kv_bytes=1 << 20, max_rss=1 << 28,
               tokens=[[1, 2]])
    first = {("kv", 1024, 4): {"transformers": fig, "full": dict(fig, prefill_s=2.0)}}
    second = {("kv", 2048, 4): {"transformers": dict(fig, decode_ms=20.0),
                                "full": dict(fig, decode_ms=5.0)},
              ("kv", 1024, 4): {"full": dict(fig, prefill_s=0.5)}}
    paths = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    module.save_results(first, paths[0])
    module.save_results(second, paths[1])
    png = tmp_path / "merged.png"
    results = module.main(["--merge", ",".join(paths), "--plot", str(png)])
    assert list(results) == [("kv", 1024, 4), ("kv", 2048, 4)]
    assert results[("kv", 1024, 4)]["full"]["prefill_s"] == 0.5  # the later run's
    out = capsys.readouterr().out
    assert "| kv | 1k | 4 | 1.00 | 10.0 | 0.50 s (2.00x) |" in out
    assert "| kv | 2k | 4 | 1.00 | 20.0 | 1.00 s (1.00x) | 5.0 (4.00x) |" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    module.save_results({("kv", 1024, 4): {"full": fig}}, str(tmp_path / "no_tf.json"))
    with pytest.raises(SystemExit, match="transformers"):
        module.main(["--merge", str(tmp_path / "no_tf.json")])


def test_short_runs_are_repeated_and_their_medians_reported(bench):
    """A configuration timed in under MIN_TIMED_S is run again (at most `most` times) and the
    record holds the median prefill and decode times; a long one runs once."""
    module, _ = bench
    times = iter([(0.1, 1.0), (0.3, 3.0), (0.2, 2.0), (9.0, 9.0)])

    def once():
        prefill_s, decode_ms = next(times)
        return dict(prefill_s=prefill_s, decode_ms=decode_ms, tokens=[[prefill_s]])

    run = module.repeated(once, most=3)
    assert (run["prefill_s"], run["decode_ms"], run["repeats"]) == (0.2, 2.0, 3)
    assert run["tokens"] == [[0.1]]  # the first run's record
    assert module.repeated(once, most=3)["repeats"] == 1  # 9 s timed: enough


@pytest.mark.parametrize("system,layout", [("dms8", "paged"), ("full", "slots")])
def test_profile_breaks_a_chunk_and_a_step_down_by_source_line(bench, tmp_path, capsys, system,
                                                               layout):
    """`--profile SHAPE,CTX,B,SYSTEM,LAYOUT`: a `dms<CR>` system gets the forced decisions of the
    table's, and the chunk's and the decode step's per-op times come out by source line."""
    module, _ = bench
    module.profile("tiny", 128, 2, system, layout, chunk=32, steps=2, window=16,
                   trace_dir=str(tmp_path))
    out = capsys.readouterr().out
    assert f"tiny {system} B=2: prefill chunk of 32 at position 96" in out
    assert out.count("all XLA ops") == 2 and "decode at 128" in out
